//! The in-memory backend's state: one [`EnvRecord`] per environment (the toolbox's record, with
//! layer ids as locators) plus what only this backend keeps — power states and simulated guests.
//! Everything here is mechanism: the bookkeeping is the toolbox's.

use std::collections::BTreeMap;

use time::OffsetDateTime;

use super::disk::{LayerId, LayerStore};
use super::guest::{Guests, SimGuest};
use crate::toolbox::{EnvRecord, StagePlan, disk_key, fill_identities, new_baseline_id};
use crate::{Baseline, BaselineLayer, CloneKind, EnvironmentSpec, Error, Identities, PowerState, Result};

/// One disk: its writable top layer and virtual size (the memory backend's layer locator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DiskState {
    pub(crate) top: LayerId,
    pub(crate) size: u64,
}

/// What only the memory backend keeps about an environment.
#[derive(Debug, Default)]
pub(crate) struct Extra {
    pub(crate) power: BTreeMap<String, PowerState>,
    /// The simulated guest of each machine.
    pub(crate) guests: Guests,
    /// The simulated guests at each baseline taken of this environment.
    pub(crate) baseline_guests: BTreeMap<String, Guests>,
    /// The simulated guests at each snapshot, by snapshot name.
    pub(crate) snapshot_guests: BTreeMap<String, Guests>,
}

/// One environment.
pub(crate) type EnvState = EnvRecord<DiskState, Extra>;

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) layers: LayerStore,
    pub(crate) envs: BTreeMap<String, EnvState>,
}

impl State {
    pub(crate) fn env(&self, name: &str) -> Result<&EnvState> {
        self.envs.get(name).ok_or_else(|| Error::not_found("environment", name))
    }

    pub(crate) fn insert(&mut self, env: EnvState) -> Result<()> {
        if self.envs.contains_key(&env.name) {
            return Err(Error::already_exists("environment", &env.name));
        }
        self.envs.insert(env.name.clone(), env);
        Ok(())
    }

    /// Exchanges machines and data of `production` and `stage`, keeping each side's identities.
    pub(crate) fn swap(&mut self, production: &str, stage: &str) -> Result<()> {
        let mut p = self.envs.remove(production).ok_or_else(|| Error::not_found("environment", production))?;
        let Some(mut s) = self.envs.remove(stage) else {
            self.envs.insert(production.into(), p);
            return Err(Error::not_found("environment", stage));
        };
        let (p_ids, s_ids) = (Identities::of(&p.spec), Identities::of(&s.spec));
        std::mem::swap(&mut p.spec.machines, &mut s.spec.machines);
        std::mem::swap(&mut p.disks, &mut s.disks);
        std::mem::swap(&mut p.backend.power, &mut s.backend.power);
        std::mem::swap(&mut p.backend.guests, &mut s.backend.guests);
        p_ids.apply_to(&mut p.spec);
        s_ids.apply_to(&mut s.spec);
        set_power_all(&mut s, PowerState::Stopped);
        self.envs.insert(production.into(), p);
        self.envs.insert(stage.into(), s);
        Ok(())
    }
}

fn extra_for(spec: &EnvironmentSpec, guests: Guests) -> Extra {
    Extra {
        power: spec.machines.iter().map(|m| (m.name.clone(), PowerState::Stopped)).collect(),
        guests,
        ..Extra::default()
    }
}

/// A new production with empty disks; identities filled where absent.
pub(crate) fn create(layers: &mut LayerStore, spec: &EnvironmentSpec) -> Result<EnvState> {
    let mut spec = spec.clone();
    fill_identities(&mut spec);
    let mut disks = BTreeMap::new();
    for (i, m) in spec.machines.iter().enumerate() {
        for (j, d) in m.disks.iter().enumerate() {
            let size = d.size_bytes.ok_or_else(|| {
                Error::invalid(format!("machines[{i}].disks[{j}].size_bytes"), "the memory backend needs a size")
            })?;
            disks.insert(disk_key(&m.name, &d.name), DiskState { top: layers.overlay(None), size });
        }
    }
    let guests = spec.machines.iter().map(|m| (m.name.clone(), SimGuest::new(&m.name))).collect();
    let extra = extra_for(&spec, guests);
    Ok(EnvRecord::production(spec, disks, extra))
}

/// Executes a stage plan: per disk an overlay over the baseline layer (linked) or over a
/// flattened copy of it (full); the simulated guests as of the baseline, with new identities.
pub(crate) fn execute(layers: &mut LayerStore, plan: &StagePlan, guests: Guests) -> Result<EnvState> {
    let (mut disks, mut origin) = (BTreeMap::new(), BTreeMap::new());
    for d in &plan.disks {
        let layer = d
            .layer
            .strip_prefix("layer:")
            .and_then(|l| l.parse::<LayerId>().ok())
            .ok_or_else(|| Error::not_found("baseline layer", format!("{}/{}", d.machine, d.disk)))?;
        let base = match d.clone {
            CloneKind::Linked => layer,
            CloneKind::Full => layers.flatten(layer),
        };
        let size = d.size_bytes.unwrap_or(0);
        origin.insert(d.key.clone(), DiskState { top: base, size });
        disks.insert(d.key.clone(), DiskState { top: layers.overlay(Some(base)), size });
    }
    let mut plan = plan.clone();
    let name = plan.name.clone();
    plan.set_disk_sources(|m, d| format!("memory:{name}/{m}/{d}"));
    let mut extra = extra_for(&plan.spec, guests);
    for (machine, guest) in extra.guests.iter_mut() {
        guest.regenerate_identity(&format!("{}{machine}", plan.prefix));
    }
    if plan.start {
        extra.power.values_mut().for_each(|p| *p = PowerState::Running);
    }
    Ok(EnvRecord::stage(&plan, disks, origin, extra))
}

pub(crate) fn set_power_all(env: &mut EnvState, power: PowerState) {
    for p in env.backend.power.values_mut() {
        *p = power;
    }
}

/// Sets the power state of one machine (callers checked the name).
pub(crate) fn set_power(env: &mut EnvState, machine: &str, power: PowerState) {
    if let Some(p) = env.backend.power.get_mut(machine) {
        *p = power;
    }
}

/// The disk state of `machine`/`disk`.
pub(crate) fn disk(env: &EnvState, machine: &str, disk: &str) -> Result<DiskState> {
    env.top(machine, disk).copied()
}

/// Freezes every disk's top and returns the frozen layers.
pub(crate) fn freeze_all(env: &mut EnvState, layers: &mut LayerStore) -> BTreeMap<String, DiskState> {
    let mut frozen = BTreeMap::new();
    for (key, d) in env.disks.iter_mut() {
        frozen.insert(key.clone(), *d);
        d.top = layers.freeze(d.top);
    }
    frozen
}

/// Takes a baseline: freezes every disk and records the frozen layers and guests.
pub(crate) fn take_baseline(env: &mut EnvState, layers: &mut LayerStore) -> Result<Baseline> {
    env.require_production()?;
    let frozen = freeze_all(env, layers);
    let mut layer_list = Vec::new();
    for m in &env.spec.machines {
        for d in &m.disks {
            let s = frozen[&disk_key(&m.name, &d.name)];
            layer_list.push(BaselineLayer {
                machine: m.name.clone(),
                disk: d.name.clone(),
                layer: format!("layer:{}", s.top),
            });
        }
    }
    let baseline = Baseline {
        id: new_baseline_id(),
        environment: env.name.clone(),
        taken_at: OffsetDateTime::now_utc(),
        spec: env.spec.clone(),
        layers: layer_list,
        consistency: Default::default(),
    };
    env.backend.baseline_guests.insert(baseline.id.clone(), env.backend.guests.clone());
    env.push_baseline(baseline.clone(), frozen);
    Ok(baseline)
}
