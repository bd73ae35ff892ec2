//! The local registry: productions attached by name or label, whose domains this crate did not
//! define and must not edit (invariant 1: attaching writes nothing into their definitions).
//!
//! One JSON file per environment, `<state dir>/registry/<env>.json`, listing the domains and the
//! record this crate keeps for them (logical names, snapshots). Stages and created productions
//! never use it: their record lives in the domains' own `<metadata>`. The registry is local to the
//! process's host; a production attached from another host must be attached there again.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stagecore::Result;

use crate::error;
use crate::xml::meta::MachineRecord;

/// One registered domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// The domain name.
    pub(crate) instance: String,
    /// What we record about it.
    pub(crate) record: MachineRecord,
}

fn dir(state: &Path) -> PathBuf {
    state.join("registry")
}

fn file(state: &Path, env: &str) -> PathBuf {
    dir(state).join(format!("{env}.json"))
}

/// The entries of `env`, if it is registered.
pub(crate) fn load(state: &Path, env: &str) -> Result<Option<Vec<Entry>>> {
    let path = file(state, env);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| error::json(&path.display().to_string(), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(error::io(&path, e)),
    }
}

/// Writes the entries of `env` durably ([`stagecore::toolbox::write_atomic`]: temporary file,
/// fsync, rename, directory fsync), so a crash leaves the old or the new registry file.
pub(crate) fn store(state: &Path, env: &str, entries: &[Entry]) -> Result<()> {
    let d = dir(state);
    std::fs::create_dir_all(&d).map_err(|e| error::io(&d, e))?;
    let bytes = serde_json::to_vec_pretty(entries).map_err(|e| error::json("registry", e))?;
    stagecore::toolbox::write_atomic(&file(state, env), &bytes)
}

/// Forgets `env`.
pub(crate) fn remove(state: &Path, env: &str) -> Result<()> {
    let path = file(state, env);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(error::io(&path, e)),
        _ => Ok(()),
    }
}

/// Names of all registered environments.
pub(crate) fn names(state: &Path) -> Result<Vec<String>> {
    let d = dir(state);
    let Ok(read) = std::fs::read_dir(&d) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for entry in read {
        let entry = entry.map_err(|e| error::io(&d, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(env) = name.strip_suffix(".json").filter(|n| !n.starts_with('.')) {
            out.push(env.to_string());
        }
    }
    out.sort();
    Ok(out)
}
