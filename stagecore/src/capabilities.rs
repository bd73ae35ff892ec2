//! What a backend can do, declared as data, and checked in one place ([`crate::checked`]).
//!
//! Callers and the conformance kit ask [`Capabilities`] before calling; an operation a backend
//! does not declare returns [`crate::Error::NotSupported`] — the check layer makes sure of that,
//! so a backend cannot forget to.

use serde::{Deserialize, Serialize};

use crate::Change;

/// The abilities of a backend; all default to `false`. The struct is `#[non_exhaustive]` so new
/// abilities can be added: outside this crate, start from `default()` and set fields.
///
/// ```
/// let mut caps = stagecore::Capabilities::default();
/// caps.linked_clone = true;
/// caps.changes.set_memory = true;
/// assert!(!caps.full_clone);
/// assert!(caps.allows(&stagecore::Change::SetMemory { machine: "web".into(), memory_mib: 512 }));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Capabilities {
    /// Creates environments from a spec ([`crate::Backend::create`]).
    pub create: bool,
    /// Linked clones: copy-on-write over the baseline, near-instant.
    pub linked_clone: bool,
    /// Full clones: independent copies.
    pub full_clone: bool,
    /// Fenced stages: NICs on a segment private to the stage.
    pub fencing: bool,
    /// Snapshots of running machines.
    pub live_snapshot: bool,
    /// Snapshots that include memory state.
    pub memory_snapshot: bool,
    /// Whole-environment snapshots are crash-consistent (all disks captured at one instant).
    pub atomic_snapshot: bool,
    /// Per-disk changed extents since a baseline ([`crate::Environment::disk_changes`]).
    pub disk_drift: bool,
    /// Raw disk access for tests and fingerprints ([`crate::Environment::disk_io`]). The check
    /// layer hands out an environment's `DiskIo` only when this is declared, and refuses an
    /// environment whose accessor disagrees with it.
    pub disk_io: bool,
    /// A guest channel for commands and files ([`crate::Environment::guest`]); checked against
    /// the accessor like [`Capabilities::disk_io`].
    pub guest_channel: bool,
    /// Which kinds of [`Change`] [`crate::Environment::apply`] takes, one flag per kind.
    pub changes: ChangeKinds,
    /// Swap promotion ([`crate::Backend::swap`]).
    pub swap: bool,
    /// Environments outlive the process that made them and can be reopened by name.
    pub persistent: bool,
}

impl Capabilities {
    /// Whether `change` is of a kind this backend applies (guest changes also need
    /// [`Capabilities::guest_channel`]).
    pub fn allows(&self, change: &Change) -> bool {
        let kind = self.changes.allows(change);
        match change {
            Change::GuestCommand { .. } | Change::GuestFile { .. } => kind && self.guest_channel,
            Change::WriteDisk { .. } => kind && self.disk_io,
            _ => kind,
        }
    }
}

/// One flag per kind of [`Change`] (the names are [`Change::kind`]'s).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ChangeKinds {
    /// [`Change::SetMemory`].
    pub set_memory: bool,
    /// [`Change::SetVcpus`].
    pub set_vcpus: bool,
    /// [`Change::AddNic`].
    pub add_nic: bool,
    /// [`Change::RemoveNic`].
    pub remove_nic: bool,
    /// [`Change::AddDisk`].
    pub add_disk: bool,
    /// [`Change::RemoveDisk`].
    pub remove_disk: bool,
    /// [`Change::WriteDisk`] (also needs [`Capabilities::disk_io`]).
    pub write_disk: bool,
    /// [`Change::ReplaceDiskImage`].
    pub replace_disk_image: bool,
    /// [`Change::GuestCommand`] (also needs [`Capabilities::guest_channel`]).
    pub guest_command: bool,
    /// [`Change::GuestFile`] (also needs [`Capabilities::guest_channel`]).
    pub guest_file: bool,
}

impl ChangeKinds {
    /// Every kind.
    pub fn all() -> Self {
        ChangeKinds {
            set_memory: true,
            set_vcpus: true,
            add_nic: true,
            remove_nic: true,
            add_disk: true,
            remove_disk: true,
            write_disk: true,
            replace_disk_image: true,
            guest_command: true,
            guest_file: true,
        }
    }

    /// The configuration kinds (memory, vCPUs, NICs, disks: [`Change::is_config`]).
    pub fn config() -> Self {
        ChangeKinds {
            write_disk: false,
            replace_disk_image: false,
            guest_command: false,
            guest_file: false,
            ..Self::all()
        }
    }

    /// Whether every configuration kind is taken.
    pub fn all_config(&self) -> bool {
        self.set_memory && self.set_vcpus && self.add_nic && self.remove_nic && self.add_disk && self.remove_disk
    }

    /// The flag of the kind called `kind` ([`Change::kind`]'s names); `false` for unknown names.
    pub fn get(&self, kind: &str) -> bool {
        match kind {
            "set_memory" => self.set_memory,
            "set_vcpus" => self.set_vcpus,
            "add_nic" => self.add_nic,
            "remove_nic" => self.remove_nic,
            "add_disk" => self.add_disk,
            "remove_disk" => self.remove_disk,
            "write_disk" => self.write_disk,
            "replace_disk_image" => self.replace_disk_image,
            "guest_command" => self.guest_command,
            "guest_file" => self.guest_file,
            _ => false,
        }
    }

    /// The flag of `change`'s kind.
    pub fn allows(&self, change: &Change) -> bool {
        match change {
            Change::SetMemory { .. } => self.set_memory,
            Change::SetVcpus { .. } => self.set_vcpus,
            Change::AddNic { .. } => self.add_nic,
            Change::RemoveNic { .. } => self.remove_nic,
            Change::AddDisk { .. } => self.add_disk,
            Change::RemoveDisk { .. } => self.remove_disk,
            Change::WriteDisk { .. } => self.write_disk,
            Change::ReplaceDiskImage { .. } => self.replace_disk_image,
            Change::GuestCommand { .. } => self.guest_command,
            Change::GuestFile { .. } => self.guest_file,
        }
    }
}
