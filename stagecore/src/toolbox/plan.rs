//! [`StagePlan`]: the stage algorithm, computed once from a [`Baseline`] and [`StageOptions`] and
//! executed by a backend.
//!
//! The plan checks the options (names, prefix), that the baseline has a frozen layer for every
//! disk of its spec, and that the baseline's production still knows it; it chooses the stage's
//! identities (new UUID per machine, new MAC per NIC, instance names `prefix + machine`), a clone
//! plan per disk (linked: an overlay over the baseline layer; full: a copy of it), the fencing
//! plan (a segment id private to the stage) and the [`StageInfo`]. A backend only executes it:
//! it makes the disks, defines the machines, and records the result with
//! [`crate::toolbox::EnvRecord::stage`], rolling back through [`crate::toolbox::Undo`] when a
//! step fails.

use crate::{
    Baseline, CloneKind, EnvironmentSpec, Error, MachineInstance, Result, StageInfo, StageOptions,
    toolbox::identity::{new_uuid, renew_identities},
    toolbox::record::disk_key,
};

/// How one disk of the stage is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlan {
    /// Logical machine name.
    pub machine: String,
    /// Logical disk name.
    pub disk: String,
    /// `machine/disk`, the key of the disk in an [`crate::toolbox::EnvRecord`].
    pub key: String,
    /// The backend locator of the baseline's frozen layer of this disk.
    pub layer: String,
    /// Linked (overlay over `layer`) or full (copy of `layer`, then an overlay over the copy).
    pub clone: CloneKind,
    /// The disk's virtual size as the baseline's spec gives it.
    pub size_bytes: Option<u64>,
}

/// Where the stage's NICs go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FencingPlan {
    /// Whether the stage is fenced: its NICs go to segments private to it.
    pub fenced: bool,
    /// The id the stage's private segments are named after (new for every stage).
    pub segment_id: String,
}

/// The stage algorithm's result, for a backend to execute.
#[derive(Debug, Clone, PartialEq)]
pub struct StagePlan {
    /// The stage environment's name.
    pub name: String,
    /// The prefix of the stage machines' hypervisor-level names.
    pub prefix: String,
    /// The stage's spec: the baseline's with the stage's name and new UUIDs and MACs. Disk
    /// sources are still the baseline's until the backend sets them
    /// ([`StagePlan::set_disk_sources`]).
    pub spec: EnvironmentSpec,
    /// One entry per disk, in spec order.
    pub disks: Vec<DiskPlan>,
    /// Where the NICs go.
    pub fencing: FencingPlan,
    /// Whether to start the machines once cloned.
    pub start: bool,
    /// What the stage will know about where it came from.
    pub info: StageInfo,
}

impl StagePlan {
    /// Plans a stage of `baseline` with `options`: checks the options and that every disk of the
    /// baseline's spec has a frozen layer, then chooses identities, disk and fencing plans.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use stagecore::{Backend, StageOptions, toolbox::StagePlan};
    /// let backend = stagecore::memory::MemoryBackend::new();
    /// let prod = backend.create(&stagecore::memory::sample_spec("prod")).await?;
    /// let baseline = prod.take_baseline().await?;
    /// let plan = StagePlan::new(&baseline, &StageOptions::linked("try-1"))?;
    /// assert_eq!(plan.spec.name, "try-1");
    /// assert_ne!(plan.spec.machines[0].uuid, baseline.spec.machines[0].uuid);
    /// assert_eq!(plan.instances()[0].instance_name, format!("try-1-{}", plan.spec.machines[0].name));
    /// # Ok::<(), stagecore::Error>(()) }).unwrap();
    /// ```
    pub fn new(baseline: &Baseline, options: &StageOptions) -> Result<StagePlan> {
        options.validate()?;
        let mut disks = Vec::new();
        for m in &baseline.spec.machines {
            for d in &m.disks {
                let layer = baseline.layer(&m.name, &d.name).ok_or_else(|| {
                    Error::not_found(
                        "baseline layer",
                        format!("{}/{}/{}/{}", baseline.environment, baseline.id, m.name, d.name),
                    )
                })?;
                disks.push(DiskPlan {
                    machine: m.name.clone(),
                    disk: d.name.clone(),
                    key: disk_key(&m.name, &d.name),
                    layer: layer.layer.clone(),
                    clone: options.clone,
                    size_bytes: d.size_bytes,
                });
            }
        }
        let mut spec = baseline.spec.clone();
        spec.name = options.name.clone();
        renew_identities(&mut spec);
        Ok(StagePlan {
            name: options.name.clone(),
            prefix: options.prefix(),
            spec,
            disks,
            fencing: FencingPlan { fenced: options.fenced, segment_id: new_uuid() },
            start: options.start,
            info: StageInfo::new(baseline, options),
        })
    }

    /// The baseline the stage is cloned from.
    pub fn baseline(&self) -> &Baseline {
        &self.info.baseline
    }

    /// Fails with `AlreadyExists` when the backend already has an environment of this name.
    pub fn require_name_free(&self, taken: bool) -> Result<()> {
        if taken { Err(Error::already_exists("environment", &self.name)) } else { Ok(()) }
    }

    /// Fails with `NotFound` when the baseline's production is known to the backend
    /// (`production_baselines` is `Some`) but does not list the baseline. `None` means the
    /// production lives where this backend cannot see its record (another root, another
    /// host): the layers themselves are then the proof, checked by the backend.
    pub fn require_known_baseline(&self, production_baselines: Option<&[Baseline]>) -> Result<()> {
        let b = self.baseline();
        match production_baselines {
            Some(list) if !list.iter().any(|x| x.id == b.id) => {
                Err(Error::not_found("baseline", format!("{}/{}", b.environment, b.id)))
            }
            _ => Ok(()),
        }
    }

    /// Sets every disk's `source` in the stage's spec to `f(machine, disk)` (the backend's
    /// locator of the stage's own disk).
    pub fn set_disk_sources(&mut self, f: impl Fn(&str, &str) -> String) {
        for m in &mut self.spec.machines {
            for d in &mut m.disks {
                d.source = f(&m.name, &d.name);
            }
        }
    }

    /// The hypervisor-level identities the stage's machines get.
    pub fn instances(&self) -> Vec<MachineInstance> {
        instances(&self.spec, &self.prefix)
    }
}

/// The hypervisor-level identities of `spec`'s machines under `prefix`.
pub(crate) fn instances(spec: &EnvironmentSpec, prefix: &str) -> Vec<MachineInstance> {
    spec.machines
        .iter()
        .map(|m| MachineInstance {
            name: m.name.clone(),
            instance_name: format!("{prefix}{}", m.name),
            uuid: m.uuid.clone().unwrap_or_default(),
        })
        .collect()
}
