//! Turning vCenter VM details into stagecore's model.
//!
//! Contract: a VM's `GET /api/vcenter/vm/{vm}` details become a [`MachineSpec`] with logical names
//! that satisfy [`stagecore::name`]: the machine is called by its logical name (the VM name for a
//! production), disks by their label (`Hard disk 1` → `hard-disk-1`), NICs by their label
//! (`Network adapter 1` → `network-adapter-1`), networks by the port group name with every
//! character outside `[A-Za-z0-9._-]` replaced by `-` (`VM Network` → `VM-Network`). Disk sources
//! are the VMDK datastore paths (format `vmdk`), sizes the capacities. On a fenced stage a NIC on
//! the configured isolated network reports the network its production NIC is on (from the
//! baseline spec), since fencing is a property of the stage, not drift.

use stagecore::{DiskFormat, DiskSpec, EnvironmentSpec, Firmware, MachineSpec, NetworkSpec, NicSpec};

use crate::{DiskInfo, VmInfo};

/// A label or port group name made into a valid logical name.
pub(crate) fn logical(raw: &str) -> String {
    let mut s: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' }).collect();
    while s.contains("..") {
        s = s.replace("..", ".");
    }
    let s = s.trim_start_matches(['.', '-']);
    let mut s: String = s.chars().take(stagecore::name::MAX_NAME_LEN).collect();
    if s.is_empty() {
        s = "unnamed".into();
    }
    s
}

/// The logical name of a disk (by label, lower-cased; by key if the label is missing).
pub(crate) fn disk_name(label: &str, key: &str) -> String {
    if label.trim().is_empty() { format!("disk-{key}") } else { logical(&label.to_ascii_lowercase()) }
}

/// How a stage's NICs on the isolated network are reported.
pub(crate) struct Fencing<'a> {
    /// The isolated port group's name.
    pub(crate) isolated: &'a str,
    /// The baseline spec (production's NIC networks).
    pub(crate) baseline: &'a EnvironmentSpec,
}

/// The spec of one VM under logical machine name `machine`.
pub(crate) fn machine_spec(machine: &str, info: &VmInfo, fencing: Option<&Fencing<'_>>) -> MachineSpec {
    let disks = sorted_disks(&info.disks)
        .into_iter()
        .map(|d| DiskSpec {
            name: disk_name(&d.label, &d.key),
            source: d.vmdk_file.clone().unwrap_or_else(|| format!("vsphere:{}/{}", info.vm, d.key)),
            format: DiskFormat::Vmdk,
            size_bytes: d.capacity,
            read_only: false,
        })
        .collect();
    let nics = info
        .nics
        .iter()
        .map(|n| {
            let name = if n.label.trim().is_empty() {
                format!("nic-{}", n.key)
            } else {
                logical(&n.label.to_ascii_lowercase())
            };
            let raw_net = n.network_name.clone().or_else(|| n.network.clone()).unwrap_or_else(|| "unconnected".into());
            let network = match fencing {
                Some(f) if raw_net == f.isolated => f
                    .baseline
                    .machine(machine)
                    .and_then(|m| m.nic(&name))
                    .map(|n| n.network.clone())
                    .unwrap_or_else(|| logical(&raw_net)),
                _ => logical(&raw_net),
            };
            NicSpec {
                name,
                network,
                mac: n.mac_address.as_ref().map(|m| m.to_ascii_lowercase()),
                model: n.model.as_deref().map(str::to_ascii_lowercase).unwrap_or_else(|| "vmxnet3".into()),
            }
        })
        .collect();
    MachineSpec {
        name: machine.to_string(),
        uuid: info.identity.as_ref().map(|i| i.bios_uuid.clone()),
        vcpus: info.cpu.count,
        memory_mib: info.memory.size_mib,
        firmware: if info.boot.kind.eq_ignore_ascii_case("EFI") { Firmware::Uefi } else { Firmware::Bios },
        disks,
        nics,
        labels: Default::default(),
        boot: None,
        after: Vec::new(),
    }
}

/// Disks in device-key order (numeric, so `16000` sorts after `2001`).
pub(crate) fn sorted_disks(disks: &[DiskInfo]) -> Vec<&DiskInfo> {
    let mut v: Vec<&DiskInfo> = disks.iter().collect();
    v.sort_by_key(|d| (d.key.parse::<i64>().unwrap_or(i64::MAX), d.key.clone()));
    v
}

/// The environment spec of machines, with every network their NICs join declared once.
pub(crate) fn environment_spec(name: &str, machines: Vec<MachineSpec>) -> EnvironmentSpec {
    let mut networks: Vec<NetworkSpec> = Vec::new();
    for n in machines.iter().flat_map(|m| &m.nics) {
        if !networks.iter().any(|x| x.name == n.network) {
            networks.push(NetworkSpec { name: n.network.clone(), cidr: None });
        }
    }
    EnvironmentSpec { name: name.to_string(), machines, networks, labels: Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logical_names_are_valid() {
        assert_eq!(logical("VM Network"), "VM-Network");
        assert_eq!(disk_name("Hard disk 1", "2000"), "hard-disk-1");
        assert_eq!(disk_name("", "2000"), "disk-2000");
        for raw in ["../x", "-a", "é/ü", "", &"x".repeat(100), "a..b"] {
            let l = logical(raw);
            assert!(stagecore::name::check(&l).is_ok(), "{raw:?} → {l:?}");
        }
    }
}
