//! [`Kit`]: what a conformance function needs from a backend — the backend itself and a way to
//! make a fresh production environment with data on its disks.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use stagecore::{
    Backend, Baseline, Capabilities, DynEnvironment, EnvironmentInfo, EnvironmentSpec, Error, Result, Selector,
    StageOptions, memory::sample_spec,
};

/// A boxed future returning a fresh production.
pub type ProductionFuture = Pin<Box<dyn Future<Output = Result<DynEnvironment>> + Send>>;

/// Makes a fresh production environment called by the given name.
pub type ProductionFactory = Arc<dyn Fn(String) -> ProductionFuture + Send + Sync>;

/// The bytes the default factory writes at the start of every production disk.
pub const SEED: &[u8] = b"stagecore production data";

/// A backend under test plus a production factory.
///
/// The kit's [`Kit::backend`] goes through stagecore's capability check layer
/// ([`stagecore::checked`]) and remembers every environment made through it or through
/// [`Kit::production`], so [`crate::suite::run_case`] can destroy them after a failed case.
#[derive(Clone)]
pub struct Kit {
    /// The backend under test (checked and tracked).
    pub backend: Arc<dyn Backend>,
    factory: ProductionFactory,
    made: Arc<Mutex<Vec<String>>>,
    crash_stride: u64,
}

/// Remembers the names of the environments made through it.
#[derive(Debug)]
struct Tracking {
    inner: Arc<dyn Backend>,
    made: Arc<Mutex<Vec<String>>>,
}

impl Tracking {
    fn note(&self, name: &str) {
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        if !made.iter().any(|n| n == name) {
            made.push(name.to_string());
        }
    }
}

#[async_trait]
impl Backend for Tracking {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn create(&self, spec: &EnvironmentSpec) -> Result<DynEnvironment> {
        let env = self.inner.create(spec).await?;
        self.note(&spec.name);
        Ok(env)
    }
    async fn attach(&self, selector: &Selector) -> Result<DynEnvironment> {
        self.inner.attach(selector).await
    }
    async fn stage(&self, baseline: &Baseline, options: &StageOptions) -> Result<DynEnvironment> {
        let env = self.inner.stage(baseline, options).await?;
        self.note(&options.name);
        Ok(env)
    }
    async fn open(&self, name: &str) -> Result<DynEnvironment> {
        self.inner.open(name).await
    }
    async fn list(&self) -> Result<Vec<EnvironmentInfo>> {
        self.inner.list().await
    }
    async fn destroy(&self, name: &str) -> Result<()> {
        self.inner.destroy(name).await
    }
    async fn swap(&self, production: &str, stage: &str) -> Result<()> {
        self.inner.swap(production, stage).await
    }
}

impl std::fmt::Debug for Kit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kit").field("backend", &self.backend).finish_non_exhaustive()
    }
}

impl Kit {
    /// A kit whose productions are [`sample_spec`] environments made with [`Backend::create`]
    /// (requires [`Capabilities::create`]), with [`SEED`] and a machine-specific marker written at
    /// the start of every disk when the backend offers [`Capabilities::disk_io`].
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        let b = backend.clone();
        let factory: ProductionFactory = Arc::new(move |name: String| {
            let b = b.clone();
            Box::pin(async move {
                let env = b.create(&sample_spec(&name)).await?;
                if let Some(io) = env.disk_io() {
                    for m in env.spec().await?.machines {
                        for d in &m.disks {
                            io.write(&m.name, &d.name, 0, SEED).await?;
                            io.write(&m.name, &d.name, 1 << 20, m.name.as_bytes()).await?;
                        }
                    }
                }
                Ok(env)
            })
        });
        Self::with_factory(backend, factory)
    }

    /// A kit with a custom production factory (for backends that cannot create environments,
    /// such as vSphere against a simulator holding pre-made VMs).
    pub fn with_factory(backend: Arc<dyn Backend>, factory: ProductionFactory) -> Self {
        let made = Arc::new(Mutex::new(Vec::new()));
        let backend: Arc<dyn Backend> =
            Arc::new(Tracking { inner: stagecore::checked::checked(backend), made: made.clone() });
        Kit { backend, factory, made, crash_stride: 1 }
    }

    /// Makes [`crate::promotion::crash_at_every_step`] crash at every `stride`-th journal line
    /// (1, 1 + stride, …, and always run through to the end) instead of at every one: for a second
    /// suite of the same backend (libvirt over a remote URI) whose recovery code is the same and
    /// whose every promotion costs seconds. 0 counts as 1.
    pub fn with_crash_stride(mut self, stride: u64) -> Self {
        self.crash_stride = stride.max(1);
        self
    }

    /// The journal-line stride of [`crate::promotion::crash_at_every_step`] (1 unless set).
    pub fn crash_stride(&self) -> u64 {
        self.crash_stride
    }

    /// The backend's capabilities.
    pub fn caps(&self) -> Capabilities {
        self.backend.capabilities()
    }

    /// A fresh production called `name`.
    pub async fn production(&self, name: &str) -> Result<DynEnvironment> {
        let env = (self.factory)(name.to_string()).await?;
        self.made.lock().unwrap_or_else(|p| p.into_inner()).push(name.to_string());
        stagecore::checked::hand_out(env, self.caps(), self.backend.name())
    }

    /// Destroys every environment made through this kit that still exists, newest first (stages
    /// before the productions they were cloned from); failures are logged, not raised.
    pub async fn cleanup_tracked(&self) {
        let names: Vec<String> = std::mem::take(&mut *self.made.lock().unwrap_or_else(|p| p.into_inner()));
        for name in names.iter().rev() {
            match self.backend.destroy(name).await {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) => tracing::warn!(environment = %name, error = %e, "kit cleanup could not destroy"),
            }
        }
    }

    /// Panics unless the backend applies changes of `kind` ([`stagecore::Change::kind`]'s names).
    pub fn require_change(&self, kind: &str) {
        self.require(kind, self.caps().changes.get(kind));
    }

    /// Panics unless the backend declares the capability: a conformance function never skips silently.
    pub fn require(&self, what: &str, has: bool) {
        assert!(
            has,
            "this conformance function requires the `{what}` capability, which the {} backend does not declare",
            self.backend.name()
        );
    }
}

/// A unique name with a prefix, safe for every backend (`kit-clone-3f2a9c`).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..6])
}

/// Destroys environments, stages first, ignoring the ones already gone.
pub async fn cleanup(backend: &dyn Backend, names: &[&str]) {
    for name in names {
        match backend.destroy(name).await {
            Ok(()) | Err(Error::NotFound { .. }) => {}
            Err(e) => panic!("cleanup of {name} failed: {e}"),
        }
    }
}
