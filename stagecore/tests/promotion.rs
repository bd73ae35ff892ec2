//! The promotion engine on the in-memory backend, through the testkit's promotion functions.

use std::sync::Arc;

use stagecore::memory::MemoryBackend;
use stagecore::promotion::Strategy;
use stagecore_testkit::{Kit, promotion};

fn kit() -> (Kit, MemoryBackend) {
    let backend = MemoryBackend::new();
    (Kit::new(Arc::new(backend.clone())), backend)
}

#[tokio::test]
async fn replay_commits() {
    promotion::replay_commits(&kit().0).await;
}

#[tokio::test]
async fn gate_failure_rolls_back() {
    promotion::gate_failure_rolls_back(&kit().0).await;
}

#[tokio::test]
async fn precondition_refuses() {
    promotion::precondition_refuses(&kit().0).await;
}

#[tokio::test]
async fn concurrent_promotions_one_locked() {
    promotion::concurrent_promotions_one_locked(&kit().0).await;
}

#[tokio::test]
async fn crash_at_every_step_replay() {
    promotion::crash_at_every_step(&kit().0, Strategy::Replay).await;
}

#[tokio::test]
async fn crash_at_every_step_swap() {
    promotion::crash_at_every_step(&kit().0, Strategy::Swap).await;
}

#[tokio::test]
async fn swap_commits() {
    promotion::swap_commits(&kit().0).await;
}

#[tokio::test]
async fn swap_rolls_back() {
    promotion::swap_rolls_back(&kit().0).await;
}

#[tokio::test]
async fn apply_failure_rolls_back() {
    let (kit, backend) = kit();
    promotion::apply_failure_rolls_back(&kit, |n| backend.faults().fail_nth("apply", n)).await;
}
