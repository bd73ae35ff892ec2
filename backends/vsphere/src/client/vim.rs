//! Typed VI/JSON calls (`/sdk/vim25/{release}/{moType}/{moId}/{method|property}`, vSphere 8.0U1+).
//!
//! Contract: snapshots, linked clones, reconfiguration and changed-block tracking, which the REST
//! API lacks. Task methods wait for their task (see `task.rs`). No OpenAPI document for VI/JSON is
//! available here; bodies follow the vSphere Web Services / VI/JSON reference pages:
//! - CreateSnapshotEx_Task (used; CreateSnapshot_Task is deprecated since 8.0):
//!   <https://developer.broadcom.com/xapis/virtual-infrastructure-json-api/8.0.2.0/sdk/vim25/release/VirtualMachine/moId/CreateSnapshotEx_Task/post>
//! - RevertToSnapshot_Task:
//!   <https://developer.broadcom.com/xapis/virtual-infrastructure-json-api/8.0.2.0/sdk/vim25/release/VirtualMachineSnapshot/moId/RevertToSnapshot_Task/post>
//! - RemoveSnapshot_Task:
//!   <https://developer.broadcom.com/xapis/virtual-infrastructure-json-api/latest/sdk/vim25/release/VirtualMachineSnapshot/moId/RemoveSnapshot_Task/post/>
//! - CloneVM_Task (VirtualMachineCloneSpec, RelocateSpec.diskMoveType, RelocateSpec.deviceChange):
//!   <https://developer.broadcom.com/xapis/virtual-infrastructure-json-api/latest/sdk/vim25/release/VirtualMachine/moId/CloneVM_Task/post>
//! - QueryChangedDiskAreas / DiskChangeInfo:
//!   <https://developer.broadcom.com/xapis/virtual-infrastructure-json-api/latest/sdk/vim25/release/VirtualMachine/moId/QueryChangedDiskAreas/post/>
//!   <https://developer.broadcom.com/xapis/virtual-infrastructure-json-api/8.0.2.0/data-structures/DiskChangeInfo>
//! - Login and the `vmware-api-session-id` header:
//!   <https://developer.vmware.com/apis/vi-json/latest/sdk/vim25/release/SessionManager/moId/Login/post/>
//! - Property reads (`GET .../VirtualMachine/{moId}/snapshot`, `.../config`,
//!   `.../VirtualMachineSnapshot/{moId}/config`): <https://developer.broadcom.com/xapis/virtual-infrastructure-json-api/latest/virtual-machine-snapshot/>

use super::rest::check_id as validate_id;
use super::task::TaskOutcome;
use super::{Api, VsphereClient, error};
use reqwest::Method;
use serde_json::{Value, json};
use stagecore::{Error, Result};
use tokio_util::sync::CancellationToken;

/// A managed object reference (`{"type": "VirtualMachine", "value": "vm-42"}`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MoRef {
    /// Managed object type, e.g. `VirtualMachineSnapshot`.
    pub kind: String,
    /// Managed object id, e.g. `snapshot-7`.
    pub value: String,
}

impl MoRef {
    /// A reference of the given type and id.
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        MoRef { kind: kind.into(), value: value.into() }
    }

    /// The VI/JSON form.
    pub(crate) fn to_json(&self) -> Value {
        json!({"_typeName": "ManagedObjectReference", "type": self.kind, "value": self.value})
    }

    fn from_json(v: &Value, context: &str) -> Result<Self> {
        match (v["type"].as_str(), v["value"].as_str()) {
            (Some(t), Some(val)) => Ok(MoRef::new(t, val)),
            _ => Err(error::malformed(context, format!("expected a managed object reference, got {v}"))),
        }
    }
}

/// One node of a VM's snapshot tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotNode {
    /// The snapshot.
    pub snapshot: MoRef,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Children.
    pub children: Vec<SnapshotNode>,
}

/// A VM's snapshots: the tree and the current one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotTree {
    /// The current snapshot (what the VM runs on top of).
    pub current: Option<MoRef>,
    /// Root snapshots.
    pub roots: Vec<SnapshotNode>,
}

/// A disk as VI/JSON describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VimDisk {
    /// Device key (`2000`).
    pub key: i32,
    /// Label.
    pub label: String,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// Top-layer file.
    pub file_name: Option<String>,
    /// Parent layer file (linked clones, snapshots).
    pub parent_file_name: Option<String>,
    /// Change id for `QueryChangedDiskAreas` (set when change tracking is on).
    pub change_id: Option<String>,
}

/// A NIC as VI/JSON describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VimNic {
    /// Device key (`4000`).
    pub key: i32,
    /// Device type, e.g. `VirtualVmxnet3`.
    pub device_type: String,
    /// Label.
    pub label: String,
    /// MAC address.
    pub mac_address: Option<String>,
    /// Network id.
    pub network: Option<String>,
    /// Network (port group) name.
    pub network_name: Option<String>,
}

/// The parts of `VirtualMachineConfigInfo` stagecore reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VimConfig {
    /// Name.
    pub name: String,
    /// vCPUs.
    pub num_cpu: u32,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// Changed-block tracking enabled.
    pub change_tracking_enabled: bool,
    /// Disks.
    pub disks: Vec<VimDisk>,
    /// NICs.
    pub nics: Vec<VimNic>,
}

/// A changed extent of a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChangedArea {
    /// Byte offset.
    pub start: u64,
    /// Byte length.
    pub length: u64,
}

/// What `ReconfigVM_Task` changes; `None` leaves a field as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconfig {
    /// vCPUs.
    pub cpus: Option<u32>,
    /// Memory in MiB (a multiple of 4).
    pub memory_mib: Option<u64>,
    /// Turn changed-block tracking on or off.
    pub change_tracking: Option<bool>,
}

/// A clone of a snapshot of the source VM: linked ([`VsphereClient::linked_clone`], child disks
/// over the snapshot) or full ([`VsphereClient::full_clone_from_snapshot`], independent copies).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkedCloneSpec {
    /// The source VM's snapshot the clone's disks will be children of.
    pub snapshot: MoRef,
    /// The clone's name.
    pub name: String,
    /// Destination folder id (`group-v11`).
    pub folder: String,
    /// Put every NIC of the clone on this network (port group name), e.g. an isolated one.
    pub network_name: Option<String>,
    /// Power the clone on when created.
    pub power_on: bool,
}

impl VsphereClient {
    fn vim_path(&self, mo: &MoRef, member: &str) -> Result<String> {
        Ok(format!("/sdk/vim25/{}/{}/{}/{}", self.vim()?.release, mo.kind, mo.value, member))
    }

    /// Invokes a VI/JSON method and returns its JSON result (`Null` for none).
    pub async fn invoke(&self, mo: &MoRef, method: &str, body: Value) -> Result<Value> {
        validate_id("moId", &mo.value)?;
        let context = format!("{method} on {}/{}", mo.kind, mo.value);
        self.call(Api::Vim, Method::POST, &self.vim_path(mo, method)?, &[], Some(&body), &context).await
    }

    /// Reads one property (`GET .../{moType}/{moId}/{property}`).
    pub async fn property(&self, mo: &MoRef, property: &str) -> Result<Value> {
        validate_id("moId", &mo.value)?;
        let context = format!("read {property} of {}/{}", mo.kind, mo.value);
        self.call(Api::Vim, Method::GET, &self.vim_path(mo, property)?, &[], None, &context).await
    }

    /// Starts a `*_Task` method; returns the task reference without waiting.
    pub async fn start_task(&self, mo: &MoRef, method: &str, body: Value) -> Result<MoRef> {
        let v = self.invoke(mo, method, body).await?;
        MoRef::from_json(&v, method)
    }

    async fn run_task(&self, mo: &MoRef, method: &str, body: Value) -> Result<TaskOutcome> {
        let task = self.start_task(mo, method, body).await?;
        self.wait_task(&task, method, &CancellationToken::new()).await
    }

    /// `CreateSnapshotEx_Task` (crash-consistent unless `memory`); returns the new snapshot.
    pub async fn create_snapshot(&self, vm: &str, name: &str, description: &str, memory: bool) -> Result<MoRef> {
        if name.is_empty() {
            return Err(Error::invalid("snapshot.name", "is empty"));
        }
        let body = json!({"name": name, "description": description, "memory": memory});
        let out = self.run_task(&MoRef::new("VirtualMachine", vm), "CreateSnapshotEx_Task", body).await?;
        let result = out.result.ok_or_else(|| error::malformed("CreateSnapshotEx_Task", "task has no result"))?;
        MoRef::from_json(&result, "CreateSnapshotEx_Task")
    }

    /// `RevertToSnapshot_Task`.
    pub async fn revert_snapshot(&self, snapshot: &MoRef, suppress_power_on: bool) -> Result<()> {
        let body = json!({"suppressPowerOn": suppress_power_on});
        self.run_task(snapshot, "RevertToSnapshot_Task", body).await.map(|_| ())
    }

    /// `RemoveSnapshot_Task` (children kept unless `remove_children`; disks consolidated).
    pub async fn remove_snapshot(&self, snapshot: &MoRef, remove_children: bool) -> Result<()> {
        let body = json!({"removeChildren": remove_children, "consolidate": true});
        self.run_task(snapshot, "RemoveSnapshot_Task", body).await.map(|_| ())
    }

    /// The VM's snapshot tree (`GET .../VirtualMachine/{vm}/snapshot`; unset means none).
    pub async fn snapshot_tree(&self, vm: &str) -> Result<SnapshotTree> {
        let v = self.property(&MoRef::new("VirtualMachine", vm), "snapshot").await?;
        if v.is_null() {
            return Ok(SnapshotTree::default());
        }
        let current =
            v.get("currentSnapshot").filter(|c| !c.is_null()).map(|c| MoRef::from_json(c, "snapshot")).transpose()?;
        let roots = parse_nodes(&v["rootSnapshotList"])?;
        Ok(SnapshotTree { current, roots })
    }

    /// The VM's configuration (`GET .../VirtualMachine/{vm}/config`).
    pub async fn vm_config(&self, vm: &str) -> Result<VimConfig> {
        parse_config(&self.property(&MoRef::new("VirtualMachine", vm), "config").await?)
    }

    /// The configuration captured by a snapshot (`GET .../VirtualMachineSnapshot/{id}/config`).
    pub async fn snapshot_config(&self, snapshot: &MoRef) -> Result<VimConfig> {
        parse_config(&self.property(snapshot, "config").await?)
    }

    /// `ReconfigVM_Task` with a `VirtualMachineConfigSpec` of the given fields.
    pub async fn reconfigure(&self, vm: &str, change: &Reconfig) -> Result<()> {
        let mut spec = json!({"_typeName": "VirtualMachineConfigSpec"});
        if let Some(c) = change.cpus {
            if c == 0 {
                return Err(Error::invalid("reconfig.cpus", "must be at least 1"));
            }
            spec["numCPUs"] = json!(c);
        }
        if let Some(m) = change.memory_mib {
            if m == 0 || m % 4 != 0 {
                return Err(Error::invalid("reconfig.memory_mib", format!("{m} is not a positive multiple of 4")));
            }
            spec["memoryMB"] = json!(m);
        }
        if let Some(t) = change.change_tracking {
            spec["changeTrackingEnabled"] = json!(t);
        }
        self.run_task(&MoRef::new("VirtualMachine", vm), "ReconfigVM_Task", json!({"spec": spec})).await.map(|_| ())
    }

    /// Linked clone (`CloneVM_Task` from a snapshot with `diskMoveType: createNewChildDiskBacking`,
    /// NICs optionally moved onto a named standard port group); returns the new VM id.
    pub async fn linked_clone(&self, vm: &str, spec: &LinkedCloneSpec) -> Result<String> {
        self.clone_from_snapshot(vm, spec, "createNewChildDiskBacking").await
    }

    /// Full clone of a snapshot's state (`CloneVM_Task` from `spec.snapshot` with
    /// `diskMoveType: moveAllDiskBackingsAndDisallowSharing`: independent copies of the disks as
    /// they were at the snapshot, NICs optionally moved); returns the new VM id. Unlike
    /// [`VsphereClient::full_clone`] (REST), which copies the VM's *current* state.
    pub async fn full_clone_from_snapshot(&self, vm: &str, spec: &LinkedCloneSpec) -> Result<String> {
        self.clone_from_snapshot(vm, spec, "moveAllDiskBackingsAndDisallowSharing").await
    }

    async fn clone_from_snapshot(&self, vm: &str, spec: &LinkedCloneSpec, disk_move_type: &str) -> Result<String> {
        validate_id("folder", &spec.folder)?;
        if spec.name.is_empty() || spec.name.contains('/') || spec.name.contains("..") {
            return Err(Error::invalid("clone.name", format!("`{}` must be non-empty without `/` or `..`", spec.name)));
        }
        let mut location = json!({"_typeName": "VirtualMachineRelocateSpec", "diskMoveType": disk_move_type});
        if let Some(net_name) = &spec.network_name {
            location["deviceChange"] = Value::Array(self.nic_moves(&spec.snapshot, net_name).await?);
        }
        let body = json!({
            "folder": MoRef::new("Folder", &spec.folder).to_json(),
            "name": spec.name,
            "spec": {"_typeName": "VirtualMachineCloneSpec", "location": location, "snapshot": spec.snapshot.to_json(),
                     "powerOn": spec.power_on, "template": false},
        });
        let out = self.run_task(&MoRef::new("VirtualMachine", vm), "CloneVM_Task", body).await?;
        let result = out.result.ok_or_else(|| error::malformed("CloneVM_Task", "task has no result"))?;
        Ok(MoRef::from_json(&result, "CloneVM_Task")?.value)
    }

    async fn nic_moves(&self, snapshot: &MoRef, net_name: &str) -> Result<Vec<Value>> {
        let nets = self.list_networks(&[net_name]).await?;
        let net = match nets.as_slice() {
            [one] => one,
            [] => return Err(Error::not_found("network", net_name)),
            _ => return Err(Error::invalid("clone.network_name", format!("`{net_name}` names several networks"))),
        };
        if net.kind != "STANDARD_PORTGROUP" {
            return Err(Error::not_supported("clone onto a non-standard port group", crate::BACKEND));
        }
        let config = self.snapshot_config(snapshot).await?;
        Ok(config
            .nics
            .iter()
            .map(|n| {
                json!({"_typeName": "VirtualDeviceConfigSpec", "operation": "edit",
                       "device": {"_typeName": n.device_type, "key": n.key, "addressType": "generated",
                                  "backing": {"_typeName": "VirtualEthernetCardNetworkBackingInfo", "deviceName": net.name,
                                              "network": MoRef::new("Network", &net.network).to_json()}}})
            })
            .collect())
    }

    /// `QueryChangedDiskAreas` for one disk, repeated until the whole disk is covered.
    pub async fn query_changed_areas(
        &self,
        vm: &str,
        snapshot: Option<&MoRef>,
        disk_key: i32,
        change_id: &str,
    ) -> Result<Vec<ChangedArea>> {
        let mo = MoRef::new("VirtualMachine", vm);
        let mut areas = Vec::new();
        let mut offset: u64 = 0;
        loop {
            let mut body = json!({"deviceKey": disk_key, "startOffset": offset, "changeId": change_id});
            if let Some(s) = snapshot {
                body["snapshot"] = s.to_json();
            }
            let v = self.invoke(&mo, "QueryChangedDiskAreas", body).await?;
            let (start, length) = (v["startOffset"].as_u64(), v["length"].as_u64());
            let (Some(start), Some(length)) = (start, length) else {
                return Err(error::malformed("QueryChangedDiskAreas", "DiskChangeInfo without startOffset/length"));
            };
            for a in v["changedArea"].as_array().into_iter().flatten() {
                let (Some(s), Some(l)) = (a["start"].as_u64(), a["length"].as_u64()) else {
                    return Err(error::malformed("QueryChangedDiskAreas", "DiskChangeExtent without start/length"));
                };
                areas.push(ChangedArea { start: s, length: l });
            }
            if length == 0 {
                break;
            }
            offset = start + length;
            let capacity = self.disk_capacity(vm, snapshot, disk_key).await?;
            if offset >= capacity {
                break;
            }
        }
        Ok(areas)
    }

    async fn disk_capacity(&self, vm: &str, snapshot: Option<&MoRef>, key: i32) -> Result<u64> {
        let config = match snapshot {
            Some(s) => self.snapshot_config(s).await?,
            None => self.vm_config(vm).await?,
        };
        config
            .disks
            .iter()
            .find(|d| d.key == key)
            .map(|d| d.capacity_bytes)
            .ok_or_else(|| Error::not_found("disk", format!("{vm} key {key}")))
    }
}

fn parse_nodes(list: &Value) -> Result<Vec<SnapshotNode>> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            Ok(SnapshotNode {
                snapshot: MoRef::from_json(&n["snapshot"], "snapshot tree")?,
                name: n["name"].as_str().unwrap_or_default().to_string(),
                description: n["description"].as_str().unwrap_or_default().to_string(),
                children: parse_nodes(&n["childSnapshotList"])?,
            })
        })
        .collect()
}

/// Reads the parts of a `VirtualMachineConfigInfo` stagecore uses. Devices are recognised by
/// shape, not by a closed list of `_typeName`s: a disk is a `VirtualDisk`, a NIC any device with a
/// `VirtualEthernetCard…` backing or a MAC address; every other device (controllers, CD-ROMs, and
/// types this client has never heard of) is ignored, never a parse failure.
pub(crate) fn parse_config(v: &Value) -> Result<VimConfig> {
    let hw = &v["hardware"];
    let (Some(cpus), Some(mem)) = (hw["numCPU"].as_u64(), hw["memoryMB"].as_u64()) else {
        return Err(error::malformed("config", "VirtualMachineConfigInfo without hardware.numCPU/memoryMB"));
    };
    let mut disks = Vec::new();
    let mut nics = Vec::new();
    for d in hw["device"].as_array().into_iter().flatten() {
        let Some(key) = d["key"].as_i64().and_then(|k| i32::try_from(k).ok()) else { continue };
        let label = d["deviceInfo"]["label"].as_str().unwrap_or_default().to_string();
        let backing = &d["backing"];
        let backing_type = backing["_typeName"].as_str().unwrap_or_default();
        if d["_typeName"] == "VirtualDisk" {
            let capacity = d["capacityInBytes"]
                .as_u64()
                .or_else(|| d["capacityInKB"].as_u64().map(|kb| kb.saturating_mul(1024)))
                .unwrap_or_default();
            disks.push(VimDisk {
                key,
                label,
                capacity_bytes: capacity,
                file_name: backing["fileName"].as_str().map(str::to_string),
                parent_file_name: backing["parent"]["fileName"].as_str().map(str::to_string),
                change_id: backing["changeId"].as_str().map(str::to_string),
            });
        } else if backing_type.starts_with("VirtualEthernetCard") || d.get("macAddress").is_some() {
            // Standard port group: `network` + `deviceName`; distributed: `port.portgroupKey`;
            // NSX opaque network: `opaqueNetworkId`.
            let network = backing["network"]["value"]
                .as_str()
                .or_else(|| backing["port"]["portgroupKey"].as_str())
                .or_else(|| backing["opaqueNetworkId"].as_str())
                .map(str::to_string);
            nics.push(VimNic {
                key,
                device_type: d["_typeName"].as_str().unwrap_or("VirtualEthernetCard").to_string(),
                label,
                mac_address: d["macAddress"].as_str().map(str::to_string),
                network,
                network_name: backing["deviceName"].as_str().map(str::to_string),
            });
        }
    }
    Ok(VimConfig {
        name: v["name"].as_str().unwrap_or_default().to_string(),
        num_cpu: u32::try_from(cpus).unwrap_or(u32::MAX),
        memory_mb: mem,
        change_tracking_enabled: v["changeTrackingEnabled"].as_bool().unwrap_or(false),
        disks,
        nics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_device_types_are_ignored_not_fatal() {
        let v = json!({"_typeName": "VirtualMachineConfigInfo", "name": "x", "changeTrackingEnabled": true,
        "hardware": {"_typeName": "VirtualHardware", "numCPU": 2, "memoryMB": 1024, "device": [
            {"_typeName": "VirtualQuantumEntangler", "key": 77, "backing": {"_typeName": "VirtualQuantumBackingInfo"}},
            {"_typeName": "ParaVirtualSCSIController", "key": 1000, "busNumber": 0, "sharedBus": "noSharing"},
            {"_typeName": "VirtualDisk", "key": 2000, "deviceInfo": {"label": "Hard disk 1"}, "capacityInKB": 4,
             "backing": {"_typeName": "VirtualDiskSparseVer2BackingInfo", "fileName": "[ds] a.vmdk", "diskMode": "persistent", "changeId": "c/1"}},
            {"_typeName": "VirtualFutureNic", "key": 4000, "deviceInfo": {"label": "Network adapter 1"},
             "backing": {"_typeName": "VirtualEthernetCardDistributedVirtualPortBackingInfo",
                         "port": {"switchUuid": "u", "portgroupKey": "dvportgroup-9"}}},
            {"_typeName": "VirtualVmxnet3", "key": 4001, "macAddress": "00:50:56:00:00:01",
             "backing": {"_typeName": "VirtualEthernetCardOpaqueNetworkBackingInfo", "opaqueNetworkId": "seg-1", "opaqueNetworkType": "nsx.LogicalSwitch"}},
            {"key": "not-a-number"}
        ]}});
        let c = parse_config(&v).unwrap();
        assert_eq!(c.disks.len(), 1);
        assert_eq!(c.disks[0].capacity_bytes, 4096);
        assert_eq!(c.disks[0].change_id.as_deref(), Some("c/1"));
        assert_eq!(c.nics.len(), 2);
        assert_eq!(c.nics[0].device_type, "VirtualFutureNic");
        assert_eq!(c.nics[0].network.as_deref(), Some("dvportgroup-9"));
        assert_eq!(c.nics[1].network.as_deref(), Some("seg-1"));
    }
}
