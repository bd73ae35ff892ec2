//! The change under test: [`ChangeSet`] and its [`Change`]s.
//!
//! A ChangeSet is applied to a stage (and recorded there), tested, and then promoted into
//! production. Changes name machines, disks and NICs by their *logical* names, so the same
//! ChangeSet applies to production and to any of its stages.
//!
//! Each change knows which config paths it touches ([`Change::config_paths`]) and which disk
//! ranges it writes ([`Change::disk_scope`]); the drift engine uses that to mark records as
//! *intended*.

use serde::{Deserialize, Serialize};

use crate::{DiskSpec, EnvironmentSpec, Error, Extent, NicSpec, Result};

/// An ordered list of changes, tested on a stage and promoted as a unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeSet {
    /// Unique id, e.g. `cs-2026-11-26-app-memory`.
    pub id: String,
    /// What the change is for.
    #[serde(default)]
    pub description: String,
    /// The changes, applied in order.
    pub changes: Vec<Change>,
}

/// One change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// Set a machine's memory.
    SetMemory {
        /// Logical machine name.
        machine: String,
        /// New memory in MiB.
        memory_mib: u64,
    },
    /// Set a machine's vCPU count.
    SetVcpus {
        /// Logical machine name.
        machine: String,
        /// New vCPU count.
        vcpus: u32,
    },
    /// Add a NIC.
    AddNic {
        /// Logical machine name.
        machine: String,
        /// The NIC (its MAC, if any, is replaced by a new one on a stage).
        nic: NicSpec,
    },
    /// Remove a NIC.
    RemoveNic {
        /// Logical machine name.
        machine: String,
        /// Logical NIC name.
        nic: String,
    },
    /// Add a new, empty disk (`size_bytes` required); `source` is a hint the backend may replace.
    AddDisk {
        /// Logical machine name.
        machine: String,
        /// The disk.
        disk: DiskSpec,
    },
    /// Detach and remove a disk.
    RemoveDisk {
        /// Logical machine name.
        machine: String,
        /// Logical disk name.
        disk: String,
    },
    /// Write bytes at an offset of a disk (a raw patch, as a guest would; for appliances and tests).
    WriteDisk {
        /// Logical machine name.
        machine: String,
        /// Logical disk name.
        disk: String,
        /// Byte offset.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Run a command in the guest (needs a guest channel).
    GuestCommand {
        /// Logical machine name.
        machine: String,
        /// argv.
        command: Vec<String>,
        /// How long the command may run, in seconds (default: [`crate::GuestExec::DEFAULT_TIMEOUT`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_secs: Option<u64>,
    },
    /// Write a file in the guest (needs a guest channel).
    GuestFile {
        /// Logical machine name.
        machine: String,
        /// Path in the guest.
        path: String,
        /// File content.
        content: Vec<u8>,
        /// Permission bits (e.g. `0o644`); `None` keeps an existing file's mode.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
    },
    /// Replace a stateless machine's disk with another image (its guest-visible content).
    ReplaceDiskImage {
        /// Logical machine name.
        machine: String,
        /// Logical disk name.
        disk: String,
        /// The replacement image (backend locator, e.g. a qcow2 path).
        image: String,
    },
}

/// Which part of a disk a change writes, for marking disk drift as intended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskScope {
    /// These byte ranges of one disk.
    Extents {
        /// Logical machine name.
        machine: String,
        /// Logical disk name.
        disk: String,
        /// Written ranges.
        extents: Vec<Extent>,
    },
    /// Anywhere on this disk.
    WholeDisk {
        /// Logical machine name.
        machine: String,
        /// Logical disk name.
        disk: String,
    },
    /// Anywhere on any disk of this machine (guest commands and files).
    Machine {
        /// Logical machine name.
        machine: String,
    },
}

impl Change {
    /// The logical machine this change is for.
    pub fn machine(&self) -> &str {
        match self {
            Change::SetMemory { machine, .. }
            | Change::SetVcpus { machine, .. }
            | Change::AddNic { machine, .. }
            | Change::RemoveNic { machine, .. }
            | Change::AddDisk { machine, .. }
            | Change::RemoveDisk { machine, .. }
            | Change::WriteDisk { machine, .. }
            | Change::GuestCommand { machine, .. }
            | Change::GuestFile { machine, .. }
            | Change::ReplaceDiskImage { machine, .. } => machine,
        }
    }

    /// A short name of the change's kind (`set_memory`), for logs and receipts.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::SetMemory { .. } => "set_memory",
            Change::SetVcpus { .. } => "set_vcpus",
            Change::AddNic { .. } => "add_nic",
            Change::RemoveNic { .. } => "remove_nic",
            Change::AddDisk { .. } => "add_disk",
            Change::RemoveDisk { .. } => "remove_disk",
            Change::WriteDisk { .. } => "write_disk",
            Change::GuestCommand { .. } => "guest_command",
            Change::GuestFile { .. } => "guest_file",
            Change::ReplaceDiskImage { .. } => "replace_disk_image",
        }
    }

    /// Whether this change edits the machine's configuration (as opposed to data or the guest).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Change::SetMemory { .. }
                | Change::SetVcpus { .. }
                | Change::AddNic { .. }
                | Change::RemoveNic { .. }
                | Change::AddDisk { .. }
                | Change::RemoveDisk { .. }
        )
    }

    /// Config paths (drift-record style, `/machines/app/memory_mib`) this change explains.
    /// A record whose path equals or lies below one of them is intended.
    pub fn config_paths(&self) -> Vec<String> {
        let m = self.machine();
        match self {
            Change::SetMemory { .. } => vec![format!("/machines/{m}/memory_mib")],
            Change::SetVcpus { .. } => vec![format!("/machines/{m}/vcpus")],
            Change::AddNic { nic, .. } => vec![format!("/machines/{m}/nics/{}", nic.name)],
            Change::RemoveNic { nic, .. } => vec![format!("/machines/{m}/nics/{nic}")],
            Change::AddDisk { disk, .. } => vec![format!("/machines/{m}/disks/{}", disk.name)],
            Change::RemoveDisk { disk, .. } => vec![format!("/machines/{m}/disks/{disk}")],
            _ => Vec::new(),
        }
    }

    /// The disk area this change writes, if any.
    pub fn disk_scope(&self) -> Option<DiskScope> {
        let machine = self.machine().to_string();
        match self {
            Change::WriteDisk { disk, offset, data, .. } => Some(DiskScope::Extents {
                machine,
                disk: disk.clone(),
                extents: vec![Extent { offset: *offset, length: data.len() as u64 }],
            }),
            Change::ReplaceDiskImage { disk, .. } | Change::AddDisk { disk: DiskSpec { name: disk, .. }, .. } => {
                Some(DiskScope::WholeDisk { machine, disk: disk.clone() })
            }
            Change::GuestCommand { .. } | Change::GuestFile { .. } => Some(DiskScope::Machine { machine }),
            _ => None,
        }
    }

    /// Applies a config change to a spec (non-config changes leave it as it is). Errors name the
    /// change by its position `changes[index]`.
    pub fn apply_to_spec(&self, spec: &mut EnvironmentSpec, index: usize) -> Result<()> {
        let at = |field: &str| format!("changes[{index}].{field}");
        let env = spec.name.clone();
        let networks: Vec<String> = spec.networks.iter().map(|n| n.name.clone()).collect();
        let machine = spec
            .machine_mut(self.machine())
            .ok_or_else(|| Error::not_found("machine", format!("{env}/{}", self.machine())))?;
        match self {
            Change::SetMemory { memory_mib, .. } => {
                if *memory_mib == 0 {
                    return Err(Error::invalid(at("memory_mib"), "must be at least 1 MiB"));
                }
                machine.memory_mib = *memory_mib;
            }
            Change::SetVcpus { vcpus, .. } => {
                if *vcpus == 0 {
                    return Err(Error::invalid(at("vcpus"), "must be at least 1"));
                }
                machine.vcpus = *vcpus;
            }
            Change::AddNic { nic, .. } => {
                crate::name::validate(&at("nic.name"), &nic.name)?;
                if machine.nic(&nic.name).is_some() {
                    return Err(Error::already_exists("nic", format!("{env}/{}/{}", machine.name, nic.name)));
                }
                if !networks.contains(&nic.network) {
                    return Err(Error::invalid(at("nic.network"), format!("unknown network {:?}", nic.network)));
                }
                machine.nics.push(nic.clone());
            }
            Change::RemoveNic { nic, .. } => {
                let before = machine.nics.len();
                machine.nics.retain(|n| &n.name != nic);
                if machine.nics.len() == before {
                    return Err(Error::not_found("nic", format!("{env}/{}/{nic}", machine.name)));
                }
            }
            Change::AddDisk { disk, .. } => {
                crate::name::validate(&at("disk.name"), &disk.name)?;
                if machine.disk(&disk.name).is_some() {
                    return Err(Error::already_exists("disk", format!("{env}/{}/{}", machine.name, disk.name)));
                }
                if disk.size_bytes.unwrap_or(0) == 0 {
                    return Err(Error::invalid(at("disk.size_bytes"), "a new disk needs a size"));
                }
                machine.disks.push(disk.clone());
            }
            Change::RemoveDisk { disk, .. } => {
                let before = machine.disks.len();
                machine.disks.retain(|d| &d.name != disk);
                if machine.disks.len() == before {
                    return Err(Error::not_found("disk", format!("{env}/{}/{disk}", machine.name)));
                }
            }
            Change::WriteDisk { disk, .. } | Change::ReplaceDiskImage { disk, .. } => {
                if machine.disk(disk).is_none() {
                    return Err(Error::not_found("disk", format!("{env}/{}/{disk}", machine.name)));
                }
            }
            Change::GuestCommand { command, timeout_secs, .. } => {
                if command.first().is_none_or(|c| c.is_empty()) {
                    return Err(Error::invalid(at("command"), "a guest command needs a program"));
                }
                if *timeout_secs == Some(0) {
                    return Err(Error::invalid(at("timeout_secs"), "must be at least 1"));
                }
            }
            Change::GuestFile { path, mode, .. } => {
                if !path.starts_with('/') || path.contains('\0') || path.split('/').any(|p| p == "..") {
                    return Err(Error::invalid(at("path"), "a guest file path must be absolute, without `..`"));
                }
                if mode.is_some_and(|m| m > 0o7777) {
                    return Err(Error::invalid(at("mode"), "permission bits must be at most 0o7777"));
                }
            }
        }
        Ok(())
    }
}

impl ChangeSet {
    /// Checks the ChangeSet against a spec without changing it: every change must apply in order.
    pub fn check_against(&self, spec: &EnvironmentSpec) -> Result<()> {
        let mut scratch = spec.clone();
        for (i, change) in self.changes.iter().enumerate() {
            change.apply_to_spec(&mut scratch, i)?;
        }
        Ok(())
    }
}
