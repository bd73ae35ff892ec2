//! Integrity of baseline layers: what `take_baseline` seals and what is checked before drift,
//! staging and promotion trust those layers (issue #11: a baseline layer rewritten behind
//! stagecore's back — an operator's internal-snapshot revert — changed a stage's content while
//! drift, which reads only the allocation *above* the layer, said IN_SYNC).
//!
//! Contract: `take_baseline` seals every file of each frozen layer's chain
//! ([`stagecore_qcow2::Seals`], kept in [`crate::store::QemuExtra::seals`]). A stage copies the
//! seals of the files its origins stand on into its own record when it is made — after checking
//! them — and seals its own full copies; so a stage's checks never read production's record
//! (production may be locked by a promotion, live under another root, or be gone). Before
//! `disk_changes` against a baseline, and before `stage` creates anything, the seals of that
//! baseline's origin chains are checked: a file that no longer matches is
//! `Error::Precondition("<file>: layer changed since it was sealed: <what>")`. Promotion
//! computes a drift report first, so it refuses before touching production. Layers this backend
//! rewrites itself (collapse merging into a kept layer, swap rewriting a backing-file name) are
//! resealed or their seal dropped in the same record update; a collapse drops its merge uppers'
//! seals from the record *before* merging, so a process killed midway leaves them unsealed,
//! never with a stale seal that would fail every later check.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use stagecore::toolbox::StagePlan;
use stagecore::{CloneKind, Result};
use stagecore_qcow2::Seals;

use crate::error::BACKEND;
use crate::shared::blocking;
use crate::store::EnvRecord;

/// The seals of every file of the chain of each frozen layer (added to the record with the
/// baseline).
pub(crate) async fn seal_frozen(frozen: &BTreeMap<String, PathBuf>) -> Result<Seals> {
    let layers: Vec<PathBuf> = frozen.values().cloned().collect();
    blocking(move || {
        let mut seals = Seals::new();
        seals.seal_chains(&layers, BACKEND)?;
        Ok(seals)
    })
    .await
}

/// Checks the seals of the origin chains of baseline `id` in `rec` (no origins or no seals:
/// nothing to check).
pub(crate) async fn verify_origins(rec: &EnvRecord, id: &str) -> Result<()> {
    let Some(origin) = rec.origins.get(id) else { return Ok(()) };
    if rec.backend.seals.is_empty() {
        return Ok(());
    }
    let (seals, layers): (Seals, Vec<PathBuf>) = (rec.backend.seals.clone(), origin.values().cloned().collect());
    blocking(move || seals.verify_chains(&layers, BACKEND)).await
}

/// Checks the layers of `plan` against `seals`, those of the baseline's production (empty when
/// it does not live under this root), and returns the seals of the files its linked disks will
/// stand on, for the stage's record. Runs before the stage makes anything.
pub(crate) async fn for_stage(seals: Seals, plan: &StagePlan) -> Result<Seals> {
    if seals.is_empty() {
        return Ok(seals);
    }
    let all: Vec<PathBuf> = plan.disks.iter().map(|d| PathBuf::from(&d.layer)).collect();
    let linked: Vec<PathBuf> =
        plan.disks.iter().filter(|d| d.clone == CloneKind::Linked).map(|d| PathBuf::from(&d.layer)).collect();
    blocking(move || {
        seals.verify_chains(&all, BACKEND)?;
        seals.of_chains(&linked, BACKEND)
    })
    .await
}

/// Adds the seals of a stage's full copies (its origins, which nothing writes after the copy).
pub(crate) async fn seal_copies(seals: &mut Seals, copies: Vec<PathBuf>) -> Result<()> {
    let sealed = blocking(move || {
        let mut s = Seals::new();
        s.seal_all(&copies, BACKEND)?;
        Ok(s)
    })
    .await?;
    seals.extend(sealed);
    Ok(())
}

/// Removes the seals of the `layers` about to be rewritten by this backend (a collapse's merge
/// uppers) from `seals`, returning those that were sealed: they get new seals from
/// [`after_merge`] once rewritten, and until then are unsealed rather than stale.
pub(crate) fn take_for_rewrite(seals: &mut Seals, layers: &[PathBuf]) -> Vec<PathBuf> {
    layers.iter().filter(|l| seals.remove(l).is_some()).cloned().collect()
}

/// `seals` after a collapse merged runs of layers into their uppers (re-pointed, data absorbed,
/// what they read unchanged): the uppers that were sealed (`resealing`, from
/// [`take_for_rewrite`]) are sealed anew, merged-away files (`gone`, canonical) lose their
/// seals. An upper that cannot be sealed stays unsealed, with a warning.
pub(crate) async fn after_merge(mut seals: Seals, resealing: Vec<PathBuf>, gone: HashSet<PathBuf>) -> Result<Seals> {
    blocking(move || {
        seals.retain(|p, _| !gone.contains(p));
        for u in &resealing {
            if let Err(e) = seals.seal_all([u], BACKEND) {
                tracing::warn!(layer = %u.display(), %e, "a merged layer could not be sealed again; it stays unsealed");
            }
        }
        Ok(seals)
    })
    .await
}
