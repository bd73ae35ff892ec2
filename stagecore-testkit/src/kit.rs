//! [`Kit`]: what a conformance function needs from a backend — the backend itself and a way to
//! make a fresh production environment with data on its disks.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use stagecore::{Backend, Capabilities, DynEnvironment, Error, Result, memory::sample_spec};

/// A boxed future returning a fresh production.
pub type ProductionFuture = Pin<Box<dyn Future<Output = Result<DynEnvironment>> + Send>>;

/// Makes a fresh production environment called by the given name.
pub type ProductionFactory = Arc<dyn Fn(String) -> ProductionFuture + Send + Sync>;

/// The bytes the default factory writes at the start of every production disk.
pub const SEED: &[u8] = b"stagecore production data";

/// A backend under test plus a production factory.
#[derive(Clone)]
pub struct Kit {
    /// The backend under test.
    pub backend: Arc<dyn Backend>,
    factory: ProductionFactory,
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
        Kit { backend, factory }
    }

    /// A kit with a custom production factory (for backends that cannot create environments,
    /// such as vSphere against a simulator holding pre-made VMs).
    pub fn with_factory(backend: Arc<dyn Backend>, factory: ProductionFactory) -> Self {
        Kit { backend, factory }
    }

    /// The backend's capabilities.
    pub fn caps(&self) -> Capabilities {
        self.backend.capabilities()
    }

    /// A fresh production called `name`.
    pub async fn production(&self, name: &str) -> Result<DynEnvironment> {
        (self.factory)(name.to_string()).await
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
