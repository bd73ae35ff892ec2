//! [`LockFile`]: an exclusive, non-blocking lock on a file that no child process can inherit
//! and whose holder is always named.
//!
//! Why not `flock(2)` (or OFD locks): those belong to an *open file description*, which a
//! `fork(2)` shares with the child. A forked child that has not exec'd yet (or a helper that never
//! execs) keeps such a lock after its parent was killed, and recovery then finds a lock "held" by
//! a process that no longer exists. [`LockFile`] uses classic POSIX record locks (`fcntl(F_SETLK)`
//! on the whole file), which belong to the *process*: they are never inherited by `fork`, and the
//! kernel drops them when the holder dies. Every file is also opened `O_CLOEXEC` (std's default).
//!
//! Record locks have two traps, both handled here: they do not exclude other threads of the same
//! process, and closing *any* descriptor of the file in the holding process drops the lock. So
//! the process keeps one registry of the files it holds (by device and inode): a second locker in
//! the same process is refused from the registry without opening the file, and no descriptor of
//! a held file is ever opened and closed again. Code that wants to read a lock file's content
//! must go through [`LockFile::peek`].
//!
//! Naming the holder: a locker may write a content (e.g. a [`LockRecord`] as JSON) right after it
//! got the lock; [`LockFile::try_lock`] returns it in [`LockAttempt::Busy`]. Between two processes
//! the content is checked against the pid the kernel reports for the conflicting lock
//! (`F_GETLK`), and waited for briefly while the holder has not written it yet, so a busy lock is
//! named by its live holder, never by a dead previous one.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::fsutil::io_err;
use crate::{Error, Result};

/// Who holds a lock: what a process writes into a lock file it took (as JSON) and what
/// [`Error::Locked`] reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    /// The holding process.
    pub pid: u32,
    /// Its host.
    pub host: String,
    /// What it is doing under the lock.
    pub operation: String,
    /// When it took the lock.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
}

impl LockRecord {
    /// A record of this process doing `operation`, now.
    pub fn now(operation: impl Into<String>) -> Self {
        LockRecord {
            pid: std::process::id(),
            host: super::fsutil::hostname(),
            operation: operation.into(),
            since: OffsetDateTime::now_utc(),
        }
    }
}

impl std::fmt::Display for LockRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on {} ({}), since {}", self.pid, self.host, self.operation, self.since)
    }
}

/// What [`LockFile::try_lock`] found.
#[derive(Debug)]
pub enum LockAttempt {
    /// The lock is ours now; `previous` is the content an earlier holder left (a holder that died
    /// without releasing), `None` when the file was empty.
    Acquired(LockFile, Option<String>),
    /// Another holder (another process, or another part of this one) has it.
    Busy {
        /// The holder's pid, as the kernel reports it (`None` when held in this process).
        pid: Option<u32>,
        /// The content the holder wrote, when it matches that pid (`None` when it wrote none in
        /// time).
        content: Option<String>,
    },
}

/// A held lock (see the module docs). Dropping it releases the lock and keeps the content, as a
/// crash would; [`LockFile::release`] empties the file first.
#[derive(Debug)]
pub struct LockFile {
    file: Option<File>,
    key: (u64, u64),
    path: PathBuf,
}

/// The files this process holds, by (device, inode), with the content their holder wrote.
type Held = HashMap<(u64, u64), Option<String>>;

static HELD: LazyLock<Mutex<Held>> = LazyLock::new(Default::default);

fn held() -> std::sync::MutexGuard<'static, Held> {
    HELD.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long a busy lock whose holder has not written its content yet is looked at again.
const NAME_WAIT: Duration = Duration::from_secs(2);

fn flock_struct(kind: libc::c_int) -> libc::flock {
    // SAFETY: `flock` is a plain C struct; all-zero is a valid value (whole file from offset 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl
}

/// `F_SETLK` write lock on the whole file: `Ok(true)` taken, `Ok(false)` held by another process.
fn set_lock(file: &File) -> std::io::Result<bool> {
    let fl = flock_struct(libc::F_WRLCK);
    // SAFETY: fcntl(2) with F_SETLK reads the `flock` struct we own for the duration of the call.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &fl) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

/// The pid of the process holding a conflicting lock (`F_GETLK`), `None` when it is free now.
fn lock_owner(file: &File) -> std::io::Result<Option<u32>> {
    let mut fl = flock_struct(libc::F_WRLCK);
    // SAFETY: fcntl(2) with F_GETLK writes into the `flock` struct we own.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut fl) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if fl.l_type == libc::F_UNLCK as libc::c_short {
        return Ok(None);
    }
    Ok(u32::try_from(fl.l_pid).ok())
}

fn write_content(file: &mut File, content: &str) -> std::io::Result<()> {
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(content.as_bytes())?;
    file.sync_data()
}

fn read_all(file: &mut File) -> std::io::Result<String> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_string(&mut text)?;
    Ok(text)
}

/// The pid named by a content, if it is a JSON object with a `pid` field.
fn content_pid(text: &str) -> Option<u32> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    v.get("pid")?.as_u64().and_then(|p| u32::try_from(p).ok())
}

fn key_of(meta: &std::fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

impl LockFile {
    /// Tries to take the lock on `path` (created if missing) without waiting. On success the
    /// previous content is returned and `content` (when given) is written durably; a `None`
    /// content leaves the file as it is (a journal locks itself this way). Blocking file I/O.
    pub fn try_lock(path: &Path, content: Option<&str>) -> Result<LockAttempt> {
        // A holder elsewhere that released between our attempt and its naming: try again.
        for _ in 0..3 {
            match Self::try_lock_once(path, content)? {
                LockAttempt::Busy { pid: None, content: None } => continue,
                other => return Ok(other),
            }
        }
        Self::try_lock_once(path, content)
    }

    fn try_lock_once(path: &Path, content: Option<&str>) -> Result<LockAttempt> {
        let mut registry = held();
        // A file held in this process is never opened again (closing that descriptor would drop
        // our own record lock).
        if let Ok(meta) = std::fs::metadata(path)
            && let Some(content) = registry.get(&key_of(&meta))
        {
            return Ok(LockAttempt::Busy { pid: None, content: content.clone() });
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io_err(path, "open lock file", e))?;
        let key = key_of(&file.metadata().map_err(|e| io_err(path, "stat lock file", e))?);
        if let Some(content) = registry.get(&key) {
            // Created between the stat and the open by another thread of ours: cannot happen
            // while we hold the registry, but never close a held file's descriptor regardless.
            let content = content.clone();
            std::mem::forget(file);
            return Ok(LockAttempt::Busy { pid: None, content });
        }
        if !set_lock(&file).map_err(|e| io_err(path, "lock (fcntl F_SETLK)", e))? {
            drop(registry);
            return Ok(busy_elsewhere(file));
        }
        let previous = read_all(&mut file).map_err(|e| io_err(path, "read lock file", e))?;
        let previous = (!previous.trim().is_empty()).then_some(previous);
        // Named before any other thread of ours can look (we still hold the registry).
        if let Some(content) = content {
            write_content(&mut file, content).map_err(|e| io_err(path, "write lock file", e))?;
        }
        registry.insert(key, content.map(str::to_string).or_else(|| previous.clone()));
        let lock = LockFile { file: Some(file), key, path: path.to_path_buf() };
        Ok(LockAttempt::Acquired(lock, previous))
    }

    /// The content of the lock file at `path` without taking the lock (safe while this process
    /// holds it). `None` when the file is missing or empty.
    pub fn peek(path: &Path) -> Result<Option<String>> {
        let registry = held();
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(path, "stat lock file", e)),
        };
        if let Some(content) = registry.get(&key_of(&meta)) {
            return Ok(content.clone());
        }
        let mut file = File::open(path).map_err(|e| io_err(path, "open lock file", e))?;
        let text = read_all(&mut file).map_err(|e| io_err(path, "read lock file", e))?;
        Ok((!text.trim().is_empty()).then_some(text))
    }

    /// The held file (for a journal that appends to the file it locks).
    pub fn file(&self) -> &File {
        self.file.as_ref().expect("a held lock has its file")
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the content, durably (what a busy attempt of another locker reports).
    pub fn set_content(&mut self, content: &str) -> Result<()> {
        let mut registry = held();
        let file = self.file.as_mut().expect("a held lock has its file");
        write_content(file, content).map_err(|e| io_err(&self.path, "write lock file", e))?;
        registry.insert(self.key, Some(content.to_string()));
        Ok(())
    }

    /// Empties the file (durably) and releases the lock.
    pub fn release(mut self) -> Result<()> {
        let file = self.file.as_ref().expect("a held lock has its file");
        file.set_len(0).and_then(|()| file.sync_data()).map_err(|e| io_err(&self.path, "clear lock file", e))?;
        self.unlock();
        Ok(())
    }

    fn unlock(&mut self) {
        let mut registry = held();
        // Closing the descriptor drops the record lock; done under the registry so no other
        // thread of ours sees the file free before it is.
        drop(self.file.take());
        registry.remove(&self.key);
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            self.unlock();
        }
    }
}

/// A lock another process holds: its pid from the kernel, and its content once it names that
/// pid (waited for up to [`NAME_WAIT`]: the holder writes it right after locking). `pid: None`
/// when it was released meanwhile.
fn busy_elsewhere(mut file: File) -> LockAttempt {
    let deadline = Instant::now() + NAME_WAIT;
    loop {
        let Some(pid) = lock_owner(&file).ok().flatten() else {
            return LockAttempt::Busy { pid: None, content: None };
        };
        let text = read_all(&mut file).unwrap_or_default();
        // A JSON content must name the kernel's holder (not a dead earlier one); a plain-text
        // content is taken as it is.
        let plain = !text.trim().is_empty() && !text.trim_start().starts_with('{');
        if plain || content_pid(&text) == Some(pid) {
            return LockAttempt::Busy { pid: Some(pid), content: Some(text) };
        }
        if Instant::now() >= deadline {
            return LockAttempt::Busy { pid: Some(pid), content: None };
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Names a busy lock for [`Error::Locked`]: the holder's record when it wrote one, else its pid.
pub fn describe_holder(pid: Option<u32>, content: Option<&str>) -> String {
    if let Some(record) = content.and_then(|c| serde_json::from_str::<LockRecord>(c).ok()) {
        return record.to_string();
    }
    match (pid, content) {
        (_, Some(c)) if !c.trim().is_empty() => c.trim().to_string(),
        (Some(pid), _) => format!("pid {pid} on {} (it has not named its operation yet)", super::fsutil::hostname()),
        (None, _) => "another holder that released it meanwhile".to_string(),
    }
}

/// The [`Error::Locked`] of `resource` for a busy attempt.
pub fn locked_error(resource: impl Into<String>, pid: Option<u32>, content: Option<&str>) -> Error {
    Error::Locked { resource: resource.into(), holder: describe_holder(pid, content) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_locker_in_the_same_process_is_busy_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let rec = serde_json::to_string(&LockRecord::now("testing")).unwrap();
        let LockAttempt::Acquired(lock, None) = LockFile::try_lock(&path, Some(&rec)).unwrap() else { panic!() };
        match LockFile::try_lock(&path, None).unwrap() {
            LockAttempt::Busy { content: Some(c), .. } => {
                assert!(describe_holder(None, Some(&c)).contains("testing"), "{c}")
            }
            other => panic!("expected busy, got {other:?}"),
        }
        // Peeking does not drop our lock (it never opens a held file).
        assert_eq!(LockFile::peek(&path).unwrap().as_deref(), Some(rec.as_str()));
        assert!(matches!(LockFile::try_lock(&path, None).unwrap(), LockAttempt::Busy { .. }));
        drop(lock);
        match LockFile::try_lock(&path, None).unwrap() {
            LockAttempt::Acquired(l, Some(prev)) => {
                assert_eq!(prev, rec, "a dropped holder leaves its content");
                l.release().unwrap();
            }
            other => panic!("expected acquired with the old content, got {other:?}"),
        }
        assert!(matches!(LockFile::try_lock(&path, None).unwrap(), LockAttempt::Acquired(_, None)));
    }

    #[test]
    fn a_forked_child_that_never_execs_does_not_keep_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fork.lock");
        let LockAttempt::Acquired(lock, _) = LockFile::try_lock(&path, Some("{}")).unwrap() else { panic!() };
        // SAFETY: the child only calls async-signal-safe functions (sleep, _exit).
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: async-signal-safe calls only, then the child ends without unwinding.
            unsafe {
                libc::sleep(5);
                libc::_exit(0);
            }
        }
        assert!(child > 0, "fork failed");
        drop(lock);
        let free = matches!(LockFile::try_lock(&path, None).unwrap(), LockAttempt::Acquired(..));
        // SAFETY: signalling and reaping our own child.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
        assert!(free, "a record lock is not inherited: free while the forked child still runs");
    }
}
