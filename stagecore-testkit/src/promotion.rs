//! Invariants 4 and 5 through the [`PromotionEngine`]: a promotion ends fully applied or fully
//! rolled back (gate failure, precondition refusal, a failing apply, a crash at any journal line),
//! and two promotions of one production at once give exactly one `Locked`.
//!
//! Every function builds its own production (through the [`Kit`]), a linked stage with a recorded
//! ChangeSet (app memory + a write on db's disk), and an engine over a fresh temporary state
//! directory, and destroys what it made. "Applied" and "rolled back" are judged by fingerprints:
//! rolled back means production's fingerprint equals its pre-promotion one; applied means its
//! config matches the stage's and every disk's digest equals the stage's pre-promotion digest.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stagecore::drift::config_differences;
use stagecore::promotion::{
    Gate, GateContext, GateVerdict, Outcome, PreconditionPolicy, Promotion, PromotionEngine, PromotionRequest, Receipt,
    Strategy,
};
use stagecore::{Change, ChangeSet, DynEnvironment, EnvironmentExt, EnvironmentSpec, Error, Fingerprint, StageOptions};

use crate::{Kit, cleanup, unique};

/// Where the ChangeSet writes on db's disk.
const WRITE_AT: u64 = 2 << 20;

/// A gate that approves as `by`.
#[derive(Debug)]
struct Approve(&'static str);

#[async_trait]
impl Gate for Approve {
    fn name(&self) -> &str {
        "approve"
    }
    async fn check(&self, ctx: &GateContext<'_>) -> stagecore::Result<GateVerdict> {
        assert!(!ctx.change_sets.is_empty(), "a gate must be shown the ChangeSets");
        Ok(GateVerdict { passed: true, by: Some(self.0.into()), note: "looks good".into() })
    }
}

/// A gate that refuses (a failed health probe).
#[derive(Debug)]
struct Refuse;

#[async_trait]
impl Gate for Refuse {
    fn name(&self) -> &str {
        "health"
    }
    async fn check(&self, _: &GateContext<'_>) -> stagecore::Result<GateVerdict> {
        Ok(GateVerdict { passed: false, by: None, note: "probe answered 503".into() })
    }
}

/// A gate that errors.
#[derive(Debug)]
struct Broken;

#[async_trait]
impl Gate for Broken {
    fn name(&self) -> &str {
        "broken"
    }
    async fn check(&self, _: &GateContext<'_>) -> stagecore::Result<GateVerdict> {
        Err(Error::Unreachable { endpoint: "http://probe.invalid".into(), reason: "connection refused".into() })
    }
}

/// A gate that passes once the signal is raised.
#[derive(Debug)]
struct WaitFor(tokio::sync::watch::Receiver<bool>);

#[async_trait]
impl Gate for WaitFor {
    fn name(&self) -> &str {
        "wait"
    }
    async fn check(&self, _: &GateContext<'_>) -> stagecore::Result<GateVerdict> {
        let mut rx = self.0.clone();
        rx.wait_for(|raised| *raised).await.map_err(|_| Error::backend_msg("testkit", "signal dropped"))?;
        Ok(GateVerdict { passed: true, by: None, note: String::new() })
    }
}

/// A production, a stage with a recorded ChangeSet, and their pre-promotion fingerprints.
struct Setup {
    pname: String,
    sname: String,
    prod: DynEnvironment,
    stage: DynEnvironment,
    before: Fingerprint,
    stage_before: Fingerprint,
    stage_spec: EnvironmentSpec,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new(kit: &Kit) -> Setup {
        kit.require_change("set_memory");
        kit.require("disk_io", kit.caps().disk_io);
        let (pname, sname) = (unique("kit-prod"), unique("kit-promo"));
        let prod = kit.production(&pname).await.expect("production");
        let baseline = prod.take_baseline().await.expect("baseline");
        let stage = kit.backend.stage(&baseline, &StageOptions::linked(&sname)).await.expect("stage");
        let spec = prod.spec().await.unwrap();
        let (app, db) = (spec.machine("app").expect("app"), spec.machine("db").expect("db"));
        let cs = ChangeSet {
            id: "cs-kit-promotion".into(),
            description: "app gets more memory; db gets a patched block".into(),
            changes: vec![
                Change::SetMemory { machine: app.name.clone(), memory_mib: app.memory_mib + 128 },
                Change::WriteDisk {
                    machine: db.name.clone(),
                    disk: db.disks[0].name.clone(),
                    offset: WRITE_AT,
                    data: b"promoted patch".repeat(300),
                },
            ],
        };
        stage.apply_change_set(&cs).await.expect("apply the ChangeSet to the stage");
        let dir = tempfile::tempdir().expect("state dir");
        Setup {
            before: prod.fingerprint().await.unwrap(),
            stage_before: stage.fingerprint().await.unwrap(),
            stage_spec: stage.spec().await.unwrap(),
            pname,
            sname,
            prod,
            stage,
            dir,
        }
    }

    fn request(&self, strategy: Strategy, gates: Vec<Arc<dyn Gate>>) -> PromotionRequest {
        PromotionRequest {
            production: self.prod.clone(),
            stage: self.stage.clone(),
            strategy,
            policy: PreconditionPolicy::Anywhere,
            requested_by: "testkit".into(),
            gates,
        }
    }

    async fn engine(&self, kit: &Kit) -> PromotionEngine {
        let (engine, recovered) =
            PromotionEngine::open(self.dir.path(), kit.backend.clone()).await.expect("open engine");
        assert!(recovered.is_empty(), "a fresh state dir has nothing to recover");
        engine
    }

    /// Whether production is fully applied (`Some(true)`), fully rolled back (`Some(false)`), or
    /// in between (`None`).
    async fn state(&self) -> Option<bool> {
        let now = self.prod.fingerprint().await.expect("fingerprint");
        if now == self.before {
            return Some(false);
        }
        let spec = self.prod.spec().await.unwrap();
        let digests = |f: &Fingerprint| {
            let mut d = f.disks.clone();
            d.sort();
            d
        };
        (config_differences(&spec, &self.stage_spec).is_empty() && digests(&now) == digests(&self.stage_before))
            .then_some(true)
    }

    async fn assert_no_snapshot_left(&self) {
        let snaps = self.prod.list_snapshots().await.unwrap();
        assert!(
            snaps.iter().all(|s| !s.name.starts_with("pre-promotion-")),
            "a pre-promotion snapshot was left behind: {snaps:?}"
        );
    }

    async fn cleanup(self, kit: &Kit) {
        cleanup(&*kit.backend, &[&self.sname, &self.pname]).await;
    }
}

fn step_names(r: &Receipt) -> Vec<&str> {
    r.steps.iter().map(|s| s.step.as_str()).collect()
}

/// Replay happy path: production gets the change (config and disk), the receipt says Committed
/// with every step and the approval, the snapshot is gone, the lock is free.
pub async fn replay_commits(kit: &Kit) {
    let s = Setup::new(kit).await;
    let engine = s.engine(kit).await;
    let receipt = engine.promote(s.request(Strategy::Replay, vec![Arc::new(Approve("alice"))])).await.expect("promote");
    assert_eq!(receipt.outcome, Outcome::Committed, "{receipt:#?}");
    assert_eq!(step_names(&receipt), ["lock", "precondition", "snapshot", "apply", "verify", "gate:approve", "commit"]);
    assert!(receipt.steps.iter().all(|st| st.outcome.starts_with("ok") || st.outcome == "passed"), "{receipt:#?}");
    assert_eq!(receipt.approvals.len(), 1);
    assert_eq!((receipt.approvals[0].gate.as_str(), receipt.approvals[0].by.as_deref()), ("approve", Some("alice")));
    assert!(receipt.drift.is_some(), "the accepted drift report belongs in the receipt");
    assert_eq!(receipt.change_sets.len(), 1);
    assert!(!receipt.recovered);
    assert_eq!(s.state().await, Some(true), "production does not carry the change");
    let app = s.prod.spec().await.unwrap().machine("app").unwrap().memory_mib;
    assert_eq!(app, s.stage_spec.machine("app").unwrap().memory_mib);
    let got = s.prod.disk_io().unwrap().read("db", "disk0", WRITE_AT, 14).await.unwrap();
    assert_eq!(got, b"promoted patch");
    s.assert_no_snapshot_left().await;
    assert_eq!(engine.receipts().await.unwrap(), [receipt], "the archive keeps exactly this receipt");
    assert!(engine.unfinished().await.unwrap().is_empty());
    // The lock is free: promoting again is decided by the precondition, not refused as locked.
    let again = engine.promote(s.request(Strategy::Replay, vec![])).await.expect("second promotion");
    if kit.caps().disk_drift {
        assert!(matches!(again.outcome, Outcome::Refused { .. }), "production moved since the baseline: {again:#?}");
    }
    s.cleanup(kit).await;
}

/// A refusing gate and an erroring gate each roll the promotion back: production's fingerprint
/// equals its pre-promotion one and no snapshot is left.
pub async fn gate_failure_rolls_back(kit: &Kit) {
    let gates: [(Arc<dyn Gate>, &str); 2] = [(Arc::new(Refuse), "health"), (Arc::new(Broken), "broken")];
    for (gate, name) in gates {
        let s = Setup::new(kit).await;
        let engine = s.engine(kit).await;
        let receipt = engine.promote(s.request(Strategy::Replay, vec![gate])).await.expect("promote");
        let Outcome::RolledBack { reason } = &receipt.outcome else {
            panic!("gate {name} did not roll back: {receipt:#?}")
        };
        assert!(reason.contains(name), "the reason names the gate: {reason}");
        assert_eq!(s.prod.fingerprint().await.unwrap(), s.before, "gate {name}: production is not as before");
        assert!(step_names(&receipt).ends_with(&[&format!("gate:{name}") as &str, "rollback"]), "{receipt:#?}");
        assert!(receipt.approvals.is_empty());
        s.assert_no_snapshot_left().await;
        s.cleanup(kit).await;
    }
}

/// A production that moved since the baseline is refused before it is touched (no snapshot, same
/// fingerprint); policy `touched` lets through drift where the ChangeSet does not touch, and
/// keeps it. Requires `disk_drift`.
pub async fn precondition_refuses(kit: &Kit) {
    kit.require("disk_drift", kit.caps().disk_drift);
    // Production wrote on db, which the ChangeSet touches: refused under both policies.
    let s = Setup::new(kit).await;
    let engine = s.engine(kit).await;
    s.prod.disk_io().unwrap().write("db", "disk0", 8 << 20, b"production moved").await.unwrap();
    let moved = s.prod.fingerprint().await.unwrap();
    for policy in [PreconditionPolicy::Anywhere, PreconditionPolicy::Touched] {
        let req = PromotionRequest { policy, ..s.request(Strategy::Replay, vec![Arc::new(Approve("bob"))]) };
        let receipt = engine.promote(req).await.expect("promote");
        let Outcome::Refused { reason } = &receipt.outcome else { panic!("{policy:?} did not refuse: {receipt:#?}") };
        assert!(reason.contains("db/disk0"), "the reason names the moved disk: {reason}");
        assert_eq!(step_names(&receipt), ["lock", "precondition"]);
        assert!(receipt.drift.is_some());
        assert_eq!(s.prod.fingerprint().await.unwrap(), moved, "a refused promotion touched production");
        s.assert_no_snapshot_left().await;
    }
    s.cleanup(kit).await;

    // Production moved on web only (vCPUs and disk): refused anywhere, promoted where touched.
    let s = Setup::new(kit).await;
    let engine = s.engine(kit).await;
    let vcpus = s.prod.spec().await.unwrap().machine("web").unwrap().vcpus + 1;
    s.prod.apply(&Change::SetVcpus { machine: "web".into(), vcpus }).await.unwrap();
    s.prod.disk_io().unwrap().write("web", "disk0", 8 << 20, b"web moved").await.unwrap();
    let receipt = engine.promote(s.request(Strategy::Replay, vec![])).await.expect("promote");
    assert!(matches!(receipt.outcome, Outcome::Refused { .. }), "{receipt:#?}");
    let req = PromotionRequest { policy: PreconditionPolicy::Touched, ..s.request(Strategy::Replay, vec![]) };
    let receipt = engine.promote(req).await.expect("promote");
    assert_eq!(receipt.outcome, Outcome::Committed, "{receipt:#?}");
    let spec = s.prod.spec().await.unwrap();
    assert_eq!(spec.machine("web").unwrap().vcpus, vcpus, "production's own change was lost");
    assert_eq!(spec.machine("app").unwrap().memory_mib, s.stage_spec.machine("app").unwrap().memory_mib);
    assert_eq!(s.prod.disk_io().unwrap().read("web", "disk0", 8 << 20, 9).await.unwrap(), b"web moved");
    s.cleanup(kit).await;
}

/// Two promotions of one production at once, from two engines over one state dir: exactly one
/// proceeds, the other gets `Locked` naming the holder (invariant 5).
pub async fn concurrent_promotions_one_locked(kit: &Kit) {
    let s = Setup::new(kit).await;
    let (a, b) = (s.engine(kit).await, s.engine(kit).await);
    let (tx, rx) = tokio::sync::watch::channel(false);
    let gate: Arc<dyn Gate> = Arc::new(WaitFor(rx));
    // The winner waits in its gate until the loser has returned, so both really overlap.
    let (req_a, req_b) = (s.request(Strategy::Replay, vec![gate.clone()]), s.request(Strategy::Replay, vec![gate]));
    let both = tokio::time::timeout(Duration::from_secs(300), async {
        tokio::join!(promote_then_signal(&a, req_a, &tx), promote_then_signal(&b, req_b, &tx))
    })
    .await;
    let (ra, rb) = both.expect("deadlock: both promotions waited in their gates, so both held the lock");
    let (won, lost) = match (ra, rb) {
        (Ok(r), Err(e)) | (Err(e), Ok(r)) => (r, e),
        (ra, rb) => panic!("expected exactly one Locked, got {ra:?} and {rb:?}"),
    };
    assert_eq!(won.outcome, Outcome::Committed, "{won:#?}");
    match &lost {
        Error::Locked { resource, holder } => {
            assert!(resource.contains(&s.pname), "{lost}");
            assert!(holder.contains(&won.id), "the error names the holder {}: {lost}", won.id);
        }
        other => panic!("expected Locked, got {other}"),
    }
    assert_eq!(a.receipts().await.unwrap().len(), 1, "only the winner has a receipt");
    assert_eq!(s.state().await, Some(true));
    s.cleanup(kit).await;
}

async fn promote_then_signal(
    engine: &PromotionEngine,
    request: PromotionRequest,
    done: &tokio::sync::watch::Sender<bool>,
) -> stagecore::Result<Receipt> {
    let result = engine.promote(request).await;
    done.send_replace(true);
    result
}

/// Crash injection at every journal line k of a full promotion, on the commit path (gate passes)
/// and the rollback path (gate refuses); after each crash one recovery is itself crashed after its
/// first line, then the engine is reopened. Production must end fully applied or fully rolled
/// back (by fingerprints), consistent with the one receipt, no snapshot left, no journal left,
/// and the lock free. Requires `swap` for [`Strategy::Swap`]. With [`Kit::with_crash_stride`]
/// `n`, it crashes at lines 1, 1 + n, 1 + 2n, … only.
pub async fn crash_at_every_step(kit: &Kit, strategy: Strategy) {
    if strategy == Strategy::Swap {
        kit.require("swap", kit.caps().swap);
    }
    for passes in [true, false] {
        let mut k = 1;
        loop {
            let s = Setup::new(kit).await;
            let gate: Arc<dyn Gate> = if passes { Arc::new(Approve("carol")) } else { Arc::new(Refuse) };
            let engine = PromotionEngine::new(s.dir.path(), kit.backend.clone()).unwrap().with_crash_after(k);
            let result = engine.promote(s.request(strategy, vec![gate])).await;
            drop(engine);
            if let Ok(receipt) = result {
                // k lies beyond the last line: the promotion ran to its end.
                assert!(k > 10, "a full promotion writes more than 10 journal lines, fewer than {k} here");
                let expected = if passes { Some(true) } else { Some(false) };
                assert_eq!(s.state().await, expected, "{receipt:#?}");
                s.cleanup(kit).await;
                break;
            }
            let err = result.unwrap_err();
            assert!(err.to_string().contains("crash injected"), "k={k}: unexpected error {err}");
            let crashed = PromotionEngine::new(s.dir.path(), kit.backend.clone()).unwrap().with_crash_after(1);
            let _ = crashed.recover().await;
            drop(crashed);
            check_recovered(kit, &s, strategy, passes, k).await;
            s.cleanup(kit).await;
            k += kit.crash_stride();
        }
    }
}

async fn check_recovered(kit: &Kit, s: &Setup, strategy: Strategy, passes: bool, k: u64) {
    let (engine, recovered) = PromotionEngine::open(s.dir.path(), kit.backend.clone()).await.expect("reopen");
    assert!(recovered.len() <= 1, "k={k}: {recovered:#?}");
    assert!(recovered.iter().all(|r| r.recovered), "k={k}: {recovered:#?}");
    assert!(engine.unfinished().await.unwrap().is_empty(), "k={k}: a journal is left");
    let state = s.state().await.unwrap_or_else(|| panic!("k={k}: production is neither applied nor rolled back"));
    let receipts = engine.receipts().await.unwrap();
    assert_eq!(receipts.len(), 1, "k={k}: one promotion, one receipt: {receipts:#?}");
    assert_eq!(matches!(receipts[0].outcome, Outcome::Committed), state, "k={k}: receipt and production disagree");
    if !passes {
        assert!(!state, "k={k}: a promotion whose gate refuses must never end applied");
    }
    s.assert_no_snapshot_left().await;
    // The lock is free: a new promotion is not refused as locked.
    let again = engine.promote(s.request(strategy, vec![Arc::new(Approve("dave"))])).await;
    assert!(!matches!(again, Err(Error::Locked { .. })), "k={k}: the lock was not released: {again:?}");
    if !state && strategy == Strategy::Replay {
        assert_eq!(again.expect("promote after rollback").outcome, Outcome::Committed, "k={k}");
    }
}

/// Swap happy path: production runs the stage's machines (config and data) under its own
/// identity; the stage keeps old production, stopped. Requires `swap`.
pub async fn swap_commits(kit: &Kit) {
    kit.require("swap", kit.caps().swap);
    let s = Setup::new(kit).await;
    let engine = s.engine(kit).await;
    let receipt = engine.promote(s.request(Strategy::Swap, vec![Arc::new(Approve("erin"))])).await.expect("promote");
    assert_eq!(receipt.outcome, Outcome::Committed, "{receipt:#?}");
    assert_eq!(s.state().await, Some(true), "production does not run the stage's machines");
    let (before, now) =
        (serde_json::from_str::<EnvironmentSpec>(&s.before.spec).unwrap(), s.prod.spec().await.unwrap());
    for m in &before.machines {
        for n in &m.nics {
            let after = now.machine(&m.name).and_then(|x| x.nic(&n.name)).and_then(|x| x.mac.clone());
            assert_eq!(after, n.mac, "{}/{} lost production's MAC", m.name, n.name);
        }
    }
    let mut old = s.stage.fingerprint().await.unwrap().disks;
    let mut want = s.before.disks.clone();
    old.sort();
    want.sort();
    assert_eq!(old, want, "the stage must hold old production's data as the way back");
    let status = s.stage.status().await.unwrap();
    assert!(status.iter().all(|m| m.power == stagecore::PowerState::Stopped), "old production runs: {status:?}");
    s.assert_no_snapshot_left().await;
    s.cleanup(kit).await;
}

/// Swap with a refusing gate swaps back: production and stage are as before. Requires `swap`.
pub async fn swap_rolls_back(kit: &Kit) {
    kit.require("swap", kit.caps().swap);
    let s = Setup::new(kit).await;
    let engine = s.engine(kit).await;
    let receipt = engine.promote(s.request(Strategy::Swap, vec![Arc::new(Refuse)])).await.expect("promote");
    assert!(matches!(receipt.outcome, Outcome::RolledBack { .. }), "{receipt:#?}");
    assert_eq!(s.prod.fingerprint().await.unwrap(), s.before, "production is not as before");
    assert_eq!(s.stage.fingerprint().await.unwrap(), s.stage_before, "the stage is not as before");
    s.assert_no_snapshot_left().await;
    s.cleanup(kit).await;
}

/// A backend failure in the middle of a replay rolls back. `fail_nth_apply(n)` must make the
/// backend's `n`th `Environment::apply` call from now fail (the in-memory backend:
/// `backend.faults().fail_nth("apply", n)`).
pub async fn apply_failure_rolls_back(kit: &Kit, fail_nth_apply: impl Fn(u64)) {
    let s = Setup::new(kit).await;
    let engine = s.engine(kit).await;
    fail_nth_apply(2);
    let receipt = engine.promote(s.request(Strategy::Replay, vec![Arc::new(Approve("frank"))])).await.expect("promote");
    let Outcome::RolledBack { reason } = &receipt.outcome else { panic!("not rolled back: {receipt:#?}") };
    assert!(reason.contains("changes[1]"), "the reason names the failing change: {reason}");
    assert_eq!(s.prod.fingerprint().await.unwrap(), s.before, "production is not as before");
    assert!(receipt.approvals.is_empty(), "no gate may run after a failed apply");
    s.assert_no_snapshot_left().await;
    s.cleanup(kit).await;
}

/// Runs every promotion function that applies to the backend's capabilities (not the
/// fault-injection one, which needs a hook).
pub async fn run_all(kit: &Kit) {
    let caps = kit.caps();
    kit.require_change("set_memory");
    kit.require("disk_io", caps.disk_io);
    replay_commits(kit).await;
    gate_failure_rolls_back(kit).await;
    concurrent_promotions_one_locked(kit).await;
    crash_at_every_step(kit, Strategy::Replay).await;
    if caps.disk_drift {
        precondition_refuses(kit).await;
    }
    if caps.swap {
        swap_commits(kit).await;
        swap_rolls_back(kit).await;
        crash_at_every_step(kit, Strategy::Swap).await;
    }
}
