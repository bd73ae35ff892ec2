//! The cross-process lock of one environment: `root/envs/<env>/lock`, held with a
//! [`stagecore::promotion::LockFile`] — a POSIX record lock, so no child process (a QEMU being
//! spawned, a forked helper that never execs) ever inherits it, and the kernel drops it when the
//! holder dies. Its content names the holder ([`stagecore::promotion::LockRecord`]: pid, host,
//! operation, since), written the moment the lock is taken.
//!
//! Contract: [`EnvLock::acquire`] never blocks; when another holder has the lock (another
//! process, or another backend instance in this process) it fails with `Error::Locked` naming the
//! environment and the holder — pid, host, operation and since, between processes too. The lock
//! is released when the [`EnvLock`] is dropped (or the process dies).

use std::path::Path;

use stagecore::Result;
use stagecore::promotion::{LockAttempt, LockFile, LockRecord, locked_error};

use crate::error;

/// A held environment lock.
#[derive(Debug)]
pub(crate) struct EnvLock {
    _file: LockFile,
}

/// What this process does with an environment it holds open, for other processes' errors.
fn operation(env: &str) -> String {
    let program = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "unknown program".into());
    format!("stagecore-qemu holds environment {env} open in {program}")
}

impl EnvLock {
    /// Takes the lock at `path` for environment `env`.
    pub(crate) fn acquire(path: &Path, env: &str) -> Result<EnvLock> {
        let record = serde_json::to_string(&LockRecord::now(operation(env)))
            .map_err(|e| error::msg(format!("serialising lock record: {e}")))?;
        match LockFile::try_lock(path, Some(&record))? {
            LockAttempt::Acquired(file, _) => Ok(EnvLock { _file: file }),
            LockAttempt::Busy { pid, content } => {
                Err(locked_error(format!("environment {env}"), pid, content.as_deref()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_locker_in_this_process_gets_the_holder_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let held = EnvLock::acquire(&path, "prod").unwrap();
        let err = EnvLock::acquire(&path, "prod").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, stagecore::Error::Locked { .. }), "{err}");
        for part in [format!("pid {}", std::process::id()), "holds environment prod open".into(), "since".into()] {
            assert!(text.contains(&part), "{text} lacks {part}");
        }
        drop(held);
        EnvLock::acquire(&path, "prod").expect("free once dropped");
    }
}
