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
//! on domain start (chown, xattrs) changes the inode's ctime, not what the seal checks.
//!
//! Layers on remote storage (a remote URI's pools) are sealed and checked the same way, read
//! over libvirt streams ([`crate::storage::VolResolver`], the `*_in` methods of
//! [`stagecore_qcow2::Seals`]; the seals files stay in the client's state directory, keyed by the
//! volume paths on the host). A volume has no modification time the client can trust, so a
//! remote seal is metadata-only (size and the qcow2 table hashes, `mtime_ns` absent): every
//! rewrite that allocates, frees, snapshots, reverts, rebases or rewrites a header is caught; an
//! in-place overwrite of an already allocated data cluster is not. Every remote check reads the
//! metadata again over the wire (no cache). This backend never rewrites a sealed layer (snapshot
//! delete only forgets, swap only redefines).

use std::path::{Path, PathBuf};

use stagecore::toolbox::StagePlan;
use stagecore::{Baseline, CloneKind, Result, Role};
use stagecore_qcow2::Seals;

use crate::error::{self, NAME};
use crate::machines::Machine;
use crate::shared::Shared;
use crate::storage::VolResolver;

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

/// Where the layers of one backend are read: local files, or the remote host's storage volumes.
enum Layers<'a> {
    Local,
    Remote(&'a VolResolver),
}

impl Layers<'_> {
    fn seal_chains(&self, seals: &mut Seals, layers: &[String]) -> Result<()> {
        match self {
            Layers::Local => seals.seal_chains(layers, NAME),
            Layers::Remote(r) => seals.seal_chains_in(*r, layers, NAME),
        }
    }

    fn seal_all(&self, seals: &mut Seals, files: &[&String]) -> Result<()> {
        match self {
            Layers::Local => seals.seal_all(files, NAME),
            Layers::Remote(r) => seals.seal_all_in(*r, files, NAME),
        }
    }

    fn verify_chains(&self, seals: &Seals, layers: &[String]) -> Result<()> {
        match self {
            Layers::Local => seals.verify_chains(layers, NAME),
            Layers::Remote(r) => seals.verify_chains_in(*r, layers, NAME),
        }
    }

    fn of_chains(&self, seals: &Seals, layers: &[String]) -> Result<Seals> {
        match self {
            Layers::Local => seals.of_chains(layers, NAME),
            Layers::Remote(r) => seals.of_chains_in(*r, layers, NAME),
        }
    }
}

/// Runs `f` on a blocking thread with the [`Layers`] of `shared`'s storage.
async fn with_layers<T: Send + 'static>(
    shared: &Shared,
    f: impl FnOnce(Layers<'_>) -> Result<T> + Send + 'static,
) -> Result<T> {
    let storage = shared.storage.clone();
    shared
        .conn
        .run(move |c, _| if storage.is_remote() { f(Layers::Remote(&storage.resolver(c))) } else { f(Layers::Local) })
        .await
}

/// Seals the chains of a new baseline's frozen `layers` of production `env` (local files or remote volumes).
pub(crate) async fn seal_baseline(shared: &Shared, env: &str, id: &str, layers: Vec<String>) -> Result<()> {
    let file = baseline_file(shared, env, id);
    with_layers(shared, move |at| {
        let mut seals = Seals::new();
        at.seal_chains(&mut seals, &layers)?;
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
    let (own, prod) = (stage_file(shared, env), baseline_file(shared, &baseline.environment, &baseline.id));
    with_layers(shared, move |at| {
        let mut seals = load(&prod)?;
        seals.extend(load(&own)?);
        if seals.is_empty() {
            return Ok(());
        }
        at.verify_chains(&seals, &bases)
    })
    .await
}

/// Before a stage makes anything: checks the layers of `plan` against the seals production
/// (`source`) keeps for the baseline, and returns the seals of the chains its linked disks will
/// stand on.
pub(crate) async fn for_stage(source: &Shared, plan: &StagePlan) -> Result<Seals> {
    let b = plan.baseline();
    let file = baseline_file(source, &b.environment, &b.id);
    let all: Vec<String> = plan.disks.iter().map(|d| d.layer.clone()).collect();
    let linked: Vec<String> =
        plan.disks.iter().filter(|d| d.clone == CloneKind::Linked).map(|d| d.layer.clone()).collect();
    with_layers(source, move |at| {
        let seals = load(&file)?;
        if seals.is_empty() {
            return Ok(seals);
        }
        at.verify_chains(&seals, &all)?;
        at.of_chains(&seals, &linked)
    })
    .await
}

/// Writes the stage's seals: `copied` (from [`for_stage`]) plus fresh seals of the `origins` it
/// made itself (full copies, replicas); origins already covered are left as copied.
pub(crate) async fn record_stage(shared: &Shared, env: &str, copied: Seals, origins: Vec<String>) -> Result<()> {
    let file = stage_file(shared, env);
    with_layers(shared, move |at| {
        let mut seals = copied;
        let fresh: Vec<&String> = origins.iter().filter(|o| !seals.contains(Path::new(o))).collect();
        at.seal_all(&mut seals, &fresh)?;
        store(&file, &seals)
    })
    .await
}
