//! Executing a [`StagePlan`]: the QEMU mechanisms of a stage.
//!
//! Contract: the toolbox plans the stage (options, baseline layers, new instance names, UUIDs,
//! MACs, segment id, StageInfo); here the plan is checked against this root (name free, the
//! baseline known to its production when that production lives under this root, every layer
//! file present) and executed: a linked disk gets one in-process overlay over the baseline
//! layer; a full disk gets a copy of the allocated data (`copy_allocated_many`: the stage's
//! copies in parallel, bounded) with an overlay on top, so its origin is the copy. Durability
//! is batched: the overlays are written unsynced, then made durable together with the new
//! directories ([`DurableBatch`]: concurrent `fdatasync`s, one `fsync` per directory), then the
//! record is saved — the commit point.
//! Undo idiom: the [`NewEnv`] drop guard — everything a stage makes lives in its new
//! directory, which is removed (under the environment's lock) on any failure before the record
//! is committed; a process that dies before the record leaves a directory without one, which
//! the next stage of that name removes (`NewEnv::begin`) and which `open`/`list` never show.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use stagecore::toolbox::{DurableBatch, StagePlan};
use stagecore::{Baseline, CloneKind, Error, Result, StageOptions};
use stagecore_qcow2::{CopyJob, ImageFormat, Seals};

use crate::error::qcow2;
use crate::shared::{Ctx, EnvShared, NewEnv, blocking};
use crate::store::{EnvPaths, EnvRecord, QemuExtra, QemuRecord};

/// Checks `plan` against this root: the name is free, the baseline's production (when it lives
/// here) knows the baseline, every layer file exists. Returns the production's seals (none when
/// it does not live here), from the same read of its record.
fn check_plan(ctx: &Ctx, plan: &StagePlan) -> Result<Seals> {
    plan.require_name_free(EnvPaths::new(&ctx.root, &plan.name).record().exists())?;
    let prod = &plan.baseline().environment;
    let (baselines, seals) = match EnvRecord::load(&EnvPaths::new(&ctx.root, prod), prod) {
        Ok(rec) => (Some(rec.baselines), rec.backend.seals),
        Err(Error::NotFound { .. }) => (None, Seals::new()),
        Err(e) => return Err(e),
    };
    plan.require_known_baseline(baselines.as_deref())?;
    for d in &plan.disks {
        if !Path::new(&d.layer).is_file() {
            return Err(Error::not_found("baseline layer", d.layer.clone()));
        }
    }
    Ok(seals)
}

/// One disk to clone: baseline layer → (optional full copy) → top.
struct Job {
    key: String,
    layer: PathBuf,
    copy: Option<PathBuf>,
    top: PathBuf,
}

/// Full copies of a stage run at most this many at a time (their data copies and syncs overlap).
const COPY_PARALLELISM: usize = 4;

/// Clones every disk — the full copies first, in parallel (bounded), then an overlay per disk —
/// and makes the new overlays and `dirs` durable in one batch (each copy is durable on its own:
/// its data dominates, and its sync overlaps the other copies).
fn clone_disks(jobs: &[Job], dirs: &[PathBuf]) -> Result<()> {
    let copies: Vec<CopyJob> = jobs
        .iter()
        .filter_map(|j| j.copy.as_ref().map(|c| CopyJob { src_top: j.layer.clone(), stop_at: None, dest: c.clone() }))
        .collect();
    let mut first_err = None;
    for (c, r) in copies.iter().zip(stagecore_qcow2::copy_allocated_many(&copies, COPY_PARALLELISM)) {
        match r {
            Ok(stats) => tracing::debug!(dest = %c.dest.display(), bytes = stats.data_bytes, "full copy"),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(qcow2(e));
    }
    let mut batch = DurableBatch::new();
    for d in dirs {
        batch.dir(d);
    }
    for j in jobs {
        let base = j.copy.as_deref().unwrap_or(&j.layer);
        stagecore_qcow2::create_overlay_unsynced(&j.top, base, ImageFormat::Qcow2, None).map_err(qcow2)?;
        batch.file(&j.top);
    }
    batch.sync()
}

/// Creates the stage of `baseline` (not started) and returns its open shared state.
pub(crate) async fn stage(ctx: &Arc<Ctx>, baseline: &Baseline, options: &StageOptions) -> Result<Arc<EnvShared>> {
    let mut plan = StagePlan::new(baseline, options)?;
    let prod_seals = check_plan(ctx, &plan)?;
    let mut seals = crate::seals::for_stage(prod_seals, &plan).await?;
    let new = NewEnv::begin(&ctx.root, &plan.name)?;
    let disks_dir = new.paths.disks();
    let name = plan.name.clone();
    plan.set_disk_sources(|m, d| format!("qemu:{name}/{m}/{d}"));
    let mut n = 1u64;
    let mut path = |m: &str, d: &str| {
        n += 1;
        disks_dir.join(format!("{m}.{d}.{}.qcow2", n - 1))
    };
    let mut jobs = Vec::new();
    for d in &plan.disks {
        let copy = (d.clone == CloneKind::Full).then(|| path(&d.machine, &d.disk));
        let top = path(&d.machine, &d.disk);
        jobs.push(Job { key: d.key.clone(), layer: PathBuf::from(&d.layer), copy, top });
    }
    let origin: BTreeMap<String, PathBuf> =
        jobs.iter().map(|j| (j.key.clone(), j.copy.clone().unwrap_or_else(|| j.layer.clone()))).collect();
    let disks: BTreeMap<String, PathBuf> = jobs.iter().map(|j| (j.key.clone(), j.top.clone())).collect();
    // The new directories' entries: disks/ in the environment's directory, that one in envs/.
    let env_dir = new.paths.dir.clone();
    let dirs: Vec<PathBuf> =
        [Some(env_dir.clone()), env_dir.parent().map(Path::to_path_buf)].into_iter().flatten().collect();
    let copies: Vec<PathBuf> = jobs.iter().filter_map(|j| j.copy.clone()).collect();
    blocking(move || clone_disks(&jobs, &dirs)).await?;
    crate::seals::seal_copies(&mut seals, copies).await?;
    if let Err(e) = ctx.hooks.crash("stage:synced") {
        new.abandon();
        return Err(e);
    }
    let extra = QemuExtra { next_layer: n, seals, ..QemuExtra::default() };
    new.commit(ctx, EnvRecord::stage(&plan, disks, origin, extra))
}
