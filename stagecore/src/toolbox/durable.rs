//! [`DurableBatch`]: making many new files durable together, before the record that names them
//! is published.
//!
//! Contract: a backend writes every file of an operation without syncing each (e.g. the qcow2
//! overlays of a whole stage), adds them with [`DurableBatch::file`], and calls
//! [`DurableBatch::sync`] once; after `Ok` every file's data and every directory entry added
//! (each file's own directory included) survives a power loss. Only then does it publish the
//! record (the commit point): a crash before that leaves files no record names, which the
//! backend removes on its next open or re-create.
//!
//! Two ways ([`Durability`]), chosen by the caller:
//! - [`Durability::Files`] (the default): `fdatasync` of every file, issued concurrently from a
//!   bounded set of threads, then one `fsync` per distinct directory. Concurrent syncs share
//!   journal commits (ext4 and XFS group-commit them), so 400 files cost a few commits instead
//!   of 400; and the cost stays bounded by this batch's own data.
//! - [`Durability::Filesystem`]: one `syncfs(2)` per filesystem the batch touches. Cheapest on
//!   a quiet filesystem (one writeback, one commit), but it also writes back every other
//!   process's dirty data on that filesystem, so on a shared host its cost has no bound the
//!   caller controls. Offered for hosts where the state directory has a filesystem of its own.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{Error, Result};

/// How a [`DurableBatch`] makes its files durable (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// `fdatasync` of each file (concurrently, bounded), then `fsync` of each directory.
    #[default]
    Files,
    /// One `syncfs(2)` per filesystem the batch's files and directories are on.
    Filesystem,
}

/// At most this many `fdatasync` calls run at once ([`Durability::Files`]).
pub const MAX_PARALLEL_SYNCS: usize = 16;

/// New files and directory entries to make durable together (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct DurableBatch {
    files: BTreeSet<PathBuf>,
    dirs: BTreeSet<PathBuf>,
    mode: Durability,
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl DurableBatch {
    /// An empty batch synced the [`Durability::Files`] way.
    pub fn new() -> Self {
        DurableBatch::default()
    }

    /// An empty batch synced the `mode` way.
    pub fn with_mode(mode: Durability) -> Self {
        DurableBatch { mode, ..DurableBatch::default() }
    }

    /// How this batch syncs.
    pub fn mode(&self) -> Durability {
        self.mode
    }

    /// Adds a new (or rewritten) file: its data and its entry in its directory.
    pub fn file(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        let path = path.into();
        self.dirs.insert(parent_of(&path));
        self.files.insert(path);
        self
    }

    /// Adds a directory whose entries changed (a new subdirectory, a rename inside it). A new
    /// directory's own entry lives in its parent: add both.
    pub fn dir(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.dirs.insert(path.into());
        self
    }

    /// Files in the batch.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(PathBuf::as_path)
    }

    /// Directories in the batch (the files' own ones included).
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(PathBuf::as_path)
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.dirs.is_empty()
    }

    /// Makes everything added durable. Blocking (run it inside [`crate::toolbox::blocking`]).
    /// The first failure is returned as `Error::Io` naming the file or directory; the batch is
    /// then not durable as a whole.
    pub fn sync(&self) -> Result<()> {
        match self.mode {
            Durability::Files => {
                sync_files(&self.files)?;
                for d in &self.dirs {
                    fsync_path(d, "syncing directory")?;
                }
                Ok(())
            }
            Durability::Filesystem => self.syncfs(),
        }
    }

    fn syncfs(&self) -> Result<()> {
        let mut done = BTreeSet::new();
        for p in self.dirs.iter().chain(&self.files) {
            let meta = std::fs::metadata(p).map_err(|e| Error::io("inspecting", p, e))?;
            if !done.insert(meta.dev()) {
                continue;
            }
            let f = std::fs::File::open(p).map_err(|e| Error::io("opening", p, e))?;
            // SAFETY: `f` is an open descriptor for the duration of the call.
            if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
                return Err(Error::io("syncing the filesystem of", p, std::io::Error::last_os_error()));
            }
        }
        Ok(())
    }
}

fn fsync_path(p: &Path, action: &'static str) -> Result<()> {
    let f = std::fs::File::open(p).map_err(|e| Error::io("opening", p, e))?;
    f.sync_all().map_err(|e| Error::io(action, p, e))
}

fn fdatasync_path(p: &Path) -> Result<()> {
    let f = std::fs::File::open(p).map_err(|e| Error::io("opening", p, e))?;
    f.sync_data().map_err(|e| Error::io("syncing", p, e))
}

/// `fdatasync` of every file, at most [`MAX_PARALLEL_SYNCS`] at once.
fn sync_files(files: &BTreeSet<PathBuf>) -> Result<()> {
    let files: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    if files.len() <= 1 {
        return files.iter().try_for_each(|f| fdatasync_path(f));
    }
    let next = AtomicUsize::new(0);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..MAX_PARALLEL_SYNCS.min(files.len()) {
            scope.spawn(|| {
                while let Some(f) = files.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if let Err(e) = fdatasync_path(f) {
                        first_err.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                        // Stop handing out work; the batch fails anyway.
                        next.store(files.len(), Ordering::Relaxed);
                    }
                }
            });
        }
    });
    match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("stagecore-durable-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("sub")).unwrap();
        d
    }

    #[test]
    fn a_batch_collects_files_and_their_directories_once() {
        let mut b = DurableBatch::new();
        b.file("/x/a").file("/x/b").file("/y/c").dir("/x");
        assert_eq!(b.files().count(), 3);
        assert_eq!(b.dirs().collect::<Vec<_>>(), [Path::new("/x"), Path::new("/y")]);
        assert!(!b.is_empty() && DurableBatch::new().is_empty());
    }

    #[test]
    fn both_modes_sync_real_files_and_name_a_missing_one() {
        for mode in [Durability::Files, Durability::Filesystem] {
            let d = tmpdir(&format!("{mode:?}"));
            let mut b = DurableBatch::with_mode(mode);
            for i in 0..40 {
                let p = d.join("sub").join(format!("f{i}"));
                std::fs::write(&p, b"data").unwrap();
                b.file(p);
            }
            b.dir(&d);
            b.sync().unwrap();
            let missing = d.join("sub").join("gone");
            b.file(&missing);
            let err = b.sync().unwrap_err();
            assert!(matches!(&err, Error::Io { path, .. } if path.contains("gone")), "{mode:?}: {err}");
            std::fs::remove_dir_all(&d).unwrap();
        }
    }
}
