//! Durable markers of a machine's freeze and pause: written before guests are frozen or paused
//! and removed after they are thawed or resumed, so a process killed in between leaves a record
//! that the next open settles (`freeze::recover`). Shared by `freeze` and `machines`.

use std::path::PathBuf;

use stagecore::Result;

use crate::shared::EnvShared;
use crate::store::write_atomic;

pub(crate) fn freeze_marker(shared: &EnvShared, machine: &str) -> PathBuf {
    shared.paths.machine_dir(machine).join("freeze.marker")
}

pub(crate) fn pause_marker(shared: &EnvShared, machine: &str) -> PathBuf {
    shared.paths.machine_dir(machine).join("pause.marker")
}

pub(crate) fn write_marker(path: &std::path::Path, what: &str) -> Result<()> {
    let text = format!("{what} by pid {} at {}\n", std::process::id(), time::OffsetDateTime::now_utc());
    write_atomic(path, text.as_bytes())
}

pub(crate) fn remove_marker(path: &std::path::Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(marker = %path.display(), %e, "cannot remove marker"),
    }
}

/// Removes both markers of `machine` (it stopped or boots fresh: neither frozen nor paused).
pub(crate) fn clear_markers(shared: &EnvShared, machine: &str) {
    remove_marker(&freeze_marker(shared, machine));
    remove_marker(&pause_marker(shared, machine));
}
