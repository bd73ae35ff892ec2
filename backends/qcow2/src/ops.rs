//! The crate's operations (re-exported at the crate root), each returning the crate's own
//! [`Error`](crate::Error): match on its variants (`BaseNotInChain`, `UnsupportedFeature`,
//! `LayerChanged`, …), and map it into [`stagecore::Error`] with
//! [`Error::into_core`](crate::Error::into_core) and the caller's backend name.

use std::path::Path;

use sha2::{Digest as _, Sha256};

use crate::alloc::{self, CacheStats};
use crate::chain::{self as chain_mod, Chain};
use crate::copy::{self, CopyJob};
use crate::error::Result;
use crate::seal::{self as seal_mod, LayerSeal};
use crate::source::Resolver;
use crate::types::{CopyStats, Extent, ImageFormat, ImageInfo};
use crate::{create, layer, write};

/// Creates a qcow2 overlay at `path` whose backing file is `backing` (an absolute path, in
/// `backing_format`), without spawning `qemu-img`.
///
/// The virtual size defaults to the backing file's. The file is written under a temporary name,
/// fdatasync'ed, hard-linked into place and the directory fsync'ed: after `Ok` it survives a
/// crash, and a failure leaves nothing behind. Fails with `AlreadyExists` if `path` exists,
/// `NotFound` if `backing` does not, `InvalidArgument` for a relative backing path or a bad
/// size, `NotQcow2` for a backing file declared qcow2 that is not.
#[tracing::instrument(level = "debug", skip_all, fields(path = %path.display(), backing = %backing.display()))]
pub fn create_overlay(
    path: &Path,
    backing: &Path,
    backing_format: ImageFormat,
    virtual_size: Option<u64>,
) -> Result<()> {
    create::create_overlay(path, backing, backing_format, virtual_size, create::Sync::Durable)
}

/// [`create_overlay`] without its two syncs and without the temporary name: the file is written
/// at `path` itself (never over an existing file: `AlreadyExists`; a failure removes it again),
/// and it is durable only once the caller has `fdatasync`ed it and `fsync`ed its directory — for
/// callers that create many overlays in a directory of their own and publish them together by
/// their own commit point (a record written after `stagecore::toolbox::DurableBatch` made them
/// durable). A process killed while writing leaves a partial file at `path`: such callers
/// remove files no record names (the link and unlink of a temporary name cost more than the
/// overlay itself).
#[tracing::instrument(level = "debug", skip_all, fields(path = %path.display(), backing = %backing.display()))]
pub fn create_overlay_unsynced(
    path: &Path,
    backing: &Path,
    backing_format: ImageFormat,
    virtual_size: Option<u64>,
) -> Result<()> {
    create::create_overlay(path, backing, backing_format, virtual_size, create::Sync::Deferred)
}

/// Creates an empty image of `size` bytes at `path` without spawning `qemu-img`: a qcow2 image
/// without a backing file (the layout `qemu-img create -f qcow2` writes; size 0 allowed), or a
/// sparse raw file.
///
/// Published like [`create_overlay`]: durable after `Ok`, nothing left behind on failure,
/// `AlreadyExists` if `path` exists, `InvalidArgument` for a size that is not a multiple of 512.
#[tracing::instrument(level = "debug", skip_all, fields(path = %path.display(), size))]
pub fn create_empty(path: &Path, format: ImageFormat, size: u64) -> Result<()> {
    create::create_empty(path, format, size)
}

/// Reads the qcow2 header of `path`: format, virtual size, cluster size, backing file and format.
///
/// A file that is not a qcow2 image (raw, garbage, too short) gives `NotQcow2`, a damaged or
/// truncated one `Corrupt`; both name the file and say what is wrong.
#[tracing::instrument(level = "debug", skip_all, fields(path = %path.display()))]
pub fn info(path: &Path) -> Result<ImageInfo> {
    chain_mod::describe(None, path)
}

/// Describes every layer of the chain of the qcow2 image `top`, top first.
///
/// Backing files without a recorded format are probed (qcow2 magic, else raw). A missing backing
/// file is `NotFound` naming it; a chain that loops is `Corrupt`.
#[tracing::instrument(level = "debug", skip_all, fields(top = %top.display()))]
pub fn chain(top: &Path) -> Result<Vec<ImageInfo>> {
    Chain::open(top, false)?.infos()
}

/// Guest ranges allocated in the qcow2 image `path` itself (not its backing files): data,
/// compressed and zero clusters (or subclusters, for extended L2 entries), sorted and merged.
#[tracing::instrument(level = "debug", skip_all, fields(path = %path.display()))]
pub fn allocated_extents(path: &Path) -> Result<Vec<Extent>> {
    let file = layer::open_file(path, false)?;
    layer::Qcow2Layer::from_file(path, file)?.allocated()
}

/// What changed since `base`: the union of the allocation of every layer from `top` down to,
/// excluding, `base`. `base` must be a file of `top`'s chain (compared by identity, so any path
/// to it works), else [`Error::BaseNotInChain`](crate::Error::BaseNotInChain).
/// `changed_since(x, x)` is empty.
///
/// Only the layers from `top` down to `base` are opened. The maps of backing layers (read-only
/// by the qcow2 contract) are cached process-wide, keyed by device, inode, size, mtime, ctime and
/// a hash of the first 4 KiB, so a report over a deep chain reads each unchanged backing layer
/// once ([`allocation_cache_stats`]); the top is always read afresh.
#[tracing::instrument(level = "debug", skip_all, fields(top = %top.display(), base = %base.display()))]
pub fn changed_since(top: &Path, base: &Path) -> Result<Vec<Extent>> {
    alloc::changed_since(None, top, base)
}

/// [`info`] of `top` and [`changed_since`]`(top, base)` with the top opened once: the outer
/// error when `top` itself cannot be described (as [`info`]), the inner one when only the
/// changes cannot be read (as [`changed_since`], e.g. `BaseNotInChain`). For drift over many
/// disks, where a second open of every top per report adds up.
#[tracing::instrument(level = "debug", skip_all, fields(top = %top.display(), base = %base.display()))]
pub fn info_and_changed_since(top: &Path, base: &Path) -> Result<(ImageInfo, Result<Vec<Extent>>)> {
    alloc::info_and_changed_since(top, base)
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

/// Many full copies at once ([`copy_allocated`] per job), at most `parallelism` at a time on
/// scoped threads (the disks of a stage's machines: their data copies and syncs overlap). One
/// result per job, in order; a failed job leaves nothing at its `dest` and does not stop the
/// others. `parallelism` 0 is taken as 1.
#[tracing::instrument(level = "debug", skip_all, fields(jobs = jobs.len(), parallelism))]
pub fn copy_allocated_many(jobs: &[CopyJob], parallelism: usize) -> Vec<Result<CopyStats>> {
    copy::copy_allocated_many(jobs, parallelism)
}

/// Reads guest-visible bytes at `offset` of the chain of `top` into `buf`.
///
/// `offset + buf.len()` must lie within the virtual size (`InvalidArgument` otherwise).
#[tracing::instrument(level = "trace", skip_all, fields(top = %top.display(), offset, len = buf.len()))]
pub fn read_at(top: &Path, offset: u64, buf: &mut [u8]) -> Result<()> {
    Chain::open(top, false)?.read(offset, buf)
}

/// Writes `data` at guest `offset` into the top qcow2 layer `top`, allocating clusters there
/// (copy-on-write from the backing chain for partly written clusters). For tests and tools:
/// not synced, and refused (`UnsupportedFeature`) for images with internal snapshots,
/// encryption, extended L2 entries or a refcount width other than 16 bits.
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
    digest_chain(&mut chain)
}

fn digest_chain(chain: &mut Chain) -> Result<[u8; 32]> {
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

/// Seals the layer `path` (qcow2 or raw): size, mtime and, for qcow2, SHA-256 of cluster 0, the
/// L1 table, the L2 tables it references and the refcount table. Reads metadata only (cost like
/// [`changed_since`] on the layer, not the data). Take it when the layer becomes read-only
/// (a baseline) and check it with [`verify`] before trusting the layer again.
#[tracing::instrument(level = "debug", skip_all, fields(path = %path.display()))]
pub fn seal(path: &Path) -> Result<LayerSeal> {
    seal_mod::seal(path)
}

/// Checks that `path` still matches `seal`: `Ok(())`, or
/// [`Error::LayerChanged`](crate::Error::LayerChanged) naming the first difference (size,
/// header, L1, L2, refcount table, modification time). A layer that
/// was rewritten behind our back (an internal-snapshot revert, a plain write) fails here.
/// Repeated checks of a file whose inode did not change since a full check (same size, mtime
/// and ctime) cost one `stat` (see the `seal` module docs).
#[tracing::instrument(level = "debug", skip_all, fields(path = %path.display()))]
pub fn verify(path: &Path, seal: &LayerSeal) -> Result<()> {
    seal_mod::verify(path, seal)
}

// The same reads over any byte source: every image (the top and each backing file, by the path
// the chain names) is opened through a [`Resolver`], never from the local filesystem. Identity
// (for `base` and loop detection) is the path as the chain names it.

/// [`info`] of an image opened through `resolver`.
#[tracing::instrument(level = "debug", skip_all, fields(path = %path.display()))]
pub fn info_in(resolver: &dyn Resolver, path: &Path) -> Result<ImageInfo> {
    chain_mod::describe(Some(resolver), path)
}

/// [`chain`] with every layer opened through `resolver`.
#[tracing::instrument(level = "debug", skip_all, fields(top = %top.display()))]
pub fn chain_in(resolver: &dyn Resolver, top: &Path) -> Result<Vec<ImageInfo>> {
    Chain::open_in(Some(resolver), top, false)?.infos()
}

/// [`allocated_extents`] of an image opened through `resolver`: reads the header, the L1 table
/// and the allocated L2 tables only.
#[tracing::instrument(level = "debug", skip_all, fields(path = %path.display()))]
pub fn allocated_extents_in(resolver: &dyn Resolver, path: &Path) -> Result<Vec<Extent>> {
    let file = layer::open_source(Some(resolver), path, false)?;
    layer::Qcow2Layer::from_source(path, file)?.allocated()
}

/// [`changed_since`] over layers opened through `resolver`; `base` is matched by path against
/// the backing names of the chain (as resolved). Reads metadata only: O(changed).
#[tracing::instrument(level = "debug", skip_all, fields(top = %top.display(), base = %base.display()))]
pub fn changed_since_in(resolver: &dyn Resolver, top: &Path, base: &Path) -> Result<Vec<Extent>> {
    alloc::changed_since(Some(resolver), top, base)
}

/// [`seal`] of a layer opened through `resolver` (qcow2 or raw): the same hashes of header, L1,
/// L2 and refcount tables and the size, but no modification time (`mtime_ns: None`): a
/// metadata-only seal. Every change that allocates, frees, snapshots, reverts, rebases, resizes
/// or rewrites a header is caught; an in-place overwrite of an already allocated data cluster is
/// not (over a resolver nothing records that a file was written).
#[tracing::instrument(level = "debug", skip_all, fields(path = %path.display()))]
pub fn seal_in(resolver: &dyn Resolver, path: &Path) -> Result<LayerSeal> {
    seal_mod::seal_in(resolver, path)
}

/// [`verify`] of a layer opened through `resolver`: reads its metadata again every time (no
/// cache) and compares it with `seal` — size and hashes; a modification time in `seal` (a seal
/// taken of a local file) is not checked, a resolver has none.
#[tracing::instrument(level = "debug", skip_all, fields(path = %path.display()))]
pub fn verify_in(resolver: &dyn Resolver, path: &Path, seal: &LayerSeal) -> Result<()> {
    seal_mod::verify_in(resolver, path, seal)
}

/// [`read_at`] through `resolver`.
#[tracing::instrument(level = "trace", skip_all, fields(top = %top.display(), offset, len = buf.len()))]
pub fn read_at_in(resolver: &dyn Resolver, top: &Path, offset: u64, buf: &mut [u8]) -> Result<()> {
    Chain::open_in(Some(resolver), top, false)?.read(offset, buf)
}

/// [`write_at`] through `resolver` (the top is opened for writing; its source must implement
/// [`ReadAt::write_all_at`](crate::ReadAt::write_all_at) and
/// [`ReadAt::set_len`](crate::ReadAt::set_len)).
#[tracing::instrument(level = "debug", skip_all, fields(top = %top.display(), offset, len = data.len()))]
pub fn write_at_in(resolver: &dyn Resolver, top: &Path, offset: u64, data: &[u8]) -> Result<()> {
    write::write_at_in(Some(resolver), top, offset, data)
}

/// [`digest`] through `resolver`.
#[tracing::instrument(level = "debug", skip_all, fields(top = %top.display()))]
pub fn digest_in(resolver: &dyn Resolver, top: &Path) -> Result<[u8; 32]> {
    let mut chain = Chain::open_in(Some(resolver), top, false)?;
    digest_chain(&mut chain)
}

/// Counters of the process-wide allocation-map cache that [`changed_since`] keeps for backing
/// (read-only) layers of local files.
pub fn allocation_cache_stats() -> CacheStats {
    alloc::stats()
}

/// Empties the allocation-map cache (for callers that rewrite backing layers in place, which the
/// cache would otherwise notice only by size, timestamps or header).
pub fn clear_allocation_cache() {
    alloc::clear()
}

#[cfg(test)]
mod tests;
