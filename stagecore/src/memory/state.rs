//! The in-memory backend's state: environments, their disks (layer ids), snapshots, baselines.

use std::collections::BTreeMap;

use time::OffsetDateTime;

use super::disk::{LayerId, LayerStore};
use super::guest::{Guests, SimGuest};
use crate::{
    Baseline, BaselineLayer, CloneKind, EnvironmentInfo, EnvironmentSpec, Error, Identities, MachineInstance,
    PowerState, Result, Role, SnapshotInfo, StageInfo, StageOptions, random_mac,
};

/// One disk: its writable top layer and virtual size.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DiskState {
    pub(crate) top: LayerId,
    pub(crate) size: u64,
}

pub(crate) type DiskKey = (String, String);

#[derive(Debug)]
pub(crate) struct SnapshotState {
    pub(crate) info: SnapshotInfo,
    pub(crate) layers: BTreeMap<DiskKey, DiskState>,
    /// The simulated guests at the snapshot.
    pub(crate) guests: Guests,
}

#[derive(Debug)]
pub(crate) struct EnvState {
    pub(crate) name: String,
    pub(crate) role: Role,
    pub(crate) spec: EnvironmentSpec,
    pub(crate) instances: Vec<MachineInstance>,
    pub(crate) power: BTreeMap<String, PowerState>,
    pub(crate) disks: BTreeMap<DiskKey, DiskState>,
    pub(crate) snapshots: Vec<SnapshotState>,
    /// Baselines taken of this environment.
    pub(crate) baselines: Vec<Baseline>,
    /// For each baseline id this environment is measured against: the layer per disk that holds
    /// the baseline's content in *this* environment's chains.
    pub(crate) origins: BTreeMap<String, BTreeMap<DiskKey, LayerId>>,
    pub(crate) fenced: bool,
    /// The simulated guest of each machine.
    pub(crate) guests: Guests,
    /// The simulated guests at each baseline taken of this environment.
    pub(crate) baseline_guests: BTreeMap<String, Guests>,
}

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
        std::mem::swap(&mut p.power, &mut s.power);
        std::mem::swap(&mut p.guests, &mut s.guests);
        p_ids.apply_to(&mut p.spec);
        s_ids.apply_to(&mut s.spec);
        s.set_power_all(PowerState::Stopped);
        self.envs.insert(production.into(), p);
        self.envs.insert(stage.into(), s);
        Ok(())
    }
}

impl EnvState {
    /// A new environment with empty disks; identities (UUIDs, MACs) filled where absent.
    pub(crate) fn create(
        layers: &mut LayerStore,
        spec: &EnvironmentSpec,
        name: &str,
        role: Role,
        fenced: bool,
    ) -> Result<Self> {
        let mut spec = spec.clone();
        spec.name = name.into();
        let mut disks = BTreeMap::new();
        for (i, m) in spec.machines.iter_mut().enumerate() {
            m.uuid.get_or_insert_with(|| uuid::Uuid::new_v4().to_string());
            for n in &mut m.nics {
                n.mac.get_or_insert_with(random_mac);
            }
            for (j, d) in m.disks.iter().enumerate() {
                let size = d.size_bytes.ok_or_else(|| {
                    Error::invalid(format!("machines[{i}].disks[{j}].size_bytes"), "the memory backend needs a size")
                })?;
                disks.insert((m.name.clone(), d.name.clone()), DiskState { top: layers.overlay(None), size });
            }
        }
        let mut env = Self::assemble(name, role, spec, disks, fenced, String::new());
        env.guests = env.spec.machines.iter().map(|m| (m.name.clone(), SimGuest::new(&m.name))).collect();
        Ok(env)
    }

    fn assemble(
        name: &str,
        role: Role,
        spec: EnvironmentSpec,
        disks: BTreeMap<DiskKey, DiskState>,
        fenced: bool,
        prefix: String,
    ) -> Self {
        let instances = spec
            .machines
            .iter()
            .map(|m| MachineInstance {
                name: m.name.clone(),
                instance_name: format!("{prefix}{}", m.name),
                uuid: m.uuid.clone().unwrap_or_default(),
            })
            .collect();
        let power = spec.machines.iter().map(|m| (m.name.clone(), PowerState::Stopped)).collect();
        EnvState {
            name: name.into(),
            role,
            spec,
            instances,
            power,
            disks,
            snapshots: Vec::new(),
            baselines: Vec::new(),
            origins: BTreeMap::new(),
            fenced,
            guests: Guests::new(),
            baseline_guests: BTreeMap::new(),
        }
    }

    /// A stage cloned from `baseline`: new identities, linked or full disks.
    pub(crate) fn clone_from(
        layers: &mut LayerStore,
        baseline: &Baseline,
        options: &StageOptions,
        info: StageInfo,
        guests: Guests,
    ) -> Result<Self> {
        let mut spec = baseline.spec.clone();
        spec.name = options.name.clone();
        let mut disks = BTreeMap::new();
        let mut origin = BTreeMap::new();
        for m in &mut spec.machines {
            m.uuid = Some(uuid::Uuid::new_v4().to_string());
            for n in &mut m.nics {
                n.mac = Some(random_mac());
            }
            for d in &mut m.disks {
                let layer = baseline
                    .layer(&m.name, &d.name)
                    .and_then(|l| l.layer.strip_prefix("layer:")?.parse::<LayerId>().ok())
                    .ok_or_else(|| Error::not_found("baseline layer", format!("{}/{}", m.name, d.name)))?;
                let base = match options.clone {
                    CloneKind::Linked => layer,
                    CloneKind::Full => layers.flatten(layer),
                };
                let size = d.size_bytes.unwrap_or(0);
                d.source = format!("memory:{}/{}/{}", options.name, m.name, d.name);
                origin.insert((m.name.clone(), d.name.clone()), base);
                disks.insert((m.name.clone(), d.name.clone()), DiskState { top: layers.overlay(Some(base)), size });
            }
        }
        let mut env =
            Self::assemble(&options.name, Role::Stage(Box::new(info)), spec, disks, options.fenced, options.prefix());
        env.origins.insert(baseline.id.clone(), origin);
        env.guests = guests;
        for (machine, guest) in env.guests.iter_mut() {
            guest.regenerate_identity(&format!("{}{machine}", options.prefix()));
        }
        Ok(env)
    }

    pub(crate) fn info(&self) -> EnvironmentInfo {
        EnvironmentInfo {
            name: self.name.clone(),
            backend: super::NAME.into(),
            role: self.role.clone(),
            machines: self.instances.clone(),
        }
    }

    pub(crate) fn stage_source(&self) -> Option<&str> {
        match &self.role {
            Role::Stage(s) => Some(&s.source),
            Role::Production => None,
        }
    }

    pub(crate) fn clone_kind(&self) -> Option<CloneKind> {
        match &self.role {
            Role::Stage(s) => Some(s.clone),
            Role::Production => None,
        }
    }

    pub(crate) fn set_power_all(&mut self, power: PowerState) {
        for p in self.power.values_mut() {
            *p = power;
        }
    }

    pub(crate) fn disk(&self, machine: &str, disk: &str) -> Result<DiskState> {
        self.disks
            .get(&(machine.to_string(), disk.to_string()))
            .copied()
            .ok_or_else(|| Error::not_found("disk", format!("{}/{machine}/{disk}", self.name)))
    }

    /// Freezes every disk's top and returns the frozen layers.
    pub(crate) fn freeze_all(&mut self, layers: &mut LayerStore) -> BTreeMap<DiskKey, DiskState> {
        let mut frozen = BTreeMap::new();
        for (key, d) in self.disks.iter_mut() {
            frozen.insert(key.clone(), *d);
            d.top = layers.freeze(d.top);
        }
        frozen
    }

    pub(crate) fn take_baseline(&mut self, layers: &mut LayerStore) -> Baseline {
        let frozen = self.freeze_all(layers);
        let id = format!("bl-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let baseline = Baseline {
            id: id.clone(),
            environment: self.name.clone(),
            taken_at: OffsetDateTime::now_utc(),
            spec: self.spec.clone(),
            layers: frozen
                .iter()
                .map(|((m, d), s)| BaselineLayer {
                    machine: m.clone(),
                    disk: d.clone(),
                    layer: format!("layer:{}", s.top),
                })
                .collect(),
            consistency: Default::default(),
        };
        self.baseline_guests.insert(id.clone(), self.guests.clone());
        self.origins.insert(id, frozen.into_iter().map(|(k, s)| (k, s.top)).collect());
        self.baselines.push(baseline.clone());
        baseline
    }
}
