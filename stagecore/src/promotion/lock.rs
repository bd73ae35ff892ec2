//! The production lock: exactly one promotion per production at a time, across processes.
//!
//! One file per production, `<state_dir>/locks/<production>.lock`, held with an exclusive
//! `flock(2)` (std's [`File::try_lock`]) for the promotion's whole life. The file's content names
//! the holder (promotion id, host, pid, since) as JSON; an empty file means free. The file is never
//! deleted (deleting a flock'd file races with a second locker), only emptied on release.
//!
//! The kernel drops a flock when its holder dies, so a free flock over a non-empty file is a
//! *stale* lock: its holder crashed, and the journal of the named promotion says what to recover.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::fsutil::io_err;
use crate::{Error, Result};

/// Who holds (or last held) a production lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LockHolder {
    /// The promotion id.
    pub(crate) promotion: String,
    /// The host of the holding process.
    pub(crate) host: String,
    /// The holding process.
    pub(crate) pid: u32,
    /// When the lock was taken.
    #[serde(with = "time::serde::rfc3339")]
    pub(crate) since: OffsetDateTime,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "promotion {} (pid {} on {}, since {})", self.promotion, self.pid, self.host, self.since)
    }
}

/// How often a busy, still unnamed lock is looked at again (5 ms apart) before giving up naming it.
const NAME_RETRIES: usize = 200;

/// The outcome of a non-blocking lock attempt.
#[derive(Debug)]
pub(crate) enum TryLock {
    /// We hold the flock now; `previous` is the content left by an earlier holder (a stale lock)
    /// or `None` when the lock was free.
    Acquired(ProductionLock, Option<LockHolder>),
    /// A live process holds it; its content, if already written.
    Busy(Option<LockHolder>),
}

/// A held production lock. Dropping it releases the flock but keeps the content (as a crash
/// would); [`ProductionLock::release`] empties the file first.
#[derive(Debug)]
pub(crate) struct ProductionLock {
    file: File,
    path: PathBuf,
}

/// The lock file of `production` under `locks_dir`.
pub(crate) fn lock_path(locks_dir: &Path, production: &str) -> PathBuf {
    locks_dir.join(format!("{production}.lock"))
}

fn read_holder(file: &mut File, path: &Path) -> Result<Option<LockHolder>> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).and_then(|_| file.read_to_string(&mut text)).map_err(|e| io_err(path, "read", e))?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    // A torn write (the holder died while writing) still names an unknown holder.
    Ok(Some(serde_json::from_str(&text).unwrap_or_else(|_| LockHolder {
        promotion: "unknown (unreadable lock file)".into(),
        host: "unknown".into(),
        pid: 0,
        since: OffsetDateTime::UNIX_EPOCH,
    })))
}

impl ProductionLock {
    /// Tries to take the lock without waiting (blocking file I/O; call from a blocking task).
    pub(crate) fn try_acquire(locks_dir: &Path, production: &str) -> Result<TryLock> {
        let path = lock_path(locks_dir, production);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_err(&path, "open lock file", e))?;
        match file.try_lock() {
            Ok(()) => {
                let previous = read_holder(&mut file, &path)?;
                Ok(TryLock::Acquired(ProductionLock { file, path }, previous))
            }
            Err(TryLockError::WouldBlock) => Ok(TryLock::Busy(read_holder(&mut file, &path)?)),
            Err(TryLockError::Error(e)) => Err(io_err(&path, "flock", e)),
        }
    }

    /// Like [`ProductionLock::try_acquire`], but a busy lock whose holder has not written its name
    /// yet (it takes the flock, then writes) is retried briefly, so that `Busy` names the holder.
    pub(crate) fn try_acquire_named(locks_dir: &Path, production: &str) -> Result<TryLock> {
        for _ in 0..NAME_RETRIES {
            match Self::try_acquire(locks_dir, production)? {
                TryLock::Busy(None) => std::thread::sleep(std::time::Duration::from_millis(5)),
                other => return Ok(other),
            }
        }
        Self::try_acquire(locks_dir, production)
    }

    /// Writes `holder` as the lock's content, durably.
    pub(crate) fn set_holder(&mut self, holder: &LockHolder) -> Result<()> {
        let json = serde_json::to_string(holder).map_err(|e| Error::backend("promotion", e))?;
        let path = &self.path;
        self.file.set_len(0).map_err(|e| io_err(path, "truncate", e))?;
        self.file.seek(SeekFrom::Start(0)).map_err(|e| io_err(path, "seek", e))?;
        self.file.write_all(json.as_bytes()).and_then(|()| self.file.sync_data()).map_err(|e| io_err(path, "write", e))
    }

    /// Empties the file (durably) and drops the flock: the lock is free.
    pub(crate) fn release(self) -> Result<()> {
        self.file.set_len(0).and_then(|()| self.file.sync_data()).map_err(|e| io_err(&self.path, "clear lock", e))
    }
}

/// The [`Error::Locked`] for `production` held by `holder`.
pub(crate) fn locked(production: &str, holder: Option<&LockHolder>, note: &str) -> Error {
    let holder = match holder {
        Some(h) => format!("{h}{note}"),
        None => format!("a promotion that is taking the lock right now{note}"),
    };
    Error::Locked { resource: format!("environment {production}"), holder }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(id: &str) -> LockHolder {
        LockHolder { promotion: id.into(), host: "h".into(), pid: 1, since: OffsetDateTime::UNIX_EPOCH }
    }

    #[test]
    fn second_locker_is_busy_and_sees_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let TryLock::Acquired(mut a, None) = ProductionLock::try_acquire(dir.path(), "prod").unwrap() else {
            panic!("a fresh lock must be free")
        };
        a.set_holder(&holder("pr-a")).unwrap();
        match ProductionLock::try_acquire(dir.path(), "prod").unwrap() {
            TryLock::Busy(Some(h)) => assert_eq!(h.promotion, "pr-a"),
            other => panic!("expected busy, got {other:?}"),
        }
        a.release().unwrap();
        assert!(matches!(ProductionLock::try_acquire(dir.path(), "prod").unwrap(), TryLock::Acquired(_, None)));
    }

    #[test]
    fn a_dropped_holder_leaves_a_stale_lock() {
        let dir = tempfile::tempdir().unwrap();
        let TryLock::Acquired(mut a, _) = ProductionLock::try_acquire(dir.path(), "prod").unwrap() else { panic!() };
        a.set_holder(&holder("pr-dead")).unwrap();
        drop(a);
        match ProductionLock::try_acquire(dir.path(), "prod").unwrap() {
            TryLock::Acquired(_, Some(h)) => assert_eq!(h.promotion, "pr-dead"),
            other => panic!("expected a stale lock, got {other:?}"),
        }
    }
}
