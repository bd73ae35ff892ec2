//! The conformance suite as data: every kit function with the capabilities it needs
//! ([`cases`]), run one at a time inside a fixture that cleans up even after a panic
//! ([`run_case`]), and the [`conformance_tests!`](crate::conformance_tests) macro a backend's
//! `tests/conformance.rs` calls once to get one test per kit function.
//!
//! A case whose capabilities the backend does not declare is not skipped: it runs
//! [`crate::capability::declared_false_gives_not_supported`] instead, which proves the backend
//! refuses what it does not declare.

use std::future::Future;
use std::pin::Pin;

use stagecore::Capabilities;
use stagecore::promotion::Strategy;

use crate::{Kit, bad_input, capability, clone, drift, invariants, power, promotion, snapshot};

/// A boxed kit-function future.
pub type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One kit function and what it needs.
pub struct Case {
    /// The function's name (also the generated test's name).
    pub name: &'static str,
    /// The first capability it needs that `caps` lacks, if any.
    pub missing: fn(&Capabilities) -> Option<&'static str>,
    /// Runs it.
    pub run: fn(Kit) -> CaseFuture,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Case").field("name", &self.name).finish_non_exhaustive()
    }
}

fn need(list: &[(bool, &'static str)]) -> Option<&'static str> {
    list.iter().find(|(has, _)| !has).map(|(_, what)| *what)
}

macro_rules! case {
    ($name:literal, |$c:ident| $needs:expr, $f:expr) => {
        Case {
            name: $name,
            missing: |$c: &Capabilities| need(&$needs),
            run: |kit: Kit| Box::pin(async move { ($f)(kit).await }),
        }
    };
}

/// Every kit function that takes only a [`Kit`], with what it needs.
pub fn cases() -> Vec<Case> {
    vec![
        case!("spec_round_trip", |_c| [], |k: Kit| async move { clone::spec_round_trip(&k).await }),
        case!("identity_safety", |c| [(c.linked_clone, "linked_clone")], |k: Kit| async move {
            clone::identity_safety(&k).await
        }),
        case!(
            "linked_clone",
            |c| [(c.linked_clone, "linked_clone")],
            |k: Kit| async move { clone::linked_clone(&k).await }
        ),
        case!("full_clone", |c| [(c.full_clone, "full_clone")], |k: Kit| async move { clone::full_clone(&k).await }),
        case!("fencing_flag", |c| [(c.fencing, "fencing")], |k: Kit| async move { clone::fencing_flag(&k).await }),
        case!(
            "add_nic_gets_new_mac",
            |c| [(c.linked_clone, "linked_clone"), (c.changes.add_nic, "add_nic")],
            |k: Kit| async move { clone::add_nic_gets_new_mac(&k).await }
        ),
        case!("zero_drift_after_clone", |c| [(c.linked_clone, "linked_clone")], |k: Kit| async move {
            invariants::zero_drift_after_clone(&k).await
        }),
        case!("bad_input_is_typed", |_c| [], |k: Kit| async move { bad_input::bad_input_is_typed(&k).await }),
        case!("start_and_stop_named_machines", |_c| [], |k: Kit| async move {
            power::start_and_stop_named_machines(&k).await
        }),
        case!("capability_declared_false_gives_not_supported", |_c| [], |k: Kit| async move {
            capability::declared_false_gives_not_supported(&k).await
        }),
        case!("production_untouched", |c| [(c.disk_io, "disk_io")], |k: Kit| async move {
            invariants::production_untouched(&k).await
        }),
        case!(
            "snapshot_revert_restores",
            |c| [(c.disk_io, "disk_io"), (c.changes.set_memory, "set_memory")],
            |k: Kit| async move { snapshot::snapshot_revert_restores(&k).await }
        ),
        case!(
            "change_set_is_intended",
            |c| [(c.disk_io, "disk_io"), (c.changes.set_memory, "set_memory"), (c.changes.write_disk, "write_disk")],
            |k: Kit| async move { drift::change_set_is_intended(&k).await }
        ),
        case!("stage_config_edit_is_drift", |c| [(c.changes.set_memory, "set_memory")], |k: Kit| async move {
            drift::stage_config_edit_is_drift(&k).await
        }),
        case!("both_sides_is_conflict", |c| [(c.changes.set_vcpus, "set_vcpus")], |k: Kit| async move {
            drift::both_sides_is_conflict(&k).await
        }),
        case!(
            "production_disk_write_is_drift",
            |c| [(c.disk_io, "disk_io"), (c.disk_drift, "disk_drift")],
            |k: Kit| async move { drift::production_disk_write_is_drift(&k).await }
        ),
        case!("promotion_replay_commits", |c| [promo(c)], |k: Kit| async move { promotion::replay_commits(&k).await }),
        case!("promotion_gate_failure_rolls_back", |c| [promo(c)], |k: Kit| async move {
            promotion::gate_failure_rolls_back(&k).await
        }),
        case!("promotion_concurrent_one_locked", |c| [promo(c)], |k: Kit| async move {
            promotion::concurrent_promotions_one_locked(&k).await
        }),
        case!("promotion_crash_at_every_step_replay", |c| [promo(c)], |k: Kit| async move {
            promotion::crash_at_every_step(&k, Strategy::Replay).await
        }),
        case!("promotion_precondition_refuses", |c| [promo(c), (c.disk_drift, "disk_drift")], |k: Kit| async move {
            promotion::precondition_refuses(&k).await
        }),
        case!("promotion_swap_commits", |c| [promo(c), (c.swap, "swap")], |k: Kit| async move {
            promotion::swap_commits(&k).await
        }),
        case!("promotion_swap_rolls_back", |c| [promo(c), (c.swap, "swap")], |k: Kit| async move {
            promotion::swap_rolls_back(&k).await
        }),
        case!("promotion_crash_at_every_step_swap", |c| [promo(c), (c.swap, "swap")], |k: Kit| async move {
            promotion::crash_at_every_step(&k, Strategy::Swap).await
        }),
    ]
}

fn promo(c: &Capabilities) -> (bool, &'static str) {
    match need(&[(c.disk_io, "disk_io"), (c.changes.set_memory, "set_memory"), (c.linked_clone, "linked_clone")]) {
        Some(what) => (false, what),
        None => (true, ""),
    }
}

/// Runs the case called `name` against `kit`: the kit function when the backend declares what
/// it needs, else [`capability::declared_false_gives_not_supported`]. Environments the case made
/// through the kit are destroyed afterwards, also when it panicked (the panic is then resumed).
pub async fn run_case(kit: Kit, name: &str) {
    let cases = cases();
    let case = cases.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no kit case called {name}"));
    let caps = kit.caps();
    let run = match (case.missing)(&caps) {
        None => (case.run)(kit.clone()),
        Some(what) => {
            tracing::info!(case = name, missing = what, "capability not declared: checking it is refused instead");
            Box::pin({
                let k = kit.clone();
                async move { capability::declared_false_gives_not_supported(&k).await }
            })
        }
    };
    let outcome = tokio::spawn(run).await;
    kit.cleanup_tracked().await;
    if let Err(e) = outcome {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
        panic!("kit case {name} was cancelled: {e}");
    }
}

/// Runs every case one after another (see [`run_case`]).
pub async fn run_all(kit: &Kit) {
    for case in cases() {
        run_case(kit.clone(), case.name).await;
    }
}

/// One `#[tokio::test]` per kit case ([`cases`]), each calling [`run_case`] with a fresh kit from
/// `$setup` — an `async fn() -> (G, Kit)` whose `G` (a temporary directory, a daemon handle) is
/// kept alive for the test. Call it once in a backend's `tests/conformance.rs`:
///
/// ```ignore
/// async fn setup() -> (Fixture, stagecore_testkit::Kit) { let f = Fixture::new(); let k = Kit::new(f.backend.clone()); (f, k) }
/// stagecore_testkit::conformance_tests!(setup);
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($setup:path) => {
        $crate::conformance_tests!(@cases $setup;
            spec_round_trip, identity_safety, linked_clone, full_clone, fencing_flag, add_nic_gets_new_mac,
            zero_drift_after_clone, bad_input_is_typed, start_and_stop_named_machines,
            capability_declared_false_gives_not_supported,
            production_untouched, snapshot_revert_restores, change_set_is_intended, stage_config_edit_is_drift,
            both_sides_is_conflict, production_disk_write_is_drift, promotion_replay_commits,
            promotion_gate_failure_rolls_back, promotion_concurrent_one_locked,
            promotion_crash_at_every_step_replay, promotion_precondition_refuses, promotion_swap_commits,
            promotion_swap_rolls_back, promotion_crash_at_every_step_swap);
    };
    (@cases $setup:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (_guard, kit) = $setup().await;
                $crate::suite::run_case(kit, stringify!($name)).await;
            }
        )*
        #[test]
        fn every_kit_case_has_a_test() {
            let generated = [$(stringify!($name)),*];
            for case in $crate::suite::cases() {
                assert!(generated.contains(&case.name), "kit case {} has no generated test", case.name);
            }
        }
    };
}
