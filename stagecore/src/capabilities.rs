//! What a backend can do, declared as data.
//!
//! Callers and the conformance kit ask [`Capabilities`] before calling; an operation a backend
//! does not declare returns [`crate::Error::NotSupported`].

use serde::{Deserialize, Serialize};

/// The abilities of a backend; all default to `false`. The struct is `#[non_exhaustive]` so new
/// abilities can be added: outside this crate, start from `default()` and set fields.
///
/// ```
/// let mut caps = stagecore::Capabilities::default();
/// caps.linked_clone = true;
/// assert!(!caps.full_clone);
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
    /// Raw disk access for tests and fingerprints ([`crate::Environment::disk_io`]).
    pub disk_io: bool,
    /// A guest channel for commands and files ([`crate::Environment::guest`]).
    pub guest_channel: bool,
    /// Config changes (memory, vCPUs, NICs, disks) through [`crate::Environment::apply`].
    pub config_changes: bool,
    /// Swap promotion ([`crate::Backend::swap`]).
    pub swap: bool,
    /// Environments outlive the process that made them and can be reopened by name.
    pub persistent: bool,
}
