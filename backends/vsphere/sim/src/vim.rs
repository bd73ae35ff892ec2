//! The VI/JSON API subset (`/sdk/vim25/{release}/...`), following the vSphere Web Services docs.
//!
//! Contract: no OpenAPI document for VI/JSON is available here, so these endpoints are NOT checked
//! against a schema; each handler checks the fields it needs and answers an `InvalidArgument` fault
//! (HTTP 500, as VI/JSON does for faults) when one is missing or mistyped. Unauthenticated calls get
//! 401 with a `NotAuthenticated` fault. Endpoints: `SessionManager/SessionManager/Login|Logout`,
//! `VirtualMachine/{id}/CreateSnapshotEx_Task|CloneVM_Task|ReconfigVM_Task|QueryChangedDiskAreas`,
//! `VirtualMachineSnapshot/{id}/RevertToSnapshot_Task|RemoveSnapshot_Task`,
//! `Task/{id}/CancelTask`, and property reads `GET VirtualMachine/{id}/snapshot|config`,
//! `GET VirtualMachineSnapshot/{id}/config`, `GET Task/{id}/info`.

use crate::server::{Reply, Req, authenticated, end_session, new_session};
use crate::state::{Fault, Inventory, PowerState, VmConfig};
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
    if burst {
        return Reply::empty(503);
    }
    let segs: Vec<&str> = req.path.trim_start_matches("/sdk/vim25/").split('/').collect();
    let [release, kind, id, member] = segs.as_slice() else {
        return Reply::empty(404);
    };
    if !release.split('.').all(|p| p.parse::<u32>().is_ok()) {
        return Reply::empty(404);
    }
    if req.raw_body_invalid {
        return invalid("request body is not JSON");
    }
    let body = req.body.clone().unwrap_or(Value::Null);
    if *kind == "SessionManager" && *member == "Login" && req.method == Method::POST {
        return login(shared, &body);
    }
    if !authenticated(shared, req, true) {
        return fault(401, Fault::new("NotAuthenticated", "The session is not authenticated."));
    }
    let result = match (&req.method, *kind, *member) {
        (&Method::POST, "SessionManager", "Logout") => {
            end_session(shared, req);
            lock(&shared.stats).vim_logouts += 1;
            return Reply::empty(204);
        }
        (&Method::GET, "Task", "info") => task_info(shared, id),
        (&Method::POST, "Task", "CancelTask") => cancel(shared, id),
        (&Method::GET, "VirtualMachine", "snapshot") => vm_snapshot_info(&lock(&shared.inv), id),
        (&Method::GET, "VirtualMachine", "config") => {
            let inv = lock(&shared.inv);
            inv.vm(id).map(|vm| config_json(&inv, &vm.name, &vm.config))
        }
        (&Method::GET, "VirtualMachineSnapshot", "config") => {
            let inv = lock(&shared.inv);
            inv.snapshot(id).map(|s| config_json(&inv, &s.name, &s.config))
        }
        (&Method::POST, "VirtualMachine", "QueryChangedDiskAreas") => changed_areas(shared, id, &body),
        (&Method::POST, "VirtualMachine", "CreateSnapshotEx_Task") => create_snapshot(shared, id, &body),
        (&Method::POST, "VirtualMachine", "CloneVM_Task") => clone_vm(shared, id, &body),
        (&Method::POST, "VirtualMachine", "ReconfigVM_Task") => reconfig(shared, id, &body),
        (&Method::POST, "VirtualMachineSnapshot", "RevertToSnapshot_Task") => revert(shared, id, &body),
        (&Method::POST, "VirtualMachineSnapshot", "RemoveSnapshot_Task") => remove(shared, id, &body),
        _ => return Reply::empty(404),
    };
    match result {
        Ok(v) => Reply::json(200, v),
        Err(f) => fault(500, f),
    }
}

fn login(shared: &Shared, body: &Value) -> Reply {
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
    let mut reply = Reply::json(
        200,
        json!({"_typeName": "UserSession", "key": uuid::Uuid::new_v4().to_string(), "userName": user}),
    );
    reply.headers.push(("vmware-api-session-id", token));
    reply
}

fn task_info(shared: &Shared, id: &str) -> Result<Value, Fault> {
    let tasks = lock(&shared.tasks);
    let t = tasks.get(id).ok_or_else(|| Fault::new("ManagedObjectNotFound", format!("Task {id} does not exist")))?;
    Ok(tasks::info_json(t))
}

fn cancel(shared: &Shared, id: &str) -> Result<Value, Fault> {
    lock(&shared.stats).task_cancels += 1;
    let mut tasks = lock(&shared.tasks);
    let t =
        tasks.get_mut(id).ok_or_else(|| Fault::new("ManagedObjectNotFound", format!("Task {id} does not exist")))?;
    t.cancel_requested = true;
    Ok(Value::Null)
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
           "vm": moref("VirtualMachine", &s.vm), "name": s.name, "description": s.description,
           "createTime": "2024-01-01T00:00:00Z", "state": s.power.vim(), "quiesced": false,
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

fn config_json(inv: &Inventory, name: &str, c: &VmConfig) -> Value {
    let mut devices: Vec<Value> = c
        .disks
        .iter()
        .map(|d| {
            let mut backing = json!({"_typeName": "VirtualDiskFlatVer2BackingInfo", "fileName": d.file, "diskMode": "persistent"});
            if c.cbt {
                backing["changeId"] = json!(d.change_id());
            }
            if let Some(p) = &d.parent_file {
                backing["parent"] = json!({"_typeName": "VirtualDiskFlatVer2BackingInfo", "fileName": p});
            }
            json!({"_typeName": "VirtualDisk", "key": d.key, "deviceInfo": {"_typeName": "Description", "label": d.label, "summary": ""},
                   "capacityInBytes": d.capacity, "backing": backing})
        })
        .collect();
    devices.extend(c.nics.iter().map(|n| {
        let net_name = inv.network_by_id(&n.network).map(|x| x.name.clone()).unwrap_or_default();
        json!({"_typeName": "VirtualVmxnet3", "key": n.key, "deviceInfo": {"_typeName": "Description", "label": n.label, "summary": net_name},
               "macAddress": n.mac, "addressType": "generated",
               "backing": {"_typeName": "VirtualEthernetCardNetworkBackingInfo", "deviceName": net_name,
                           "network": moref("Network", &n.network)}})
    }));
    json!({"_typeName": "VirtualMachineConfigInfo", "name": name, "changeTrackingEnabled": c.cbt,
           "hardware": {"_typeName": "VirtualHardware", "numCPU": c.cpus, "numCoresPerSocket": 1,
                        "memoryMB": c.memory_mib, "device": devices}})
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
                return Err(Fault::new("ManagedObjectNotFound", format!("Network {net} does not exist")));
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
                return Err(Fault::new("DuplicateName", format!("The name '{name}' already exists.")));
            }
            let mut config = match &snapshot {
                Some(s) => inv.snapshot(s)?.config.clone(),
                None => inv.vm(&vm_id)?.config.clone(),
            };
            for (key, net) in &nic_changes {
                let nic =
                    config.nics.iter_mut().find(|n| n.key == *key).ok_or_else(|| {
                        Fault::new("InvalidDeviceSpec", format!("device {key} is not a NIC of {vm_id}"))
                    })?;
                nic.network = net.clone();
            }
            let id = inv.create_vm(&name, &folder, config, linked);
            if power_on {
                inv.vm_mut(&id)?.power = PowerState::On;
            }
            Ok(Some(moref("VirtualMachine", &id)))
        }),
    )
}
