//! Removing layer files nothing needs any more.
//!
//! Contract: a file in the environment's `disks/` directory is kept when it lies in the chain of
//! a current top, a snapshot layer, an origin or a baseline layer (baseline layers are what linked
//! stages of a production stand on). Everything else there (tops abandoned by a revert, layers of
//! deleted snapshots above the current state) is removed. When any chain cannot be read, nothing
//! is removed: collection is conservative, never a risk to a chain.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use stagecore::Result;

use crate::shared::{EnvShared, blocking};
use crate::store::EnvRecord;

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Removes unreachable layer files of `rec`'s environment; returns how many were removed.
pub(crate) async fn collect(shared: &EnvShared, rec: &EnvRecord) -> Result<usize> {
    let mut roots: Vec<PathBuf> = rec.disks.values().cloned().collect();
    roots.extend(rec.snapshots.iter().flat_map(|s| s.layers.values().cloned()));
    roots.extend(rec.origins.values().flat_map(|o| o.values().cloned()));
    roots.extend(rec.baselines.iter().flat_map(|b| b.layers.iter().map(|l| PathBuf::from(&l.layer))));
    let dir = shared.paths.disks();
    let env = shared.name.clone();
    blocking(move || {
        let mut keep = HashSet::new();
        for root in &roots {
            match stagecore_qcow2::chain(root) {
                Ok(infos) => keep.extend(infos.iter().map(|i| canonical(&i.path))),
                Err(e) => {
                    tracing::warn!(%env, root = %root.display(), %e, "layer collection skipped");
                    return Ok(0);
                }
            }
        }
        let mut removed = 0;
        let entries = std::fs::read_dir(&dir).map_err(|e| crate::error::io("listing", &dir, &e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let layer =
                path.extension().is_some_and(|x| x == "qcow2") && !entry.file_name().to_string_lossy().starts_with('.');
            if layer && !keep.contains(&canonical(&path)) && std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        tracing::debug!(%env, removed, "unreachable layers removed");
        Ok(removed)
    })
    .await
}
