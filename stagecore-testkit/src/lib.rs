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
pub mod clone;
pub mod drift;
pub mod guest;
pub mod guest_drift;
pub mod guest_image;
pub mod invariants;
pub mod promotion;
pub mod snapshot;

pub use kit::{Kit, ProductionFactory, ProductionFuture, SEED, cleanup, unique};

/// Runs every function that applies to the backend's declared capabilities, one after another.
/// Backends whose capabilities are all declared can call this from one test; others call the
/// functions one by one.
pub async fn run_all(kit: &Kit) {
    let caps = kit.caps();
    clone::spec_round_trip(kit).await;
    clone::identity_safety(kit).await;
    invariants::zero_drift_after_clone(kit).await;
    bad_input::bad_input_is_typed(kit).await;
    if caps.linked_clone {
        clone::linked_clone(kit).await;
    }
    if caps.full_clone {
        clone::full_clone(kit).await;
    }
    if caps.fencing {
        clone::fencing_flag(kit).await;
    }
    if caps.disk_io {
        invariants::production_untouched(kit).await;
    }
    if caps.disk_io && caps.config_changes {
        snapshot::snapshot_revert_restores(kit).await;
        drift::change_set_is_intended(kit).await;
    }
    if caps.config_changes {
        drift::stage_config_edit_is_drift(kit).await;
        drift::both_sides_is_conflict(kit).await;
    }
    if caps.disk_io && caps.disk_drift {
        drift::production_disk_write_is_drift(kit).await;
    }
    if caps.disk_io && caps.config_changes {
        promotion::run_all(kit).await;
    }
}
