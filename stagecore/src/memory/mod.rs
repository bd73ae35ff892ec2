//! `memory`: a complete in-memory reference backend and test double.
//!
//! Machines, disks as sparse block maps with copy-on-write layers (so linked clones and "changed
//! since baseline" behave like qcow2), whole-environment snapshots, fencing flags, swap, and a
//! [`FaultInjector`] that fails the Nth call of an operation. It runs the whole conformance kit.
//!
//! Its guest channel reaches a **simulated** guest per machine (files, packages, services and
//! ports as maps; see `docs/drift.md`): enough for the inventory collector, the gate probes and a
//! small documented `stagecore-sim` command set, so the guest engines are tested without VMs. It is
//! not a real guest and runs no commands.
//! State lives as long as the [`MemoryBackend`] (and its clones) do.

mod disk;
mod env;
mod fault;
mod guest;
mod sample;
mod state;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;

pub use disk::BLOCK;
pub use env::MemoryEnvironment;
pub use fault::FaultInjector;
pub use sample::sample_spec;

use crate::{
    Backend, Baseline, Capabilities, CloneKind, Environment, EnvironmentInfo, EnvironmentSpec, Error, Result, Role,
    Selector, StageInfo, StageOptions,
};
use state::{EnvState, State};

pub(crate) const NAME: &str = "memory";

#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    pub(crate) faults: FaultInjector,
}

/// The in-memory backend. Cloning it shares the same state.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {
    shared: Arc<Shared>,
}

impl MemoryBackend {
    /// A new, empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// The fault injector of this backend.
    pub fn faults(&self) -> &FaultInjector {
        &self.shared.faults
    }

    fn handle(&self, name: &str) -> Arc<dyn Environment> {
        Arc::new(MemoryEnvironment::new(name, self.shared.clone()))
    }

    /// Whether the environment's NICs are fenced (on a segment private to the environment).
    pub fn is_fenced(&self, environment: &str) -> Result<bool> {
        self.shared.state.lock().expect("state lock").env(environment).map(|e| e.fenced)
    }

    /// The network segment a machine's NIC is attached to (`fenced:<env>:<net>` or `<net>`).
    pub fn segment(&self, environment: &str, network: &str) -> Result<String> {
        let state = self.shared.state.lock().expect("state lock");
        let env = state.env(environment)?;
        Ok(if env.fenced { format!("fenced:{environment}:{network}") } else { network.to_string() })
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            create: true,
            linked_clone: true,
            full_clone: true,
            fencing: true,
            live_snapshot: true,
            memory_snapshot: false,
            atomic_snapshot: true,
            disk_drift: true,
            disk_io: true,
            guest_channel: true,
            config_changes: true,
            swap: true,
            persistent: false,
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(environment = %spec.name))]
    async fn create(&self, spec: &EnvironmentSpec) -> Result<Arc<dyn Environment>> {
        self.shared.faults.check("create")?;
        spec.validate()?;
        let mut state = self.shared.state.lock().expect("state lock");
        let env = EnvState::create(&mut state.layers, spec, &spec.name, Role::Production, false)?;
        state.insert(env)?;
        drop(state);
        Ok(self.handle(&spec.name))
    }

    async fn attach(&self, selector: &Selector) -> Result<Arc<dyn Environment>> {
        match selector {
            Selector::Environment { name } => self.open(name).await,
            _ => Err(Error::not_supported("attach by machines, label or folder", NAME)),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(environment = %options.name, production = %baseline.environment))]
    async fn stage(&self, baseline: &Baseline, options: &StageOptions) -> Result<Arc<dyn Environment>> {
        options.validate()?;
        self.shared.faults.check("stage")?;
        let mut state = self.shared.state.lock().expect("state lock");
        if state.envs.contains_key(&options.name) {
            return Err(Error::already_exists("environment", &options.name));
        }
        let source = state.env(&baseline.environment)?;
        if !source.baselines.iter().any(|b| b.id == baseline.id) {
            return Err(Error::not_found("baseline", format!("{}/{}", baseline.environment, baseline.id)));
        }
        let info = StageInfo::new(baseline, options);
        let guests = source.baseline_guests.get(&baseline.id).cloned().unwrap_or_default();
        let mut env = EnvState::clone_from(&mut state.layers, baseline, options, info, guests)?;
        if options.start {
            env.set_power_all(crate::PowerState::Running);
        }
        if options.clone == CloneKind::Full {
            tracing::debug!(stage = %options.name, "full clone copied allocated blocks");
        }
        state.insert(env)?;
        drop(state);
        Ok(self.handle(&options.name))
    }

    async fn open(&self, name: &str) -> Result<Arc<dyn Environment>> {
        crate::name::validate("environment", name)?;
        self.shared.state.lock().expect("state lock").env(name)?;
        Ok(self.handle(name))
    }

    async fn list(&self) -> Result<Vec<EnvironmentInfo>> {
        let state = self.shared.state.lock().expect("state lock");
        Ok(state.envs.values().map(EnvState::info).collect())
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn destroy(&self, name: &str) -> Result<()> {
        crate::name::validate("environment", name)?;
        self.shared.faults.check("destroy")?;
        let mut state = self.shared.state.lock().expect("state lock");
        state.env(name)?;
        let linked_child =
            state.envs.values().find(|e| e.stage_source() == Some(name) && e.clone_kind() == Some(CloneKind::Linked));
        if let Some(child) = linked_child {
            return Err(Error::Precondition(format!(
                "stage {} is a linked clone of {name}; destroy it first",
                child.name
            )));
        }
        state.envs.remove(name);
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn swap(&self, production: &str, stage: &str) -> Result<()> {
        self.shared.faults.check("swap")?;
        self.shared.state.lock().expect("state lock").swap(production, stage)
    }
}
