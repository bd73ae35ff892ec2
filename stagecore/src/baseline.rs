//! [`Baseline`]: the frozen point of production a stage is cloned from, and how consistent each
//! machine's layers are ([`MachineConsistency`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::EnvironmentSpec;

/// The point in production's history a stage was cloned from: a read-only layer per disk plus the
/// spec at that moment. Drift and promotion are measured against it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Baseline {
    /// Unique id (`bl-…`), chosen by the backend.
    pub id: String,
    /// The production environment it belongs to.
    pub environment: String,
    /// When it was taken.
    #[serde(with = "time::serde::rfc3339")]
    pub taken_at: OffsetDateTime,
    /// Production's spec at that moment.
    pub spec: EnvironmentSpec,
    /// One read-only layer per disk.
    pub layers: Vec<BaselineLayer>,
    /// The consistency each machine's layers reached (logical machine name → level).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub consistency: BTreeMap<String, MachineConsistency>,
}

/// The frozen layer of one disk in a [`Baseline`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaselineLayer {
    /// Logical machine name.
    pub machine: String,
    /// Logical disk name.
    pub disk: String,
    /// Backend locator of the frozen layer (file path, snapshot id, layer id).
    pub layer: String,
}

impl Baseline {
    /// The frozen layer of `machine`/`disk`.
    pub fn layer(&self, machine: &str, disk: &str) -> Option<&BaselineLayer> {
        self.layers.iter().find(|l| l.machine == machine && l.disk == disk)
    }
}

/// How consistent one machine's disks are in a snapshot or baseline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConsistency {
    /// The level reached.
    pub level: ConsistencyLevel,
    /// Why a higher level was not reached (no agent, freeze failed), if it was tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl MachineConsistency {
    /// A level without a note.
    pub fn new(level: ConsistencyLevel) -> Self {
        MachineConsistency { level, detail: None }
    }

    /// A level with a note saying why no higher one was reached.
    pub fn with_detail(level: ConsistencyLevel, detail: impl Into<String>) -> Self {
        MachineConsistency { level, detail: Some(detail.into()) }
    }
}

/// The consistency levels of one machine's disks, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsistencyLevel {
    /// Captured while running, as after a power loss (no guest cooperation).
    Crash,
    /// The guest agent froze the guest's filesystems around the capture (`guest-fsfreeze-freeze`):
    /// everything written before is on disk, journals are checkpointed.
    Application,
    /// The machine was not running: its disks were at rest.
    Stopped,
}
