//! What backends report about environments: roles, baselines, snapshots, power state, and the
//! options a stage is cloned with.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{ChangeSet, EnvironmentSpec};

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

/// Whether an environment is a production or a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Role {
    /// A production environment (created from a spec or attached to existing machines).
    Production,
    /// A stage cloned from a production.
    Stage(Box<StageInfo>),
}

/// What a stage knows about where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageInfo {
    /// The production environment it was cloned from.
    pub source: String,
    /// The baseline it was cloned from.
    pub baseline: Baseline,
    /// Linked or full.
    pub clone: CloneKind,
    /// Whether the stage is fenced.
    pub fenced: bool,
    /// The ChangeSets applied to the stage, in order.
    #[serde(default)]
    pub change_sets: Vec<ChangeSet>,
}

impl StageInfo {
    /// The stage information of a fresh stage cloned from `baseline` with `options` (no ChangeSets yet).
    pub fn new(baseline: &Baseline, options: &StageOptions) -> Self {
        StageInfo {
            source: baseline.environment.clone(),
            baseline: baseline.clone(),
            clone: options.clone,
            fenced: options.fenced,
            change_sets: Vec::new(),
        }
    }
}

/// A machine as the hypervisor knows it: logical name plus the identity it runs under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineInstance {
    /// Logical name (same in production and its stages).
    pub name: String,
    /// The hypervisor-level name (domain name, VM name), unique on the host.
    pub instance_name: String,
    /// The hypervisor UUID.
    pub uuid: String,
}

/// A summary of an environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentInfo {
    /// The environment's name.
    pub name: String,
    /// The backend that runs it.
    pub backend: String,
    /// Production or stage (with its baseline and ChangeSets).
    pub role: Role,
    /// The machines and the identities they run under.
    pub machines: Vec<MachineInstance>,
}

impl EnvironmentInfo {
    /// The stage information, if this is a stage.
    pub fn stage(&self) -> Option<&StageInfo> {
        match &self.role {
            Role::Stage(s) => Some(s),
            Role::Production => None,
        }
    }
}

/// Power state of a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    /// Running.
    Running,
    /// Paused (vCPUs stopped, process alive).
    Paused,
    /// Not running.
    Stopped,
    /// The backend could not tell (stale process, lost socket); `detail` says why.
    Unknown,
}

/// Power state of one machine, with a note when something is off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineStatus {
    /// Logical machine name.
    pub machine: String,
    /// Its power state.
    pub power: PowerState,
    /// Why the state is unknown or anything else worth telling (stale pid, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Linked or full clone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloneKind {
    /// Copy-on-write over the baseline layer: near-instant, shares production's frozen data.
    #[default]
    Linked,
    /// An independent copy of the allocated data.
    Full,
}

/// How to create a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageOptions {
    /// The stage environment's name.
    pub name: String,
    /// Linked or full clone.
    #[serde(default)]
    pub clone: CloneKind,
    /// Fence the stage: its machines reach each other at production's addresses but nothing else.
    #[serde(default = "yes")]
    pub fenced: bool,
    /// Prefix of the stage machines' hypervisor-level names; defaults to `"{name}-"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_prefix: Option<String>,
    /// Start the stage's machines once cloned.
    #[serde(default)]
    pub start: bool,
}

fn yes() -> bool {
    true
}

impl StageOptions {
    /// A linked, fenced, not-started stage called `name`.
    pub fn linked(name: impl Into<String>) -> Self {
        StageOptions { name: name.into(), clone: CloneKind::Linked, fenced: true, name_prefix: None, start: false }
    }

    /// A full, fenced, not-started stage called `name`.
    pub fn full(name: impl Into<String>) -> Self {
        StageOptions { clone: CloneKind::Full, ..Self::linked(name) }
    }

    /// The prefix of hypervisor-level names (`name_prefix`, or `"{name}-"`).
    pub fn prefix(&self) -> String {
        self.name_prefix.clone().unwrap_or_else(|| format!("{}-", self.name))
    }

    /// Checks the options; errors name the field (`stage.name`, `stage.name_prefix`).
    pub fn validate(&self) -> crate::Result<()> {
        crate::name::validate("stage.name", &self.name)?;
        let probe = format!("{}x", self.prefix());
        crate::name::check(&probe).map_err(|r| crate::Error::invalid("stage.name_prefix", format!("prefix {r}")))
    }
}

/// Which existing machines form an environment, for [`crate::Backend::attach`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Selector {
    /// An environment the backend already knows by name.
    Environment {
        /// Its name.
        name: String,
    },
    /// Named hypervisor-level machines, grouped under a new environment name.
    Machines {
        /// The environment name to give the group.
        environment: String,
        /// Hypervisor-level machine names (domain / VM names).
        names: Vec<String>,
    },
    /// Machines carrying a label (libvirt metadata, vSphere tag), grouped under a name.
    Label {
        /// The environment name to give the group.
        environment: String,
        /// Label key.
        key: String,
        /// Label value.
        value: String,
    },
    /// Machines in a folder (vSphere).
    Folder {
        /// The environment name to give the group.
        environment: String,
        /// The folder.
        folder: String,
    },
}

impl Selector {
    /// The environment name this selector gives.
    pub fn environment(&self) -> &str {
        match self {
            Selector::Environment { name } => name,
            Selector::Machines { environment, .. }
            | Selector::Label { environment, .. }
            | Selector::Folder { environment, .. } => environment,
        }
    }
}
