//! Executing a [`StagePlan`]: the QEMU mechanisms of a stage.
//!
//! Contract: the toolbox plans the stage (options, baseline layers, new instance names, UUIDs,
//! MACs, segment id, StageInfo); here the plan is checked against this root (name free, the
//! baseline known to its production when that production lives under this root, every layer
//! file present) and executed: a linked disk gets one in-process overlay over the baseline
//! layer; a full disk gets a copy of the allocated data (`copy_allocated`) with an overlay on
//! top, so its origin is the copy. Undo idiom: the [`NewEnv`] drop guard — everything a stage
//! makes lives in its new directory, which is removed (under the environment's lock) on any
//! failure before the record is committed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use stagecore::toolbox::StagePlan;
use stagecore::{Baseline, CloneKind, Error, Result, StageOptions};
use stagecore_qcow2::{ImageFormat, typed};

use crate::error::qcow2;
use crate::shared::{Ctx, EnvShared, NewEnv, blocking};
use crate::store::{EnvPaths, EnvRecord, QemuExtra, QemuRecord};

/// Checks `plan` against this root: the name is free, the baseline's production (when it lives
/// here) knows the baseline, every layer file exists.
fn check_plan(ctx: &Ctx, plan: &StagePlan) -> Result<()> {
    plan.require_name_free(EnvPaths::new(&ctx.root, &plan.name).record().exists())?;
    let prod = &plan.baseline().environment;
    let baselines = match EnvRecord::load(&EnvPaths::new(&ctx.root, prod), prod) {
        Ok(rec) => Some(rec.baselines),
        Err(Error::NotFound { .. }) => None,
        Err(e) => return Err(e),
    };
    plan.require_known_baseline(baselines.as_deref())?;
    for d in &plan.disks {
        if !Path::new(&d.layer).is_file() {
            return Err(Error::not_found("baseline layer", d.layer.clone()));
        }
    }
    Ok(())
}

/// One disk to clone: baseline layer → (optional full copy) → top.
struct Job {
    key: String,
    layer: PathBuf,
    copy: Option<PathBuf>,
    top: PathBuf,
}

fn clone_disks(jobs: &[Job]) -> Result<()> {
    for j in jobs {
        let base = match &j.copy {
            Some(copy) => {
                let stats = typed::copy_allocated(&j.layer, None, copy).map_err(qcow2)?;
                tracing::debug!(disk = %j.key, bytes = stats.data_bytes, "full copy");
                copy.as_path()
            }
            None => j.layer.as_path(),
        };
        typed::create_overlay(&j.top, base, ImageFormat::Qcow2, None).map_err(qcow2)?;
    }
    Ok(())
}

/// Creates the stage of `baseline` (not started) and returns its open shared state.
pub(crate) async fn stage(ctx: &Arc<Ctx>, baseline: &Baseline, options: &StageOptions) -> Result<Arc<EnvShared>> {
    let mut plan = StagePlan::new(baseline, options)?;
    check_plan(ctx, &plan)?;
    let mut seals = crate::seals::for_stage(ctx, &plan).await?;
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
    let copies: Vec<PathBuf> = jobs.iter().filter_map(|j| j.copy.clone()).collect();
    blocking(move || clone_disks(&jobs)).await?;
    crate::seals::seal_copies(&mut seals, copies).await?;
    let extra = QemuExtra { next_layer: n, seals, ..QemuExtra::default() };
    new.commit(ctx, EnvRecord::stage(&plan, disks, origin, extra))
}
