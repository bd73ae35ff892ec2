//! # stagecore-testkit
//!
//! The conformance suite every stagecore backend runs from its `tests/conformance.rs`: plain
//! public async functions, grouped by capability, that panic with a clear message when the backend
//! breaks the contract. They prove the brief's invariants: staging never changes production (1),
//! a fresh clone has zero drift (2), snapshot → change → revert restores (3), promotions are
//! atomic (4) and exclusive (5), bad input is typed and leaves nothing behind (6).
//!
//! A function that needs a capability the backend does not declare panics instead of skipping:
//! each backend's conformance test calls exactly the functions that apply to it.
//!
//! ```no_run
//! # async fn run() {
//! use std::sync::Arc;
//! let kit = stagecore_testkit::Kit::new(Arc::new(stagecore::memory::MemoryBackend::new()));
//! stagecore_testkit::invariants::zero_drift_after_clone(&kit).await;
//! # }
//! ```

mod kit;

pub mod bad_input;
pub mod capability;
pub mod clone;
pub mod drift;
pub mod guest;
pub mod guest_drift;
pub mod guest_image;
pub mod invariants;
pub mod power;
pub mod promotion;
pub mod snapshot;
pub mod suite;

pub use kit::{Kit, ProductionFactory, ProductionFuture, SEED, cleanup, unique};

/// Runs every kit case that applies to the backend's declared capabilities (and the
/// "declared false gives NotSupported" check for the others), one after another, cleaning up
/// after each ([`suite::run_all`]). Backends get one test per case with [`conformance_tests!`].
pub async fn run_all(kit: &Kit) {
    suite::run_all(kit).await;
}
