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
mod guest;
mod sample;
mod state;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;

pub use crate::toolbox::FaultInjector;
pub use disk::BLOCK;
pub use env::MemoryEnvironment;
pub use sample::sample_spec;

use crate::toolbox::{StagePlan, check_destroy};
use crate::{
    Backend, Baseline, Capabilities, ChangeKinds, Environment, EnvironmentInfo, EnvironmentSpec, Error, Result,
    Selector, StageOptions,
};
use state::State;

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

    fn handle(&self, name: &str) -> Result<Arc<dyn Environment>> {
        let env: Arc<dyn Environment> = Arc::new(MemoryEnvironment::new(name, self.shared.clone()));
        crate::checked::hand_out(env, self.capabilities(), NAME)
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
            changes: ChangeKinds::all(),
            swap: true,
            persistent: false,
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(environment = %spec.name))]
    async fn create(&self, spec: &EnvironmentSpec) -> Result<Arc<dyn Environment>> {
        self.shared.faults.check("create")?;
        spec.validate()?;
        let mut state = self.shared.state.lock().expect("state lock");
        let env = state::create(&mut state.layers, spec)?;
        state.insert(env)?;
        drop(state);
        self.handle(&spec.name)
    }

    async fn attach(&self, selector: &Selector) -> Result<Arc<dyn Environment>> {
        match selector {
            Selector::Environment { name } => self.open(name).await,
            _ => Err(Error::not_supported("attach by machines, label or folder", NAME)),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(environment = %options.name, production = %baseline.environment))]
    async fn stage(&self, baseline: &Baseline, options: &StageOptions) -> Result<Arc<dyn Environment>> {
        let plan = StagePlan::new(baseline, options)?;
        crate::checked::check_stage(&self.capabilities(), options, NAME)?;
        self.shared.faults.check("stage")?;
        let mut state = self.shared.state.lock().expect("state lock");
        plan.require_name_free(state.envs.contains_key(&plan.name))?;
        let source = state.env(&baseline.environment)?;
        plan.require_known_baseline(Some(&source.baselines))?;
        let guests = source.backend.baseline_guests.get(&baseline.id).cloned().unwrap_or_default();
        let env = state::execute(&mut state.layers, &plan, guests)?;
        state.insert(env)?;
        drop(state);
        self.handle(&plan.name)
    }

    async fn open(&self, name: &str) -> Result<Arc<dyn Environment>> {
        crate::name::validate("environment", name)?;
        self.shared.state.lock().expect("state lock").env(name)?;
        self.handle(name)
    }

    async fn list(&self) -> Result<Vec<EnvironmentInfo>> {
        let state = self.shared.state.lock().expect("state lock");
        Ok(state.envs.values().map(|e| e.info(NAME)).collect())
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn destroy(&self, name: &str) -> Result<()> {
        crate::name::validate("environment", name)?;
        self.shared.faults.check("destroy")?;
        let mut state = self.shared.state.lock().expect("state lock");
        state.env(name)?;
        check_destroy(name, state.envs.values().map(|e| (e.name.as_str(), &e.role)))?;
        state.envs.remove(name);
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn swap(&self, production: &str, stage: &str) -> Result<()> {
        self.shared.faults.check("swap")?;
        self.shared.state.lock().expect("state lock").swap(production, stage)
    }
}
