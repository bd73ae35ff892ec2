//! Drift: how a stage differs from production, in layers.
//!
//! The [`Drift`] trait is the contract; [`DriftEngine`] implements it for every backend from what
//! the [`crate::Environment`] trait reports: the specs (config layer) and the changed extents of
//! each disk since the baseline (disk layer, computed from copy-on-write allocation — never by
//! reading whole disks), and the guest inventories of both sides' machines through their guest
//! channels (guest layer; see [`crate::inventory`]). A layer, or a machine's guest layer, that
//! cannot be checked says NOT_CHECKED with the reason.
//! See `docs/drift.md` for the model, the score formula and the JSON schema.

mod config;
mod disk;
mod display;
pub(crate) mod engine;
mod guest;
mod report;
pub mod score;

use std::fmt::Debug;

use async_trait::async_trait;

pub use engine::{DriftEngine, guest_judged};
pub use report::{
    ConfigRecord, DiskRecord, DiskSide, DriftReport, GuestRecord, Layer, MachineDrift, RecordKind, SCHEMA, Side, Status,
};

use crate::{Environment, EnvironmentSpec, Result};

/// Computes drift between a production and one of its stages.
///
/// # Contract
/// - Read-only on both environments (invariant 1).
/// - A fresh clone reports IN_SYNC and 100 % (invariant 2): generated identities (UUIDs, MACs,
///   instance names, overlay paths) are normalised away.
/// - Layers that cannot be checked say NOT_CHECKED with a reason, never "no drift".
#[async_trait]
pub trait Drift: Send + Sync + Debug {
    /// The drift report of `stage` against `production`.
    async fn drift(&self, production: &dyn Environment, stage: &dyn Environment) -> Result<DriftReport>;
}

/// Config paths where two specs differ after normalisation (identities and disk sources removed).
/// Used by promotion to verify that production now matches the stage.
pub fn config_differences(a: &EnvironmentSpec, b: &EnvironmentSpec) -> Vec<String> {
    config::differences(&config::normalise(a, false), &config::normalise(b, false))
        .into_iter()
        .map(|(p, _)| p)
        .collect()
}

/// The value at a config path (`/machines/app/memory_mib`) of a spec, normalised as the config
/// layer sees it (`null` when absent).
pub fn config_value(spec: &EnvironmentSpec, path: &str) -> serde_json::Value {
    config::at(&config::normalise(spec, false), path)
}

/// Test fixtures shared by the drift modules' tests.
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;

    use crate::inventory::{self, InventoryConfig};
    use crate::memory::{MemoryBackend, sample_spec};
    use crate::{Backend, Environment, StageOptions};

    /// A running production on the memory backend and a running linked stage of it, staged with
    /// a baseline inventory when `with_inventory`.
    pub(crate) async fn running_pair(
        with_inventory: bool,
    ) -> (MemoryBackend, Arc<dyn Environment>, Arc<dyn Environment>) {
        let backend = MemoryBackend::new();
        let prod = backend.create(&sample_spec("prod")).await.unwrap();
        prod.start().await.unwrap();
        let stage = if with_inventory {
            let (b, inv) = inventory::take_baseline(&*prod, &InventoryConfig::default(), None).await.unwrap();
            inventory::stage(&backend, &b, &inv, &StageOptions::linked("try")).await.unwrap()
        } else {
            let b = prod.take_baseline().await.unwrap();
            backend.stage(&b, &StageOptions::linked("try")).await.unwrap()
        };
        stage.start().await.unwrap();
        (backend, prod, stage)
    }
}
