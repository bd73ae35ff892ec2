//! Cloning a production baseline into a new stage environment.
//!
//! Contract: the baseline is checked first (known to its production when that production lives
//! under this root; every layer file present in any case). A linked stage gets one in-process
//! overlay per disk over the baseline layer; a full stage gets a copy of the allocated data
//! (`copy_allocated`) with an overlay on top, so its origin is the copy. The stage has new
//! instance names, UUIDs and MACs, and its own segment id. Any failure removes the stage
//! directory with everything in it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use stagecore::{Baseline, CloneKind, Error, Result, Role, StageInfo, StageOptions};
use stagecore_qcow2::ImageFormat;

use crate::shared::{Ctx, EnvShared, NewEnv, blocking};
use crate::store::{EnvPaths, EnvRecord, disk_key};

/// Checks that `baseline` can be cloned: its production knows it, its layers exist.
fn check_baseline(ctx: &Ctx, baseline: &Baseline) -> Result<()> {
    let prod = &baseline.environment;
    match EnvRecord::load(&EnvPaths::new(&ctx.root, prod), prod) {
        Ok(rec) if !rec.baselines.iter().any(|b| b.id == baseline.id) => {
            return Err(Error::not_found("baseline", format!("{prod}/{}", baseline.id)));
        }
        Ok(_) | Err(Error::NotFound { .. }) => {}
        Err(e) => return Err(e),
    }
    for m in &baseline.spec.machines {
        for d in &m.disks {
            let layer = baseline
                .layer(&m.name, &d.name)
                .ok_or_else(|| Error::not_found("baseline layer", format!("{prod}/{}/{}", m.name, d.name)))?;
            if !Path::new(&layer.layer).is_file() {
                return Err(Error::not_found("baseline layer", layer.layer.clone()));
            }
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
                let stats = stagecore_qcow2::copy_allocated(&j.layer, None, copy)?;
                tracing::debug!(disk = %j.key, bytes = stats.data_bytes, "full copy");
                copy.as_path()
            }
            None => j.layer.as_path(),
        };
        stagecore_qcow2::create_overlay(&j.top, base, ImageFormat::Qcow2, None)?;
    }
    Ok(())
}

/// Creates the stage (not started) and returns its open shared state.
pub(crate) async fn stage(ctx: &Arc<Ctx>, baseline: &Baseline, options: &StageOptions) -> Result<Arc<EnvShared>> {
    if EnvPaths::new(&ctx.root, &options.name).record().exists() {
        return Err(Error::already_exists("environment", &options.name));
    }
    check_baseline(ctx, baseline)?;
    let new = NewEnv::begin(&ctx.root, &options.name)?;
    let disks_dir = new.paths.disks();
    let mut spec = baseline.spec.clone();
    spec.name = options.name.clone();
    let (mut jobs, mut n) = (Vec::new(), 1u64);
    for m in &mut spec.machines {
        m.uuid = Some(uuid::Uuid::new_v4().to_string());
        for nic in &mut m.nics {
            nic.mac = Some(stagecore::random_mac());
        }
        for d in &mut m.disks {
            let layer = baseline.layer(&m.name, &d.name).expect("checked").layer.clone();
            let mut path = || {
                n += 1;
                disks_dir.join(format!("{}.{}.{}.qcow2", m.name, d.name, n - 1))
            };
            let copy = (options.clone == CloneKind::Full).then(&mut path);
            let top = path();
            jobs.push(Job { key: disk_key(&m.name, &d.name), layer: PathBuf::from(layer), copy, top });
            d.source = format!("qemu:{}/{}/{}", options.name, m.name, d.name);
        }
    }
    let origins: BTreeMap<String, PathBuf> =
        jobs.iter().map(|j| (j.key.clone(), j.copy.clone().unwrap_or_else(|| j.layer.clone()))).collect();
    let disks: BTreeMap<String, PathBuf> = jobs.iter().map(|j| (j.key.clone(), j.top.clone())).collect();
    blocking(move || clone_disks(&jobs)).await?;
    let info = StageInfo::new(baseline, options);
    let rec = EnvRecord {
        name: options.name.clone(),
        role: Role::Stage(Box::new(info)),
        spec,
        prefix: options.prefix(),
        fenced: options.fenced,
        segment_id: uuid::Uuid::new_v4().to_string(),
        baselines: Vec::new(),
        origins: [(baseline.id.clone(), origins)].into(),
        snapshots: Vec::new(),
        disks,
        next_layer: n,
        owned_files: Vec::new(),
        last_swap: None,
    };
    new.commit(ctx, rec)
}
