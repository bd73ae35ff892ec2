//! The cross-process lock of one environment: an exclusive `flock` on `root/envs/<env>/lock`,
//! holding the holder's pid as text.
//!
//! Contract: [`EnvLock::acquire`] never blocks; when another open file description holds the
//! lock (another process, or another backend instance on the same root) it fails with
//! `Error::Locked` naming the environment and the holder's pid. The lock is released when the
//! [`EnvLock`] is dropped (or the process dies).

use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use stagecore::{Error, Result};

use crate::error;

/// A held environment lock.
#[derive(Debug)]
pub(crate) struct EnvLock {
    _file: std::fs::File,
}

impl EnvLock {
    /// Takes the lock at `path` for environment `env`.
    pub(crate) fn acquire(path: &Path, env: &str) -> Result<EnvLock> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| error::io("opening lock", path, &e))?;
        // SAFETY: flock(2) on a file descriptor we own; no memory is touched.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "another process or backend instance".to_string(),
                    pid => format!("pid {pid}"),
                };
                return Err(Error::Locked { resource: format!("environment {env}"), holder });
            }
            return Err(error::io("locking", path, &e));
        }
        let pid = std::process::id().to_string();
        let write = (|| {
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(pid.as_bytes())
        })();
        write.map_err(|e| error::io("writing lock", path, &e))?;
        Ok(EnvLock { _file: file })
    }
}
