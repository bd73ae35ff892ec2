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
//! * [`seal`] records a read-only layer's metadata (header, L1, L2 and refcount tables, size,
//!   mtime) in a [`LayerSeal`]; [`verify`] proves it unchanged or names what changed.
//!   [`Seals`] keeps the seals of an environment's baseline layers (one per file): backends
//!   [`Seals::seal_chains`] when a baseline freezes layers and [`Seals::verify_chains`] before
//!   drift, staging and promotion trust them again.
//!
//! # What is read
//!
//! qcow2 v2 and v3, any cluster size, deflate- and zstd-compressed clusters, zero clusters,
//! extended L2 entries (subclusters: allocation maps and reads at 1/32-cluster granularity),
//! internal snapshots (the active L1 only), raw backing files. Not read: encryption, external
//! data files ([`Error::UnsupportedFeature`]). [`write_at`] additionally refuses extended L2,
//! internal snapshots and refcount widths other than 16 bits.
//!
//! # Errors
//!
//! The crate's own [`Error`] has variants that name the file (`NotFound`, `AlreadyExists`,
//! `NotQcow2`, `Corrupt`, `UnsupportedFeature`, `BaseNotInChain`, `InvalidArgument`,
//! `LayerChanged`, `Io`); [`Error::is_not_checked`] tells a drift engine which of them mean
//! "cannot see: NOT_CHECKED". The functions in [`typed`] return it. The functions at the crate
//! root are the same calls returning [`stagecore::Error`], mapped in one place
//! (`impl From<Error> for stagecore::Error`, table in the `error` module docs): `NotFound`,
//! `AlreadyExists`, `InvalidSpec { path: <file> }` for `NotQcow2`/`Corrupt`, `NotSupported`
//! for `UnsupportedFeature`, `InvalidSpec { path: "base" }` for `BaseNotInChain`,
//! `InvalidSpec { path: <argument> }`, `Precondition` for `LayerChanged`,
//! `Backend { backend: "qcow2" }` for `Io`.

mod alloc;
mod chain;
mod copy;
mod create;
mod error;
mod header;
mod layer;
mod publish;
mod read;
mod seal;
mod seals;
mod source;
mod types;
mod write;

pub mod typed;

use std::path::Path;

pub use alloc::CacheStats;
pub use copy::CopyJob;
pub use error::{Error, Feature, Result};
pub use seal::LayerSeal;
pub use seals::Seals;
pub use source::{ReadAt, Resolver};
pub use types::{CopyStats, Extent, ImageFormat, ImageInfo};

/// Creates a qcow2 overlay at `path` whose backing file is `backing` (an absolute path, in
/// `backing_format`), without spawning `qemu-img`.
///
/// The virtual size defaults to the backing file's. The file is written under a temporary name,
/// fdatasync'ed, hard-linked into place and the directory fsync'ed: after `Ok` it survives a
/// crash, and a failure leaves nothing behind. Fails with `AlreadyExists` if `path` exists,
/// `NotFound` if `backing` does not, `InvalidArgument` for a relative backing path or a bad
/// size, `NotQcow2` for a backing file declared qcow2 that is not.
///
/// [`typed::create_overlay`] with the error mapped into [`stagecore::Error`].
pub fn create_overlay(
    path: &Path,
    backing: &Path,
    backing_format: ImageFormat,
    virtual_size: Option<u64>,
) -> stagecore::Result<()> {
    typed::create_overlay(path, backing, backing_format, virtual_size).map_err(Into::into)
}

/// [`create_overlay`] without syncing the file or its directory: durable only once the caller
/// syncs both (e.g. with `stagecore::toolbox::DurableBatch`, many overlays at once).
///
/// [`typed::create_overlay_unsynced`] with the error mapped into [`stagecore::Error`].
pub fn create_overlay_unsynced(
    path: &Path,
    backing: &Path,
    backing_format: ImageFormat,
    virtual_size: Option<u64>,
) -> stagecore::Result<()> {
    typed::create_overlay_unsynced(path, backing, backing_format, virtual_size).map_err(Into::into)
}

/// Reads the qcow2 header of `path`: format, virtual size, cluster size, backing file and format.
///
/// A file that is not a qcow2 image (raw, garbage, too short) gives `NotQcow2`, a damaged or
/// truncated one `Corrupt`; both name the file and say what is wrong.
///
/// [`typed::info`] with the error mapped into [`stagecore::Error`].
pub fn info(path: &Path) -> stagecore::Result<ImageInfo> {
    typed::info(path).map_err(Into::into)
}

/// Describes every layer of the chain of the qcow2 image `top`, top first.
///
/// Backing files without a recorded format are probed (qcow2 magic, else raw). A missing backing
/// file is `NotFound` naming it; a chain that loops is `Corrupt`.
///
/// [`typed::chain`] with the error mapped into [`stagecore::Error`].
pub fn chain(top: &Path) -> stagecore::Result<Vec<ImageInfo>> {
    typed::chain(top).map_err(Into::into)
}

/// Guest ranges allocated in the qcow2 image `path` itself (not its backing files): data,
/// compressed and zero clusters (or subclusters, for extended L2 entries), sorted and merged.
///
/// [`typed::allocated_extents`] with the error mapped into [`stagecore::Error`].
pub fn allocated_extents(path: &Path) -> stagecore::Result<Vec<Extent>> {
    typed::allocated_extents(path).map_err(Into::into)
}

/// What changed since `base`: the union of the allocation of every layer from `top` down to,
/// excluding, `base`. `base` must be a file of `top`'s chain (compared by identity, so any path
/// to it works), else [`Error::BaseNotInChain`]. `changed_since(x, x)` is empty.
///
/// [`typed::changed_since`] with the error mapped into [`stagecore::Error`].
pub fn changed_since(top: &Path, base: &Path) -> stagecore::Result<Vec<Extent>> {
    typed::changed_since(top, base).map_err(Into::into)
}

/// Full clone: writes a new qcow2 image at `dest` that reads exactly like `src_top`, copying
/// only clusters allocated in the layers from `src_top` down to, excluding, `stop_at`.
///
/// * `stop_at: None` flattens the whole chain; `dest` depends on no other file.
/// * `stop_at: Some(layer)` (a file of the chain) copies only the layers above it and makes
///   `layer` (absolute path) the backing file of `dest` — e.g. a clone that shares the read-only
///   production base but not the stage's own layers.
///
/// Data is shared by reflink (FICLONERANGE) where the filesystem can (XFS with reflink, btrfs;
/// [`CopyStats::cloned_bytes`]), else moves with `copy_file_range` (in-kernel copy). The result
/// is synced and published atomically; on any error (ENOSPC included) nothing is left at or next
/// to `dest`. `AlreadyExists` if `dest` exists. Many copies in parallel:
/// [`copy_allocated_many`].
///
/// [`typed::copy_allocated`] with the error mapped into [`stagecore::Error`].
pub fn copy_allocated(src_top: &Path, stop_at: Option<&Path>, dest: &Path) -> stagecore::Result<CopyStats> {
    typed::copy_allocated(src_top, stop_at, dest).map_err(Into::into)
}

/// Many full copies, at most `parallelism` at a time: one [`copy_allocated`] result per job, in
/// order; a failed job leaves nothing at its `dest` and does not stop the others.
///
/// [`typed::copy_allocated_many`] with the errors mapped into [`stagecore::Error`].
pub fn copy_allocated_many(jobs: &[CopyJob], parallelism: usize) -> Vec<stagecore::Result<CopyStats>> {
    typed::copy_allocated_many(jobs, parallelism).into_iter().map(|r| r.map_err(Into::into)).collect()
}

/// Reads guest-visible bytes at `offset` of the chain of `top` into `buf`.
///
/// `offset + buf.len()` must lie within the virtual size (`InvalidArgument` otherwise).
///
/// [`typed::read_at`] with the error mapped into [`stagecore::Error`].
pub fn read_at(top: &Path, offset: u64, buf: &mut [u8]) -> stagecore::Result<()> {
    typed::read_at(top, offset, buf).map_err(Into::into)
}

/// Writes `data` at guest `offset` into the top qcow2 layer `top`, allocating clusters there
/// (copy-on-write from the backing chain for partly written clusters). For tests and tools:
/// not synced, and refused (`UnsupportedFeature`) for images with internal snapshots,
/// encryption, extended L2 entries or a refcount width other than 16 bits.
///
/// [`typed::write_at`] with the error mapped into [`stagecore::Error`].
pub fn write_at(top: &Path, offset: u64, data: &[u8]) -> stagecore::Result<()> {
    typed::write_at(top, offset, data).map_err(Into::into)
}

/// SHA-256 of the whole guest-visible content of the chain of `top` (virtual size bytes).
///
/// Two chains with equal digests read the same; used to prove that staging never changes what
/// production's guests read.
///
/// [`typed::digest`] with the error mapped into [`stagecore::Error`].
pub fn digest(top: &Path) -> stagecore::Result<[u8; 32]> {
    typed::digest(top).map_err(Into::into)
}

/// Seals the layer `path` (qcow2 or raw): size, mtime and, for qcow2, SHA-256 of cluster 0, the
/// L1 table, the L2 tables it references and the refcount table. Reads metadata only (cost like
/// [`changed_since`] on the layer, not the data). Take it when the layer becomes read-only
/// (a baseline) and check it with [`verify`] before trusting the layer again.
///
/// [`typed::seal`] with the error mapped into [`stagecore::Error`].
pub fn seal(path: &Path) -> stagecore::Result<LayerSeal> {
    typed::seal(path).map_err(Into::into)
}

/// Checks that `path` still matches `seal`: `Ok(())`, or [`Error::LayerChanged`] naming the
/// first difference (size, header, L1, L2, refcount table, modification time). A layer that
/// was rewritten behind our back (an internal-snapshot revert, a plain write) fails here.
///
/// [`typed::verify`] with the error mapped into [`stagecore::Error`].
pub fn verify(path: &Path, seal: &LayerSeal) -> stagecore::Result<()> {
    typed::verify(path, seal).map_err(Into::into)
}
