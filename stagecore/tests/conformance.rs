//! The in-memory reference backend runs every conformance function.

use std::sync::Arc;

use stagecore::memory::MemoryBackend;
use stagecore_testkit::{Kit, bad_input, clone, drift, invariants, snapshot};

fn kit() -> Kit {
    Kit::new(Arc::new(MemoryBackend::new()))
}

#[tokio::test]
async fn spec_round_trip() {
    clone::spec_round_trip(&kit()).await;
}

#[tokio::test]
async fn linked_clone() {
    clone::linked_clone(&kit()).await;
}

#[tokio::test]
async fn full_clone() {
    clone::full_clone(&kit()).await;
}

#[tokio::test]
async fn identity_safety() {
    clone::identity_safety(&kit()).await;
}

#[tokio::test]
async fn fencing_flag() {
    clone::fencing_flag(&kit()).await;
}

#[tokio::test]
async fn zero_drift_after_clone() {
    invariants::zero_drift_after_clone(&kit()).await;
}

#[tokio::test]
async fn production_untouched() {
    invariants::production_untouched(&kit()).await;
}

#[tokio::test]
async fn snapshot_revert_restores() {
    snapshot::snapshot_revert_restores(&kit()).await;
}

#[tokio::test]
async fn bad_input_is_typed() {
    bad_input::bad_input_is_typed(&kit()).await;
}

#[tokio::test]
async fn stage_config_edit_is_drift() {
    drift::stage_config_edit_is_drift(&kit()).await;
}

#[tokio::test]
async fn production_disk_write_is_drift() {
    drift::production_disk_write_is_drift(&kit()).await;
}

#[tokio::test]
async fn both_sides_is_conflict() {
    drift::both_sides_is_conflict(&kit()).await;
}

#[tokio::test]
async fn change_set_is_intended() {
    drift::change_set_is_intended(&kit()).await;
}

#[tokio::test]
async fn run_all_on_one_backend() {
    stagecore_testkit::run_all(&kit()).await;
}

mod guest_drift {
    use super::kit;
    use stagecore_testkit::guest_drift::{self, GuestFixture};

    #[tokio::test]
    async fn zero_guest_drift_after_clone() {
        guest_drift::zero_guest_drift_after_clone(&kit(), &GuestFixture::simulated()).await;
    }

    #[tokio::test]
    async fn guest_change_is_intended() {
        guest_drift::guest_change_is_intended(&kit(), &GuestFixture::simulated()).await;
    }

    #[tokio::test]
    async fn footprint_verify() {
        guest_drift::footprint_verify(&kit(), &GuestFixture::simulated()).await;
    }

    #[tokio::test]
    async fn gates_on_stage() {
        guest_drift::gates_on_stage(&kit(), &GuestFixture::simulated()).await;
    }

    #[tokio::test]
    async fn rebase_without_conflict() {
        guest_drift::rebase_without_conflict(&kit(), &GuestFixture::simulated()).await;
    }

    #[tokio::test]
    async fn rebase_with_conflict() {
        guest_drift::rebase_with_conflict(&kit(), &GuestFixture::simulated()).await;
    }

    #[tokio::test]
    async fn production_untouched_by_inventory() {
        guest_drift::production_untouched_by_inventory(&kit(), &GuestFixture::simulated()).await;
    }
}
