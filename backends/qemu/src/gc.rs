//! Which layer files are still needed, and removing the ones nothing needs.
//!
//! Contract: a file is *needed* when it lies in the chain of a current top, a snapshot layer, an
//! origin or a baseline layer of **any** environment under the root (after a swap, a production
//! and its stage run on each other's layers, and linked stages stand on production's baseline
//! layers). [`collect`] removes the other `*.qcow2` files of one environment's `disks/`
//! directory (tops abandoned by a revert, layers of deleted snapshots, layers merged away by a
//! collapse). When any chain or record cannot be read, nothing is removed: collection is
//! conservative, never a risk to a chain.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use stagecore::{Error, Result};

use crate::shared::{EnvShared, blocking};
use crate::store::{EnvPaths, EnvRecord, QemuRecord};

/// A path with symlinks and `..` resolved (the path itself when it cannot be resolved).
pub(crate) fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The files whose chains a record needs: tops, snapshot layers, origins, baseline layers.
pub(crate) fn roots(rec: &EnvRecord) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = rec.disks.values().cloned().collect();
    roots.extend(rec.snapshots.iter().flat_map(|s| s.layers.values().cloned()));
    roots.extend(rec.origins.values().flat_map(|o| o.values().cloned()));
    roots.extend(rec.baselines.iter().flat_map(|b| b.layers.iter().map(|l| PathBuf::from(&l.layer))));
    roots
}

/// Every file (canonical) in the chains of `roots`. Blocking.
pub(crate) fn chain_files(roots: &[PathBuf]) -> Result<HashSet<PathBuf>> {
    let mut out = HashSet::new();
    for root in roots {
        out.extend(stagecore_qcow2::chain(root).map_err(crate::error::qcow2)?.iter().map(|i| canonical(&i.path)));
    }
    Ok(out)
}

/// The records of every environment under `root` except those named in `except`. Blocking.
/// A record that cannot be read is an error (callers must then not remove anything).
pub(crate) fn other_records(root: &Path, except: &[&str]) -> Result<Vec<EnvRecord>> {
    let envs = root.join("envs");
    let entries = match std::fs::read_dir(&envs) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(crate::error::io("listing", &envs, &e)),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
        if except.contains(&name.as_str()) {
            continue;
        }
        match EnvRecord::load(&EnvPaths::new(root, &name), &name) {
            Ok(rec) => out.push(rec),
            Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Every file the other environments under `root` need (canonical). Blocking.
pub(crate) fn needed_by_others(root: &Path, except: &[&str]) -> Result<HashSet<PathBuf>> {
    let roots: Vec<PathBuf> = other_records(root, except)?.iter().flat_map(roots).collect();
    chain_files(&roots)
}

/// The layer files in `dir` (`*.qcow2`, not hidden).
pub(crate) fn layer_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| crate::error::io("listing", dir, &e))?;
    Ok(entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.ends_with(".qcow2") && !name.starts_with('.')
        })
        .map(|e| e.path())
        .collect())
}

/// Removes unreachable layer files of `rec`'s environment; returns how many were removed. Seals
/// of removed files leave the record too (saved when there were any), so a record's seals are of
/// files that exist.
pub(crate) async fn collect(shared: &EnvShared, rec: &mut EnvRecord) -> Result<usize> {
    let own = roots(rec);
    let dir = shared.paths.disks();
    let (env, root) = (shared.name.clone(), shared.ctx.root.clone());
    let removed: Vec<PathBuf> = blocking(move || {
        let keep = chain_files(&own).and_then(|mut keep| {
            keep.extend(needed_by_others(&root, &[&env])?);
            Ok(keep)
        });
        let keep = match keep {
            Ok(keep) => keep,
            Err(e) => {
                tracing::warn!(%env, %e, "layer collection skipped");
                return Ok(Vec::new());
            }
        };
        let mut removed = Vec::new();
        for path in layer_files(&dir)? {
            let c = canonical(&path);
            if !keep.contains(&c) && std::fs::remove_file(&path).is_ok() {
                removed.push(c);
            }
        }
        tracing::debug!(%env, removed = removed.len(), "unreachable layers removed");
        Ok(removed)
    })
    .await?;
    let (sealed, gone): (usize, HashSet<&Path>) =
        (rec.backend.seals.len(), removed.iter().map(|p| p.as_path()).collect());
    rec.backend.seals.retain(|p, _| !gone.contains(p));
    if rec.backend.seals.len() != sealed {
        rec.save(&shared.paths)?;
    }
    Ok(removed.len())
}

/// The first other environment under `root` whose chains go through one of `files`, with that
/// file. Blocking. (`destroy` refuses while there is one.)
pub(crate) fn dependent(root: &Path, env: &str, files: &[PathBuf]) -> Result<Option<(String, PathBuf)>> {
    let files: HashSet<PathBuf> = files.iter().map(|f| canonical(f)).collect();
    for rec in other_records(root, &[env])? {
        let needed = match chain_files(&roots(&rec)) {
            Ok(needed) => needed,
            Err(e) => {
                tracing::warn!(env = %rec.name, %e, "unreadable chains ignored while checking dependents");
                continue;
            }
        };
        if let Some(f) = files.iter().find(|f| needed.contains(*f)) {
            return Ok(Some((rec.name, f.clone())));
        }
    }
    Ok(None)
}
