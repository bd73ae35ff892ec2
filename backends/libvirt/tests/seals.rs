//! Sealed baseline layers against the live libvirtd (`qemu:///system`, TCG; FAILS without the
//! daemon), issue #11: a baseline layer rewritten behind stagecore's back (`qemu-img snapshot -a`
//! to an internal snapshot from before the baseline, a plain `qemu-io` write) makes drift, staging
//! and promotion fail with `Error::Precondition` naming the file — staging leaves no domain, file
//! or record, a refused promotion leaves production's definitions and files as they were — and
//! starting and stopping production and a stage (libvirt relabels and chowns the chain's files)
//! keeps every seal valid.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use stagecore::promotion::{Outcome, PreconditionPolicy, Promotion, PromotionEngine, PromotionRequest, Strategy};
use stagecore::{
    Backend, BackendExt, Baseline, Change, ChangeMap, ChangeSet, DynEnvironment, EnvironmentExt, Error, StageOptions,
    memory::sample_spec,
};

use common::{Guard, assert_changed, small, virsh};

fn tool(t: &str, args: &[&str]) {
    let out = Command::new(t).args(args).output().unwrap_or_else(|e| panic!("{t} is required: {e}"));
    assert!(out.status.success(), "{t} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Every file under `dir` with its length and modification time.
fn files_state(dir: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime)> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, (u64, std::time::SystemTime)>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if let Ok(m) = std::fs::metadata(&p) {
                out.insert(p, (m.len(), m.modified().unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, &mut out);
    out
}

/// The inactive XML of every domain of the test.
fn definitions(g: &Guard) -> BTreeMap<String, String> {
    g.domains().into_iter().map(|d| (d.clone(), virsh(&["dumpxml", "--inactive", &d]).join("\n"))).collect()
}

fn layer_of(b: &Baseline, machine: &str) -> String {
    b.layers.iter().find(|l| l.machine == machine).expect("machine in baseline").layer.clone()
}

async fn check(env: &DynEnvironment, b: &Baseline, what: &str) {
    let changes = env.disk_changes(b).await.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(changes.iter().all(|c| matches!(c.changes, ChangeMap::Checked { .. })), "{what}: {changes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_baseline_layer_is_refused_by_drift_staging_and_promotion() {
    let g = Guard::new("seal");
    let backend = Arc::new(g.backend().await);
    let pname = format!("p{}", g.tag);
    let prod = backend.create(&small(sample_spec(&pname))).await.expect("create production");
    let top = stagecore::Environment::disk_io(&*prod).unwrap();
    top.write("web", "disk0", 0, &[0x11; 4096]).await.unwrap();
    // The operator's internal snapshot of production's disk, from before the baseline.
    let web_top = prod.spec().await.unwrap().machine("web").unwrap().disks[0].source.clone();
    let web_file = web_top.trim_start_matches("file:").to_string();
    assert!(Path::new(&web_file).is_file(), "production's web disk file: {web_top}");
    tool("qemu-img", &["snapshot", "-c", "x", &web_file]);
    tool("qemu-io", &["-f", "qcow2", "-c", "write -P 0x22 0 64k", &web_file]);

    let b = prod.take_baseline().await.expect("baseline");
    let layer = layer_of(&b, "web");
    assert_eq!(std::fs::canonicalize(&layer).unwrap(), std::fs::canonicalize(&web_file).unwrap());
    let seals_file = g.dir.join(&pname).join("baselines").join(&b.id).join("seals.json");
    let seals: stagecore_qcow2::Seals =
        serde_json::from_slice(&std::fs::read(&seals_file).expect("the baseline's seals")).unwrap();
    assert!(b.layers.iter().all(|l| seals.contains(Path::new(&l.layer))), "{seals:?}");

    let sname = format!("s{}", g.tag);
    let stage = backend.stage(&b, &StageOptions::linked(&sname)).await.expect("linked stage");
    assert!(g.dir.join(&sname).join("seals.json").is_file(), "the stage keeps its base's seals");
    let app = prod.spec().await.unwrap().machine("app").unwrap().memory_mib;
    let cs = ChangeSet {
        id: "cs-seal".into(),
        description: "app gets more memory".into(),
        changes: vec![Change::SetMemory { machine: "app".into(), memory_mib: app + 64 }],
    };
    stage.apply_change_set(&cs).await.expect("change set on the stage");
    backend.drift(&*prod, &*stage).await.expect("drift before the rewrite");
    let sio = stage.disk_io().unwrap();
    assert_eq!(sio.read("web", "disk0", 0, 4).await.unwrap(), [0x22; 4]);

    // The revert behind stagecore's back: the stage reads old content, its overlay shows nothing.
    tool("qemu-img", &["snapshot", "-a", "x", &layer]);
    assert_eq!(sio.read("web", "disk0", 0, 4).await.unwrap(), [0x11; 4], "the stage's content changed");

    assert_changed(prod.disk_changes(&b).await, &layer, "production's disk_changes");
    assert_changed(stage.disk_changes(&b).await, &layer, "the stage's disk_changes");
    assert_changed(backend.drift(&*prod, &*stage).await, &layer, "the drift report");

    let (defs, files) = (definitions(&g), files_state(&g.dir));
    let again = format!("a{}", g.tag);
    assert_changed(backend.stage(&b, &StageOptions::linked(&again)).await.map(drop), &layer, "stage");
    assert_changed(backend.stage(&b, &StageOptions::full(&again)).await.map(drop), &layer, "full stage");
    assert_eq!(definitions(&g), defs, "a refused stage defines no domain");
    assert_eq!(files_state(&g.dir), files, "a refused stage leaves no file");
    assert!(matches!(backend.open(&again).await, Err(Error::NotFound { .. })), "no record of it");

    let state = tempfile::tempdir().unwrap();
    let (engine, _) = PromotionEngine::open(state.path(), backend.clone()).await.unwrap();
    let request = PromotionRequest {
        production: prod.clone(),
        stage: stage.clone(),
        strategy: Strategy::Replay,
        policy: PreconditionPolicy::Anywhere,
        requested_by: "seals test".into(),
        gates: vec![],
    };
    let prod_files = files_state(&g.dir.join(&pname));
    match engine.promote(request).await.expect("promote").outcome {
        Outcome::Refused { reason } => assert!(reason.contains("layer changed since it was sealed"), "{reason}"),
        other => panic!("expected a refused promotion, got {other:?}"),
    }
    assert_eq!(definitions(&g), defs, "production's (and the stage's) definitions are untouched");
    assert_eq!(files_state(&g.dir.join(&pname)), prod_files, "production's files are untouched");
    assert!(prod.list_snapshots().await.unwrap().is_empty(), "no pre-promotion snapshot");
    assert_eq!(prod.spec().await.unwrap().machine("app").unwrap().memory_mib, app);

    // A plain write into another baseline layer is caught too.
    tool("qemu-img", &["snapshot", "-d", "x", &layer]);
    let db = layer_of(&b, "db");
    tool("qemu-io", &["-f", "qcow2", "-c", "write -P 0x55 0 64k", &db]);
    let e = prod.disk_changes(&b).await;
    assert!(matches!(&e, Err(Error::Precondition(_))), "{e:?}");

    backend.destroy(&sname).await.unwrap();
    backend.destroy(&pname).await.unwrap();
}

/// libvirt chowns and relabels a chain's files when a domain starts and restores them when it
/// stops: none of that is a change of the layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_and_stop_of_production_and_stage_keep_seals_valid() {
    let g = Guard::new("sealrun");
    let backend = g.backend().await;
    let pname = format!("p{}", g.tag);
    let prod = backend.create(&small(sample_spec(&pname))).await.expect("create production");
    prod.start().await.unwrap();
    let b = prod.take_baseline().await.expect("baseline of a running production");
    let full = backend.stage(&b, &StageOptions::full(format!("f{}", g.tag))).await.expect("full stage");
    let sname = format!("s{}", g.tag);
    let stage = backend.stage(&b, &StageOptions::linked(&sname)).await.expect("linked stage");
    check(&prod, &b, "production running").await;
    check(&stage, &b, "stage stopped").await;
    let layer = layer_of(&b, "web");
    let owner = |what: &str| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&layer).unwrap();
        eprintln!("{what}: {layer} uid {} gid {} ctime {}.{:09}", m.uid(), m.gid(), m.ctime(), m.ctime_nsec());
        (m.uid(), m.gid(), m.ctime(), m.ctime_nsec())
    };
    // What a relabel does to the inode — a new owner, a new ctime — done by hand first, then by
    // libvirt when the stage starts (its DAC driver chowns the chain's files it must read).
    let started_owner = owner("as production's former top");
    std::os::unix::fs::chown(&layer, Some(0), Some(0)).unwrap();
    let before = owner("chowned to root");
    assert_ne!(before, started_owner);
    check(&stage, &b, "after a chown of its base").await;
    check(&prod, &b, "after a chown of its baseline layer").await;
    stage.start().await.unwrap();
    let running = owner("with the stage running");
    assert_ne!(running, before, "libvirt relabels the stage's base layer on start");
    full.start().await.unwrap();
    check(&stage, &b, "stage running").await;
    check(&full, &b, "full stage running").await;
    check(&prod, &b, "production with the stages running").await;
    stage.stop().await.unwrap();
    full.stop().await.unwrap();
    prod.stop().await.unwrap();
    owner("with everything stopped");
    check(&prod, &b, "production stopped").await;
    check(&stage, &b, "stage stopped again").await;
    prod.start().await.unwrap();
    check(&prod, &b, "production started again").await;
    assert_eq!(backend.drift(&*prod, &*stage).await.expect("drift").not_checked_disks().count(), 0);
    prod.stop().await.unwrap();
    backend.destroy(&format!("f{}", g.tag)).await.unwrap();
    backend.destroy(&sname).await.unwrap();
    backend.destroy(&pname).await.unwrap();
}
