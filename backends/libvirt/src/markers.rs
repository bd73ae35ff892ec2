//! Durable markers of what a freeze does to a domain, so that a process killed in the middle
//! leaves nothing paused or frozen after the next open.
//!
//! Two kinds, one file per domain under the state directory: `frozen/<domain>.json` (its guest's
//! filesystems frozen through the agent, [`crate::quiesce`]) and `suspended/<domain>.json` (the
//! domain suspended for the one-instant capture, [`crate::freeze`]). A marker is written
//! durably ([`stagecore::toolbox::write_atomic`]) before the act and removed after it was undone.
//! It names the process that wrote it: the next open undoes it only when that process is gone
//! ([`orphaned`]), so one process's open never thaws or resumes another live process's freeze.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stagecore::Result;

use crate::error;

/// What a marker records was done to its domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The guest's filesystems were frozen (`guest-fsfreeze-freeze`).
    Frozen,
    /// The domain was suspended (`virDomainSuspend`).
    Suspended,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Frozen => "frozen",
            Kind::Suspended => "suspended",
        }
    }
}

/// The content of one marker.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Marker {
    environment: String,
    machine: String,
    domain: String,
    #[serde(with = "time::serde::rfc3339")]
    since: time::OffsetDateTime,
    /// The process that wrote it (absent in markers written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
}

/// The marker file of `domain` of `kind` in the state directory `state`.
pub(crate) fn path(state: &Path, kind: Kind, domain: &str) -> PathBuf {
    state.join(kind.dir()).join(format!("{domain}.json"))
}

/// Writes the marker durably (temporary file, fsync, rename, directory fsync).
pub(crate) fn write(state: &Path, kind: Kind, environment: &str, machine: &str, domain: &str) -> Result<()> {
    let file = path(state, kind, domain);
    let dir = file.parent().unwrap_or(state);
    std::fs::create_dir_all(dir).map_err(|e| error::io(dir, e))?;
    let marker = Marker {
        environment: environment.into(),
        machine: machine.into(),
        domain: domain.into(),
        since: time::OffsetDateTime::now_utc(),
        pid: Some(std::process::id()),
    };
    let bytes = serde_json::to_vec(&marker).map_err(|e| error::json("marker", e))?;
    stagecore::toolbox::write_atomic(&file, &bytes)
}

/// Removes a marker; a missing one is fine, other failures are logged (the marker then stays
/// and the next open acts on it again, which is harmless: thaw and resume are idempotent).
pub(crate) fn remove(file: &Path) {
    match std::fs::remove_file(file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(marker = %file.display(), error = %e, "could not remove a marker"),
    }
}

/// True when `file` is a marker whose writer is gone: a process that no longer exists, or an
/// old marker that names none. A marker of this process or of another live one is not.
/// (A process id the kernel reused for a new process keeps the marker until that one ends.)
pub(crate) fn orphaned(file: &Path) -> bool {
    let Ok(bytes) = std::fs::read(file) else { return false };
    let pid = match serde_json::from_slice::<Marker>(&bytes) {
        Ok(m) => m.pid,
        Err(e) => {
            tracing::warn!(marker = %file.display(), error = %e, "unreadable marker: treated as left by a dead process");
            None
        }
    };
    match pid {
        None => true,
        Some(p) if p == std::process::id() => false,
        Some(p) => !Path::new("/proc").join(p.to_string()).exists(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_of_this_process_are_not_orphaned_and_of_a_dead_one_are() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), Kind::Suspended, "e", "web", "e-web").unwrap();
        let file = path(dir.path(), Kind::Suspended, "e-web");
        assert!(file.exists());
        assert!(!orphaned(&file), "this process wrote it");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let mut m: Marker = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!((m.pid, m.domain.as_str()), (Some(std::process::id()), "e-web"));
        m.pid = Some(dead);
        std::fs::write(&file, serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(orphaned(&file), "its writer is gone");
        let old = r#"{"environment":"e","machine":"web","domain":"e-web","since":"2026-01-01T00:00:00Z"}"#;
        std::fs::write(&file, old).unwrap();
        assert!(orphaned(&file), "an old marker without a pid");
        remove(&file);
        assert!(!file.exists() && !orphaned(&file));
        assert_eq!(path(dir.path(), Kind::Frozen, "d"), dir.path().join("frozen").join("d.json"));
    }
}
