//! Disk image files: resolving a spec's `source`, checking an existing image, creating an empty
//! one.
//!
//! Contract: relative sources live under `root/images/` and may not climb out of it (`..`); an
//! existing source must be a readable qcow2 chain, else `InvalidSpec` at the spec field naming
//! the file; empty images are made in-process by `stagecore_qcow2::create_empty`.

use std::path::{Component, Path, PathBuf};

use stagecore::{Error, Result};
use stagecore_qcow2::Error as Q;

use crate::error::{self, qcow2};
use crate::shared::blocking;

/// The file a disk `source` names; `field` is the spec path for errors.
pub(crate) fn resolve(root: &Path, field: &str, source: &str) -> Result<PathBuf> {
    let p = Path::new(source);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    if p.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(Error::invalid(field, format!("relative source {source:?} must stay inside the images directory")));
    }
    Ok(root.join("images").join(p))
}

/// Checks that `file` is a usable qcow2 image (its whole chain readable).
pub(crate) async fn check_existing(field: &str, file: &Path) -> Result<u64> {
    let f = file.to_path_buf();
    let field = field.to_string();
    blocking(move || {
        let checked = stagecore_qcow2::info(&f).and_then(|info| stagecore_qcow2::chain(&f).map(|_| info.virtual_size));
        // A file that is not a usable qcow2 chain is a bad spec field; the message names the file.
        checked.map_err(|e| match e {
            Q::NotQcow2 { .. }
            | Q::Corrupt { .. }
            | Q::UnsupportedFeature { .. }
            | Q::BaseNotInChain { .. }
            | Q::InvalidArgument { .. } => Error::invalid(field, e.to_string()),
            other => qcow2(other),
        })
    })
    .await
}

/// Creates an empty qcow2 image of `size` bytes at `path` (parent directories included).
pub(crate) async fn create_empty(path: &Path, size: u64) -> Result<()> {
    let path = path.to_path_buf();
    blocking(move || {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| error::io("creating", dir, &e))?;
        }
        stagecore_qcow2::create_empty(&path, stagecore_qcow2::ImageFormat::Qcow2, size).map_err(qcow2)
    })
    .await
}

/// Rewrites the backing-file name in `image`'s header to `backing` (qcow2), without touching
/// data (`qemu-img rebase -u`): for a backing file that moved (same content, new name). The
/// image must not be open in a running QEMU.
pub(crate) async fn set_backing(image: &Path, backing: &Path) -> Result<()> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(backing)
        .arg(image)
        .output()
        .await
        .map_err(|e| error::binary(Path::new("qemu-img"), &e))?;
    if !out.status.success() {
        return Err(error::msg(format!(
            "qemu-img rebase -u {} onto {} failed: {}",
            image.display(),
            backing.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
