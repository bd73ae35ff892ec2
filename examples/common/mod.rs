//! Shared helpers for the examples: choosing a backend, a simple approval gate.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use stagekit::stagecore::promotion::{Gate, GateContext, GateVerdict};
use stagekit::stagecore::{Backend, DynEnvironment, Environment, EnvironmentSpec, Error, Result, memory};

/// The backend the examples use when none is named.
pub(crate) const DEFAULT_BACKEND: &str = if cfg!(feature = "qemu") { "qemu" } else { "memory" };

/// A backend with the production it runs the demo on.
pub(crate) struct Demo {
    /// The backend.
    pub(crate) backend: Arc<dyn Backend>,
    /// The production to create: real guests from the test image where the backend has a guest
    /// channel, the sample spec (empty disks) otherwise.
    pub(crate) production: EnvironmentSpec,
    /// The new build of the demo app (`stagecore-demo-app` 1.1) as a `.deb` on the host.
    pub(crate) new_app_deb: Option<std::path::PathBuf>,
}

/// The backend called `name` with its production spec, keeping state under `work`.
pub(crate) async fn backend(name: &str, work: &Path) -> Result<Demo> {
    match name {
        "memory" => Ok(Demo {
            backend: Arc::new(memory::MemoryBackend::new()),
            production: memory::sample_spec("prod"),
            new_app_deb: None,
        }),
        #[cfg(feature = "qemu")]
        "qemu" => {
            // TCG runs the guests anywhere (nested KVM may hang Linux guests).
            let config = stagekit::qemu::QemuConfig::new(work.join("qemu")).with_accel(stagekit::qemu::Accel::Tcg);
            let image = stagecore_testkit::guest_image::GuestImage::try_locate().map_err(|reason| {
                Error::invalid("STAGECORE_GUEST_IMAGE", format!("{reason} (`cargo xtask guest-image` builds it)"))
            })?;
            let disks = work.join("disks");
            std::fs::create_dir_all(&disks).map_err(|e| Error::io("creating", &disks, e))?;
            let production =
                image.production_spec("prod", &disks).map_err(|e| Error::invalid("guest image", e.to_string()))?;
            Ok(Demo {
                backend: Arc::new(stagekit::qemu::QemuBackend::new(config)),
                production,
                new_app_deb: image.app_debs.get("1.1").cloned(),
            })
        }
        other => Err(Error::invalid("--backend", format!("unknown backend {other:?}; use memory or qemu"))),
    }
}

/// Waits until every machine's guest agent answers (bounded).
pub(crate) async fn wait_all(env: &dyn Environment) -> Result<()> {
    let guest = env.guest().ok_or(Error::not_supported("guest channel", "demo"))?;
    for m in env.spec().await?.machines {
        guest.wait_ready(&m.name, std::time::Duration::from_secs(180)).await?;
    }
    Ok(())
}

/// Writes a marker at the start of every machine's first disk (backends without guests).
pub(crate) async fn seed(env: &DynEnvironment) -> Result<()> {
    let io = env.disk_io().ok_or(Error::not_supported("disk_io", "demo"))?;
    for m in env.spec().await?.machines {
        io.write(&m.name, "disk0", 0, format!("{} data v1", m.name).as_bytes()).await?;
    }
    Ok(())
}

/// An approval gate that approves in the name of a person.
#[derive(Debug)]
pub(crate) struct Approve(pub(crate) &'static str);

#[async_trait]
impl Gate for Approve {
    fn name(&self) -> &str {
        "approval"
    }

    async fn check(&self, ctx: &GateContext<'_>) -> Result<GateVerdict> {
        Ok(GateVerdict {
            passed: true,
            by: Some(self.0.into()),
            note: format!("approved with drift score {:.1} %", ctx.drift.score),
        })
    }
}
