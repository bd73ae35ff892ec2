//! Shared helpers for the examples: choosing a backend, a simple approval gate.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use stagekit::stagecore::promotion::{Gate, GateContext, GateVerdict};
use stagekit::stagecore::{Backend, EnvironmentSpec, Error, Result, memory};

/// The backend the examples use when none is named.
pub(crate) const DEFAULT_BACKEND: &str = if cfg!(feature = "qemu") { "qemu" } else { "memory" };

/// The backend called `name` with its production spec, keeping state under `work`.
pub(crate) async fn backend(name: &str, work: &Path) -> Result<(Arc<dyn Backend>, EnvironmentSpec)> {
    match name {
        "memory" => Ok((Arc::new(memory::MemoryBackend::new()), memory::sample_spec("prod"))),
        #[cfg(feature = "qemu")]
        "qemu" => {
            // The demo machines boot no guest OS; TCG runs them anywhere (nested KVM may not).
            let config = stagekit::qemu::QemuConfig::new(work.join("qemu")).with_accel(stagekit::qemu::Accel::Tcg);
            Ok((Arc::new(stagekit::qemu::QemuBackend::new(config)), memory::sample_spec("prod")))
        }
        other => Err(Error::invalid("--backend", format!("unknown backend {other:?}; use memory or qemu"))),
    }
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
