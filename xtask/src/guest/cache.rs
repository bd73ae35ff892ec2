//! The artifact cache: `/var/cache/stagecore/guest-image/<key>/` (or `$STAGECORE_GUEST_CACHE`),
//! built in a temporary sibling `.tmp-<key>-<pid>` and renamed into place, so a key directory is
//! either complete or absent. `current` is a symlink to the newest key; a lock file serialises
//! builds; old keys are pruned (the newest [`KEEP`] stay, and whatever `current` names).
//!
//! Removing a temporary directory first detaches any mount left under it (an interrupted
//! mmdebstrap can leave proc/sys/dev mounted in the rootfs), and refuses to delete through one.

use std::fs::{self, File};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use crate::run::{Failure, Result};

/// Default cache root.
pub(crate) const DEFAULT_ROOT: &str = "/var/cache/stagecore/guest-image";

/// Key directories kept by [`prune`].
pub(crate) const KEEP: usize = 2;

/// Files a complete artifact directory holds (besides `debs/`).
pub(crate) const REQUIRED: &[&str] =
    &["base.qcow2", "vmlinuz", "initrd.img", "cmdline", "packages.txt", "manifest.json"];

/// Length of the key prefix used as the directory name.
pub(crate) const DIR_KEY_LEN: usize = 16;

/// The cache root: `$STAGECORE_GUEST_CACHE` or [`DEFAULT_ROOT`].
pub(crate) fn root() -> PathBuf {
    std::env::var_os("STAGECORE_GUEST_CACHE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT))
}

/// The directory of a key.
pub(crate) fn key_dir(root: &Path, key: &str) -> PathBuf {
    root.join(&key[..DIR_KEY_LEN.min(key.len())])
}

/// Whether `dir` holds a complete artifact.
pub(crate) fn complete(dir: &Path) -> bool {
    REQUIRED.iter().all(|f| dir.join(f).is_file()) && dir.join("debs").is_dir()
}

/// An exclusive lock on `<root>/.lock`, held until dropped.
pub(crate) struct Lock(#[allow(dead_code)] File);

/// Takes the build lock (blocks while another build holds it).
pub(crate) fn lock(root: &Path) -> Result<Lock> {
    fs::create_dir_all(root).map_err(|e| fail("create", root, e))?;
    let path = root.join(".lock");
    let file =
        File::options().create(true).truncate(false).write(true).open(&path).map_err(|e| fail("open", &path, e))?;
    file.lock().map_err(|e| fail("lock", &path, e))?;
    Ok(Lock(file))
}

/// A temporary build directory, removed (mounts detached first) unless [`TempBuild::commit`]ted.
pub(crate) struct TempBuild {
    path: Option<PathBuf>,
}

impl TempBuild {
    /// Creates `<root>/.tmp-<key>-<pid>` (removing a leftover of the same name).
    pub(crate) fn new(root: &Path, key: &str) -> Result<TempBuild> {
        let path = root.join(format!(".tmp-{}-{}", &key[..DIR_KEY_LEN.min(key.len())], std::process::id()));
        if path.symlink_metadata().is_ok() {
            remove_tree(&path)?;
        }
        fs::create_dir(&path).map_err(|e| fail("create", &path, e))?;
        Ok(TempBuild { path: Some(path) })
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new("/nonexistent"))
    }

    /// Renames the directory to `dest` atomically. If `dest` appeared meanwhile, the new copy is dropped.
    pub(crate) fn commit(mut self, dest: &Path) -> Result<()> {
        let path = self.path.take().unwrap_or_default();
        if complete(dest) {
            return remove_tree(&path);
        }
        if dest.symlink_metadata().is_ok() {
            remove_tree(dest)?;
        }
        fs::rename(&path, dest)
            .map_err(|e| Failure(format!("guest-image: rename {} -> {}: {e}", path.display(), dest.display())))
    }
}

impl Drop for TempBuild {
    fn drop(&mut self) {
        if let Some(path) = self.path.take()
            && let Err(e) = remove_tree(&path)
        {
            eprintln!("guest-image: warning: could not remove {}: {e}", path.display());
        }
    }
}

/// Mount points at or under `dir`, deepest first (from `/proc/self/mountinfo`).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found.dedup();
    found
}

/// Removes a directory tree, first lazily unmounting anything mounted inside it; refuses to
/// remove while a mount remains.
pub(crate) fn remove_tree(dir: &Path) -> Result<()> {
    for m in mounts_under(dir) {
        let _ = Command::new("umount").arg("-l").arg(&m).status();
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        return Err(Failure(format!(
            "guest-image: not removing {}: still mounted inside: {}",
            dir.display(),
            left.iter().map(|m| m.display().to_string()).collect::<Vec<_>>().join(", ")
        )));
    }
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(fail("remove", dir, e)),
    }
}

/// Points `<root>/current` at `dir_name` (a relative symlink, replaced atomically by rename).
pub(crate) fn set_current(root: &Path, dir_name: &str) -> Result<()> {
    let current = root.join("current");
    if fs::read_link(&current).is_ok_and(|t| t == Path::new(dir_name)) {
        return Ok(());
    }
    let tmp = root.join(format!(".current-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    symlink(dir_name, &tmp).map_err(|e| fail("symlink", &tmp, e))?;
    fs::rename(&tmp, &current).map_err(|e| fail("rename over", &current, e))
}

/// Removes temporary directories left by interrupted builds (a killed process runs no destructors).
/// Call with the lock held: then no build is running.
pub(crate) fn remove_stale(root: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(root).map_err(|e| fail("list", root, e))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // `.current-<pid>` is made without the lock (on cache hits): only a dead process's is stale.
        let dead_link = name.strip_prefix(".current-").is_some_and(|pid| !Path::new("/proc").join(pid).exists());
        if name.starts_with(".tmp-") || dead_link {
            let path = entry.path();
            if path.is_dir() && !path.is_symlink() {
                remove_tree(&path)?;
            } else {
                fs::remove_file(&path).map_err(|e| fail("remove", &path, e))?;
            }
            removed.push(path);
        }
    }
    Ok(removed)
}

/// Removes stale temporary directories (call with the lock held) and all but the newest
/// [`KEEP`] key directories, never the one `current` names.
pub(crate) fn prune(root: &Path) -> Result<Vec<PathBuf>> {
    let current = fs::read_link(root.join("current")).ok();
    let mut keys: Vec<(SystemTime, PathBuf)> = Vec::new();
    let mut removed = remove_stale(root)?;
    for entry in fs::read_dir(root).map_err(|e| fail("list", root, e))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !name.starts_with('.') && name != "current" && path.is_dir() && !path.is_symlink() {
            let built =
                fs::metadata(path.join("manifest.json")).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            keys.push((built, path));
        }
    }
    keys.sort_by_key(|k| std::cmp::Reverse(k.0));
    for (_, path) in keys.into_iter().skip(KEEP) {
        if current.as_deref().is_some_and(|c| path.file_name() == Some(c.as_os_str())) {
            continue;
        }
        remove_tree(&path)?;
        removed.push(path);
    }
    Ok(removed)
}

fn fail(what: &str, path: &Path, e: std::io::Error) -> Failure {
    Failure(format!("guest-image: cache: {what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_artifact(dir: &Path) {
        fs::create_dir_all(dir.join("debs")).unwrap();
        for f in REQUIRED {
            fs::write(dir.join(f), "x").unwrap();
        }
    }

    #[test]
    fn temp_build_is_removed_unless_committed_and_commit_is_a_rename() {
        let tmp = tempfile::tempdir().unwrap();
        let key = "0123456789abcdef0123";
        {
            let build = TempBuild::new(tmp.path(), key).unwrap();
            fs::write(build.path().join("partial"), "x").unwrap();
            assert!(build.path().exists());
        }
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0, "dropped build left files");
        let build = TempBuild::new(tmp.path(), key).unwrap();
        fake_artifact(build.path());
        let dest = key_dir(tmp.path(), key);
        build.commit(&dest).unwrap();
        assert!(complete(&dest));
        assert_eq!(dest.file_name().unwrap(), "0123456789abcdef");
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn current_is_replaced_atomically_and_prune_keeps_newest_and_current() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for (i, name) in ["aaaa", "bbbb", "cccc", "dddd"].iter().enumerate() {
            fake_artifact(&root.join(name));
            let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000 + i as u64 * 10);
            File::options().write(true).open(root.join(name).join("manifest.json")).unwrap().set_modified(t).unwrap();
        }
        fs::create_dir(root.join(".tmp-dead-1")).unwrap();
        set_current(root, "aaaa").unwrap();
        set_current(root, "aaaa").unwrap();
        assert_eq!(fs::read_link(root.join("current")).unwrap(), Path::new("aaaa"));
        let removed = prune(root).unwrap();
        let mut left: Vec<_> =
            fs::read_dir(root).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["aaaa", "cccc", "current", "dddd"], "removed {removed:?}");
        set_current(root, "dddd").unwrap();
        assert_eq!(fs::read_link(root.join("current")).unwrap(), Path::new("dddd"));
        assert!(root.join("current").join("manifest.json").is_file());
    }

    #[test]
    fn incomplete_directories_are_not_artifacts() {
        let tmp = tempfile::tempdir().unwrap();
        fake_artifact(tmp.path());
        assert!(complete(tmp.path()));
        fs::remove_file(tmp.path().join("initrd.img")).unwrap();
        assert!(!complete(tmp.path()));
    }
}
