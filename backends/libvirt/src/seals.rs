//! Integrity of baseline layers on libvirt (issue #11): a layer rewritten behind stagecore's back
//! (an operator's `virsh snapshot-revert` to an internal snapshot, `qemu-img snapshot -a`, a
//! plain write) must not leave drift reading IN_SYNC.
//!
//! Contract: `take_baseline` seals every file of each frozen layer's chain
//! ([`stagecore_qcow2::Seals`]) into `<state>/<production>/baselines/<id>/seals.json`, next to the
//! baseline's saved XML — where libvirt's baseline bookkeeping lives (production's record keeps
//! no list of baselines). A stage, when it is made, checks them and keeps its own
//! `<state>/<stage>/seals.json`: the seals of the files its origins stand on (copied for linked
//! disks, fresh for full copies and streamed replicas), so its checks do not depend on
//! production's directory. `disk_changes` and `stage` check the seals of the chains of the layers
//! they measure against / clone from first: a file that no longer matches is
//! `Error::Precondition("<file>: layer changed since it was sealed: <what>")`. A seal covers
//! content only (size, modification time, qcow2 metadata hashes): libvirt's DAC/SELinux relabeling
//! on domain start (chown, xattrs) changes the inode's ctime, not what the seal checks. Layers
//! on remote storage (a remote URI's pools) are read over streams and are not sealed. This
//! backend never rewrites a sealed layer (snapshot delete only forgets, swap only redefines).

use std::path::{Path, PathBuf};

use stagecore::toolbox::StagePlan;
use stagecore::{Baseline, CloneKind, Result, Role};
use stagecore_qcow2::Seals;

use crate::error::{self, NAME};
use crate::machines::Machine;
use crate::shared::Shared;

const FILE: &str = "seals.json";

fn baseline_file(shared: &Shared, env: &str, id: &str) -> PathBuf {
    shared.env_dir(env).join("baselines").join(id).join(FILE)
}

fn stage_file(shared: &Shared, env: &str) -> PathBuf {
    shared.env_dir(env).join(FILE)
}

fn load(path: &Path) -> Result<Seals> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| error::json(&path.display().to_string(), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Seals::new()),
        Err(e) => Err(error::io(path, e)),
    }
}

fn store(path: &Path, seals: &Seals) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(seals).map_err(|e| error::json("seals", e))?;
    stagecore::toolbox::write_atomic(path, &bytes)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    stagecore::toolbox::blocking(NAME, f).await
}

/// Seals the chains of a new baseline's frozen `layers` of production `env` (local storage).
pub(crate) async fn seal_baseline(shared: &Shared, env: &str, id: &str, layers: Vec<String>) -> Result<()> {
    if shared.storage.is_remote() {
        return Ok(());
    }
    let file = baseline_file(shared, env, id);
    blocking(move || {
        let mut seals = Seals::new();
        seals.seal_chains(&layers, NAME)?;
        store(&file, &seals)
    })
    .await
}

/// The layer each disk of `ms` (environment `env`) is measured against for `baseline`: the
/// stage's own origin when it was cloned from that baseline, else the baseline's layer. The
/// same choice as `disk_changes`.
pub(crate) fn bases(ms: &[Machine], baseline: &Baseline) -> Vec<String> {
    let mut out = Vec::new();
    for m in ms {
        let own = matches!(&m.record.role, Role::Stage(s) if s.baseline.id == baseline.id);
        for (disk, _) in m.parsed.disks() {
            let base = if own { m.record.origins.get(&disk).cloned() } else { None }
                .or_else(|| baseline.layer(m.name(), &disk).map(|l| l.layer.clone()));
            out.extend(base);
        }
    }
    out
}

/// Checks the seals of the chains of `bases` (see [`bases`]) of environment `env`: its own
/// stage seals and those the baseline's production keeps.
pub(crate) async fn verify(shared: &Shared, env: &str, baseline: &Baseline, bases: Vec<String>) -> Result<()> {
    if shared.storage.is_remote() {
        return Ok(());
    }
    let (own, prod) = (stage_file(shared, env), baseline_file(shared, &baseline.environment, &baseline.id));
    blocking(move || {
        let mut seals = load(&prod)?;
        seals.extend(load(&own)?);
        if seals.is_empty() {
            return Ok(());
        }
        seals.verify_chains(&bases, NAME)
    })
    .await
}

/// Before a stage makes anything: checks the layers of `plan` against the seals production
/// (`source`) keeps for the baseline, and returns the seals of the chains its linked disks will
/// stand on.
pub(crate) async fn for_stage(source: &Shared, plan: &StagePlan) -> Result<Seals> {
    if source.storage.is_remote() {
        return Ok(Seals::new());
    }
    let b = plan.baseline();
    let file = baseline_file(source, &b.environment, &b.id);
    let all: Vec<String> = plan.disks.iter().map(|d| d.layer.clone()).collect();
    let linked: Vec<String> =
        plan.disks.iter().filter(|d| d.clone == CloneKind::Linked).map(|d| d.layer.clone()).collect();
    blocking(move || {
        let seals = load(&file)?;
        if seals.is_empty() {
            return Ok(seals);
        }
        seals.verify_chains(&all, NAME)?;
        seals.of_chains(&linked, NAME)
    })
    .await
}

/// Writes the stage's seals: `copied` (from [`for_stage`]) plus fresh seals of the `origins` it
/// made itself (full copies, replicas); origins already covered are left as copied. Local
/// storage only.
pub(crate) async fn record_stage(shared: &Shared, env: &str, copied: Seals, origins: Vec<String>) -> Result<()> {
    if shared.storage.is_remote() {
        return Ok(());
    }
    let file = stage_file(shared, env);
    blocking(move || {
        let mut seals = copied;
        let fresh: Vec<&String> = origins.iter().filter(|o| !seals.contains(Path::new(o))).collect();
        seals.seal_all(fresh, NAME)?;
        store(&file, &seals)
    })
    .await
}
