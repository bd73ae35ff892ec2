//! Freezing every disk of an environment at one instant (baselines and snapshots), with the
//! guests' filesystems quiesced through their agents where they answer.
//!
//! Contract of [`freeze_all`]: overlays are created in-process on every disk's current top
//! first. Then, for every running machine whose guest agent answers a short probe (all probed
//! at once, bounded by [`PROBE`]; a machine that does not answer is remembered as agentless
//! until it restarts), `guest-fsfreeze-freeze` runs *before* the pause; every running machine is
//! paused (QMP `stop`), each gets one `transaction` of `blockdev-snapshot-sync` (mode
//! `existing`) for all its disks, every paused machine is resumed and every guest that was asked
//! to freeze is thawed — whatever failed. Stopped machines just switch to their new overlay. On
//! success the old tops are returned (now read-only layers) with each machine's consistency
//! level (`Application`, `Crash` with the reason, `Stopped`), and the record points at the new
//! tops. On failure, the record follows reality: a running machine whose transaction took
//! effect keeps its new overlay (a valid chain), every unused overlay file is removed, the record
//! is saved, and the first error is returned.
//!
//! Crash safety: a durable marker (`machines/<m>/freeze.marker`) is written before a guest is
//! frozen and removed once it is thawed, and `machines/<m>/pause.marker` before a machine is
//! paused, removed once it is resumed. [`recover`] — run when an environment is opened and before
//! guest operations, freezes and starts — resumes a machine with a pause marker that QMP reports
//! paused, thaws one with a freeze marker through its agent, and removes the markers, so a
//! process killed inside the window never leaves a frozen or paused guest behind the next open.

use crate::markers::{clear_markers, freeze_marker, pause_marker, remove_marker, write_marker};
use futures::future::join_all;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use stagecore::{ConsistencyLevel, Error, MachineConsistency, Result};
use stagecore_qcow2::ImageFormat;
use stagecore_qga::Agent;

use crate::machines::{self, Liveness, disk_id};
use crate::qmp::{BlockdevSnapshotSync, NewImageMode, QmpClient, RunState};
use crate::shared::{EnvShared, EnvState, blocking};
use crate::store::{QemuRecord, disk_key};

/// Bound of the probe that tells a machine with a guest agent from one without.
pub(crate) const PROBE: Duration = Duration::from_millis(1500);
/// Bound of one `guest-fsfreeze-freeze`.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound of one `guest-fsfreeze-thaw`, and how often it is tried.
const THAW_TIMEOUT: Duration = Duration::from_secs(10);
const THAW_TRIES: usize = 3;

/// The detail of a machine whose agent did not answer the probe.
pub(crate) const NO_AGENT: &str = "guest agent did not answer";

/// One disk to freeze.
#[derive(Debug)]
struct Plan {
    machine: String,
    index: usize,
    key: String,
    old: PathBuf,
    new: PathBuf,
    node: String,
}

/// What [`freeze_all`] captured.
#[derive(Debug)]
pub(crate) struct Frozen {
    /// `machine/disk` → frozen layer.
    pub(crate) layers: BTreeMap<String, PathBuf>,
    /// Machine → the consistency its disks reached.
    pub(crate) consistency: BTreeMap<String, MachineConsistency>,
}

/// Settles what a process that died inside a freeze window left (once per loaded state, and
/// again after a thaw failed): resumes machines it paused, thaws guests it froze, removes the
/// markers. Problems are logged, never fatal — a later call tries again.
pub(crate) async fn recover(shared: &EnvShared, st: &mut EnvState) {
    if st.recovered {
        return;
    }
    st.recovered = true;
    let Ok(rec) = st.rec(&shared.name) else { return };
    let names: Vec<String> = rec.spec.machines.iter().map(|m| m.name.clone()).collect();
    let scan = crate::process::ProcScan::new();
    for m in names {
        let (fm, pm) = (freeze_marker(shared, &m), pause_marker(shared, &m));
        if !fm.exists() && !pm.exists() {
            // Reconcile what runs with the record (adopts the overlay of a freeze that died before
            // saving it, stops a QEMU that runs what it must not; see `machines::liveness`).
            if let Err(e) = machines::liveness(shared, st, &m, &scan).await {
                tracing::warn!(env = %shared.name, machine = %m, %e, "cannot inspect a machine on open");
                st.recovered = false;
            }
            continue;
        }
        let q = match machines::liveness(shared, st, &m, &scan).await {
            Ok(Liveness::Live(q)) => q,
            Ok(Liveness::Down(_)) => {
                clear_markers(shared, &m);
                continue;
            }
            Ok(Liveness::Unknown(why)) => {
                tracing::warn!(env = %shared.name, machine = %m, %why, "frozen or paused machine left by a dead process is in an unknown state");
                st.recovered = false;
                continue;
            }
            Err(e) => {
                tracing::warn!(env = %shared.name, machine = %m, %e, "cannot inspect a machine left frozen or paused");
                st.recovered = false;
                continue;
            }
        };
        if pm.exists() {
            let resumed = match q.query_status().await {
                Ok(s) if s.status == RunState::Paused => q.cont().await.map(|()| true),
                Ok(_) => Ok(false),
                Err(e) => Err(e),
            };
            match resumed {
                Ok(cont) => {
                    tracing::warn!(env = %shared.name, machine = %m, resumed = cont, "settled a pause left by a dead process");
                    remove_marker(&pm);
                }
                Err(e) => {
                    tracing::warn!(env = %shared.name, machine = %m, %e, "cannot resume a machine left paused");
                    st.recovered = false;
                    continue;
                }
            }
        }
        if fm.exists() {
            let agent = crate::shared::running_agent(shared, st, &m);
            match agent.fsfreeze_thaw(THAW_TIMEOUT).await {
                Ok(n) => {
                    tracing::warn!(env = %shared.name, machine = %m, thawed = n, "thawed a guest left frozen by a dead process");
                    remove_marker(&fm);
                }
                Err(e) => {
                    tracing::warn!(env = %shared.name, machine = %m, %e, "cannot thaw a guest left frozen");
                    st.recovered = false;
                }
            }
        }
    }
    // Overlays a dead process created but never switched to nor recorded: removed (every file
    // some chain of some environment needs is kept; see `crate::gc`).
    if let Ok(rec) = st.rec_mut(&shared.name) {
        match crate::gc::collect(shared, rec).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(env = %shared.name, removed = n, "removed layer files no record knows"),
            Err(e) => tracing::warn!(env = %shared.name, %e, "layer collection on open failed"),
        }
    }
}

/// A running guest asked to freeze.
#[derive(Debug)]
struct Quiesced {
    machine: String,
    agent: Agent,
    qmp: QmpClient,
}

/// Freezes every disk (see the module contract).
pub(crate) async fn freeze_all(shared: &EnvShared, st: &mut EnvState) -> Result<Frozen> {
    recover(shared, st).await;
    let mut live: Vec<(String, QmpClient)> = Vec::new();
    let mut consistency = BTreeMap::new();
    let (machines, scan): (Vec<_>, _) = (st.rec(&shared.name)?.spec.machines.clone(), crate::process::ProcScan::new());
    for m in &machines {
        match machines::liveness(shared, st, &m.name, &scan).await? {
            Liveness::Live(q) => live.push((m.name.clone(), q)),
            Liveness::Down(_) => {
                consistency.insert(m.name.clone(), MachineConsistency::new(ConsistencyLevel::Stopped));
            }
            Liveness::Unknown(why) => {
                return Err(Error::Precondition(format!(
                    "machine {}/{} is in an unknown state: {why}",
                    shared.name, m.name
                )));
            }
        }
    }
    let plans = create_overlays(shared, st).await?;
    // Outside the window: which machines run (a machine the user paused stays paused).
    let mut result = Ok(());
    let mut running: Vec<(String, QmpClient)> = Vec::new();
    for ((m, q), status) in live.iter().zip(join_all(live.iter().map(|(_, q)| q.query_status())).await) {
        match status {
            Ok(s) if s.running => running.push((m.clone(), q.clone())),
            Ok(s) => {
                let detail = format!("the machine was paused (run state {:?})", s.status);
                consistency.insert(m.clone(), MachineConsistency::with_detail(ConsistencyLevel::Crash, detail));
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let mut applied = Vec::new();
    let mut thaw_error = None;
    if result.is_ok() {
        let started = Instant::now();
        let quiesced = quiesce(shared, st, &running, &mut consistency).await;
        shared.ctx.hooks.crash("freeze:frozen")?;
        let (done, r) = switch_running(shared, &live, &running, &plans).await?;
        applied = done;
        result = r;
        thaw_error = thaw(shared, &quiesced).await.err();
        let ms = started.elapsed().as_secs_f64() * 1e3;
        tracing::info!(env = %shared.name, guests = quiesced.len(), quiesce_ms = ms, "guests quiesced and thawed");
        if thaw_error.is_some() {
            st.recovered = false;
        }
    }
    let rec = st.rec_mut(&shared.name)?;
    let mut layers = BTreeMap::new();
    for p in &plans {
        let is_live = live.iter().any(|(m, _)| *m == p.machine);
        if result.is_ok() || (is_live && applied.contains(&p.machine)) {
            rec.disks.insert(p.key.clone(), p.new.clone());
            layers.insert(p.key.clone(), p.old.clone());
        } else {
            let _ = std::fs::remove_file(&p.new);
        }
    }
    rec.save(&shared.paths)?;
    result?;
    if let Some(e) = thaw_error {
        return Err(e);
    }
    Ok(Frozen { layers, consistency })
}

/// Probes the agents of the running machines at once, then freezes every guest that answered.
/// Returns the guests that must be thawed (every one asked to freeze, also when it failed) and
/// records each running machine's level in `consistency`.
async fn quiesce(
    shared: &EnvShared,
    st: &mut EnvState,
    running: &[(String, QmpClient)],
    consistency: &mut BTreeMap<String, MachineConsistency>,
) -> Vec<Quiesced> {
    let crash = |detail: String| MachineConsistency::with_detail(ConsistencyLevel::Crash, detail);
    if !shared.ctx.quiesce {
        for (m, _) in running {
            consistency.insert(m.clone(), crash("quiescing is turned off (QemuConfig::quiesce)".into()));
        }
        return Vec::new();
    }
    let mut probing = Vec::new();
    for (m, q) in running {
        if st.agentless.contains(m) {
            consistency.insert(m.clone(), crash(NO_AGENT.into()));
        } else {
            probing.push(Quiesced {
                machine: m.clone(),
                agent: crate::shared::running_agent(shared, st, m),
                qmp: q.clone(),
            });
        }
    }
    let probes = join_all(probing.iter().map(|g| g.agent.ping(PROBE))).await;
    let mut answered = Vec::new();
    for (g, probe) in probing.into_iter().zip(probes) {
        match probe {
            Ok(()) => answered.push(g),
            Err(e) => {
                tracing::info!(env = %shared.name, machine = %g.machine, %e, "no guest agent: crash-consistent capture");
                st.agentless.insert(g.machine.clone());
                consistency.insert(g.machine, crash(NO_AGENT.into()));
            }
        }
    }
    let mut asked = Vec::new();
    for g in answered {
        match write_marker(&freeze_marker(shared, &g.machine), "frozen") {
            Ok(()) => asked.push(g),
            Err(e) => {
                consistency.insert(g.machine, crash(format!("fsfreeze not tried: cannot write its marker: {e}")));
            }
        }
    }
    let freezes = join_all(asked.iter().map(|g| g.agent.fsfreeze_freeze(FREEZE_TIMEOUT))).await;
    for (g, r) in asked.iter().zip(freezes) {
        let level = match r {
            Ok(0) => crash("fsfreeze froze no filesystem".into()),
            Ok(_) => MachineConsistency::new(ConsistencyLevel::Application),
            Err(e) => crash(format!("fsfreeze failed: {e}")),
        };
        consistency.insert(g.machine.clone(), level);
    }
    asked
}

/// Thaws every guest asked to freeze (retrying), removing its marker once thawed; a guest whose
/// QEMU is gone has nothing left frozen. The first failure is returned, its marker kept.
async fn thaw(shared: &EnvShared, guests: &[Quiesced]) -> Result<()> {
    let results = join_all(guests.iter().map(|g| async move {
        let mut last = None;
        for _ in 0..THAW_TRIES {
            match g.agent.fsfreeze_thaw(THAW_TIMEOUT).await {
                Ok(_) => return Ok(()),
                Err(_) if g.qmp.is_closed() => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried at least once"))
    }))
    .await;
    let mut first = Ok(());
    for (g, r) in guests.iter().zip(results) {
        match r {
            Ok(()) => remove_marker(&freeze_marker(shared, &g.machine)),
            Err(e) => {
                tracing::error!(env = %shared.name, machine = %g.machine, %e, "guest may still be frozen; thaw is retried on the next open");
                if first.is_ok() {
                    first = Err(Error::Precondition(format!(
                        "the filesystems of {}/{} may still be frozen: thaw failed after {THAW_TRIES} tries ({e}); \
                         it is retried when the environment is used again",
                        shared.name, g.machine
                    )));
                }
            }
        }
    }
    first
}

/// Creates an overlay over every disk's top; on failure removes the ones made.
async fn create_overlays(shared: &EnvShared, st: &mut EnvState) -> Result<Vec<Plan>> {
    let disks_dir = shared.paths.disks();
    let rec = st.rec_mut(&shared.name)?;
    let mut plans = Vec::new();
    let machines = rec.spec.machines.clone();
    for m in &machines {
        for (j, d) in m.disks.iter().enumerate() {
            let old = rec.top(&m.name, &d.name)?.clone();
            let (new, n) = rec.new_layer_path(&disks_dir, &m.name, &d.name);
            let node = format!("{}-l{n}", disk_id(j));
            plans.push(Plan { machine: m.name.clone(), index: j, key: disk_key(&m.name, &d.name), old, new, node });
        }
    }
    let jobs: Vec<(PathBuf, PathBuf)> = plans.iter().map(|p| (p.new.clone(), p.old.clone())).collect();
    blocking(move || {
        for (i, (new, old)) in jobs.iter().enumerate() {
            if let Err(e) = stagecore_qcow2::create_overlay(new, old, ImageFormat::Qcow2, None) {
                for (made, _) in &jobs[..i] {
                    let _ = std::fs::remove_file(made);
                }
                return Err(crate::error::qcow2(e));
            }
        }
        Ok(())
    })
    .await?;
    Ok(plans)
}

/// Pauses every running machine, switches each live one to its overlays in one transaction,
/// resumes the paused ones. Returns the machines whose transaction took effect, and the first
/// error; the outer error is an injected crash (nothing resumed).
async fn switch_running(
    shared: &EnvShared,
    live: &[(String, QmpClient)],
    running: &[(String, QmpClient)],
    plans: &[Plan],
) -> Result<(Vec<String>, Result<()>)> {
    if live.is_empty() {
        return Ok((Vec::new(), Ok(())));
    }
    let mut result = Ok(());
    let mut marked = Vec::new();
    for (m, q) in running {
        match write_marker(&pause_marker(shared, m), "paused") {
            Ok(()) => marked.push((m, q)),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    // The window: pause all at once, one transaction per machine at once, resume all at once.
    let started = Instant::now();
    let mut paused = Vec::new();
    if result.is_ok() {
        for ((m, q), r) in marked.iter().zip(join_all(marked.iter().map(|(_, q)| q.stop())).await) {
            match r {
                Ok(()) => paused.push((*m, *q)),
                Err(e) if result.is_ok() => result = Err(e),
                Err(_) => {}
            }
        }
    }
    shared.ctx.hooks.crash("freeze:paused")?;
    if let Some(hook) = &shared.ctx.hooks.after_pause {
        hook();
    }
    let mut applied = Vec::new();
    if result.is_ok() {
        let switched = join_all(live.iter().map(|(m, q)| async move {
            match transaction(q, plans.iter().filter(|p| &p.machine == m)).await {
                Ok(done) => (done, Ok(())),
                Err(e) => (took_effect(q, plans.iter().filter(|p| &p.machine == m)).await, Err(e)),
            }
        }))
        .await;
        for ((m, _), (done, r)) in live.iter().zip(switched) {
            if done {
                applied.push(m.clone());
            }
            if let Err(e) = r
                && result.is_ok()
            {
                result = Err(e);
            }
        }
    }
    for ((m, q), r) in paused.iter().zip(join_all(paused.iter().map(|(_, q)| q.cont())).await) {
        if let Err(e) = r
            && !q.is_closed()
        {
            if result.is_ok() {
                result = Err(e);
            }
            continue;
        }
        remove_marker(&pause_marker(shared, m));
    }
    // Marked but never paused (a `stop` failed): nothing to resume.
    for (m, _) in marked.iter().filter(|(m, _)| !paused.iter().any(|(p, _)| p == m)) {
        remove_marker(&pause_marker(shared, m));
    }
    let started = (!paused.is_empty()).then_some(started);
    let ms = started.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
    tracing::info!(env = %shared.name, machines = live.len(), freeze_ms = ms, ok = result.is_ok(), "disks frozen");
    Ok((applied, result))
}

/// One transaction for a machine's disks; `Ok(false)` when it has none.
async fn transaction(q: &QmpClient, plans: impl Iterator<Item = &Plan>) -> Result<bool> {
    let mut actions = Vec::new();
    for p in plans {
        let node = machines::active_node(q, &disk_id(p.index)).await?;
        let file = p.new.display().to_string();
        actions.push(BlockdevSnapshotSync::qcow2_on_node(&node, &file, &p.node, NewImageMode::Existing));
    }
    if actions.is_empty() {
        return Ok(false);
    }
    q.snapshot_disks(&actions).await?;
    Ok(true)
}

/// After a failed transaction call: whether QEMU is alive and runs on the new overlays anyway
/// (a lost reply). A dead QEMU never wrote to them: the old tops hold everything.
async fn took_effect<'a>(q: &QmpClient, mut plans: impl Iterator<Item = &'a Plan>) -> bool {
    if q.is_closed() {
        return false;
    }
    let Some(p) = plans.next() else { return false };
    matches!(machines::active_node(q, &disk_id(p.index)).await, Ok(node) if node == p.node)
}
