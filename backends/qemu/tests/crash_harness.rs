//! Crash harness (issue 11, invariant 4): a re-exec'd child process runs one operation against
//! real QEMU (TCG) with *running* machines — a promotion by replay or by swap, `take_baseline`,
//! `create_snapshot` (whole environment) or `stage` — and the parent SIGKILLs it at a uniformly
//! random moment of that operation (drawn from its duration, measured by one unkilled run
//! first). The parent then reopens the state as a new program would (a fresh `QemuBackend` and
//! `PromotionEngine::open`, which recovers) and checks:
//!
//! - production fully applied or fully rolled back (spec and disk digests equal one side);
//! - every machine has the power state it had before (Running) — so none is paused;
//! - no unrecorded layer: every qcow2 under production's directory lies in a chain the record
//!   references, and each running QEMU's top (`info block`) is the record's top;
//! - no lost write: a write acknowledged through `DiskIo` before the operation reads back, and a
//!   write made after reopening survives a stop/start;
//! - no lock left: a second open, a `take_baseline` and (after a promotion) a new promotion succeed.
//!
//! Trials per operation: `STAGECORE_CRASH_TRIALS` (default 4); `STAGECORE_CRASH_SEED` fixes the
//! random moments. The disks are plain (no guest OS): writes go through `DiskIo` (QEMU's own
//! `qemu-io` on running machines).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stagecore::promotion::{Outcome, PreconditionPolicy, Promotion, PromotionEngine, PromotionRequest, Strategy};
use stagecore::{
    Backend, Change, ChangeSet, EnvironmentExt, EnvironmentSpec, Error, Fingerprint, PowerState, StageOptions,
};
use stagecore_qemu::{Accel, QemuBackend, QemuConfig};
use support::Fixture;

const OP: &str = "STAGECORE_CRASH_CHILD_OP";
const ROOT: &str = "STAGECORE_CRASH_CHILD_ROOT";
/// The block every disk gets before the operation (acknowledged, so it must survive).
const MARK_AT: u64 = 3 << 20;
/// Where the harness writes after reopening (must survive a stop/start).
const AFTER_AT: u64 = 5 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Replay,
    Swap,
    Baseline,
    Snapshot,
    Stage,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Replay => "replay",
            Op::Swap => "swap",
            Op::Baseline => "take_baseline",
            Op::Snapshot => "create_snapshot",
            Op::Stage => "stage",
        }
    }

    fn parse(s: &str) -> Op {
        [Op::Replay, Op::Swap, Op::Baseline, Op::Snapshot, Op::Stage]
            .into_iter()
            .find(|o| o.name() == s)
            .unwrap_or_else(|| panic!("unknown op {s}"))
    }

    fn promotes(self) -> bool {
        matches!(self, Op::Replay | Op::Swap)
    }
}

fn backend(root: &Path) -> Arc<QemuBackend> {
    Arc::new(QemuBackend::new(QemuConfig::new(root).with_accel(Accel::Tcg)))
}

fn names(root: &Path) -> (String, String) {
    let _ = root;
    ("prod".to_string(), "stage1".to_string())
}

fn state_dir(root: &Path) -> PathBuf {
    root.join("promotion-state")
}

fn mark(machine: &str) -> Vec<u8> {
    format!("acknowledged before the kill: {machine}").into_bytes().repeat(64)
}

fn flush() {
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

/// Not a test of its own: the child process of the trials (does nothing without its variables).
/// Prints `READY` right before the operation and `DONE` after it.
#[tokio::test]
async fn crash_child() {
    let (Ok(op), Ok(root)) = (std::env::var(OP), std::env::var(ROOT)) else { return };
    if op == "flap-lock" {
        return flap_lock(Path::new(&root));
    }
    if op == "hold-env" {
        let b = backend(Path::new(&root));
        let held = b.open("prod").await.expect("child opens production");
        println!("\nHOLDING {}", std::process::id());
        flush();
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        drop(held);
        return;
    }
    if let Some(op) = op.strip_prefix("setup-") {
        let root = PathBuf::from(root);
        let before = setup(&root, Op::parse(op)).await;
        std::fs::write(root.join("before.json"), serde_json::to_vec(&before).unwrap()).unwrap();
        println!("\nSETUP DONE");
        flush();
        return;
    }
    let (op, root) = (Op::parse(&op), PathBuf::from(root));
    let b = backend(&root);
    let (pname, sname) = names(&root);
    let prod = b.open(&pname).await.expect("child opens production");
    let engine = if op.promotes() {
        Some(PromotionEngine::open(state_dir(&root), b.clone()).await.expect("child opens the engine").0)
    } else {
        None
    };
    let stage = if op.promotes() { Some(b.open(&sname).await.expect("child opens the stage")) } else { None };
    let baseline: Option<stagecore::Baseline> =
        std::fs::read(root.join("baseline.json")).ok().map(|t| serde_json::from_slice(&t).unwrap());
    println!("\nREADY");
    flush();
    let result: Result<String, Error> = match op {
        Op::Replay | Op::Swap => {
            let req = PromotionRequest {
                production: prod.clone(),
                stage: stage.clone().unwrap(),
                strategy: if op == Op::Replay { Strategy::Replay } else { Strategy::Swap },
                policy: PreconditionPolicy::Anywhere,
                requested_by: "crash-harness".into(),
                gates: Vec::new(),
            };
            engine.unwrap().promote(req).await.map(|r| format!("{:?}", r.outcome))
        }
        Op::Baseline => prod.take_baseline().await.map(|b| b.id),
        Op::Snapshot => prod.create_snapshot("crash-snap").await.map(|s| s.name),
        Op::Stage => {
            let opts = StageOptions { start: true, ..StageOptions::linked(&sname) };
            b.stage(&baseline.expect("a baseline"), &opts).await.map(|s| s.name().to_string())
        }
    };
    println!("\nDONE {result:?}");
    flush();
}

/// What the parent knows before a trial (written by the setup child).
#[derive(serde::Serialize, serde::Deserialize)]
struct Before {
    #[serde(with = "fp")]
    prod: Fingerprint,
    #[serde(with = "opt_fp")]
    stage: Option<Fingerprint>,
    stage_spec: Option<EnvironmentSpec>,
    power: BTreeMap<String, PowerState>,
}

type FpParts = (String, Vec<(String, String, [u8; 32])>);

mod fp {
    use super::{Fingerprint, FpParts};
    pub(super) fn serialize<S: serde::Serializer>(f: &Fingerprint, s: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(&(f.spec.clone(), f.disks.clone()), s)
    }
    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Fingerprint, D::Error> {
        let (spec, disks): FpParts = serde::Deserialize::deserialize(d)?;
        Ok(Fingerprint { spec, disks })
    }
}

mod opt_fp {
    use super::{Fingerprint, FpParts};
    pub(super) fn serialize<S: serde::Serializer>(f: &Option<Fingerprint>, s: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(&f.as_ref().map(|f| (f.spec.clone(), f.disks.clone())), s)
    }
    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Fingerprint>, D::Error> {
        let parts: Option<FpParts> = serde::Deserialize::deserialize(d)?;
        Ok(parts.map(|(spec, disks)| Fingerprint { spec, disks }))
    }
}

/// Runs the setup in a child process (so this process holds no QMP session: QEMU serves one
/// client at a time) and reads what it wrote.
fn setup_in_child(root: &Path, op: Op) -> Before {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(OP, format!("setup-{}", op.name()))
        .env(ROOT, root)
        .stdin(Stdio::null())
        .output()
        .expect("run the setup child");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SETUP DONE"), "setup failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&std::fs::read(root.join("before.json")).unwrap()).unwrap()
}

/// Builds the trial's environments in `root`: a running production with an acknowledged mark on
/// every disk, and for promotions a linked stage with a recorded ChangeSet (more memory for app —
/// a restart —, a disk write on db); for `stage` a baseline. All handles are dropped at the end.
async fn setup(root: &Path, op: Op) -> Before {
    let b = backend(root);
    let (pname, sname) = names(root);
    let prod = b.create(&stagecore::memory::sample_spec(&pname)).await.expect("production");
    let io = prod.disk_io().unwrap();
    for m in prod.spec().await.unwrap().machines {
        for d in &m.disks {
            io.write(&m.name, &d.name, 0, stagecore_testkit::SEED).await.unwrap();
        }
    }
    prod.start().await.expect("production starts");
    for m in prod.spec().await.unwrap().machines {
        for d in &m.disks {
            io.write(&m.name, &d.name, MARK_AT, &mark(&m.name)).await.expect("acknowledged write");
        }
    }
    let (mut stage_fp, mut stage_spec) = (None, None);
    if op.promotes() || op == Op::Stage {
        let baseline = prod.take_baseline().await.expect("baseline");
        std::fs::write(root.join("baseline.json"), serde_json::to_vec(&baseline).unwrap()).unwrap();
        if op.promotes() {
            let stage = b.stage(&baseline, &StageOptions::linked(&sname)).await.expect("stage");
            let spec = prod.spec().await.unwrap();
            let (app, db) = (spec.machine("app").unwrap(), spec.machine("db").unwrap());
            let cs = ChangeSet {
                id: "cs-crash".into(),
                description: "app gets more memory; db gets a patched block".into(),
                changes: vec![
                    Change::SetMemory { machine: app.name.clone(), memory_mib: app.memory_mib + 128 },
                    Change::WriteDisk {
                        machine: db.name.clone(),
                        disk: db.disks[0].name.clone(),
                        offset: 7 << 20,
                        data: b"promoted patch".repeat(300),
                    },
                ],
            };
            stage.apply_change_set(&cs).await.expect("ChangeSet on the stage");
            stage_fp = Some(stage.fingerprint().await.unwrap());
            stage_spec = Some(stage.spec().await.unwrap());
        }
    }
    let power = prod.status().await.unwrap().into_iter().map(|s| (s.machine, s.power)).collect();
    Before { prod: prod.fingerprint().await.unwrap(), stage: stage_fp, stage_spec, power }
}

/// Runs the child; kills it `after` its `READY` (never when `None`). Returns how long the
/// operation ran until `DONE` (when it got there) and the child's output.
fn run_child(root: &Path, op: Op, after: Option<Duration>) -> (Option<Duration>, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(OP, op.name())
        .env(ROOT, root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("re-run the test binary");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut out = String::new();
    loop {
        let line = lines.next().unwrap_or_else(|| panic!("child ended before READY: {out}")).unwrap();
        out.push_str(&line);
        out.push('\n');
        if line.contains("READY") {
            break;
        }
    }
    let ready = Instant::now();
    let pid = child.id();
    let killer = after.map(|d| {
        std::thread::spawn(move || {
            std::thread::sleep(d);
            support::signal(pid, libc::SIGKILL);
        })
    });
    let mut done = None;
    for line in lines.map_while(Result::ok) {
        if line.contains("DONE") && done.is_none() {
            done = Some(ready.elapsed());
        }
        out.push_str(&line);
        out.push('\n');
    }
    if let Some(k) = killer {
        let _ = k.join();
    }
    let _ = child.wait();
    (done, out)
}

/// A small xorshift generator (no extra dependency); the seed is printed for reproduction.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("STAGECORE_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        });
        eprintln!("crash harness seed {seed} (STAGECORE_CRASH_SEED)");
        Rng(seed | 1)
    }

    fn uniform(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        max.mul_f64((self.0 >> 11) as f64 / (1u64 << 53) as f64)
    }
}

fn trials() -> usize {
    std::env::var("STAGECORE_CRASH_TRIALS").ok().and_then(|s| s.parse().ok()).unwrap_or(4)
}

/// The record's chain roots (tops, snapshot layers, origins, baseline layers) of `env`.
fn record_roots(root: &Path, env: &str) -> Vec<PathBuf> {
    let text = std::fs::read(root.join("envs").join(env).join("env.json")).expect("record");
    let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
    let mut out = Vec::new();
    let strings = |x: &serde_json::Value, out: &mut Vec<PathBuf>| {
        if let Some(o) = x.as_object() {
            out.extend(o.values().filter_map(|p| p.as_str()).map(PathBuf::from));
        }
    };
    strings(&v["disks"], &mut out);
    for s in v["snapshots"].as_array().into_iter().flatten() {
        strings(&s["layers"], &mut out);
    }
    for o in v["origins"].as_object().into_iter().flat_map(|o| o.values()) {
        strings(o, &mut out);
    }
    for b in v["baselines"].as_array().into_iter().flatten() {
        for l in b["layers"].as_array().into_iter().flatten() {
            out.extend(l["layer"].as_str().map(PathBuf::from));
        }
    }
    out
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Every qcow2 under `envs/<env>` that no chain of any environment's record reaches.
fn unrecorded_layers(root: &Path, env: &str) -> Vec<PathBuf> {
    let mut known = BTreeSet::new();
    for e in std::fs::read_dir(root.join("envs")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !e.path().join("env.json").exists() {
            continue;
        }
        for r in record_roots(root, &name) {
            for i in stagecore_qcow2::chain(&r).unwrap_or_else(|e| panic!("chain of {}: {e}", r.display())) {
                known.insert(canonical(&i.path));
            }
        }
    }
    support::files_under(&root.join("envs").join(env))
        .into_iter()
        .filter(|f| f.extension().is_some_and(|x| x == "qcow2"))
        .filter(|f| !known.contains(&canonical(f)))
        .collect()
}

/// The top file of each disk device (`d<n>`) a running QEMU reports (`info block`).
async fn running_tops(env: &stagecore_qemu::QemuEnvironment, machine: &str) -> BTreeMap<String, PathBuf> {
    let text = env.human_monitor_command(machine, "info block").await.expect("info block");
    let mut out = BTreeMap::new();
    let mut current: Option<PathBuf> = None;
    for line in text.lines() {
        // `<node>: /path/top.qcow2 (qcow2)` then `    Attached to:      /machine/peripheral/d0/...`
        if !line.starts_with(char::is_whitespace) {
            current =
                line.split_once(": ").map(|(_, rest)| PathBuf::from(rest.split(" (").next().unwrap_or(rest).trim()));
        } else if let Some(dev) = line.split("/machine/peripheral/").nth(1).and_then(|r| r.split('/').next())
            && let Some(file) = &current
        {
            out.insert(dev.to_string(), file.clone());
        }
    }
    out
}

fn sorted(f: &Fingerprint) -> Vec<(String, String, [u8; 32])> {
    let mut d = f.disks.clone();
    d.sort();
    d
}

/// The checks after reopening (see the module docs). Returns "applied", "rolled back" or
/// "unchanged" for the summary.
async fn check(root: &Path, op: Op, before: &Before, trial: &str) -> &'static str {
    let b = backend(root);
    let (pname, sname) = names(root);
    let (engine, recovered) = if op.promotes() {
        let (e, r) = PromotionEngine::open(state_dir(root), b.clone())
            .await
            .unwrap_or_else(|e| panic!("{trial}: recovery failed: {e}"));
        (Some(e), r)
    } else {
        (None, Vec::new())
    };
    let qprod = b.open_qemu(&pname).await.unwrap_or_else(|e| panic!("{trial}: production does not reopen: {e}"));
    let prod: Arc<dyn stagecore::Environment> = Arc::new(qprod.clone());
    let now = prod.fingerprint().await.unwrap();
    let mut verdict = "unchanged";
    if op.promotes() {
        let engine = engine.as_ref().unwrap();
        assert!(engine.unfinished().await.unwrap().is_empty(), "{trial}: a journal is left");
        let receipts = engine.receipts().await.unwrap();
        let spec = prod.spec().await.unwrap();
        let applied = stagecore::drift::config_differences(&spec, before.stage_spec.as_ref().unwrap()).is_empty()
            && sorted(&now) == sorted(before.stage.as_ref().unwrap());
        let rolled_back = now == before.prod;
        assert!(
            applied || rolled_back,
            "{trial}: production is neither applied nor rolled back; recovered {recovered:#?}"
        );
        if let Some(r) = receipts.last() {
            assert_eq!(
                matches!(r.outcome, Outcome::Committed),
                applied,
                "{trial}: receipt and production disagree: {r:#?}"
            );
        } else {
            assert!(rolled_back, "{trial}: applied without a receipt");
        }
        verdict = if applied { "applied" } else { "rolled back" };
        let snaps = prod.list_snapshots().await.unwrap();
        assert!(snaps.is_empty(), "{trial}: pre-promotion snapshot left: {snaps:?}");
    } else {
        assert_eq!(now.disks, before.prod.disks, "{trial}: {} changed production's disks", op.name());
    }
    // Power states as before (none paused).
    let power: BTreeMap<String, PowerState> =
        prod.status().await.unwrap().into_iter().map(|s| (s.machine, s.power)).collect();
    assert_eq!(power, before.power, "{trial}: power states not restored");
    // No unrecorded layer; each running QEMU runs the record's tops.
    let stray = unrecorded_layers(root, &pname);
    assert!(stray.is_empty(), "{trial}: layers no record knows: {stray:?}");
    for m in prod.spec().await.unwrap().machines {
        let tops = running_tops(&qprod, &m.name).await;
        for (j, d) in m.disks.iter().enumerate() {
            let want = canonical(&qprod.disk_top(&m.name, &d.name).await.unwrap());
            let got = tops.get(&format!("d{j}")).map(|p| canonical(p));
            assert_eq!(got.as_ref(), Some(&want), "{trial}: {}/{} runs on another top than recorded", m.name, d.name);
        }
    }
    // No lost write: the mark written before the operation is there (after a committed swap it
    // went with old production to the stage, the way back).
    let swapped = op == Op::Swap && verdict == "applied";
    let holder: Arc<dyn stagecore::Environment> = if swapped { b.open(&sname).await.unwrap() } else { prod.clone() };
    for m in holder.spec().await.unwrap().machines {
        for d in &m.disks {
            let want = mark(&m.name);
            let got = holder.disk_io().unwrap().read(&m.name, &d.name, MARK_AT, want.len() as u64).await.unwrap();
            assert!(got == want, "{trial}: the acknowledged write on {}/{} is lost", m.name, d.name);
        }
    }
    drop(holder);
    // A write after reopening survives a stop/start (it reached the layer the record boots).
    let io = prod.disk_io().unwrap();
    for m in prod.spec().await.unwrap().machines {
        io.write(&m.name, &m.disks[0].name, AFTER_AT, b"after reopening").await.unwrap();
    }
    prod.stop().await.unwrap();
    prod.start().await.unwrap();
    for m in prod.spec().await.unwrap().machines {
        let got = io.read(&m.name, &m.disks[0].name, AFTER_AT, 15).await.unwrap();
        assert_eq!(got, b"after reopening", "{trial}: a write after reopening was lost by a stop/start");
    }
    // The stage: fully built or not there at all (a retry with its name succeeds).
    if op == Op::Stage {
        let listed = b.list().await.unwrap().iter().any(|i| i.name == sname);
        let baseline: stagecore::Baseline =
            serde_json::from_slice(&std::fs::read(root.join("baseline.json")).unwrap()).unwrap();
        let stage = if listed {
            b.open(&sname).await.unwrap_or_else(|e| panic!("{trial}: the stage is listed but does not open: {e}"))
        } else {
            b.stage(&baseline, &StageOptions::linked(&sname)).await.unwrap_or_else(|e| panic!("{trial}: {e}"))
        };
        let stage_disks: Vec<[u8; 32]> = sorted(&stage.fingerprint().await.unwrap()).iter().map(|d| d.2).collect();
        let prod_disks: Vec<[u8; 32]> = sorted(&before.prod).iter().map(|d| d.2).collect();
        assert_eq!(stage_disks, prod_disks, "{trial}: the stage does not hold production's baseline content");
        let stray = unrecorded_layers(root, &sname);
        assert!(stray.is_empty(), "{trial}: stage layers no record knows: {stray:?}");
        if listed {
            verdict = "stage complete";
        }
    }
    // No lock left: another baseline works, and so does a new promotion.
    prod.take_baseline().await.unwrap_or_else(|e| panic!("{trial}: take_baseline after reopening: {e}"));
    if op.promotes() {
        let stage = b.open(&sname).await.unwrap();
        let req = PromotionRequest {
            production: prod.clone(),
            stage,
            strategy: Strategy::Swap,
            policy: PreconditionPolicy::Anywhere,
            requested_by: "crash-harness-again".into(),
            gates: Vec::new(),
        };
        let again = engine.as_ref().unwrap().promote(req).await;
        assert!(!matches!(again, Err(Error::Locked { .. })), "{trial}: production still locked: {again:?}");
    }
    verdict
}

async fn harness(op: Op) {
    support::require_qemu();
    let n = trials();
    let mut rng = Rng::new();
    // Measure the operation's duration once, unkilled.
    let f = Fixture::new();
    let before = setup_in_child(f.root(), op);
    let (measured, out) = run_child(f.root(), op, None);
    let duration = measured.unwrap_or_else(|| panic!("the unkilled {} did not finish: {out}", op.name()));
    assert!(out.contains("DONE Ok"), "the unkilled {} failed: {out}", op.name());
    check(f.root(), op, &before, &format!("{} unkilled", op.name())).await;
    drop(f);
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    let mut finished = 0;
    for i in 0..n {
        let f = Fixture::new();
        let before = setup_in_child(f.root(), op);
        let at = rng.uniform(duration);
        let (done, out) = run_child(f.root(), op, Some(at));
        if done.is_some() {
            finished += 1;
        }
        let trial = format!("{} trial {i} (killed {at:?} into {duration:?}; child: {})", op.name(), out.trim());
        let verdict = check(f.root(), op, &before, &trial).await;
        eprintln!(
            "CRASH TRIAL {} {i}: killed {at:?} into {duration:?}, finished {}: {verdict}",
            op.name(),
            done.is_some()
        );
        *outcomes.entry(verdict).or_default() += 1;
    }
    eprintln!(
        "CRASH HARNESS {}: {n} trials, duration {duration:?}, {finished} finished before the kill, outcomes {outcomes:?}: all checks passed",
        op.name()
    );
}

#[tokio::test]
async fn crash_harness_replay() {
    harness(Op::Replay).await;
}

#[tokio::test]
async fn crash_harness_swap() {
    harness(Op::Swap).await;
}

#[tokio::test]
async fn crash_harness_take_baseline() {
    harness(Op::Baseline).await;
}

#[tokio::test]
async fn crash_harness_create_snapshot() {
    harness(Op::Snapshot).await;
}

#[tokio::test]
async fn crash_harness_stage() {
    harness(Op::Stage).await;
}

/// Child of `locked_names_the_holder_between_processes`: takes and releases a lock file as fast
/// as it can (naming itself each time) until stdin closes.
fn flap_lock(path: &Path) {
    use stagecore::promotion::{LockAttempt, LockFile, LockRecord};
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        s.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    println!("\nFLAPPING {}", std::process::id());
    flush();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let record = serde_json::to_string(&LockRecord::now("flapping")).unwrap();
        if let Ok(LockAttempt::Acquired(lock, _)) = LockFile::try_lock(path, Some(&record)) {
            std::thread::sleep(Duration::from_micros(300));
            lock.release().unwrap();
        }
    }
}

fn spawn_child(op: &str, root: &Path, prefix: &str) -> (std::process::Child, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(OP, op)
        .env(ROOT, root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("re-run the test binary");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let pid = loop {
        let line = lines.next().expect("child announces itself").unwrap();
        if let Some(pid) = line.split(prefix).nth(1) {
            break pid.trim().to_string();
        }
    };
    (child, pid)
}

/// `Error::Locked` names the holder — pid, host, operation, since — every time between two
/// processes: an environment another process holds open (20 tries), and a lock file another
/// process takes and releases thousands of times a second (every busy attempt of 2000 is named
/// by that process, never by nobody and never by a dead earlier holder).
#[tokio::test]
async fn locked_names_the_holder_between_processes() {
    let f = Fixture::new();
    drop(backend(f.root()).create(&stagecore::memory::sample_spec("prod")).await.unwrap());
    let (mut child, pid) = spawn_child("hold-env", f.root(), "HOLDING ");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    for i in 0..20 {
        match backend(f.root()).open("prod").await {
            Err(Error::Locked { resource, holder }) => {
                assert!(resource.contains("prod"), "{resource}");
                for part in [format!("pid {pid}"), host.clone(), "holds environment prod open".into(), "since".into()] {
                    assert!(holder.contains(&part), "try {i}: the holder {holder:?} lacks {part:?}");
                }
            }
            other => panic!("try {i}: expected Locked, got {other:?}"),
        }
    }
    drop(child.stdin.take());
    let _ = child.wait();
    drop(backend(f.root()).open("prod").await.expect("free once the holder exited"));

    let path = f.root().join("flap.lock");
    let (mut child, pid) = spawn_child("flap-lock", &path, "FLAPPING ");
    let (mut busy, mut acquired) = (0, 0);
    while busy < 2000 {
        match stagecore::promotion::LockFile::try_lock(&path, None).unwrap() {
            stagecore::promotion::LockAttempt::Busy { pid: holder_pid, content } => {
                busy += 1;
                let named = stagecore::promotion::describe_holder(holder_pid, content.as_deref());
                assert!(named.contains(&format!("pid {pid} ")) && named.contains("flapping"), "unnamed: {named}");
            }
            stagecore::promotion::LockAttempt::Acquired(lock, _) => {
                acquired += 1;
                lock.release().unwrap();
            }
        }
        assert!(acquired < 200_000, "the child never held the lock");
    }
    drop(child.stdin.take());
    let _ = child.wait();
    eprintln!("lock file between processes: {busy} busy attempts all named, {acquired} acquired in between");
}
