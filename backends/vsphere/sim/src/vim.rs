//! The VI/JSON API subset (`/sdk/vim25/{release}/...`), following the vSphere Web Services docs.
//!
//! Contract: answers are shaped as VMware's VI/JSON specification says (every required property;
//! `tests/vim_conformance.rs` deserialises each one into `vim_rs`'s generated types); requests are
//! checked by each handler for the fields it needs (an `InvalidArgument` fault, HTTP 500, when one is
//! missing or mistyped). `ServiceInstance/ServiceInstance/content` is anonymous; unauthenticated
//! calls get 401 with a `NotAuthenticated` fault; an unknown member gets 404 with a `MethodNotFound`
//! fault; void methods and unset properties answer 204. Only the releases the simulated vCenter
//! serves exist (`Shared::serves`); a 7.0.x simulator has no VI/JSON at all (404). Endpoints: `SessionManager/SessionManager/Login|Logout`,
//! `VirtualMachine/{id}/CreateSnapshotEx_Task|CloneVM_Task|ReconfigVM_Task|QueryChangedDiskAreas`,
//! `VirtualMachineSnapshot/{id}/RevertToSnapshot_Task|RemoveSnapshot_Task`,
//! `Task/{id}/CancelTask`, and property reads `GET VirtualMachine/{id}/snapshot|config`,
//! `GET VirtualMachineSnapshot/{id}/config`, `GET Task/{id}/info`.

use crate::exchange::{Reply, Req, authenticated, end_session, new_session};
use crate::state::{Disk, DiskBacking, Fault, Inventory, NetworkKind, PowerState, Vm, VmConfig};
use crate::tasks::{self, moref};
use crate::{SIM_PASSWORD, SIM_USER, Shared, lock};
use axum::http::Method;
use serde_json::{Value, json};
use std::sync::Arc;

fn fault(status: u16, f: Fault) -> Reply {
    Reply::json(status, f.to_json())
}

fn invalid(msg: impl Into<String>) -> Reply {
    fault(500, Fault::new("InvalidArgument", msg))
}

/// `MethodNotFound` (with its `receiver` and `method`) for a member this simulator does not serve.
fn method_not_found(kind: &str, id: &str, member: &str) -> Reply {
    fault(
        404,
        Fault::new("MethodNotFound", format!("Method or property {member} of {kind} is not implemented"))
            .with("receiver", moref(kind, id))
            .with("method", json!(member)),
    )
}

pub(crate) fn handle(shared: &Arc<Shared>, req: &Req, burst: bool) -> Reply {
    {
        let mut stats = lock(&shared.stats);
        let rest: Vec<&str> = req.path.split('/').skip(4).collect();
        let entry = format!(
            "{} /sdk/vim25/{{release}}/{}/{{moId}}/{}",
            req.method,
            rest.first().unwrap_or(&""),
            rest.get(2).unwrap_or(&"")
        );
        if !stats.unchecked_endpoints.contains(&entry) {
            stats.unchecked_endpoints.push(entry);
        }
    }
    if shared.vim_release.is_none() {
        // A vCenter 7.0.x: `/sdk` speaks SOAP only, there is no VI/JSON endpoint.
        return Reply::empty(404);
    }
    if burst {
        return Reply::empty(503);
    }
    let segs: Vec<&str> = req.path.trim_start_matches("/sdk/vim25/").split('/').collect();
    let [release, kind, id, member] = segs.as_slice() else {
        let kind = segs.get(1).copied().unwrap_or("ServiceInstance");
        return method_not_found(kind, segs.get(2).copied().unwrap_or(""), segs.last().copied().unwrap_or(""));
    };
    if !shared.serves(release) {
        return fault(404, Fault::new("InvalidRequest", format!("release {release} is not served by this vCenter")));
    }
    if req.raw_body_invalid {
        return invalid("request body is not JSON");
    }
    let body = req.body.clone().unwrap_or(Value::Null);
    if (*kind, *id, *member) == ("ServiceInstance", "ServiceInstance", "content") && req.method == Method::GET {
        // Anonymous, as the specification allows: clients read it before logging in.
        return Reply::json(200, service_content(shared, release));
    }
    if *kind == "SessionManager" && *id == shared.session_manager && *member == "Login" && req.method == Method::POST {
        return login(shared, req, &body);
    }
    if !authenticated(shared, req, true) {
        return fault(
            401,
            Fault::new("NotAuthenticated", "The session is not authenticated.")
                .with("object", moref("SessionManager", &shared.session_manager))
                .with("privilegeId", json!("System.View")),
        );
    }
    let result = match (&req.method, *kind, *member) {
        (&Method::POST, "SessionManager", "Logout") if *id == shared.session_manager => {
            end_session(shared, req);
            lock(&shared.stats).vim_logouts += 1;
            return Reply::empty(204);
        }
        (&Method::GET, "Task", "info") => task_info(shared, id),
        (&Method::POST, "Task", "CancelTask") => match cancel(shared, id) {
            Ok(()) => return Reply::empty(204), // a void method
            Err(f) => Err(f),
        },
        (&Method::GET, "VirtualMachine", "snapshot") => match vm_snapshot_info(&lock(&shared.inv), id) {
            Ok(Value::Null) => return Reply::empty(204), // the property is unset
            other => other,
        },
        (&Method::GET, "VirtualMachine", "config") => {
            let inv = lock(&shared.inv);
            inv.vm(id).map(|vm| config_json(&inv, vm, &vm.name, &vm.config))
        }
        (&Method::GET, "VirtualMachineSnapshot", "config") => {
            let inv = lock(&shared.inv);
            inv.snapshot(id).and_then(|s| Ok(config_json(&inv, inv.vm(&s.vm)?, &s.name, &s.config)))
        }
        (&Method::POST, "VirtualMachine", "QueryChangedDiskAreas") => changed_areas(shared, id, &body),
        (&Method::POST, "VirtualMachine", "CreateSnapshotEx_Task") => create_snapshot(shared, id, &body),
        (&Method::POST, "VirtualMachine", "CloneVM_Task") => clone_vm(shared, id, &body),
        (&Method::POST, "VirtualMachine", "ReconfigVM_Task") => reconfig(shared, id, &body),
        (&Method::POST, "VirtualMachineSnapshot", "RevertToSnapshot_Task") => revert(shared, id, &body),
        (&Method::POST, "VirtualMachineSnapshot", "RemoveSnapshot_Task") => remove(shared, id, &body),
        _ => return method_not_found(kind, id, member),
    };
    match result {
        Ok(v) => Reply::json(200, v),
        Err(f) => fault(500, f),
    }
}

/// `about.version` for a release: `8.0.2.0` → `8.0.2`.
fn product_version(release: &str) -> String {
    let parts: Vec<&str> = release.split('.').collect();
    parts[..parts.len().min(3)].join(".")
}

/// `ServiceContent` as a vCenter of the simulator's release presents it.
fn service_content(shared: &Shared, _asked: &str) -> Value {
    let release = shared.vim_release.clone().unwrap_or_default();
    let version = product_version(&release);
    let mo = |kind: &str, id: &str| moref(kind, id);
    json!({
        "_typeName": "ServiceContent",
        "rootFolder": mo("Folder", "group-d1"),
        "propertyCollector": mo("PropertyCollector", "propertyCollector"),
        "viewManager": mo("ViewManager", "ViewManager"),
        "about": {
            "_typeName": "AboutInfo", "name": "VMware vCenter Server",
            "fullName": format!("VMware vCenter Server {version} build-22385739 (simulated)"),
            "vendor": "VMware, Inc.", "version": version, "build": "22385739",
            "localeVersion": "INTL", "localeBuild": "000", "osType": "linux-x64",
            "productLineId": "vpx", "apiType": "VirtualCenter", "apiVersion": release,
            "instanceUuid": "5c1d7a2e-3f40-4e8b-9a6c-7d8e9f0a1b2c",
            "licenseProductName": "VMware VirtualCenter Server", "licenseProductVersion": "8.0",
        },
        "setting": mo("OptionManager", "VpxSettings"),
        "userDirectory": mo("UserDirectory", "UserDirectory"),
        "sessionManager": mo("SessionManager", &shared.session_manager),
        "authorizationManager": mo("AuthorizationManager", "AuthorizationManager"),
        "perfManager": mo("PerformanceManager", "PerfMgr"),
        "eventManager": mo("EventManager", "EventManager"),
        "taskManager": mo("TaskManager", "TaskManager"),
        "searchIndex": mo("SearchIndex", "SearchIndex"),
        "fileManager": mo("FileManager", "FileManager"),
        "virtualDiskManager": mo("VirtualDiskManager", "virtualDiskManager"),
        "guestOperationsManager": mo("GuestOperationsManager", "guestOperationsManager"),
    })
}

fn login(shared: &Shared, req: &Req, body: &Value) -> Reply {
    let (Some(user), Some(password)) = (body["userName"].as_str(), body["password"].as_str()) else {
        return invalid("userName and password are required");
    };
    if lock(&shared.faults).reject_logins || user != SIM_USER || password != SIM_PASSWORD {
        return fault(
            500,
            Fault::new("InvalidLogin", "Cannot complete login due to an incorrect user name or password."),
        );
    }
    lock(&shared.stats).vim_logins += 1;
    let token = new_session(shared, true);
    let now = crate::now_rfc3339();
    let locale = body["locale"].as_str().unwrap_or("en");
    let agent = req.headers.get("user-agent").and_then(|v| v.to_str().ok()).unwrap_or("");
    let mut reply = Reply::json(
        200,
        json!({"_typeName": "UserSession", "key": uuid::Uuid::new_v4().to_string(), "userName": user,
               "fullName": "Administrator vsphere.local", "loginTime": now, "lastActiveTime": now,
               "locale": locale, "messageLocale": locale, "extensionSession": false,
               "ipAddress": "127.0.0.1", "userAgent": agent, "callCount": 0}),
    );
    reply.headers.push(("vmware-api-session-id", token));
    reply
}

fn task_info(shared: &Shared, id: &str) -> Result<Value, Fault> {
    let tasks = lock(&shared.tasks);
    let t = tasks.get(id).ok_or_else(|| Fault::not_found("Task", id))?;
    Ok(tasks::info_json(t))
}

fn cancel(shared: &Shared, id: &str) -> Result<(), Fault> {
    lock(&shared.stats).task_cancels += 1;
    let mut tasks = lock(&shared.tasks);
    let t = tasks.get_mut(id).ok_or_else(|| Fault::not_found("Task", id))?;
    t.cancel_requested = true;
    Ok(())
}

fn string<'a>(body: &'a Value, field: &str) -> Result<&'a str, Fault> {
    body[field].as_str().ok_or_else(|| Fault::new("InvalidArgument", format!("`{field}` must be a string")))
}

fn mo_value<'a>(v: &'a Value, kind: &str, field: &str) -> Result<&'a str, Fault> {
    match (v["type"].as_str(), v["value"].as_str()) {
        (Some(t), Some(val)) if t == kind => Ok(val),
        _ => Err(Fault::new("InvalidArgument", format!("`{field}` must be a {kind} reference"))),
    }
}

fn tree_json(inv: &Inventory, id: &str) -> Value {
    let Some(s) = inv.snapshots.get(id) else { return Value::Null };
    let children: Vec<Value> = s.children.iter().map(|c| tree_json(inv, c)).collect();
    json!({"_typeName": "VirtualMachineSnapshotTree", "snapshot": moref("VirtualMachineSnapshot", &s.id),
           "vm": moref("VirtualMachine", &s.vm), "name": s.name, "description": s.description, "id": s.number,
           "createTime": s.created, "state": s.power.vim(), "quiesced": false,
           "childSnapshotList": children})
}

fn vm_snapshot_info(inv: &Inventory, id: &str) -> Result<Value, Fault> {
    let vm = inv.vm(id)?;
    if vm.root_snapshots.is_empty() {
        return Ok(Value::Null); // the property is unset when the VM has no snapshot
    }
    let roots: Vec<Value> = vm.root_snapshots.iter().map(|r| tree_json(inv, r)).collect();
    let mut info = json!({"_typeName": "VirtualMachineSnapshotInfo", "rootSnapshotList": roots});
    if let Some(current) = &vm.current_snapshot {
        info["currentSnapshot"] = moref("VirtualMachineSnapshot", current);
    }
    Ok(info)
}

/// A disk backing (or its parent) in VI/JSON form.
fn disk_backing(d: &Disk, file: &str, parent: bool) -> Value {
    let mut b = match &d.backing {
        DiskBacking::Flat => json!({"_typeName": "VirtualDiskFlatVer2BackingInfo", "fileName": file,
            "datastore": moref("Datastore", "datastore-11"), "diskMode": "persistent", "split": false,
            "writeThrough": false, "thinProvisioned": true, "eagerlyScrub": false, "sharing": "sharingNone"}),
        DiskBacking::Sparse => json!({"_typeName": "VirtualDiskSparseVer2BackingInfo", "fileName": file,
            "datastore": moref("Datastore", "datastore-11"), "diskMode": "persistent", "split": false,
            "writeThrough": false, "spaceUsedInKB": 1024}),
        DiskBacking::Rdm { lun_uuid } => json!({"_typeName": "VirtualDiskRawDiskMappingVer1BackingInfo",
            "fileName": file, "datastore": moref("Datastore", "datastore-11"), "lunUuid": lun_uuid,
            "deviceName": format!("/vmfs/devices/disks/naa.{}", &lun_uuid[lun_uuid.len().saturating_sub(32)..]),
            "compatibilityMode": "virtualMode", "diskMode": "persistent", "sharing": "sharingNone"}),
    };
    if !parent {
        b["uuid"] = json!(format!("6000C29{:01x}-{}", d.key % 16, d.cbt_epoch.get(9..).unwrap_or("0000")));
    }
    b
}

/// `VirtualMachineConfigInfo` with every property the specification requires and a full device
/// list: PCI and IDE controllers, a paravirtual SCSI controller, a CD-ROM, disks (flat, sparse or
/// RDM backings; `parent` on linked clones) and NICs (standard, distributed or opaque backings).
fn config_json(inv: &Inventory, vm: &Vm, name: &str, c: &VmConfig) -> Value {
    let connect = |connected: bool| {
        json!({"_typeName": "VirtualDeviceConnectInfo", "startConnected": connected, "allowGuestControl": true,
               "connected": connected, "status": if connected { "ok" } else { "untried" }})
    };
    let desc = |label: &str, summary: &str| json!({"_typeName": "Description", "label": label, "summary": summary});
    let disk_keys: Vec<i32> = c.disks.iter().map(|d| d.key).collect();
    let nic_keys: Vec<i32> = c.nics.iter().map(|n| n.key).collect();
    let pci_devices: Vec<i32> = std::iter::once(1000).chain(nic_keys.iter().copied()).collect();
    let mut devices = vec![
        json!({"_typeName": "VirtualIDEController", "key": 200, "deviceInfo": desc("IDE 0", "IDE 0"), "busNumber": 0}),
        json!({"_typeName": "VirtualIDEController", "key": 201, "deviceInfo": desc("IDE 1", "IDE 1"), "busNumber": 1, "device": [3002]}),
        json!({"_typeName": "VirtualPCIController", "key": 100, "deviceInfo": desc("PCI controller 0", "PCI controller 0"),
               "busNumber": 0, "device": pci_devices}),
        json!({"_typeName": "ParaVirtualSCSIController", "key": 1000, "deviceInfo": desc("SCSI controller 0", "VMware paravirtual SCSI"),
               "controllerKey": 100, "unitNumber": 3, "busNumber": 0, "device": disk_keys, "hotAddRemove": true,
               "sharedBus": "noSharing", "scsiCtlrUnitNumber": 7}),
        json!({"_typeName": "VirtualCdrom", "key": 3002, "deviceInfo": desc("CD/DVD drive 1", "Remote device"),
               "backing": {"_typeName": "VirtualCdromRemotePassthroughBackingInfo", "deviceName": "", "useAutoDetect": false, "exclusive": false},
               "connectable": connect(false), "controllerKey": 201, "unitNumber": 0}),
    ];
    for (i, d) in c.disks.iter().enumerate() {
        let mut backing = disk_backing(d, &d.file, false);
        if c.cbt {
            backing["changeId"] = json!(d.change_id());
        }
        if let Some(p) = &d.parent_file {
            backing["parent"] = disk_backing(d, p, true);
        }
        let unit = if i >= 7 { i + 1 } else { i }; // unit 7 is the controller itself
        devices.push(json!({"_typeName": "VirtualDisk", "key": d.key,
            "deviceInfo": desc(&d.label, &format!("{} KB", d.capacity / 1024)),
            "backing": backing, "controllerKey": 1000, "unitNumber": unit,
            "capacityInKB": d.capacity / 1024, "capacityInBytes": d.capacity,
            "shares": {"_typeName": "SharesInfo", "shares": 1000, "level": "normal"},
            "storageIOAllocation": {"_typeName": "StorageIOAllocationInfo", "limit": -1,
                                    "shares": {"_typeName": "SharesInfo", "shares": 1000, "level": "normal"}, "reservation": 0},
            "diskObjectId": format!("{}-{}", vm.id.trim_start_matches("vm-"), d.key),
            "nativeUnmanagedLinkedClone": false}));
    }
    for (i, n) in c.nics.iter().enumerate() {
        let net = inv.network_by_id(&n.network);
        let net_name = net.map(|x| x.name.clone()).unwrap_or_default();
        let backing = match net.map(|x| &x.kind) {
            Some(NetworkKind::Distributed { switch_uuid, portgroup_key }) => json!({
                "_typeName": "VirtualEthernetCardDistributedVirtualPortBackingInfo",
                "port": {"_typeName": "DistributedVirtualSwitchPortConnection", "switchUuid": switch_uuid,
                         "portgroupKey": portgroup_key, "portKey": format!("{}", n.key - 3900),
                         "connectionCookie": n.key * 7 + 11}}),
            Some(NetworkKind::Opaque { opaque_id, opaque_type }) => json!({
                "_typeName": "VirtualEthernetCardOpaqueNetworkBackingInfo",
                "opaqueNetworkId": opaque_id, "opaqueNetworkType": opaque_type}),
            _ => json!({"_typeName": "VirtualEthernetCardNetworkBackingInfo", "deviceName": net_name,
                        "useAutoDetect": false, "network": moref("Network", &n.network)}),
        };
        devices.push(json!({"_typeName": "VirtualVmxnet3", "key": n.key, "deviceInfo": desc(&n.label, &net_name),
            "backing": backing, "connectable": connect(vm.power == PowerState::On), "controllerKey": 100,
            "unitNumber": 7 + i, "macAddress": n.mac, "addressType": "assigned", "wakeOnLanEnabled": true,
            "uptCompatibilityEnabled": true, "slotInfo": {"_typeName": "VirtualDevicePciBusSlotInfo", "pciSlotNumber": 192 + 32 * i}}));
    }
    let dir = format!("[datastore1] {}", vm.name);
    json!({
    "_typeName": "VirtualMachineConfigInfo",
    "changeVersion": crate::now_rfc3339(), "modified": "1970-01-01T00:00:00Z",
    "name": name, "guestFullName": "Debian GNU/Linux 12 (64-bit)", "version": "vmx-19",
    "uuid": vm.bios_uuid, "createDate": "2024-01-01T00:00:00Z", "instanceUuid": vm.instance_uuid,
    "npivTemporaryDisabled": true, "locationId": "564d1f0e-0c1a-2b3c-4d5e-6f708192a3b4",
    "template": false, "guestId": "debian12_64Guest", "alternateGuestName": "",
    "files": {"_typeName": "VirtualMachineFileInfo", "vmPathName": format!("{dir}/{}.vmx", vm.name),
              "snapshotDirectory": dir, "suspendDirectory": dir, "logDirectory": dir},
    "flags": {"_typeName": "VirtualMachineFlagInfo", "disableAcceleration": false, "enableLogging": true,
              "useToe": false, "runWithDebugInfo": false, "monitorType": "release", "htSharing": "any",
              "snapshotDisabled": false, "snapshotLocked": false, "diskUuidEnabled": false,
              "snapshotPowerOffBehavior": "powerOff", "recordReplayEnabled": false, "faultToleranceType": "unset",
              "cbrcCacheEnabled": false, "vvtdEnabled": false, "vbsEnabled": false},
    "defaultPowerOps": {"_typeName": "VirtualMachineDefaultPowerOpInfo", "powerOffType": "soft",
                        "suspendType": "hard", "resetType": "soft", "defaultPowerOffType": "soft",
                        "defaultSuspendType": "hard", "defaultResetType": "soft", "standbyAction": "checkpoint"},
    "hardware": {"_typeName": "VirtualHardware", "numCPU": c.cpus, "numCoresPerSocket": 1,
                 "autoCoresPerSocket": true, "memoryMB": c.memory_mib, "virtualICH7MPresent": false,
                 "virtualSMCPresent": false, "device": devices, "motherboardLayout": "i440bxHostBridge",
                 "simultaneousThreads": 1},
    "cpuHotAddEnabled": false, "cpuHotRemoveEnabled": false, "memoryHotAddEnabled": false,
    "changeTrackingEnabled": c.cbt, "firmware": "bios", "maxMksConnections": 40,
    "guestAutoLockEnabled": false, "swapPlacement": "inherit", "migrateEncryption": "opportunistic",
    "sgxInfo": {"_typeName": "VirtualMachineSgxInfo", "epcSize": 0, "flcMode": "unlocked", "requireAttestation": false},
        })
}

fn changed_areas(shared: &Shared, vm: &str, body: &Value) -> Result<Value, Fault> {
    let key =
        body["deviceKey"].as_i64().ok_or_else(|| Fault::new("InvalidArgument", "`deviceKey` must be an integer"))?;
    let start = body["startOffset"]
        .as_u64()
        .ok_or_else(|| Fault::new("InvalidArgument", "`startOffset` must be an integer"))?;
    let change_id = string(body, "changeId")?;
    let snapshot = match body.get("snapshot") {
        None | Some(Value::Null) => None,
        Some(s) => Some(mo_value(s, "VirtualMachineSnapshot", "snapshot")?),
    };
    let inv = lock(&shared.inv);
    if let Some(s) = snapshot
        && inv.snapshot(s)?.vm != vm
    {
        return Err(Fault::new("InvalidArgument", format!("snapshot {s} does not belong to {vm}")));
    }
    inv.changed_areas(vm, snapshot, key as i32, start, change_id)
}

fn task_ref(shared: &Arc<Shared>, name: &str, entity: &str, effect: tasks::Effect) -> Result<Value, Fault> {
    Ok(moref("Task", &tasks::start(shared, name, entity, effect)))
}

fn create_snapshot(shared: &Arc<Shared>, vm: &str, body: &Value) -> Result<Value, Fault> {
    let name = string(body, "name")?.to_string();
    let description = body["description"].as_str().unwrap_or("").to_string();
    if !body["memory"].is_boolean() {
        return Err(Fault::new("InvalidArgument", "`memory` must be a boolean"));
    }
    lock(&shared.inv).vm(vm)?;
    let vm_id = vm.to_string();
    task_ref(
        shared,
        "CreateSnapshotEx_Task",
        vm,
        Box::new(move |inv| {
            let id = inv.create_snapshot(&vm_id, &name, &description)?;
            Ok(Some(moref("VirtualMachineSnapshot", &id)))
        }),
    )
}

fn revert(shared: &Arc<Shared>, snap: &str, body: &Value) -> Result<Value, Fault> {
    let vm = lock(&shared.inv).snapshot(snap)?.vm.clone();
    let suppress = body["suppressPowerOn"].as_bool().unwrap_or(false);
    let snap = snap.to_string();
    task_ref(shared, "RevertToSnapshot_Task", &vm, Box::new(move |inv| inv.revert(&snap, suppress).map(|_| None)))
}

fn remove(shared: &Arc<Shared>, snap: &str, body: &Value) -> Result<Value, Fault> {
    let vm = lock(&shared.inv).snapshot(snap)?.vm.clone();
    let children = body["removeChildren"]
        .as_bool()
        .ok_or_else(|| Fault::new("InvalidArgument", "`removeChildren` must be a boolean"))?;
    let snap = snap.to_string();
    task_ref(
        shared,
        "RemoveSnapshot_Task",
        &vm,
        Box::new(move |inv| inv.remove_snapshot(&snap, children).map(|_| None)),
    )
}

fn reconfig(shared: &Arc<Shared>, vm: &str, body: &Value) -> Result<Value, Fault> {
    let spec = body
        .get("spec")
        .filter(|s| s["_typeName"] == "VirtualMachineConfigSpec")
        .cloned()
        .ok_or_else(|| Fault::new("InvalidArgument", "`spec` must be a VirtualMachineConfigSpec"))?;
    let cpus = spec.get("numCPUs").map(|v| v.as_u64().filter(|n| (1..=768).contains(n)).ok_or(()));
    let mem = spec.get("memoryMB").map(|v| v.as_u64().filter(|n| *n >= 4 && n % 4 == 0).ok_or(()));
    let (Ok(cpus), Ok(mem)) = (cpus.transpose(), mem.transpose()) else {
        return Err(Fault::new("InvalidArgument", "numCPUs must be 1..768 and memoryMB a positive multiple of 4"));
    };
    let cbt = spec.get("changeTrackingEnabled").and_then(Value::as_bool);
    lock(&shared.inv).vm(vm)?;
    let vm_id = vm.to_string();
    task_ref(
        shared,
        "ReconfigVM_Task",
        vm,
        Box::new(move |inv| {
            let vm = inv.vm_mut(&vm_id)?;
            if let Some(c) = cpus {
                vm.config.cpus = c as u32;
            }
            if let Some(m) = mem {
                vm.config.memory_mib = m;
            }
            if let Some(c) = cbt {
                vm.config.cbt = c;
            }
            Ok(None)
        }),
    )
}

fn clone_vm(shared: &Arc<Shared>, vm: &str, body: &Value) -> Result<Value, Fault> {
    let name = string(body, "name")?.to_string();
    let folder = mo_value(&body["folder"], "Folder", "folder")?.to_string();
    let spec = &body["spec"];
    if spec["_typeName"] != "VirtualMachineCloneSpec" || !spec["powerOn"].is_boolean() || !spec["template"].is_boolean()
    {
        return Err(Fault::new(
            "InvalidArgument",
            "`spec` must be a VirtualMachineCloneSpec with powerOn and template",
        ));
    }
    let location = &spec["location"];
    let linked = match location["diskMoveType"].as_str() {
        None | Some("moveAllDiskBackingsAndDisallowSharing") => false,
        Some("createNewChildDiskBacking") => true,
        Some(other) => return Err(Fault::new("InvalidArgument", format!("unsupported diskMoveType {other}"))),
    };
    let snapshot = match spec.get("snapshot") {
        None | Some(Value::Null) => None,
        Some(s) => Some(mo_value(s, "VirtualMachineSnapshot", "spec.snapshot")?.to_string()),
    };
    if linked && snapshot.is_none() {
        return Err(Fault::new("InvalidArgument", "createNewChildDiskBacking needs spec.snapshot"));
    }
    let mut nic_changes = Vec::new();
    for change in location["deviceChange"].as_array().into_iter().flatten() {
        let key =
            change["device"]["key"].as_i64().ok_or_else(|| Fault::new("InvalidArgument", "deviceChange.device.key"))?;
        let net = mo_value(&change["device"]["backing"]["network"], "Network", "deviceChange.device.backing.network")?;
        if change["operation"] != "edit" {
            return Err(Fault::new("InvalidArgument", "only deviceChange operation `edit` is supported"));
        }
        nic_changes.push((key as i32, net.to_string()));
    }
    let power_on = spec["powerOn"] == true;
    {
        let inv = lock(&shared.inv);
        inv.vm(vm)?;
        if let Some(s) = &snapshot
            && inv.snapshot(s)?.vm != vm
        {
            return Err(Fault::new("InvalidArgument", format!("snapshot {s} does not belong to {vm}")));
        }
        if !inv.folders.iter().any(|(f, _)| *f == folder) {
            return Err(Fault::new("ManagedObjectNotFound", format!("Folder {folder} does not exist")));
        }
        for (_, net) in &nic_changes {
            if inv.network_by_id(net).is_none() {
                return Err(Fault::not_found("Network", net));
            }
        }
    }
    let vm_id = vm.to_string();
    task_ref(
        shared,
        "CloneVM_Task",
        vm,
        Box::new(move |inv| {
            if inv.name_taken(&folder, &name) {
                return Err(Fault::new("DuplicateName", format!("The name '{name}' already exists."))
                    .with("name", json!(name))
                    .with("object", moref("Folder", &folder)));
            }
            let (mut config, guest) = match &snapshot {
                Some(s) => {
                    let s = inv.snapshot(s)?;
                    (s.config.clone(), s.guest.clone())
                }
                None => (inv.vm(&vm_id)?.config.clone(), inv.guests.get(&vm_id).cloned()),
            };
            for (key, net) in &nic_changes {
                let nic = config.nics.iter_mut().find(|n| n.key == *key).ok_or_else(|| {
                    Fault::new("InvalidDeviceSpec", format!("device {key} is not a NIC of {vm_id}"))
                        .with("property", json!("virtualDeviceSpec.device.key"))
                        .with("deviceIndex", json!(0))
                })?;
                nic.network = net.clone();
            }
            let id = inv.create_vm(&name, &folder, config, linked, guest);
            if power_on {
                inv.vm_mut(&id)?.power = PowerState::On;
            }
            Ok(Some(moref("VirtualMachine", &id)))
        }),
    )
}
