//! The simulator's inventory: VMs with disks and NICs, snapshot trees, networks, folders.
//!
//! Contract: plain data plus the operations a vCenter performs on it; callers hold the lock.
//! Disk change tracking keeps, per disk, the *lineage* of guest writes that make up its current
//! content; a snapshot copies the lineage, a revert restores it, so `QueryChangedDiskAreas` between
//! any snapshot and a change id of an ancestor point is exact.

use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Power state of a simulated VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerState {
    /// Running.
    On,
    /// Stopped.
    Off,
}

impl PowerState {
    pub(crate) fn rest(self) -> &'static str {
        match self {
            PowerState::On => "POWERED_ON",
            PowerState::Off => "POWERED_OFF",
        }
    }
    pub(crate) fn vim(self) -> &'static str {
        match self {
            PowerState::On => "poweredOn",
            PowerState::Off => "poweredOff",
        }
    }
}

/// One guest write recorded by change tracking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Write {
    /// Sequence number, increasing per disk.
    pub seq: u64,
    /// Byte offset.
    pub start: u64,
    /// Byte length.
    pub length: u64,
}

/// How a virtual disk is backed (the `_typeName` of `VirtualDisk.backing`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskBacking {
    /// `VirtualDiskFlatVer2BackingInfo` (the usual VMDK).
    Flat,
    /// `VirtualDiskSparseVer2BackingInfo` (hosted-format sparse VMDK).
    Sparse,
    /// `VirtualDiskRawDiskMappingVer1BackingInfo` (RDM in virtual compatibility mode) of a LUN.
    Rdm {
        /// The LUN's UUID.
        lun_uuid: String,
    },
}

/// A virtual disk.
#[derive(Clone, Debug)]
pub struct Disk {
    /// Device key (2000, 2001, ...).
    pub key: i32,
    /// Label, e.g. `Hard disk 1`.
    pub label: String,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Datastore path of the top layer.
    pub file: String,
    /// Datastore path of the parent layer for linked clones.
    pub parent_file: Option<String>,
    /// Backing type.
    pub backing: DiskBacking,
    /// Writes making up the current content (see module docs).
    pub lineage: Vec<Write>,
    /// Change-tracking epoch; part of every change id.
    pub cbt_epoch: String,
    pub(crate) next_seq: u64,
}

impl Disk {
    pub(crate) fn change_id(&self) -> String {
        format!("{}/{}", self.cbt_epoch, self.lineage.last().map_or(0, |w| w.seq))
    }
}

/// A virtual NIC.
#[derive(Clone, Debug)]
pub struct Nic {
    /// Device key (4000, ...).
    pub key: i32,
    /// Label, e.g. `Network adapter 1`.
    pub label: String,
    /// MAC address.
    pub mac: String,
    /// Network identifier (`network-1`).
    pub network: String,
}

/// The configuration a snapshot captures and a revert restores.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disks.
    pub disks: Vec<Disk>,
    /// NICs.
    pub nics: Vec<Nic>,
    /// Changed-block tracking enabled.
    pub cbt: bool,
}

/// A simulated VM.
#[derive(Clone, Debug)]
pub struct Vm {
    /// Identifier (`vm-101`), also its managed object id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Folder identifier (`group-v10`).
    pub folder: String,
    /// Hardware and change tracking.
    pub config: VmConfig,
    /// Power state.
    pub power: PowerState,
    /// BIOS UUID.
    pub bios_uuid: String,
    /// Instance UUID.
    pub instance_uuid: String,
    /// Root snapshots.
    pub root_snapshots: Vec<String>,
    /// Current snapshot.
    pub current_snapshot: Option<String>,
}

/// A snapshot of one VM.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Identifier (`snapshot-7`).
    pub id: String,
    /// The VM.
    pub vm: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Parent snapshot.
    pub parent: Option<String>,
    /// Child snapshots.
    pub children: Vec<String>,
    /// Captured configuration and disk lineages.
    pub config: VmConfig,
    /// Power state when taken.
    pub power: PowerState,
    /// The guest as it was (files, ...), restored by a revert and copied by a clone.
    pub guest: Option<crate::SimGuest>,
    /// The VM-unique snapshot number (`VirtualMachineSnapshotTree.id`).
    pub number: i32,
    /// When it was taken (RFC 3339).
    pub created: String,
}

/// What kind of network a [`Network`] is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkKind {
    /// A standard port group (`STANDARD_PORTGROUP`; NIC backing `VirtualEthernetCardNetworkBackingInfo`).
    Standard,
    /// A distributed port group (`DISTRIBUTED_PORTGROUP`; NIC backing
    /// `VirtualEthernetCardDistributedVirtualPortBackingInfo`).
    Distributed {
        /// The distributed switch's UUID.
        switch_uuid: String,
        /// The port group key (`dvportgroup-12`), also the network id.
        portgroup_key: String,
    },
    /// An NSX opaque network (`OPAQUE_NETWORK`; NIC backing
    /// `VirtualEthernetCardOpaqueNetworkBackingInfo`).
    Opaque {
        /// The opaque network's id.
        opaque_id: String,
        /// Its type, e.g. `nsx.LogicalSwitch`.
        opaque_type: String,
    },
}

/// A network (port group).
#[derive(Clone, Debug)]
pub struct Network {
    /// Identifier (`network-1`).
    pub id: String,
    /// Name.
    pub name: String,
    /// Whether it is an isolated port group (no uplink).
    pub isolated: bool,
    /// Standard, distributed or opaque.
    pub kind: NetworkKind,
}

impl Network {
    /// A standard port group.
    pub fn standard(id: &str, name: &str, isolated: bool) -> Self {
        Network { id: id.to_string(), name: name.to_string(), isolated, kind: NetworkKind::Standard }
    }

    pub(crate) fn rest_type(&self) -> &'static str {
        match self.kind {
            NetworkKind::Standard => "STANDARD_PORTGROUP",
            NetworkKind::Distributed { .. } => "DISTRIBUTED_PORTGROUP",
            NetworkKind::Opaque { .. } => "OPAQUE_NETWORK",
        }
    }
}

/// Everything the simulator knows.
#[derive(Debug, Default)]
pub(crate) struct Inventory {
    pub(crate) vms: BTreeMap<String, Vm>,
    pub(crate) snapshots: BTreeMap<String, Snapshot>,
    pub(crate) networks: Vec<Network>,
    pub(crate) folders: Vec<(String, String)>,
    /// Simulated guests (with VMware Tools running) by VM id.
    pub(crate) guests: BTreeMap<String, crate::SimGuest>,
    /// The process table of each VM's guest, by VM id.
    pub(crate) processes: BTreeMap<String, crate::guest::Processes>,
    next_id: u64,
}

/// A vim25 fault: type name, message and the fault type's own properties.
#[derive(Clone, Debug)]
pub struct Fault {
    /// `_typeName`, e.g. `InvalidArgument`.
    pub type_name: String,
    /// Human-readable message.
    pub message: String,
    /// The fault type's properties (`ManagedObjectNotFound.obj`, `NotAuthenticated.object`, ...).
    pub properties: Vec<(String, Value)>,
}

impl Fault {
    pub(crate) fn new(type_name: &str, message: impl Into<String>) -> Self {
        Fault { type_name: type_name.to_string(), message: message.into(), properties: Vec::new() }
    }
    /// Adds a property of the fault type.
    pub(crate) fn with(mut self, key: &str, value: Value) -> Self {
        self.properties.push((key.to_string(), value));
        self
    }
    /// `ManagedObjectNotFound` with its required `obj`.
    pub(crate) fn not_found(kind: &str, id: &str) -> Self {
        Fault::new(
            "ManagedObjectNotFound",
            format!("The object '{kind}:{id}' has already been deleted or has not been completely created"),
        )
        .with("obj", moref(kind, id))
    }
    /// The VI/JSON rendering: the `MethodFault` subtype itself, `faultMessage` a `LocalizableMessage` list.
    pub(crate) fn to_json(&self) -> Value {
        let mut v = json!({
            "_typeName": self.type_name,
            "faultMessage": [{"_typeName": "LocalizableMessage", "key": format!("vim.fault.{}", self.type_name), "message": self.message}],
        });
        for (k, val) in &self.properties {
            v[k] = val.clone();
        }
        v
    }
}

impl Inventory {
    pub(crate) fn next(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}-{}", self.next_id + 1000)
    }

    pub(crate) fn mac(&mut self) -> String {
        self.next_id += 1;
        let n = self.next_id;
        format!("00:50:56:{:02x}:{:02x}:{:02x}", (n >> 16) & 0x3f, (n >> 8) & 0xff, n & 0xff)
    }

    pub(crate) fn vm(&self, id: &str) -> Result<&Vm, Fault> {
        self.vms.get(id).ok_or_else(|| Fault::not_found("VirtualMachine", id))
    }

    pub(crate) fn vm_mut(&mut self, id: &str) -> Result<&mut Vm, Fault> {
        self.vms.get_mut(id).ok_or_else(|| Fault::not_found("VirtualMachine", id))
    }

    pub(crate) fn snapshot(&self, id: &str) -> Result<&Snapshot, Fault> {
        self.snapshots.get(id).ok_or_else(|| Fault::not_found("VirtualMachineSnapshot", id))
    }

    pub(crate) fn network_by_id(&self, id: &str) -> Option<&Network> {
        self.networks.iter().find(|n| n.id == id)
    }

    pub(crate) fn name_taken(&self, folder: &str, name: &str) -> bool {
        self.vms.values().any(|v| v.folder == folder && v.name == name)
    }

    /// Creates a VM from a config (fresh identity, fresh disk files and change tracking).
    pub(crate) fn create_vm(
        &mut self,
        name: &str,
        folder: &str,
        mut config: VmConfig,
        parents: bool,
        guest: Option<crate::SimGuest>,
    ) -> String {
        let id = self.next("vm");
        for d in &mut config.disks {
            d.parent_file = parents.then(|| d.file.clone());
            d.file = format!("[datastore1] {name}/{name}_{}.vmdk", d.key);
            d.lineage.clear();
            d.cbt_epoch = uuid::Uuid::new_v4().to_string();
            d.next_seq = 1;
        }
        for n in &mut config.nics {
            n.mac = self.mac();
        }
        let vm = Vm {
            id: id.clone(),
            name: name.to_string(),
            folder: folder.to_string(),
            config,
            power: PowerState::Off,
            bios_uuid: uuid::Uuid::new_v4().to_string(),
            instance_uuid: uuid::Uuid::new_v4().to_string(),
            root_snapshots: Vec::new(),
            current_snapshot: None,
        };
        self.vms.insert(id.clone(), vm);
        if let Some(mut g) = guest {
            g.regenerate_identity(name);
            self.guests.insert(id.clone(), g);
        }
        id
    }

    pub(crate) fn create_snapshot(&mut self, vm_id: &str, name: &str, description: &str) -> Result<String, Fault> {
        let id = self.next("snapshot");
        let vm = self.vm_mut(vm_id)?;
        let parent = vm.current_snapshot.clone();
        let snap = Snapshot {
            id: id.clone(),
            vm: vm_id.to_string(),
            name: name.to_string(),
            description: description.to_string(),
            parent: parent.clone(),
            children: Vec::new(),
            config: vm.config.clone(),
            power: vm.power,
            number: 0,
            created: crate::now_rfc3339(),
            guest: None,
        };
        vm.current_snapshot = Some(id.clone());
        match &parent {
            Some(p) => self.snapshots.get_mut(p).map(|s| s.children.push(id.clone())).unwrap_or(()),
            None => vm.root_snapshots.push(id.clone()),
        }
        let number = self.snapshots.values().filter(|x| x.vm == vm_id).map(|x| x.number).max().unwrap_or(0) + 1;
        let guest = self.guests.get(vm_id).cloned();
        self.snapshots.insert(id.clone(), Snapshot { number, guest, ..snap });
        Ok(id)
    }

    pub(crate) fn revert(&mut self, snap_id: &str, suppress_power_on: bool) -> Result<(), Fault> {
        let snap = self.snapshot(snap_id)?.clone();
        let vm = self.vm_mut(&snap.vm)?;
        vm.config = snap.config.clone();
        vm.power = if suppress_power_on { PowerState::Off } else { snap.power };
        vm.current_snapshot = Some(snap.id);
        if let Some(g) = snap.guest {
            self.guests.insert(snap.vm.clone(), g);
        }
        Ok(())
    }

    pub(crate) fn remove_snapshot(&mut self, snap_id: &str, remove_children: bool) -> Result<(), Fault> {
        let snap = self.snapshot(snap_id)?.clone();
        if remove_children {
            for c in &snap.children {
                self.remove_snapshot(c, true)?;
            }
        } else {
            for c in &snap.children {
                if let Some(child) = self.snapshots.get_mut(c) {
                    child.parent = snap.parent.clone();
                }
            }
        }
        let kept = if remove_children { Vec::new() } else { snap.children.clone() };
        match &snap.parent {
            Some(p) => {
                if let Some(parent) = self.snapshots.get_mut(p) {
                    parent.children.retain(|c| c != snap_id);
                    parent.children.extend(kept);
                }
            }
            None => {
                let vm = self.vm_mut(&snap.vm)?;
                vm.root_snapshots.retain(|c| c != snap_id);
                vm.root_snapshots.extend(kept);
            }
        }
        self.snapshots.remove(snap_id);
        let vm = self.vm_mut(&snap.vm)?;
        if vm.current_snapshot.as_deref() == Some(snap_id) {
            vm.current_snapshot = snap.parent;
        }
        Ok(())
    }

    /// Changed areas of disk `key` in `snapshot` (or the running VM) since `change_id`.
    pub(crate) fn changed_areas(
        &self,
        vm_id: &str,
        snapshot: Option<&str>,
        key: i32,
        start_offset: u64,
        change_id: &str,
    ) -> Result<Value, Fault> {
        let vm = self.vm(vm_id)?;
        let config = match snapshot {
            Some(s) => &self.snapshot(s)?.config,
            None => &vm.config,
        };
        if !config.cbt {
            return Err(Fault::new("FileFault", format!("change tracking is not enabled on {vm_id}"))
                .with("file", json!(format!("[datastore1] {}/{}-ctk.vmdk", vm.name, vm.name))));
        }
        let disk = config
            .disks
            .iter()
            .find(|d| d.key == key)
            .ok_or_else(|| Fault::new("InvalidArgument", format!("deviceKey {key} is not a disk of {vm_id}")))?;
        let since = if change_id == "*" {
            0
        } else {
            let (epoch, seq) = change_id
                .rsplit_once('/')
                .ok_or_else(|| Fault::new("InvalidArgument", format!("malformed changeId `{change_id}`")))?;
            if epoch != disk.cbt_epoch {
                return Err(Fault::new(
                    "InvalidArgument",
                    format!("changeId `{change_id}` is from another disk epoch"),
                ));
            }
            seq.parse::<u64>()
                .map_err(|_| Fault::new("InvalidArgument", format!("malformed changeId `{change_id}`")))?
        };
        if start_offset > disk.capacity {
            return Err(Fault::new("InvalidArgument", format!("startOffset {start_offset} beyond capacity")));
        }
        let areas = merge_areas(disk.lineage.iter().filter(|w| w.seq > since), start_offset, disk.capacity);
        let areas: Vec<Value> =
            areas.into_iter().map(|(s, l)| json!({"_typeName": "DiskChangeExtent", "start": s, "length": l})).collect();
        Ok(json!({
            "_typeName": "DiskChangeInfo",
            "startOffset": start_offset,
            "length": disk.capacity - start_offset,
            "changedArea": areas,
        }))
    }
}

/// Clips writes to `[from, end)`, sorts and merges overlapping or touching extents.
fn merge_areas<'a>(writes: impl Iterator<Item = &'a Write>, from: u64, end: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = writes
        .filter_map(|w| {
            let s = w.start.max(from);
            let e = (w.start + w.length).min(end);
            (s < e).then_some((s, e))
        })
        .collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

/// A `ManagedObjectReference` in VI/JSON form.
pub(crate) fn moref(kind: &str, value: &str) -> Value {
    json!({"_typeName": "ManagedObjectReference", "type": kind, "value": value})
}
