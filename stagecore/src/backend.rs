//! The [`Backend`] trait: the entry point of a hypervisor integration.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;

use crate::{Baseline, Capabilities, Environment, EnvironmentInfo, EnvironmentSpec, Result, Selector, StageOptions};

/// A shared, dynamically typed environment handle.
pub type DynEnvironment = Arc<dyn Environment>;

/// A hypervisor integration: finds production, creates stages, opens and lists environments.
///
/// Held as `Arc<dyn Backend>`; conveniences live in [`crate::BackendExt`].
///
/// # Contract
/// - Names are validated ([`crate::name`]); bad input gives [`crate::Error::InvalidSpec`] naming the
///   field, and nothing is left half-built.
/// - [`Backend::stage`] never writes production's disks or definitions; the stage is
///   identity-safe (new instance names, UUIDs, MACs) and fenced when asked.
/// - Unsupported operations return [`crate::Error::NotSupported`].
#[async_trait]
pub trait Backend: Send + Sync + Debug + 'static {
    /// A short name (`memory`, `qemu`, `libvirt`, `vsphere`).
    fn name(&self) -> &'static str;

    /// What this backend can do.
    fn capabilities(&self) -> Capabilities;

    /// Creates a new environment from a spec (typically a production for tests and demos).
    /// Disks whose source does not exist are created empty with `size_bytes`.
    /// Requires [`Capabilities::create`].
    async fn create(&self, spec: &EnvironmentSpec) -> Result<Arc<dyn Environment>>;

    /// Opens existing machines as an environment (a production the backend did not create).
    /// [`Selector::Environment`] opens one the backend knows by name, like [`Backend::open`].
    async fn attach(&self, selector: &Selector) -> Result<Arc<dyn Environment>>;

    /// Creates a stage from a production baseline.
    async fn stage(&self, baseline: &Baseline, options: &StageOptions) -> Result<Arc<dyn Environment>>;

    /// Opens an environment the backend knows by name.
    async fn open(&self, name: &str) -> Result<Arc<dyn Environment>>;

    /// Lists the environments the backend knows.
    async fn list(&self) -> Result<Vec<EnvironmentInfo>>;

    /// Stops and removes an environment with its machines and the disk layers only it uses.
    /// Layers other environments depend on (a baseline under a stage) are kept.
    async fn destroy(&self, name: &str) -> Result<()>;

    /// Swap promotion: the stage's machines take over production's identity (instance names,
    /// MACs, networks) and production's become the stage's, stopped. Calling it again swaps back.
    /// Requires [`Capabilities::swap`].
    async fn swap(&self, production: &str, stage: &str) -> Result<()>;
}
