//! Image layer operations: the ONE place that touches image files.
//!
//! qcow2 work (overlays, headers, chains, allocation maps, allocated-only copies, guest reads,
//! writes and digests) goes through the shared in-process crate `stagecore-qcow2`, the same code
//! the QEMU backend uses. Raw files (production disks created or attached as `raw`) are plain
//! files: read, written and hashed here with positional I/O. Nothing spawns `qemu-img`: new empty
//! images come from `stagecore_qcow2::create_empty` too. [`make_dir`] makes the
//! directories these files live in.
//!
//! All functions block; callers run them on `spawn_blocking` (or inside a `Conn::run` closure).
//! Reads open files read-only and work on images a running QEMU holds; writes are only made to
//! images no QEMU has open (callers check the domain is shut off).
//!
//! Ownership: new files are root-owned 0644 like `qemu-img`'s were; libvirt's DAC driver chowns a
//! domain's whole chain to `libvirt-qemu` when it starts and gives it back when it stops, so QEMU
//! can open them read/write (proved by the live tests, which start domains on such files).

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use stagecore::extent::Extent;
use stagecore::{Error, Result};
use stagecore_qcow2::ImageFormat;

use crate::error;

/// What the header of one image says (only what this crate needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ImageInfo {
    /// qcow2 or raw.
    pub(crate) format: ImageFormat,
    /// Virtual size in bytes.
    pub(crate) virtual_size: u64,
}

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

fn open(path: &Path, write: bool) -> Result<File> {
    std::fs::OpenOptions::new().read(true).write(write).open(path).map_err(|e| error::io(path, e))
}

/// The format of `path`: qcow2 when it starts with qcow2's magic, else raw (what qemu probes).
pub(crate) fn format(path: &Path) -> Result<ImageFormat> {
    let f = open(path, false)?;
    let mut magic = [0u8; 4];
    let is_qcow2 = f.read_exact_at(&mut magic, 0).is_ok() && magic == QCOW2_MAGIC;
    Ok(if is_qcow2 { ImageFormat::Qcow2 } else { ImageFormat::Raw })
}

/// Creates an empty image of `format` (`qcow2` or `raw`) and `size` bytes, in-process (fails if
/// `path` exists).
pub(crate) fn create_image(path: &Path, format: &str, size: u64) -> Result<()> {
    let format: stagecore_qcow2::ImageFormat = format.parse()?;
    stagecore_qcow2::create_empty(path, format, size).map_err(error::qcow2)
}

/// Creates a directory QEMU (running as another user) can traverse.
pub(crate) fn make_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(path).map_err(|e| error::io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(|e| error::io(path, e))
}

/// Creates a qcow2 overlay at `path` over `backing` (absolute; its format is probed), in-process.
pub(crate) fn create_overlay(path: &Path, backing: &Path) -> Result<()> {
    let backing = absolute(backing)?;
    stagecore_qcow2::create_overlay(path, &backing, format(&backing)?, None).map_err(error::qcow2)
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() { Ok(p.to_path_buf()) } else { std::fs::canonicalize(p).map_err(|e| error::io(p, e)) }
}

/// Format and virtual size of one image.
pub(crate) fn info(path: &Path) -> Result<ImageInfo> {
    match format(path)? {
        ImageFormat::Qcow2 => {
            let i = stagecore_qcow2::info(path).map_err(error::qcow2)?;
            Ok(ImageInfo { format: i.format, virtual_size: i.virtual_size })
        }
        ImageFormat::Raw => {
            let len = open(path, false)?.metadata().map_err(|e| error::io(path, e))?.len();
            Ok(ImageInfo { format: ImageFormat::Raw, virtual_size: len })
        }
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Extents allocated in the layers of `top`'s chain above `base` (guest offsets) and the
/// granularity (smallest cluster size of those layers); `None` when `base` is not in the chain.
pub(crate) fn changed_since(top: &Path, base: &Path) -> Result<Option<(Vec<Extent>, u64)>> {
    if format(top)? == ImageFormat::Raw {
        return Ok(same_file(top, base).then(|| (Vec::new(), 1)));
    }
    let chain = stagecore_qcow2::chain(top).map_err(error::qcow2)?;
    let Some(depth) = chain.iter().position(|i| same_file(&i.path, base)) else { return Ok(None) };
    let granularity = chain[..depth].iter().filter_map(|i| i.cluster_size).min().unwrap_or(1);
    Ok(Some((stagecore_qcow2::changed_since(top, base).map_err(error::qcow2)?, granularity)))
}

/// Copies what `src`'s chain allocates into a new independent qcow2 image `dst`.
///
/// A raw `src` is read through a temporary qcow2 overlay (removed afterwards), so the copy is
/// still made in-process and only holds the raw file's data extents.
pub(crate) fn copy_allocated(src: &Path, dst: &Path) -> Result<()> {
    if dst.exists() {
        return Err(Error::already_exists("image", dst.display().to_string()));
    }
    let src = absolute(src)?;
    if format(&src)? == ImageFormat::Qcow2 {
        return stagecore_qcow2::copy_allocated(&src, None, dst).map(drop).map_err(error::qcow2);
    }
    let name = dst.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dst.with_file_name(format!(".{name}.raw-view.qcow2"));
    let _ = std::fs::remove_file(&tmp);
    stagecore_qcow2::create_overlay(&tmp, &src, ImageFormat::Raw, None).map_err(error::qcow2)?;
    let r = stagecore_qcow2::copy_allocated(&tmp, None, dst).map(drop).map_err(error::qcow2);
    let _ = std::fs::remove_file(&tmp);
    r
}

/// Reads `len` guest bytes at `offset` (the caller checked the range).
pub(crate) fn read_at(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    match format(path)? {
        ImageFormat::Qcow2 => stagecore_qcow2::read_at(path, offset, &mut buf).map_err(error::qcow2)?,
        ImageFormat::Raw => {
            let f = open(path, false)?;
            let mut done = 0;
            while done < buf.len() {
                match f.read_at(&mut buf[done..], offset + done as u64).map_err(|e| error::io(path, e))? {
                    0 => break, // beyond the end of a sparse-truncated file: zeros
                    n => done += n,
                }
            }
        }
    }
    Ok(buf)
}

/// Writes `data` at `offset` into the top image and syncs it. The image must not be open in a
/// QEMU (callers refuse running domains).
pub(crate) fn write_at(path: &Path, offset: u64, data: &[u8]) -> Result<()> {
    if format(path)? == ImageFormat::Qcow2 {
        stagecore_qcow2::write_at(path, offset, data).map_err(error::qcow2)?;
        return open(path, true)?.sync_data().map_err(|e| error::io(path, e));
    }
    let f = open(path, true)?;
    f.write_all_at(data, offset).and_then(|_| f.sync_data()).map_err(|e| error::io(path, e))
}

/// SHA-256 of the whole guest-visible content.
pub(crate) fn digest(path: &Path) -> Result<[u8; 32]> {
    if format(path)? == ImageFormat::Qcow2 {
        return stagecore_qcow2::digest(path).map_err(error::qcow2);
    }
    let mut f = open(path, false)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| error::io(path, e))?;
    Ok(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_and_qcow2_layers_read_write_and_copy_in_process() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("base.raw");
        std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        write_at(&raw, 4096, b"raw bytes").unwrap();
        assert_eq!(info(&raw).unwrap(), ImageInfo { format: ImageFormat::Raw, virtual_size: 1 << 20 });
        let top = dir.path().join("top.qcow2");
        create_overlay(&top, &raw).unwrap();
        assert!(matches!(create_overlay(&top, &raw), Err(Error::AlreadyExists { .. })));
        assert_eq!(read_at(&top, 4096, 9).unwrap(), b"raw bytes");
        assert_eq!(digest(&top).unwrap(), digest(&raw).unwrap(), "an empty overlay reads like its base");
        assert_eq!(changed_since(&top, &raw).unwrap(), Some((Vec::new(), 65536)));
        write_at(&top, 1 << 19, b"top").unwrap();
        let (ext, _) = changed_since(&top, &raw).unwrap().unwrap();
        assert_eq!(ext, vec![Extent { offset: 1 << 19, length: 65536 }]);
        assert_eq!(changed_since(&top, &dir.path().join("elsewhere")).unwrap(), None);
        let copy = dir.path().join("copy.qcow2");
        copy_allocated(&raw, &copy).unwrap();
        assert_eq!(digest(&copy).unwrap(), digest(&raw).unwrap(), "full copy of a raw file");
        let flat = dir.path().join("flat.qcow2");
        copy_allocated(&top, &flat).unwrap();
        assert_eq!(digest(&flat).unwrap(), digest(&top).unwrap(), "full copy of a chain");
        assert!(stagecore_qcow2::chain(&flat).unwrap().len() == 1, "the copy stands alone");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "no temp files: {leftovers:?}");
    }
}
