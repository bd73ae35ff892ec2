//! Small durable-file helpers for the promotion engine: the one place where I/O failures become
//! [`Error`]s naming the file, blocking file work is moved off the async runtime, and writes are
//! made durable (file and directory fsync, atomic replace).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The backend name used in promotion-engine errors.
pub(crate) const ENGINE: &str = "promotion";

/// An I/O failure on `path`, as a typed error that names the file.
pub(crate) fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::backend_msg(ENGINE, format!("{what} {}: {e}", path.display()))
}

/// Runs blocking file work on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::backend_msg(ENGINE, format!("blocking file task failed: {e}")))?
}

/// Makes a directory entry change (create, rename, unlink) in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, "fsync directory", e))
}

/// Creates `dir` (and parents) and returns it.
pub(crate) fn ensure_dir(dir: PathBuf) -> Result<PathBuf> {
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, "create directory", e))?;
    Ok(dir)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename,
/// directory fsync. A crash leaves either the old content or the new, never a torn file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| io_err(&tmp, "create", e))?;
        f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| io_err(&tmp, "write", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_err(path, "rename into place", e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    sync_dir(dir)
}

/// Removes `path` (already gone is fine) and makes the removal durable.
pub(crate) fn remove_durably(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(path.parent().unwrap_or(Path::new("."))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path, "remove", e)),
    }
}

/// This host's name, for lock holders (`/proc/sys/kernel/hostname`, else `localhost`).
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
