//! The capability check layer: [`CheckedBackend`] and [`CheckedEnvironment`] wrap a backend and
//! its environments and refuse, with [`Error::NotSupported`], every call that the backend's
//! [`Capabilities`] do not declare — the one place capabilities are checked (like opendal's
//! correctness layer). The engines ([`crate::promotion::PromotionEngine`]) and the conformance kit
//! go through it; embedding programs should too ([`checked`]).
//!
//! It also keeps the declaration honest: an environment whose `disk_io()` / `guest()`
//! accessor disagrees with the declared [`Capabilities::disk_io`] /
//! [`Capabilities::guest_channel`] is refused when it is handed out, so the flag and the accessor
//! cannot drift apart unnoticed.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//! use stagecore::{Backend, Error, checked::checked, memory::MemoryBackend};
//! let backend = checked(Arc::new(MemoryBackend::new()));
//! let prod = backend.create(&stagecore::memory::sample_spec("prod")).await?;
//! assert!(prod.disk_io().is_some());
//! # Ok::<(), Error>(()) }).unwrap();
//! ```

use std::sync::Arc;

use async_trait::async_trait;

use crate::{
    Backend, Baseline, Capabilities, Change, ChangeSet, CloneKind, DiskChanges, DiskIo, DynEnvironment, Environment,
    EnvironmentInfo, EnvironmentSpec, Error, GuestChannel, MachineStatus, Result, Selector, Snapshot, SnapshotInfo,
    StageOptions,
};

/// Wraps `backend` in the check layer.
pub fn checked(backend: Arc<dyn Backend>) -> Arc<dyn Backend> {
    Arc::new(CheckedBackend::new(backend))
}

/// Wraps an environment a backend hands out in the check layer (backends call this from
/// `create`, `stage`, `open` and `attach`, so even callers that skip [`checked`] get checked
/// environments).
pub fn hand_out(env: DynEnvironment, caps: Capabilities, backend: &'static str) -> Result<DynEnvironment> {
    Ok(Arc::new(CheckedEnvironment::new(env, caps, backend)?))
}

/// Checks stage options against the capabilities: the clone kind, and fencing when asked.
pub fn check_stage(caps: &Capabilities, options: &StageOptions, backend: &'static str) -> Result<()> {
    let (has, what) = match options.clone {
        CloneKind::Linked => (caps.linked_clone, "linked_clone"),
        CloneKind::Full => (caps.full_clone, "full_clone"),
    };
    if !has {
        return Err(Error::not_supported(what, backend));
    }
    if options.fenced && !caps.fencing {
        return Err(Error::not_supported("fencing", backend));
    }
    Ok(())
}

/// A backend whose calls are checked against its declared capabilities.
#[derive(Debug, Clone)]
pub struct CheckedBackend {
    inner: Arc<dyn Backend>,
}

impl CheckedBackend {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        CheckedBackend { inner }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &Arc<dyn Backend> {
        &self.inner
    }

    fn require(&self, has: bool, operation: &'static str) -> Result<()> {
        if has { Ok(()) } else { Err(Error::not_supported(operation, self.inner.name())) }
    }

    fn wrap(&self, env: DynEnvironment) -> Result<DynEnvironment> {
        hand_out(env, self.inner.capabilities(), self.inner.name())
    }
}

#[async_trait]
impl Backend for CheckedBackend {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn create(&self, spec: &EnvironmentSpec) -> Result<DynEnvironment> {
        self.require(self.capabilities().create, "create")?;
        self.wrap(self.inner.create(spec).await?)
    }

    async fn attach(&self, selector: &Selector) -> Result<DynEnvironment> {
        self.wrap(self.inner.attach(selector).await?)
    }

    async fn stage(&self, baseline: &Baseline, options: &StageOptions) -> Result<DynEnvironment> {
        check_stage(&self.capabilities(), options, self.inner.name())?;
        self.wrap(self.inner.stage(baseline, options).await?)
    }

    async fn open(&self, name: &str) -> Result<DynEnvironment> {
        self.wrap(self.inner.open(name).await?)
    }

    async fn list(&self) -> Result<Vec<EnvironmentInfo>> {
        self.inner.list().await
    }

    async fn destroy(&self, name: &str) -> Result<()> {
        self.inner.destroy(name).await
    }

    async fn swap(&self, production: &str, stage: &str) -> Result<()> {
        self.require(self.capabilities().swap, "swap")?;
        self.inner.swap(production, stage).await
    }
}

/// An environment whose calls are checked against its backend's declared capabilities.
#[derive(Debug)]
pub struct CheckedEnvironment {
    inner: DynEnvironment,
    caps: Capabilities,
    backend: &'static str,
}

impl CheckedEnvironment {
    /// Wraps `inner`; fails when its accessors disagree with `caps` (a backend bug, named).
    pub fn new(inner: DynEnvironment, caps: Capabilities, backend: &'static str) -> Result<Self> {
        let mismatch = |what: &str, declared: bool| {
            Error::backend_msg(
                backend,
                format!(
                    "declares {what} = {declared} but environment {} {} one",
                    inner.name(),
                    if declared { "gives no" } else { "gives" }
                ),
            )
        };
        if caps.disk_io != inner.disk_io().is_some() {
            return Err(mismatch("disk_io", caps.disk_io));
        }
        if caps.guest_channel != inner.guest().is_some() {
            return Err(mismatch("guest_channel", caps.guest_channel));
        }
        Ok(CheckedEnvironment { inner, caps, backend })
    }

    /// The wrapped environment.
    pub fn inner(&self) -> &DynEnvironment {
        &self.inner
    }

    fn require(&self, has: bool, operation: &'static str) -> Result<()> {
        if has { Ok(()) } else { Err(Error::not_supported(operation, self.backend)) }
    }
}

#[async_trait]
impl Environment for CheckedEnvironment {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn info(&self) -> Result<EnvironmentInfo> {
        self.inner.info().await
    }

    async fn spec(&self) -> Result<EnvironmentSpec> {
        self.inner.spec().await
    }

    async fn status(&self) -> Result<Vec<MachineStatus>> {
        self.inner.status().await
    }

    async fn start(&self) -> Result<()> {
        self.inner.start().await
    }

    async fn stop(&self) -> Result<()> {
        self.inner.stop().await
    }

    async fn start_machines(&self, machines: &[String]) -> Result<()> {
        self.inner.start_machines(machines).await
    }

    async fn stop_machines(&self, machines: &[String]) -> Result<()> {
        self.inner.stop_machines(machines).await
    }

    async fn take_baseline(&self) -> Result<Baseline> {
        self.inner.take_baseline().await
    }

    async fn disk_changes(&self, baseline: &Baseline) -> Result<Vec<DiskChanges>> {
        self.require(self.caps.disk_drift, "disk_drift")?;
        self.inner.disk_changes(baseline).await
    }

    async fn apply(&self, change: &Change) -> Result<()> {
        self.require(self.caps.allows(change), change.kind())?;
        if let Change::AddNic { machine, nic } = change
            && self.inner.info().await?.stage().is_some()
        {
            // A stage never carries a MAC it was given: it could be production's (invariant 2).
            let mut nic = nic.clone();
            nic.mac = Some(crate::random_mac());
            return self.inner.apply(&Change::AddNic { machine: machine.clone(), nic }).await;
        }
        self.inner.apply(change).await
    }

    async fn record_change_set(&self, change_set: &ChangeSet) -> Result<()> {
        self.inner.record_change_set(change_set).await
    }

    fn disk_io(&self) -> Option<&dyn DiskIo> {
        self.inner.disk_io()
    }

    fn guest(&self) -> Option<&dyn GuestChannel> {
        self.inner.guest()
    }
}

#[async_trait]
impl Snapshot for CheckedEnvironment {
    async fn create_snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        if !self.caps.live_snapshot {
            let running = self.inner.status().await?.iter().any(|s| s.power != crate::PowerState::Stopped);
            if running {
                return Err(Error::not_supported("live_snapshot", self.backend));
            }
        }
        self.inner.create_snapshot(name).await
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.inner.list_snapshots().await
    }

    async fn revert_snapshot(&self, name: &str) -> Result<()> {
        self.inner.revert_snapshot(name).await
    }

    async fn delete_snapshot(&self, name: &str) -> Result<()> {
        self.inner.delete_snapshot(name).await
    }
}
