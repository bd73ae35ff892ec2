//! Sealed baseline layers against real QEMU (issue #11): a baseline layer rewritten behind
//! stagecore's back — an operator's internal-snapshot revert with `qemu-img snapshot -a`, a plain
//! `qemu-io` write — makes drift, staging and promotion fail with `Error::Precondition` naming the
//! file, staging leaves nothing behind, a refused promotion leaves production as it was; and the
//! normal flow (running production, stage started and stopped, snapshots, collapse) keeps every
//! seal valid.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use stagecore::drift::{Drift, DriftEngine};
use stagecore::promotion::{Outcome, PreconditionPolicy, Promotion, PromotionEngine, PromotionRequest, Strategy};
use stagecore::{Backend, Baseline, Change, ChangeMap, ChangeSet, DynEnvironment, EnvironmentExt, Error, StageOptions};
use stagecore_qemu::{Accel, QemuBackend, QemuConfig};
use stagecore_testkit::{Kit, unique};
use support::{Fixture, files_under, run};

fn tool(t: &str, args: &[&str]) {
    let (ok, text) = run(t, args);
    assert!(ok, "{t} {args:?} failed: {text}");
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The record of `env` as JSON.
fn record(root: &Path, env: &str) -> serde_json::Value {
    let text = std::fs::read(root.join("envs").join(env).join("env.json")).expect("record");
    serde_json::from_slice(&text).expect("record JSON")
}

/// The sealed files of `env`'s record.
fn sealed(root: &Path, env: &str) -> Vec<PathBuf> {
    record(root, env)["seals"].as_object().map(|o| o.keys().map(PathBuf::from).collect()).unwrap_or_default()
}

/// Every file under `dir` with its length and modification time.
fn files_state(dir: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime)> {
    files_under(dir)
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(&p).expect("metadata");
            (p, (m.len(), m.modified().expect("mtime")))
        })
        .collect()
}

fn layer_of(b: &Baseline, machine: &str) -> PathBuf {
    PathBuf::from(&b.layers.iter().find(|l| l.machine == machine).expect("machine in baseline").layer)
}

/// `Precondition` naming `file` and saying the layer changed.
#[track_caller]
fn assert_changed<T: std::fmt::Debug>(r: stagecore::Result<T>, file: &Path, what: &str) {
    let name = file.file_name().unwrap().to_str().unwrap();
    match r {
        Err(Error::Precondition(m)) => {
            assert!(m.contains(name) && m.contains("layer changed since it was sealed"), "{what}: {m}")
        }
        other => panic!("{what}: expected Precondition naming {}, got {other:?}", file.display()),
    }
}

fn change_set(prod_memory: u64) -> ChangeSet {
    ChangeSet {
        id: "cs-seal".into(),
        description: "app gets more memory".into(),
        changes: vec![Change::SetMemory { machine: "app".into(), memory_mib: prod_memory + 128 }],
    }
}

async fn promote(dir: &Path, f: &Fixture, prod: &DynEnvironment, stage: &DynEnvironment) -> Outcome {
    let (engine, _) = PromotionEngine::open(dir, f.backend.clone()).await.expect("engine");
    let request = PromotionRequest {
        production: prod.clone(),
        stage: stage.clone(),
        strategy: Strategy::Replay,
        policy: PreconditionPolicy::Anywhere,
        requested_by: "seals test".into(),
        gates: vec![],
    };
    engine.promote(request).await.expect("promote").outcome
}

/// The case: production's disk had an internal snapshot from before the baseline; the
/// operator reverts to it after a stage was made. The stage now reads old content, and the chain
/// above the layer shows nothing — only the seal tells.
#[tokio::test]
async fn internal_snapshot_revert_of_a_baseline_layer_is_refused_everywhere() {
    let f = Fixture::new();
    let kit = Kit::new(f.backend.clone());
    let (pname, sname) = (unique("seal-p"), unique("seal-s"));
    let prod = kit.production(&pname).await.unwrap();
    let q = f.backend.open_qemu(&pname).await.unwrap();
    let top = q.disk_top("web", "disk0").await.unwrap();
    tool("qemu-img", &["snapshot", "-c", "x", s(&top)]);
    tool("qemu-io", &["-f", "qcow2", "-c", "write -P 0x22 0 64k", s(&top)]);

    let b = prod.take_baseline().await.unwrap();
    let layer = layer_of(&b, "web");
    assert_eq!(std::fs::canonicalize(&layer).unwrap(), std::fs::canonicalize(&top).unwrap());
    let prod_seals = sealed(f.root(), &pname);
    for l in &b.layers {
        let c = std::fs::canonicalize(&l.layer).unwrap();
        assert!(prod_seals.contains(&c), "{} is sealed in production's record: {prod_seals:?}", c.display());
    }
    let stage = f.backend.stage(&b, &StageOptions::linked(&sname)).await.unwrap();
    let stage_seals = sealed(f.root(), &sname);
    assert!(stage_seals.contains(&std::fs::canonicalize(&layer).unwrap()), "the stage keeps its base's seals");
    let app_memory = prod.spec().await.unwrap().machine("app").unwrap().memory_mib;
    stage.apply_change_set(&change_set(app_memory)).await.unwrap();
    let drift = DriftEngine::new();
    let clean = drift.drift(&*prod, &*stage).await.expect("drift before the revert");
    assert_eq!(clean.not_checked_disks().count(), 0, "{clean:#?}");
    let io = stage.disk_io().unwrap();
    assert_eq!(io.read("web", "disk0", 0, 4).await.unwrap(), [0x22; 4]);

    // The operator's revert, behind stagecore's back.
    tool("qemu-img", &["snapshot", "-a", "x", s(&layer)]);
    assert_ne!(io.read("web", "disk0", 0, 4).await.unwrap(), [0x22; 4], "the stage's content changed");
    let stage_top = f.backend.open_qemu(&sname).await.unwrap().disk_top("web", "disk0").await.unwrap();
    assert!(stagecore_qcow2::changed_since(&stage_top, &layer).unwrap().is_empty(), "allocation alone is blind");

    assert_changed(prod.disk_changes(&b).await, &layer, "production's disk_changes");
    assert_changed(stage.disk_changes(&b).await, &layer, "the stage's disk_changes");
    assert_changed(drift.drift(&*prod, &*stage).await, &layer, "the drift report");

    // Staging from the baseline fails before anything is made.
    let before = files_state(f.root());
    let again = unique("seal-again");
    assert_changed(f.backend.stage(&b, &StageOptions::linked(&again)).await.map(drop), &layer, "stage");
    assert_changed(f.backend.stage(&b, &StageOptions::full(&again)).await.map(drop), &layer, "full stage");
    assert_eq!(files_state(f.root()), before, "a refused stage leaves no file behind");
    assert!(!f.root().join("envs").join(&again).exists());
    assert!(f.backend.open(&again).await.is_err(), "no record of the refused stage");

    // Promotion from the stage is refused before production is touched.
    let prod_dir = f.root().join("envs").join(&pname);
    let (prod_record, prod_files) = (record(f.root(), &pname), files_state(&prod_dir));
    let state = tempfile::tempdir().unwrap();
    match promote(state.path(), &f, &prod, &stage).await {
        Outcome::Refused { reason } => {
            assert!(reason.contains("layer changed since it was sealed"), "{reason}");
            assert!(reason.contains(layer.file_name().unwrap().to_str().unwrap()), "{reason}");
        }
        other => panic!("expected a refused promotion, got {other:?}"),
    }
    assert_eq!(record(f.root(), &pname), prod_record, "production's record is untouched");
    assert_eq!(files_state(&prod_dir), prod_files, "production's files are untouched");
    assert!(prod.list_snapshots().await.unwrap().is_empty(), "no pre-promotion snapshot was taken");
    assert_eq!(prod.spec().await.unwrap().machine("app").unwrap().memory_mib, app_memory);

    drop(stage);
    f.backend.destroy(&sname).await.unwrap();
    f.backend.destroy(&pname).await.unwrap();
}

/// A plain write into the baseline layer (`qemu-io`), with a full stage: production's side and
/// staging refuse naming the baseline layer; the full stage stands on its own sealed copy,
/// which is checked too.
#[tokio::test]
async fn plain_writes_into_sealed_layers_are_refused() {
    let f = Fixture::new();
    let kit = Kit::new(f.backend.clone());
    let (pname, sname) = (unique("seal-p"), unique("seal-f"));
    let prod = kit.production(&pname).await.unwrap();
    let b = prod.take_baseline().await.unwrap();
    let stage = f.backend.stage(&b, &StageOptions::full(&sname)).await.unwrap();
    let copy =
        stagecore_qcow2::chain(&f.backend.open_qemu(&sname).await.unwrap().disk_top("db", "disk0").await.unwrap())
            .unwrap()[1]
            .path
            .clone();
    assert!(sealed(f.root(), &sname).contains(&std::fs::canonicalize(&copy).unwrap()), "the full copy is sealed");
    stage.disk_changes(&b).await.expect("the full stage checks clean");

    let layer = layer_of(&b, "db");
    tool("qemu-io", &["-f", "qcow2", "-c", "write -P 0x55 0 64k", s(&layer)]);
    assert_changed(prod.disk_changes(&b).await, &layer, "production's disk_changes");
    stage.disk_changes(&b).await.expect("the full stage does not read production's layer");
    assert_changed(DriftEngine::new().drift(&*prod, &*stage).await, &layer, "the drift report");
    let before = files_state(f.root());
    let again = unique("seal-again");
    assert_changed(f.backend.stage(&b, &StageOptions::linked(&again)).await.map(drop), &layer, "stage");
    assert_eq!(files_state(f.root()), before, "a refused stage leaves no file behind");

    tool("qemu-io", &["-f", "qcow2", "-c", "write -P 0x66 1M 64k", s(&copy)]);
    assert_changed(stage.disk_changes(&b).await, &copy, "the full stage's disk_changes");

    drop(stage);
    f.backend.destroy(&sname).await.unwrap();
    f.backend.destroy(&pname).await.unwrap();
}

/// Every disk of both sides checks against `b`.
async fn check(prod: &DynEnvironment, stage: &DynEnvironment, b: &Baseline, what: &str) {
    for (side, env) in [("production", prod), ("stage", stage)] {
        let changes = env.disk_changes(b).await.unwrap_or_else(|e| panic!("{what}: {side}: {e}"));
        assert!(changes.iter().all(|c| matches!(c.changes, ChangeMap::Checked { .. })), "{what}: {side}: {changes:?}");
    }
}

/// The normal flow keeps every seal valid: a baseline of a running production (QEMU switches to
/// the new overlay and keeps the old top open read-only), a stage started and stopped on it,
/// production stopped and started, snapshots, snapshot deletion and collapse (which merges into
/// sealed layers and reseals them), and a replay promotion.
#[tokio::test]
async fn the_normal_flow_keeps_seals_valid() {
    let f = Fixture::new();
    let kit = Kit::new(f.backend.clone());
    let (pname, sname) = (unique("seal-p"), unique("seal-s"));
    let prod = kit.production(&pname).await.unwrap();
    prod.start().await.unwrap();
    let q = f.backend.open_qemu(&pname).await.unwrap();
    // (The first frozen layer is the bottom, never merged: s0 gets the second.)
    prod.create_snapshot("sa").await.unwrap();
    prod.create_snapshot("s0").await.unwrap();
    let b1 = prod.take_baseline().await.unwrap();
    let b1_layer = std::fs::canonicalize(layer_of(&b1, "web")).unwrap();
    let sealed_b1 = sealed(f.root(), &pname);
    assert!(sealed_b1.contains(&b1_layer));
    // Deleting s0 merges its layer (below b1's, sealed with b1's chain) into b1's layer — live,
    // with block-stream: b1's layer is resealed and s0's seal dropped in the same record update.
    prod.delete_snapshot("s0").await.unwrap();
    let after = sealed(f.root(), &pname);
    assert!(after.len() < sealed_b1.len(), "the merged-away layers lose their seals: {sealed_b1:?} -> {after:?}");
    assert!(after.contains(&b1_layer));
    prod.disk_changes(&b1).await.expect("b1's layer absorbed s0's and was resealed");
    prod.create_snapshot("s1").await.unwrap();
    let b2 = prod.take_baseline().await.unwrap();
    let stage = f.backend.stage(&b2, &StageOptions::linked(&sname)).await.unwrap();
    check(&prod, &stage, &b2, "after the baselines of a running production").await;
    prod.disk_changes(&b1).await.expect("the first baseline still checks");
    stage.start().await.unwrap();
    check(&prod, &stage, &b2, "with the stage running").await;
    stage.stop().await.unwrap();
    prod.stop().await.unwrap();
    prod.start().await.unwrap();
    check(&prod, &stage, &b2, "after stop and start").await;
    prod.create_snapshot("s2").await.unwrap();
    prod.delete_snapshot("s2").await.unwrap();
    prod.delete_snapshot("s1").await.unwrap();
    let report = q.collapse_layers().await.unwrap();
    check(&prod, &stage, &b2, &format!("after collapse {report:?}")).await;
    // Every remaining seal of production is of a file that exists and still matches.
    let rec = record(f.root(), &pname);
    let seals: stagecore_qcow2::Seals = serde_json::from_value(rec["seals"].clone()).unwrap();
    assert!(!seals.is_empty());
    for (file, seal) in seals.iter() {
        stagecore_qcow2::verify(file, seal).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
    drop(q);

    let app_memory = prod.spec().await.unwrap().machine("app").unwrap().memory_mib;
    stage.apply_change_set(&change_set(app_memory)).await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let outcome = promote(state.path(), &f, &prod, &stage).await;
    assert_eq!(outcome, Outcome::Committed);
    assert_eq!(prod.spec().await.unwrap().machine("app").unwrap().memory_mib, app_memory + 128);
    check(&prod, &stage, &b2, "after the promotion").await;

    prod.stop().await.unwrap();
    drop(stage);
    f.backend.destroy(&sname).await.unwrap();
    f.backend.destroy(&pname).await.unwrap();
}

/// A collapse killed after its merges rewrote a sealed layer but before the record was updated
/// (`collapse:merged`) must not leave that layer's old seal behind: it would fail every later
/// drift report and stage of the baseline, although what the layer reads never changed.
#[tokio::test]
async fn a_collapse_killed_after_merging_leaves_no_stale_seal() {
    let f = Fixture::with(|mut c| {
        c.hooks = stagecore_qemu::FaultHooks {
            crash_at: Some(std::sync::Arc::new(|p: &str| p == "collapse:merged")),
            ..Default::default()
        };
        c
    });
    let kit = Kit::new(f.backend.clone());
    let (pname, sname) = (unique("sealcrash-p"), unique("sealcrash-s"));
    let prod = kit.production(&pname).await.unwrap();
    // (The first frozen layer is the bottom, never merged: s0 gets the second.)
    prod.create_snapshot("sa").await.unwrap();
    prod.create_snapshot("s0").await.unwrap();
    let b1 = prod.take_baseline().await.unwrap();
    let b1_layer = std::fs::canonicalize(layer_of(&b1, "web")).unwrap();
    let before = std::fs::metadata(&b1_layer).unwrap().modified().unwrap();
    assert!(sealed(f.root(), &pname).contains(&b1_layer));
    // Deleting s0 merges its layer into b1's (qemu-img rebase: production is stopped), then the
    // collapse dies before its record update (delete_snapshot's merge is best effort: the
    // snapshot is gone either way).
    prod.delete_snapshot("s0").await.unwrap();
    assert_ne!(std::fs::metadata(&b1_layer).unwrap().modified().unwrap(), before, "the merge rewrote b1's layer");
    drop(prod);

    let again = std::sync::Arc::new(QemuBackend::new(QemuConfig::new(f.root()).with_accel(Accel::Tcg)));
    let prod = again.open(&pname).await.unwrap();
    prod.disk_changes(&b1).await.expect("no stale seal of the merged-into layer");
    let stage = again.stage(&b1, &StageOptions::linked(&sname)).await.expect("the baseline still stages");
    let fresh = stage.disk_changes(&b1).await.unwrap();
    assert!(
        fresh.iter().all(|d| matches!(&d.changes, ChangeMap::Checked { extents } if extents.is_empty())),
        "a fresh stage reads b1: {fresh:?}"
    );
    // A later collapse of the same environment seals the layer again.
    again.open_qemu(&pname).await.unwrap().collapse_layers().await.unwrap();
    let rec = record(f.root(), &pname);
    let seals: stagecore_qcow2::Seals = serde_json::from_value(rec["seals"].clone()).unwrap();
    for (file, seal) in seals.iter() {
        stagecore_qcow2::verify(file, seal).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
    again.destroy(&sname).await.unwrap();
    again.destroy(&pname).await.unwrap();
}
