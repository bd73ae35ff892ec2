//! The stagecore-testkit promotion functions that need more than a plain kit, against real QEMU
//! (TCG): an injected apply failure, and promotions of a *running* production. The plain promotion
//! cases (replay and swap commit, rollback, crash at every step, one `Locked` of two) run once, from
//! `conformance_tests!` in `conformance.rs`.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use stagecore_qemu::{FaultHooks, QemuConfig};
use stagecore_testkit::{Kit, promotion};
use support::{Fixture, running_kit};

fn kit(f: &Fixture) -> Kit {
    Kit::new(f.backend.clone())
}

#[tokio::test]
async fn apply_failure_rolls_back() {
    let countdown = Arc::new(AtomicU64::new(0));
    let c = countdown.clone();
    let hooks = FaultHooks {
        before_apply: Some(Arc::new(move || {
            let left = c.load(Ordering::SeqCst);
            if left == 0 {
                return None;
            }
            c.store(left - 1, Ordering::SeqCst);
            (left == 1).then(|| "apply failed on purpose".to_string())
        })),
        ..FaultHooks::default()
    };
    let f = Fixture::with(|c| QemuConfig { hooks, ..c });
    promotion::apply_failure_rolls_back(&kit(&f), |n| countdown.store(n, Ordering::SeqCst)).await;
}

#[tokio::test]
async fn replay_commits_on_running_production() {
    let f = Fixture::new();
    promotion::replay_commits(&running_kit(&f)).await;
}

#[tokio::test]
async fn gate_failure_rolls_back_on_running_production() {
    let f = Fixture::new();
    promotion::gate_failure_rolls_back(&running_kit(&f)).await;
}

#[tokio::test]
async fn swap_commits_on_running_production() {
    let f = Fixture::new();
    promotion::swap_commits(&running_kit(&f)).await;
}
