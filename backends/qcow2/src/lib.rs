//! In-process work on qcow2 disk layers, shared by the QEMU and libvirt backends of stagecore.
//!
//! # The layer model
//!
//! A disk is a *chain* of image files. Reads go to the top file; a cluster the top does not
//! allocate is read from its backing file, and so on down to the base:
//!
//! ```text
//!   base (production's disk, read-only)  ←  baseline layer  ←  top overlay (written by the guest)
//! ```
//!
//! * Taking a **baseline** of a running disk puts a new empty overlay on top of it; the file
//!   below becomes the read-only baseline layer, frozen at that instant.
//! * A **linked clone** is one more empty overlay on a frozen layer: [`create_overlay`] writes its
//!   header in-process (no `qemu-img` spawn), durably and atomically.
//! * **Disk drift** is the allocation of the layers above the baseline: [`changed_since`] reads
//!   the L1 table and only the allocated L2 tables of each such layer, so it costs O(changed),
//!   not O(disk size). [`allocated_extents`] gives one layer's own allocation.
//! * A **full clone** flattens what a chain allocates into one new independent file:
//!   [`copy_allocated`].
//! * [`read_at`], [`write_at`] and [`digest`] work on guest-visible content through the chain.
//!
//! No QEMU process is involved. All functions are blocking file I/O; [`create_overlay`],
//! [`info`], [`chain`], [`allocated_extents`] and [`changed_since`] finish in well under a
//! millisecond on metadata in the page cache, while [`copy_allocated`] and [`digest`] move data
//! and belong in `tokio::task::spawn_blocking` when called from async code.
//!
//! Errors are [`stagecore::Error`]: `NotFound` for a missing image or backing file (naming it),
//! `AlreadyExists` when a destination exists, `InvalidSpec { path: <file>, .. }` for a corrupt
//! or non-qcow2 image, `NotSupported` for qcow2 features this crate does not handle (encryption,
//! external data files, subclusters, zstd), `Backend { backend: "qcow2" }` for other I/O errors.

mod chain;
mod copy;
mod create;
mod error;
mod header;
mod layer;
mod publish;
mod read;
mod types;
mod write;

use std::path::Path;

use sha2::{Digest as _, Sha256};
use stagecore::Result;

pub use types::{CopyStats, Extent, ImageFormat, ImageInfo};

use chain::Chain;
use types::merge_extents;

/// Creates a qcow2 overlay at `path` whose backing file is `backing` (an absolute path, in
/// `backing_format`), without spawning `qemu-img`.
///
/// The virtual size defaults to the backing file's. The file is written under a temporary name,
/// fdatasync'ed, hard-linked into place and the directory fsync'ed: after `Ok` it survives a
/// crash, and a failure leaves nothing behind. Fails with `AlreadyExists` if `path` exists,
/// `NotFound` if `backing` does not, `InvalidSpec` for a relative backing path, a bad size, or a
/// backing file declared qcow2 that is not.
#[tracing::instrument(level = "debug", skip_all, fields(path = %path.display(), backing = %backing.display()))]
pub fn create_overlay(
    path: &Path,
    backing: &Path,
    backing_format: ImageFormat,
    virtual_size: Option<u64>,
) -> Result<()> {
    create::create_overlay(path, backing, backing_format, virtual_size)
}

/// Reads the qcow2 header of `path`: format, virtual size, cluster size, backing file and format.
///
/// A file that is not a valid qcow2 image (raw, garbage, truncated) gives `InvalidSpec` whose
/// `path` is the file and whose `reason` says what is wrong.
#[tracing::instrument(level = "debug", skip_all, fields(path = %path.display()))]
pub fn info(path: &Path) -> Result<ImageInfo> {
    chain::describe(path)
}

/// Describes every layer of the chain of the qcow2 image `top`, top first.
///
/// Backing files without a recorded format are probed (qcow2 magic, else raw). A missing backing
/// file is `NotFound` naming it; a chain that loops is `InvalidSpec`.
#[tracing::instrument(level = "debug", skip_all, fields(top = %top.display()))]
pub fn chain(top: &Path) -> Result<Vec<ImageInfo>> {
    Chain::open(top, false)?.infos()
}

/// Guest ranges allocated in the qcow2 image `path` itself (not its backing files): data,
/// compressed and zero clusters, sorted and merged.
#[tracing::instrument(level = "debug", skip_all, fields(path = %path.display()))]
pub fn allocated_extents(path: &Path) -> Result<Vec<Extent>> {
    let file = layer::open_file(path, false)?;
    layer::Qcow2Layer::from_file(path, file)?.allocated()
}

/// What changed since `base`: the union of the allocation of every layer from `top` down to,
/// excluding, `base`. `base` must be a file of `top`'s chain (compared by identity, so any path
/// to it works), else `InvalidSpec`. `changed_since(x, x)` is empty.
#[tracing::instrument(level = "debug", skip_all, fields(top = %top.display(), base = %base.display()))]
pub fn changed_since(top: &Path, base: &Path) -> Result<Vec<Extent>> {
    let mut chain = Chain::open(top, false)?;
    let floor = chain.index_of(base)?;
    let mut all = Vec::new();
    for l in &mut chain.layers[..floor] {
        all.extend(l.allocated()?);
    }
    Ok(merge_extents(all))
}

/// Full clone: writes a new qcow2 image at `dest` that reads exactly like `src_top`, copying
/// only clusters allocated in the layers from `src_top` down to, excluding, `stop_at`.
///
/// * `stop_at: None` flattens the whole chain; `dest` depends on no other file.
/// * `stop_at: Some(layer)` (a file of the chain) copies only the layers above it and makes
///   `layer` (absolute path) the backing file of `dest` — e.g. a clone that shares the read-only
///   production base but not the stage's own layers.
///
/// Data moves with `copy_file_range` (in-kernel copy; shared extents where the filesystem
/// reflinks). The result is synced and published atomically; on any error (ENOSPC included)
/// nothing is left at or next to `dest`. `AlreadyExists` if `dest` exists.
#[tracing::instrument(level = "debug", skip_all, fields(src = %src_top.display(), dest = %dest.display()))]
pub fn copy_allocated(src_top: &Path, stop_at: Option<&Path>, dest: &Path) -> Result<CopyStats> {
    copy::copy_allocated(src_top, stop_at, dest)
}

/// Reads guest-visible bytes at `offset` of the chain of `top` into `buf`.
///
/// `offset + buf.len()` must lie within the virtual size (`InvalidSpec` otherwise).
#[tracing::instrument(level = "trace", skip_all, fields(top = %top.display(), offset, len = buf.len()))]
pub fn read_at(top: &Path, offset: u64, buf: &mut [u8]) -> Result<()> {
    Chain::open(top, false)?.read(offset, buf)
}

/// Writes `data` at guest `offset` into the top qcow2 layer `top`, allocating clusters there
/// (copy-on-write from the backing chain for partly written clusters). For tests and tools:
/// not synced, and refused for images with internal snapshots or encryption.
#[tracing::instrument(level = "debug", skip_all, fields(top = %top.display(), offset, len = data.len()))]
pub fn write_at(top: &Path, offset: u64, data: &[u8]) -> Result<()> {
    write::write_at(top, offset, data)
}

/// SHA-256 of the whole guest-visible content of the chain of `top` (virtual size bytes).
///
/// Two chains with equal digests read the same; used to prove that staging never changes what
/// production's guests read.
#[tracing::instrument(level = "debug", skip_all, fields(top = %top.display()))]
pub fn digest(top: &Path) -> Result<[u8; 32]> {
    let mut chain = Chain::open(top, false)?;
    let size = chain.layers[0].virtual_size();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        chain.read(off, &mut buf[..n])?;
        hasher.update(&buf[..n]);
        off += n as u64;
    }
    Ok(hasher.finalize().into())
}
