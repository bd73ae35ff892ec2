//! [`SnapshotInfo`]: a named point of a whole environment, and its [`Consistency`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{EnvironmentSpec, MachineConsistency};

/// How consistent a whole-environment snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// Every disk of every machine captured at one instant (pause all → capture → resume).
    CrashConsistent,
    /// Each machine is crash-consistent on its own; machines were captured one after another.
    PerMachine,
}

/// A named point of a whole environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Snapshot name, unique in the environment.
    pub name: String,
    /// The environment it belongs to.
    pub environment: String,
    /// When it was taken.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The environment's spec at that moment.
    pub spec: EnvironmentSpec,
    /// Consistency across machines.
    pub consistency: Consistency,
    /// Whether memory state was captured.
    pub memory: bool,
    /// The consistency each machine's disks reached (logical machine name → level).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub machines: BTreeMap<String, MachineConsistency>,
}
