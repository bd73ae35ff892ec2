//! Freezing every disk of an environment at one instant (baselines and snapshots).
//!
//! Contract of [`freeze_all`]: overlays are created in-process on every disk's current top
//! first; then every running machine is paused (QMP `stop`), each gets one `transaction` of
//! `blockdev-snapshot-sync` (mode `existing`) for all its disks, and every paused machine is
//! resumed, whatever failed. Stopped machines just switch to their new overlay. On success the
//! old tops are returned (they are now read-only layers) and the record points at the new tops.
//! On failure, the record follows reality: a running machine whose transaction took effect keeps
//! its new overlay (a valid chain), every unused overlay file is removed, the record is saved,
//! and the first error is returned.

use futures::future::join_all;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use stagecore::{Error, Result};
use stagecore_qcow2::ImageFormat;

use crate::machines::{self, Liveness, disk_id};
use crate::qmp::{BlockdevSnapshotSync, NewImageMode, QmpClient};
use crate::shared::{EnvShared, EnvState, blocking};
use crate::store::disk_key;

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

/// Freezes every disk; returns `machine/disk` → frozen layer.
pub(crate) async fn freeze_all(shared: &EnvShared, st: &mut EnvState) -> Result<BTreeMap<String, PathBuf>> {
    let mut live: Vec<(String, QmpClient)> = Vec::new();
    let machines: Vec<_> = st.rec(&shared.name)?.spec.machines.clone();
    for m in &machines {
        match machines::liveness(shared, st, &m.name).await? {
            Liveness::Live(q) => live.push((m.name.clone(), q)),
            Liveness::Down(_) => {}
            Liveness::Unknown(why) => {
                return Err(Error::Precondition(format!(
                    "machine {}/{} is in an unknown state: {why}",
                    shared.name, m.name
                )));
            }
        }
    }
    let plans = create_overlays(shared, st).await?;
    let (applied, result) = switch_running(shared, &live, &plans).await;
    let rec = st.rec_mut(&shared.name)?;
    let mut frozen = BTreeMap::new();
    for p in &plans {
        let running = live.iter().any(|(m, _)| *m == p.machine);
        if result.is_ok() || (running && applied.contains(&p.machine)) {
            rec.disks.insert(p.key.clone(), p.new.clone());
            frozen.insert(p.key.clone(), p.old.clone());
        } else {
            let _ = std::fs::remove_file(&p.new);
        }
    }
    rec.save(&shared.paths)?;
    result.map(|()| frozen)
}

/// Creates an overlay over every disk's top; on failure removes the ones made.
async fn create_overlays(shared: &EnvShared, st: &mut EnvState) -> Result<Vec<Plan>> {
    let disks_dir = shared.paths.disks();
    let rec = st.rec_mut(&shared.name)?;
    let mut plans = Vec::new();
    let machines = rec.spec.machines.clone();
    for m in &machines {
        for (j, d) in m.disks.iter().enumerate() {
            let old = rec.top(&m.name, &d.name)?;
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
                return Err(e);
            }
        }
        Ok(())
    })
    .await?;
    Ok(plans)
}

/// Pauses every running machine, switches each to its overlays in one transaction, resumes
/// them. Returns the machines whose transaction took effect, and the first error.
async fn switch_running(shared: &EnvShared, live: &[(String, QmpClient)], plans: &[Plan]) -> (Vec<String>, Result<()>) {
    if live.is_empty() {
        return (Vec::new(), Ok(()));
    }
    // Outside the window: which machines run (a machine the user paused stays paused).
    let statuses = join_all(live.iter().map(|(_, q)| q.query_status())).await;
    let mut result = Ok(());
    let mut running = Vec::new();
    for ((_, q), status) in live.iter().zip(statuses) {
        match status {
            Ok(s) if s.running => running.push(q),
            Ok(_) => {}
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
        for (q, r) in running.iter().zip(join_all(running.iter().map(|q| q.stop())).await) {
            match r {
                Ok(()) => paused.push(*q),
                Err(e) if result.is_ok() => result = Err(e),
                Err(_) => {}
            }
        }
    }
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
    for (q, r) in paused.iter().zip(join_all(paused.iter().map(|q| q.cont())).await) {
        if let Err(e) = r
            && !q.is_closed()
            && result.is_ok()
        {
            result = Err(e);
        }
    }
    let started = (!paused.is_empty()).then_some(started);
    let ms = started.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
    tracing::info!(env = %shared.name, machines = live.len(), freeze_ms = ms, ok = result.is_ok(), "disks frozen");
    (applied, result)
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
