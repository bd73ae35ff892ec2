//! The production lock: exactly one promotion per production at a time, across processes.
//!
//! One file per production, `<state_dir>/locks/<production>.lock`, held with a [`LockFile`] (a
//! POSIX record lock: never inherited by a forked child, dropped by the kernel when its holder
//! dies) for the promotion's whole life. The file's content names the holder (promotion id,
//! host, pid, since) as JSON, written the moment the lock is taken; an empty file means free. The
//! file is never deleted, only emptied on release.
//!
//! A free lock over a non-empty file is a *stale* lock: its holder crashed, and the journal of
//! the named promotion says what to recover.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::lockfile::{LockAttempt, LockFile};
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

/// The outcome of a non-blocking lock attempt.
#[derive(Debug)]
pub(crate) enum TryLock {
    /// We hold the lock now (its content names `holder`); `previous` is the content left by an
    /// earlier holder (a stale lock) or `None` when the lock was free.
    Acquired(ProductionLock, Option<LockHolder>),
    /// A live process holds it; its content (`None` only when it could not be read in time).
    Busy(Option<LockHolder>),
}

/// A held production lock. Dropping it releases the lock but keeps the content (as a crash
/// would); [`ProductionLock::release`] empties the file first.
#[derive(Debug)]
pub(crate) struct ProductionLock {
    file: LockFile,
}

/// The lock file of `production` under `locks_dir`.
pub(crate) fn lock_path(locks_dir: &Path, production: &str) -> PathBuf {
    locks_dir.join(format!("{production}.lock"))
}

fn parse_holder(text: &str) -> LockHolder {
    // A torn write (the holder died while writing) still names an unknown holder.
    serde_json::from_str(text).unwrap_or_else(|_| LockHolder {
        promotion: "unknown (unreadable lock file)".into(),
        host: "unknown".into(),
        pid: 0,
        since: OffsetDateTime::UNIX_EPOCH,
    })
}

impl ProductionLock {
    /// Tries to take the lock without waiting, naming `holder` in it at once (blocking file
    /// I/O; call from a blocking task). A busy lock is reported with its holder.
    pub(crate) fn try_acquire(locks_dir: &Path, production: &str, holder: &LockHolder) -> Result<TryLock> {
        let path = lock_path(locks_dir, production);
        let json = serde_json::to_string(holder).map_err(|e| Error::backend("promotion", e))?;
        Ok(match LockFile::try_lock(&path, Some(&json))? {
            LockAttempt::Acquired(file, previous) => {
                TryLock::Acquired(ProductionLock { file }, previous.as_deref().map(parse_holder))
            }
            LockAttempt::Busy { pid, content } => TryLock::Busy(match content {
                Some(text) => Some(parse_holder(&text)),
                None => pid.map(|pid| LockHolder {
                    promotion: "unknown (it has not named itself yet)".into(),
                    host: super::fsutil::hostname(),
                    pid,
                    since: OffsetDateTime::now_utc(),
                }),
            }),
        })
    }

    /// Writes `holder` as the lock's content, durably.
    pub(crate) fn set_holder(&mut self, holder: &LockHolder) -> Result<()> {
        let json = serde_json::to_string(holder).map_err(|e| Error::backend("promotion", e))?;
        self.file.set_content(&json)
    }

    /// Writes back the content of an earlier holder (a stale lock we must not take over) and
    /// drops the lock.
    pub(crate) fn restore(mut self, previous: &LockHolder) -> Result<()> {
        self.set_holder(previous)
    }

    /// Empties the file (durably) and drops the lock: the lock is free.
    pub(crate) fn release(self) -> Result<()> {
        self.file.release()
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
        LockHolder {
            promotion: id.into(),
            host: "h".into(),
            pid: std::process::id(),
            since: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn second_locker_is_busy_and_sees_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let TryLock::Acquired(a, None) = ProductionLock::try_acquire(dir.path(), "prod", &holder("pr-a")).unwrap()
        else {
            panic!("a fresh lock must be free")
        };
        match ProductionLock::try_acquire(dir.path(), "prod", &holder("pr-b")).unwrap() {
            TryLock::Busy(Some(h)) => assert_eq!(h.promotion, "pr-a"),
            other => panic!("expected busy, got {other:?}"),
        }
        a.release().unwrap();
        assert!(matches!(
            ProductionLock::try_acquire(dir.path(), "prod", &holder("pr-c")).unwrap(),
            TryLock::Acquired(_, None)
        ));
    }

    #[test]
    fn a_dropped_holder_leaves_a_stale_lock() {
        let dir = tempfile::tempdir().unwrap();
        let TryLock::Acquired(a, _) = ProductionLock::try_acquire(dir.path(), "prod", &holder("pr-dead")).unwrap()
        else {
            panic!()
        };
        drop(a);
        match ProductionLock::try_acquire(dir.path(), "prod", &holder("pr-next")).unwrap() {
            TryLock::Acquired(l, Some(h)) => {
                assert_eq!(h.promotion, "pr-dead");
                l.restore(&h).unwrap();
            }
            other => panic!("expected a stale lock, got {other:?}"),
        }
        match ProductionLock::try_acquire(dir.path(), "prod", &holder("pr-again")).unwrap() {
            TryLock::Acquired(_, Some(h)) => assert_eq!(h.promotion, "pr-dead", "restore keeps the stale holder"),
            other => panic!("expected the stale lock again, got {other:?}"),
        }
    }
}
