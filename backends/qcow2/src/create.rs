//! Creating images in-process: a qcow2 overlay or an empty qcow2 image (header, one refcount
//! table cluster, one refcount block and an all-zero L1 table) or an empty sparse raw file,
//! published atomically and durably.
//!
//! Contract: a new qcow2 file has the layout `qemu-img create -f qcow2 [-b ...]` produces
//! (header at cluster 0, refcount table at 1, refcount block at 2, L1 from 3), passes
//! `qemu-img check`, and never replaces an existing file.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::chain::backing_size;
use crate::error::{Result, ctx, invalid};
use crate::header::{NewHeader, encode_v3};
use crate::publish::Staged;
use crate::types::ImageFormat;

/// Cluster size of images this crate creates (qemu's default).
pub(crate) const CLUSTER_BITS: u32 = 16;

/// Largest virtual size accepted (qemu's limit for 64 KiB clusters is far above; 64 TiB is sane).
const MAX_SIZE: u64 = 1 << 46;

/// Checks a virtual size and returns the number of L1 entries it needs.
pub(crate) fn l1_entries_for(path: &Path, size: u64) -> Result<u64> {
    if size == 0 || !size.is_multiple_of(512) || size > MAX_SIZE {
        return Err(invalid(
            path,
            "virtual_size",
            format!("{size} must be a non-zero multiple of 512 up to {MAX_SIZE}"),
        ));
    }
    let cs = 1u64 << CLUSTER_BITS;
    Ok(size.div_ceil(cs * (cs / 8)))
}

/// Whether a new file is synced before [`create_overlay`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sync {
    /// fdatasync the file and fsync its directory.
    Durable,
    /// Neither: the caller makes it durable (batched with other files).
    Deferred,
}

/// See [`crate::create_overlay`] and [`crate::create_overlay_unsynced`].
pub(crate) fn create_overlay(
    path: &Path,
    backing: &Path,
    backing_format: ImageFormat,
    virtual_size: Option<u64>,
    sync: Sync,
) -> Result<()> {
    if !backing.is_absolute() {
        return Err(invalid(path, "backing", format!("{} is not an absolute path", backing.display())));
    }
    let name = backing.as_os_str().as_bytes();
    if name.len() > 1023 {
        return Err(invalid(path, "backing", "path longer than 1023 bytes"));
    }
    let size = match virtual_size {
        Some(s) => s,
        None => backing_size(backing, backing_format)?.next_multiple_of(512),
    };
    write_qcow2(path, size, Some((name, backing_format)), sync)
}

/// See [`crate::create_empty`].
pub(crate) fn create_empty(path: &Path, format: ImageFormat, size: u64) -> Result<()> {
    match format {
        ImageFormat::Qcow2 => write_qcow2(path, size, None, Sync::Durable),
        ImageFormat::Raw => {
            let staged = Staged::create(path)?;
            staged.file.set_len(size).map_err(ctx("extend", staged.tmp_path()))?;
            staged.publish()
        }
    }
}

/// Writes a new qcow2 image of `size` bytes (0 allowed only without a backing file, as
/// `qemu-img create` allows it), with `backing` as its backing file name and format.
fn write_qcow2(path: &Path, size: u64, backing: Option<(&[u8], ImageFormat)>, sync: Sync) -> Result<()> {
    let l1_size = if size == 0 && backing.is_none() { 0 } else { l1_entries_for(path, size)? };
    let cs = 1u64 << CLUSTER_BITS;
    let header = encode_v3(&NewHeader {
        cluster_bits: CLUSTER_BITS,
        size,
        l1_size: l1_size as u32,
        l1_table_offset: 3 * cs,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        backing,
    });
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let used = 3 + l1_clusters;
    let staged = match sync {
        Sync::Durable => Staged::create(path)?,
        Sync::Deferred => Staged::in_place(path)?,
    };
    let f = &staged.file;
    let tmp = staged.tmp_path().to_path_buf();
    let refblock: Vec<u8> = (0..used).flat_map(|_| 1u16.to_be_bytes()).collect();
    f.write_all_at(&header, 0).map_err(ctx("write header of", &tmp))?;
    f.write_all_at(&(2 * cs).to_be_bytes(), cs).map_err(ctx("write refcount table of", &tmp))?;
    f.write_all_at(&refblock, 2 * cs).map_err(ctx("write refcount block of", &tmp))?;
    f.set_len(used * cs).map_err(ctx("extend", &tmp))?;
    match sync {
        Sync::Durable => staged.publish(),
        Sync::Deferred => staged.publish_unsynced(),
    }
}
