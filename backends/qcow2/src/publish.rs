//! Writing a new file under a temporary name and publishing it atomically without overwriting.
//!
//! Contract: [`Staged::create`] makes a hidden temp file next to the destination; dropping a
//! `Staged` that was not published removes the temp file, so no partial output survives an
//! error. [`Staged::publish`] makes data durable, hard-links it to the destination (failing with
//! `AlreadyExists` if something is there), removes the temp name and syncs the directory;
//! [`Staged::publish_unsynced`] does the same without either sync, for callers that make many
//! files durable together afterwards (`stagecore::toolbox::DurableBatch`).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result, ctx, invalid};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A file being written under a temporary name.
pub(crate) struct Staged {
    pub(crate) file: File,
    tmp: PathBuf,
    dest: PathBuf,
    published: bool,
}

fn dir_of(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

impl Staged {
    /// Creates the temp file for `dest`; fails early with `AlreadyExists` if `dest` exists.
    pub(crate) fn create(dest: &Path) -> Result<Staged> {
        if dest.symlink_metadata().is_ok() {
            return Err(Error::AlreadyExists { path: dest.to_path_buf() });
        }
        let name = dest.file_name().ok_or_else(|| invalid(dest, "path", "does not name a file"))?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.{n}.tmp", std::process::id()));
        let tmp = dir_of(dest).join(tmp_name);
        let file =
            OpenOptions::new().read(true).write(true).create_new(true).open(&tmp).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::NotFound { kind: "directory", path: dir_of(dest).to_path_buf() },
                _ => crate::error::io("create", &tmp, e),
            })?;
        Ok(Staged { file, tmp, dest: dest.to_path_buf(), published: false })
    }

    /// Creates `dest` itself (never over an existing file: `AlreadyExists`), for a file that is
    /// published by the caller's own commit rather than by a rename: on failure the partial file
    /// is removed, but a process killed while writing leaves it at `dest` (see
    /// [`crate::create_overlay_unsynced`]).
    pub(crate) fn in_place(dest: &Path) -> Result<Staged> {
        let file =
            OpenOptions::new().read(true).write(true).create_new(true).open(dest).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => Error::AlreadyExists { path: dest.to_path_buf() },
                std::io::ErrorKind::NotFound => Error::NotFound { kind: "directory", path: dir_of(dest).to_path_buf() },
                _ => crate::error::io("create", dest, e),
            })?;
        Ok(Staged { file, tmp: dest.to_path_buf(), dest: dest.to_path_buf(), published: false })
    }

    /// The temporary path (for error messages).
    pub(crate) fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// fdatasync, link to the destination, unlink the temp name, fsync the directory.
    pub(crate) fn publish(mut self) -> Result<()> {
        self.file.sync_data().map_err(ctx("sync", &self.tmp))?;
        self.link()?;
        let dir = File::open(dir_of(&self.dest)).map_err(ctx("open directory of", &self.dest))?;
        dir.sync_all().map_err(ctx("sync directory of", &self.dest))
    }

    /// Link to the destination and unlink the temp name, syncing nothing: the file is complete
    /// for readers, but durable only once the caller syncs it and its directory.
    pub(crate) fn publish_unsynced(mut self) -> Result<()> {
        self.link()
    }

    fn link(&mut self) -> Result<()> {
        if self.tmp == self.dest {
            self.published = true;
            return Ok(());
        }
        std::fs::hard_link(&self.tmp, &self.dest).map_err(ctx("link", &self.dest))?;
        self.published = true;
        std::fs::remove_file(&self.tmp).map_err(ctx("remove", &self.tmp))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
