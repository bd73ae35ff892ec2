//! [`EnvRecord`]: the one record of an environment that every backend keeps — role, spec,
//! identities, baselines, origins, snapshots, recorded ChangeSets — and the bookkeeping on it.
//!
//! `L` is the backend's *layer locator* (a file path for QEMU, a volume or snapshot id for
//! libvirt and vSphere, a layer id in memory); `X` holds what only that backend keeps (counters,
//! owned files, power states). With `X: Serialize` the record is the JSON a backend stores with
//! [`crate::toolbox::RecordFile`]; `X`'s fields are flattened into the top level.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{
    Baseline, ChangeSet, CloneKind, EnvironmentInfo, EnvironmentSpec, Error, MachineInstance, Result, Role,
    SnapshotInfo, StageInfo,
    toolbox::plan::{StagePlan, instances},
};

/// The key of one disk in an [`EnvRecord`]'s maps: `machine/disk` (names never contain `/`).
pub fn disk_key(machine: &str, disk: &str) -> String {
    format!("{machine}/{disk}")
}

/// A whole-environment snapshot: its public info plus the frozen layer of every disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound(serialize = "L: Serialize", deserialize = "L: DeserializeOwned"))]
pub struct SnapshotRecord<L> {
    /// What callers see.
    pub info: SnapshotInfo,
    /// `machine/disk` → the frozen layer.
    pub layers: BTreeMap<String, L>,
}

/// Everything a backend knows about one environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound(serialize = "L: Serialize, X: Serialize", deserialize = "L: DeserializeOwned, X: DeserializeOwned"))]
pub struct EnvRecord<L, X = ()> {
    /// The environment's name.
    pub name: String,
    /// Production, or a stage with its baseline and recorded ChangeSets.
    pub role: Role,
    /// The spec (logical names, identities, disk sources as the backend gives them).
    pub spec: EnvironmentSpec,
    /// Prefix of the hypervisor-level instance names (`""` for a production).
    pub prefix: String,
    /// Whether the environment's NICs are on segments private to it.
    pub fenced: bool,
    /// The id private segments are named after (fenced stages).
    #[serde(default)]
    pub segment_id: String,
    /// Baselines taken of this environment, oldest first.
    #[serde(default)]
    pub baselines: Vec<Baseline>,
    /// Baseline id → `machine/disk` → the layer holding the baseline's content in this
    /// environment's chains (for a production its frozen layer; for a full stage its copy).
    #[serde(default)]
    pub origins: BTreeMap<String, BTreeMap<String, L>>,
    /// Snapshots, oldest first.
    #[serde(default)]
    pub snapshots: Vec<SnapshotRecord<L>>,
    /// `machine/disk` → the writable top of the disk.
    pub disks: BTreeMap<String, L>,
    /// What only the backend keeps.
    #[serde(flatten)]
    pub backend: X,
}

impl<L: Clone, X> EnvRecord<L, X> {
    /// The record of a new production: `spec` (identities already filled, see
    /// [`crate::toolbox::fill_identities`]) with its disks' tops.
    pub fn production(spec: EnvironmentSpec, disks: BTreeMap<String, L>, backend: X) -> Self {
        EnvRecord {
            name: spec.name.clone(),
            role: Role::Production,
            spec,
            prefix: String::new(),
            fenced: false,
            segment_id: String::new(),
            baselines: Vec::new(),
            origins: BTreeMap::new(),
            snapshots: Vec::new(),
            disks,
            backend,
        }
    }

    /// The record of a stage made from `plan`: its disks' tops, and per disk the layer that
    /// holds the baseline's content (the baseline layer for linked disks, the copy for full).
    pub fn stage(plan: &StagePlan, disks: BTreeMap<String, L>, origin: BTreeMap<String, L>, backend: X) -> Self {
        EnvRecord {
            name: plan.name.clone(),
            role: Role::Stage(Box::new(plan.info.clone())),
            spec: plan.spec.clone(),
            prefix: plan.prefix.clone(),
            fenced: plan.fencing.fenced,
            segment_id: plan.fencing.segment_id.clone(),
            baselines: Vec::new(),
            origins: [(plan.baseline().id.clone(), origin)].into(),
            snapshots: Vec::new(),
            disks,
            backend,
        }
    }

    /// The hypervisor-level identities, from the spec.
    pub fn instances(&self) -> Vec<MachineInstance> {
        instances(&self.spec, &self.prefix)
    }

    /// The summary callers see; `backend` is the backend's name.
    pub fn info(&self, backend: &str) -> EnvironmentInfo {
        EnvironmentInfo {
            name: self.name.clone(),
            backend: backend.into(),
            role: self.role.clone(),
            machines: self.instances(),
        }
    }

    /// The stage information, if this is a stage.
    pub fn stage_info(&self) -> Option<&StageInfo> {
        match &self.role {
            Role::Stage(s) => Some(s),
            Role::Production => None,
        }
    }

    /// Whether this is a linked stage of `production` (which then cannot be destroyed).
    pub fn is_linked_stage_of(&self, production: &str) -> bool {
        self.stage_info().is_some_and(|s| s.source == production && s.clone == CloneKind::Linked)
    }

    /// The writable top of `machine`/`disk`, or `NotFound` naming machine or disk.
    pub fn top(&self, machine: &str, disk: &str) -> Result<&L> {
        self.spec.require_machine(machine)?;
        self.disks
            .get(&disk_key(machine, disk))
            .ok_or_else(|| Error::not_found("disk", format!("{}/{machine}/{disk}", self.name)))
    }

    /// Which name the segments of this environment's NICs are named after: its own segment id
    /// when fenced, else its production's name.
    pub fn segment_owner(&self) -> String {
        match &self.role {
            _ if self.fenced => self.segment_id.clone(),
            Role::Stage(s) => s.source.clone(),
            Role::Production => self.name.clone(),
        }
    }

    /// Fails unless this is a production (baselines are taken of productions only).
    pub fn require_production(&self) -> Result<()> {
        match self.role {
            Role::Production => Ok(()),
            Role::Stage(_) => {
                Err(Error::Precondition(format!("{} is a stage; baselines are taken of production", self.name)))
            }
        }
    }

    /// Records a baseline taken of this environment with, per disk, its frozen layer.
    pub fn push_baseline(&mut self, baseline: Baseline, origin: BTreeMap<String, L>) {
        self.origins.insert(baseline.id.clone(), origin);
        self.baselines.push(baseline);
    }

    /// The baseline `id` taken of this environment.
    pub fn baseline(&self, id: &str) -> Option<&Baseline> {
        self.baselines.iter().find(|b| b.id == id)
    }

    /// The layer of `key` holding `baseline_id`'s content in this environment's chains.
    pub fn origin(&self, baseline_id: &str, key: &str) -> Option<&L> {
        self.origins.get(baseline_id)?.get(key)
    }

    /// Records a ChangeSet as applied to this stage; a production refuses.
    pub fn record_change_set(&mut self, change_set: &ChangeSet) -> Result<()> {
        match &mut self.role {
            Role::Stage(s) => {
                s.change_sets.push(change_set.clone());
                Ok(())
            }
            Role::Production => Err(Error::Precondition(format!("{} is not a stage", self.name))),
        }
    }

    /// Checks a new snapshot name: valid, and not taken in this environment.
    pub fn require_new_snapshot(&self, name: &str) -> Result<()> {
        crate::name::validate("snapshot", name)?;
        if self.snapshots.iter().any(|s| s.info.name == name) {
            return Err(Error::already_exists("snapshot", format!("{}/{name}", self.name)));
        }
        Ok(())
    }

    /// The snapshot called `name`, or `NotFound` naming environment and snapshot.
    pub fn snapshot(&self, name: &str) -> Result<&SnapshotRecord<L>> {
        crate::name::validate("snapshot", name)?;
        self.snapshots
            .iter()
            .find(|s| s.info.name == name)
            .ok_or_else(|| Error::not_found("snapshot", format!("{}/{name}", self.name)))
    }

    /// Removes the snapshot called `name` from the record and returns it.
    pub fn remove_snapshot(&mut self, name: &str) -> Result<SnapshotRecord<L>> {
        self.snapshot(name)?;
        let i = self.snapshots.iter().position(|s| s.info.name == name).expect("found above");
        Ok(self.snapshots.remove(i))
    }

    /// The snapshots' public infos, oldest first.
    pub fn snapshot_infos(&self) -> Vec<SnapshotInfo> {
        self.snapshots.iter().map(|s| s.info.clone()).collect()
    }
}

impl<L: PartialEq, X> EnvRecord<L, X> {
    /// Whether `layer` is a disk top, a snapshot layer or an origin of this environment.
    pub fn references(&self, layer: &L) -> bool {
        self.disks.values().any(|l| l == layer)
            || self.snapshots.iter().any(|s| s.layers.values().any(|l| l == layer))
            || self.origins.values().any(|o| o.values().any(|l| l == layer))
    }
}

/// The linked-child refusal of destroy: `name` cannot be destroyed while a linked stage of it
/// exists (its disks are that stage's base). `others` are the other environments' roles.
pub fn check_destroy<'a>(name: &str, others: impl IntoIterator<Item = (&'a str, &'a Role)>) -> Result<()> {
    for (child, role) in others {
        if let Role::Stage(s) = role
            && s.source == name
            && s.clone == CloneKind::Linked
            && child != name
        {
            return Err(Error::Precondition(format!("stage {child} is a linked clone of {name}; destroy it first")));
        }
    }
    Ok(())
}
