//! The stagecore conformance kit over a remote URI: `qemu+tcp://` to libvirtd test host A
//! (`cargo xtask hosts`; its own network and mount namespaces), with the state directory on the
//! client (a temp directory) and every image a storage volume on the host under a unique root
//! that does not exist on the client — so any code path touching the client's filesystem for
//! images would fail. [`common::RemoteGuard`] removes domains, networks and pools afterwards.
//! Same kit functions as `conformance.rs`.

mod common;

use std::sync::Arc;

use common::RemoteGuard;
use stagecore::promotion::Strategy;
use stagecore_testkit::{Kit, bad_input, clone, drift, invariants, promotion, snapshot};

const HOST: &str = "STAGECORE_LIBVIRT_HOST_A";

macro_rules! conformance {
    ($($name:ident => $($f:ident)::+ ($($arg:expr),*);)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let g = RemoteGuard::new(HOST, "rk");
            let backend = g.backend().await;
            let kit = Kit::new(Arc::new(backend));
            $($f)::+(&kit $(, $arg)*).await;
        }
    )*};
}

conformance! {
    spec_round_trip => clone::spec_round_trip();
    linked_clone => clone::linked_clone();
    full_clone => clone::full_clone();
    identity_safety => clone::identity_safety();
    fencing_flag => clone::fencing_flag();
    zero_drift_after_clone => invariants::zero_drift_after_clone();
    production_untouched => invariants::production_untouched();
    snapshot_revert_restores => snapshot::snapshot_revert_restores();
    bad_input_is_typed => bad_input::bad_input_is_typed();
    stage_config_edit_is_drift => drift::stage_config_edit_is_drift();
    production_disk_write_is_drift => drift::production_disk_write_is_drift();
    both_sides_is_conflict => drift::both_sides_is_conflict();
    change_set_is_intended => drift::change_set_is_intended();
    promotion_replay_commits => promotion::replay_commits();
    promotion_gate_failure_rolls_back => promotion::gate_failure_rolls_back();
    promotion_precondition_refuses => promotion::precondition_refuses();
    promotion_concurrent_one_locked => promotion::concurrent_promotions_one_locked();
    promotion_crash_at_every_step_replay => promotion::crash_at_every_step(Strategy::Replay);
    promotion_swap_commits => promotion::swap_commits();
    promotion_swap_rolls_back => promotion::swap_rolls_back();
    promotion_crash_at_every_step_swap => promotion::crash_at_every_step(Strategy::Swap);
}
