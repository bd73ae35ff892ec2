//! Collapsing layers nothing needs as separate files any more, so disk chains do not grow with
//! every baseline and snapshot.
//!
//! Contract: a layer of a disk's chain is *kept* when it is the top or the bottom, a layer of a
//! snapshot that exists, the origin or baseline layer of a baseline still in use (staged by an
//! existing stage of this environment, this stage's own baseline, or — when deleting a snapshot —
//! any baseline), a file another environment's chains go through (which keeps everything below a
//! linked stage's baseline layer), or a file outside this environment's `disks/` directory. Every
//! maximal run of other layers is merged *upwards*: the kept layer above the run absorbs the
//! run's data and is re-pointed at the kept layer below it — QMP `block-stream` (`device` = the
//! upper node, `base-node` = the lower one, waiting for `BLOCK_JOB_COMPLETED`) on a running
//! machine, `qemu-img rebase` (safe mode) on a stopped one. What every layer above the run reads
//! does not change, so neither guests nor snapshots nor drift notice; the merged files are then
//! collected ([`crate::gc`]). The upper layer must belong to this environment alone, else the run
//! is left as it is. Baselines whose layers were merged are retired (removed from the record: a
//! later `stage` of them is `NotFound`).

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use stagecore::{Extent, Result, Role};

use crate::error::{self, qcow2};
use crate::gc::{canonical, needed_by_others, other_records};
use crate::machines::{self, disk_id};
use crate::qmp::QmpClient;
use crate::shared::{EnvShared, EnvState, blocking};
use crate::store::{EnvRecord, QemuRecord};

/// How long one merge job on a running machine may take.
const JOB_LIMIT: Duration = Duration::from_secs(600);

/// What [`crate::QemuEnvironment::collapse_layers`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CollapseReport {
    /// Every disk with its chain length (files, top and base included) before and after.
    pub disks: Vec<CollapsedDisk>,
    /// Baselines whose layers were merged away; they can no longer be staged.
    pub retired_baselines: Vec<String>,
    /// Layer files removed from the environment's directory.
    pub files_removed: usize,
}

/// One disk's chain length before and after a collapse.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CollapsedDisk {
    /// Machine name.
    pub machine: String,
    /// Disk name.
    pub disk: String,
    /// Files in the chain before.
    pub layers_before: usize,
    /// Files in the chain after.
    pub layers_after: usize,
}

/// One run to merge: `upper` absorbs `run` and is re-pointed at `lower`.
#[derive(Debug, Clone)]
struct Merge {
    machine: String,
    index: usize,
    upper: PathBuf,
    lower: PathBuf,
    run: Vec<PathBuf>,
}

/// Baseline ids whose layers must stay: all of them unless `retire`, else those staged by an
/// existing stage of this environment, plus this stage's own baseline.
fn baselines_in_use(root: &Path, rec: &EnvRecord, retire: bool) -> Result<BTreeSet<String>> {
    let mut ids: BTreeSet<String> = BTreeSet::new();
    if !retire {
        ids.extend(rec.baselines.iter().map(|b| b.id.clone()));
        ids.extend(rec.origins.keys().cloned());
    }
    if let Role::Stage(info) = &rec.role {
        ids.insert(info.baseline.id.clone());
    }
    for other in other_records(root, &[&rec.name])? {
        if let Role::Stage(info) = &other.role
            && info.source == rec.name
        {
            ids.insert(info.baseline.id.clone());
        }
    }
    Ok(ids)
}

/// The kept layers (canonical) of `rec`, and the files other environments need. Blocking.
fn kept(root: &Path, rec: &EnvRecord, retire: bool) -> Result<(HashSet<PathBuf>, HashSet<PathBuf>)> {
    let in_use = baselines_in_use(root, rec, retire)?;
    let mut keep: HashSet<PathBuf> =
        rec.snapshots.iter().flat_map(|s| s.layers.values()).map(|p| canonical(p)).collect();
    for (id, origin) in &rec.origins {
        if in_use.contains(id) {
            keep.extend(origin.values().map(|p| canonical(p)));
        }
    }
    for b in rec.baselines.iter().filter(|b| in_use.contains(&b.id)) {
        keep.extend(b.layers.iter().map(|l| canonical(Path::new(&l.layer))));
    }
    let others = needed_by_others(root, &[&rec.name])?;
    keep.extend(others.iter().cloned());
    Ok((keep, others))
}

/// The merges of every disk, and each disk's chain length. Blocking.
fn plan(root: &Path, disks_dir: &Path, rec: &EnvRecord, retire: bool) -> Result<(Vec<Merge>, Vec<CollapsedDisk>)> {
    let (keep, others) = kept(root, rec, retire)?;
    let own = canonical(disks_dir);
    let (mut merges, mut lengths) = (Vec::new(), Vec::new());
    for m in &rec.spec.machines {
        for (index, d) in m.disks.iter().enumerate() {
            let chain: Vec<PathBuf> = stagecore_qcow2::chain(rec.top(&m.name, &d.name)?)
                .map_err(qcow2)?
                .iter()
                .map(|i| canonical(&i.path))
                .collect();
            let n = chain.len();
            let is_kept = |i: usize| i == 0 || i + 1 == n || keep.contains(&chain[i]) || !chain[i].starts_with(&own);
            let mut i = 1;
            while i + 1 < n {
                if is_kept(i) {
                    i += 1;
                    continue;
                }
                let start = i;
                while !is_kept(i) {
                    i += 1;
                }
                let upper = chain[start - 1].clone();
                if (start - 1 == 0 || upper.starts_with(&own)) && !others.contains(&upper) {
                    let run = chain[start..i].to_vec();
                    merges.push(Merge { machine: m.name.clone(), index, upper, lower: chain[i].clone(), run });
                }
            }
            lengths.push(CollapsedDisk {
                machine: m.name.clone(),
                disk: d.name.clone(),
                layers_before: n,
                layers_after: n,
            });
        }
    }
    Ok((merges, lengths))
}

/// Collapses the environment's chains (see the module contract). `retire`: baselines no stage
/// uses may be merged away (public collapse); otherwise every baseline's layers stay.
pub(crate) async fn collapse(shared: &EnvShared, st: &mut EnvState, retire: bool) -> Result<CollapseReport> {
    let rec = st.rec(&shared.name)?.clone();
    let (root, dir, r) = (shared.ctx.root.clone(), shared.paths.disks(), rec.clone());
    let (merges, mut disks) = blocking(move || plan(&root, &dir, &r, retire)).await?;
    // The merges rewrite their upper layers. A process killed between a merge and the record
    // update below would leave an upper's old seal in the record, and every later check of it
    // would fail although what it reads never changed. So the seals of the uppers leave the
    // record (durably) first: killed midway, those layers are merely unsealed, not stale.
    let uppers: Vec<PathBuf> = merges.iter().map(|m| m.upper.clone()).collect();
    let resealing = crate::seals::take_for_rewrite(&mut st.rec_mut(&shared.name)?.backend.seals, &uppers);
    if !resealing.is_empty() {
        st.rec(&shared.name)?.save(&shared.paths)?;
    }
    let mut merged: HashSet<PathBuf> = HashSet::new();
    let mut result = Ok(());
    for m in &merges {
        let done = match machines::live_or_down(shared, st, &m.machine).await? {
            Some(q) => stream(&q, &shared.name, m).await,
            None => merge_stopped(m).await,
        };
        match done {
            Ok(()) => merged.extend(m.run.iter().cloned()),
            Err(e) => {
                tracing::warn!(env = %shared.name, machine = %m.machine, upper = %m.upper.display(), %e, "merge failed");
                result = result.and(Err(e));
            }
        }
    }
    shared.ctx.hooks.crash("collapse:merged")?;
    // Every merged-into layer was rewritten by us (also when its merge failed midway: what it
    // reads is unchanged): those that were sealed are sealed again in this same record update.
    let seals = st.rec(&shared.name)?.backend.seals.clone();
    let seals = crate::seals::after_merge(seals, resealing, merged.clone()).await?;
    let rec = st.rec_mut(&shared.name)?;
    rec.backend.seals = seals;
    let gone = |p: &Path| merged.contains(&canonical(p));
    let retired: Vec<String> = rec
        .baselines
        .iter()
        .filter(|b| b.layers.iter().any(|l| gone(Path::new(&l.layer))))
        .map(|b| b.id.clone())
        .collect();
    rec.baselines.retain(|b| !retired.contains(&b.id));
    rec.origins.retain(|id, o| !retired.contains(id) && !o.values().any(|p| gone(p)));
    rec.save(&shared.paths)?;
    let files_removed = crate::gc::collect(shared, rec).await?;
    for d in &mut disks {
        let top = rec.top(&d.machine, &d.disk)?.clone();
        d.layers_after = blocking(move || Ok(stagecore_qcow2::chain(&top).map_err(qcow2)?.len())).await?;
    }
    tracing::info!(env = %shared.name, merges = merges.len(), files_removed, retired = retired.len(), "layers collapsed");
    result.map(|()| CollapseReport { disks, retired_baselines: retired, files_removed })
}

/// `ranges` minus `minus` (both sorted and merged).
fn subtract(ranges: &[Extent], minus: &[Extent]) -> Vec<Extent> {
    let mut out = Vec::new();
    for r in ranges {
        let (mut start, end) = (r.offset, r.offset + r.length);
        for m in minus.iter().filter(|m| m.offset < end && m.offset + m.length > r.offset) {
            if m.offset > start {
                out.push(Extent { offset: start, length: m.offset - start });
            }
            start = start.max(m.offset + m.length);
        }
        if start < end {
            out.push(Extent { offset: start, length: end - start });
        }
    }
    out
}

/// Merges `m.run` into `m.upper` of a stopped machine in-process: every range the run allocates
/// and `upper` does not is read through `upper`'s chain and written into `upper` (so what it
/// reads does not change, and a crash midway leaves it reading the same), synced, and only then
/// is `upper`'s backing-file name pointed at `lower`.
async fn merge_stopped(m: &Merge) -> Result<()> {
    let (upper, lower) = (m.upper.clone(), m.lower.clone());
    blocking(move || {
        let missing = subtract(
            &stagecore_qcow2::changed_since(&upper, &lower).map_err(qcow2)?,
            &stagecore_qcow2::allocated_extents(&upper).map_err(qcow2)?,
        );
        let mut buf = Vec::new();
        for e in missing {
            let mut off = e.offset;
            while off < e.offset + e.length {
                let n = (e.offset + e.length - off).min(4 << 20) as usize;
                buf.resize(n, 0);
                stagecore_qcow2::read_at(&upper, off, &mut buf).map_err(qcow2)?;
                stagecore_qcow2::write_at(&upper, off, &buf).map_err(qcow2)?;
                off += n as u64;
            }
        }
        std::fs::File::open(&upper).and_then(|f| f.sync_all()).map_err(|e| error::io("syncing", &upper, &e))
    })
    .await?;
    crate::images::set_backing(&m.upper, &m.lower).await
}

/// The qcow2 node of a running machine whose image is `file`.
async fn node_of(q: &QmpClient, file: &Path) -> Result<String> {
    let want = canonical(file);
    q.query_named_block_nodes(true)
        .await?
        .into_iter()
        .find(|n| n.drv == "qcow2" && canonical(Path::new(&n.file)) == want)
        .and_then(|n| n.node_name)
        .ok_or_else(|| error::msg(format!("no qcow2 node for {} on {}", file.display(), q.socket().display())))
}

/// Merges `m.run` into `m.upper` on a running machine with `block-stream`, waiting for the job.
async fn stream(q: &QmpClient, env: &str, m: &Merge) -> Result<()> {
    let (upper, lower) = (node_of(q, &m.upper).await?, node_of(q, &m.lower).await?);
    let job = format!("collapse-{}-{}", disk_id(m.index), uuid::Uuid::new_v4().simple());
    let mut events = q.subscribe();
    q.block_stream(&job, &upper, Some(&lower)).await?;
    loop {
        let ev = q.wait_for_event(&mut events, "BLOCK_JOB_COMPLETED", JOB_LIMIT).await?;
        if ev.data.get("device").and_then(|d| d.as_str()) != Some(job.as_str()) {
            continue;
        }
        if let Some(err) = ev.data.get("error").and_then(|e| e.as_str()) {
            return Err(error::msg(format!("block-stream into {} failed: {err}", m.upper.display())));
        }
        tracing::debug!(%env, machine = %m.machine, %upper, %lower, "stream done");
        return Ok(());
    }
}

#[cfg(test)]
mod tests {
    use super::{Extent, subtract};

    fn e(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    #[test]
    fn subtract_leaves_the_uncovered_parts() {
        assert_eq!(subtract(&[e(0, 100)], &[]), [e(0, 100)]);
        assert_eq!(subtract(&[e(0, 100)], &[e(10, 10), e(50, 60)]), [e(0, 10), e(20, 30)]);
        assert_eq!(subtract(&[e(0, 10), e(20, 10)], &[e(0, 30)]), []);
        assert_eq!(subtract(&[e(20, 10)], &[e(0, 5), e(25, 1)]), [e(20, 5), e(26, 4)]);
    }
}
