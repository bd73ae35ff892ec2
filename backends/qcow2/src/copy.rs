//! Full clones: flattening the allocated clusters of a chain (down to an optional `stop_at`
//! layer) into one new qcow2 file.
//!
//! Contract: the destination reads exactly like the source top; only clusters allocated in some
//! copied layer are written (data via `copy_file_range`, so the kernel copies — or shares extents
//! on filesystems that can); with `stop_at` the destination is backed by that layer, otherwise it
//! stands alone. Written under a temp name and published only when complete and synced: on any
//! error (ENOSPC included) nothing is left at or next to `dest`.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::chain::Chain;
use crate::create::{CLUSTER_BITS, l1_entries_for};
use crate::error::{Result, corrupt, ctx, invalid};
use crate::header::{COPIED, NewHeader, encode_v3};
use crate::layer::Layer;
use crate::publish::Staged;
use crate::read::Seg;
use crate::types::{CopyStats, Extent, ImageFormat, merge_extents};

const CS: u64 = 1 << CLUSTER_BITS;

/// What one destination cluster holds.
#[derive(Clone, Copy)]
enum Slot {
    /// The `n`-th data cluster of the destination.
    Data(u64),
    /// Reads as zeros (zero flag, no data).
    Zero,
}

/// The copy plan: destination clusters by guest cluster, and data pieces by data-relative offset.
#[derive(Default)]
struct Plan {
    slots: Vec<(u64, Slot)>,
    pieces: Vec<(u64, Seg)>,
    n_data: u64,
}

impl Plan {
    fn push_piece(&mut self, rel: u64, s: Seg) {
        if let (Some((lrel, Seg::File { layer, host, len })), Seg::File { layer: l2, host: h2, len: n2 }) =
            (self.pieces.last_mut(), s)
            && *layer == l2
            && *host + *len == h2
            && *lrel + *len == rel
        {
            *len += n2;
            return;
        }
        if !matches!(s, Seg::Zero(_)) {
            self.pieces.push((rel, s));
        }
    }
}

/// See [`crate::copy_allocated`].
pub(crate) fn copy_allocated(src: &Path, stop_at: Option<&Path>, dest: &Path) -> Result<CopyStats> {
    let mut chain = Chain::open(src, false)?;
    let all = chain.layers.len();
    let floor = match stop_at {
        Some(b) => chain.index_of(b)?,
        None => all,
    };
    if floor == 0 {
        return Err(invalid(src, "stop_at", "is the source top itself: nothing to copy"));
    }
    let backing = match stop_at {
        Some(_) => Some(backing_of(&chain.layers[floor])?),
        None => None,
    };
    let mut allocated = Vec::new();
    for l in &mut chain.layers[..floor] {
        allocated.extend(l.allocated()?);
    }
    let plan = make_plan(&mut chain, floor, &merge_extents(allocated), backing.is_some())?;
    let staged = Staged::create(dest)?;
    let mut stats = write_image(&mut chain, &plan, backing.as_ref(), &staged)?;
    stats.layers = floor;
    staged.publish()?;
    Ok(stats)
}

/// One full copy for [`copy_allocated_many`](crate::copy_allocated_many): the arguments of
/// [`copy_allocated`](crate::copy_allocated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyJob {
    /// Top of the chain to copy.
    pub src_top: PathBuf,
    /// Copy only the layers above this one (and back the copy by it); `None` flattens all.
    pub stop_at: Option<PathBuf>,
    /// The new image.
    pub dest: PathBuf,
}

/// See [`crate::copy_allocated_many`].
pub(crate) fn copy_allocated_many(jobs: &[CopyJob], parallelism: usize) -> Vec<Result<CopyStats>> {
    let workers = parallelism.clamp(1, jobs.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<Result<CopyStats>>>> =
        jobs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let span = tracing::Span::current();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let _g = span.enter();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let r = copy_allocated(&job.src_top, job.stop_at.as_deref(), &job.dest);
                    *results[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                }
            });
        }
    });
    results.into_iter().map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()).expect("every job ran")).collect()
}

fn backing_of(layer: &Layer) -> Result<(PathBuf, ImageFormat)> {
    let p = layer.path();
    let abs = p.canonicalize().map_err(ctx("resolve", p))?;
    let fmt = match layer {
        Layer::Qcow2(_) => ImageFormat::Qcow2,
        Layer::Raw(_) => ImageFormat::Raw,
    };
    Ok((abs, fmt))
}

fn make_plan(chain: &mut Chain, floor: usize, ext: &[Extent], backed: bool) -> Result<Plan> {
    let size = chain.layers[0].virtual_size();
    let all = chain.layers.len();
    let mut plan = Plan::default();
    let mut segs = Vec::new();
    let mut next_gc = 0u64;
    for e in ext {
        let end = e.end().min(size).div_ceil(CS);
        for gc in (e.offset / CS).max(next_gc)..end {
            let n = CS.min(size - gc * CS);
            segs.clear();
            chain.resolve(0, floor, gc * CS, n, &mut segs)?;
            let below = segs.iter().filter(|s| matches!(s, Seg::Below(_))).count();
            if below == segs.len() {
                continue;
            }
            if below > 0 {
                segs.clear();
                chain.resolve(0, all, gc * CS, n, &mut segs)?;
            }
            if segs.iter().all(|s| matches!(s, Seg::Zero(_))) {
                if backed {
                    plan.slots.push((gc, Slot::Zero));
                }
                continue;
            }
            let d = plan.n_data;
            plan.n_data += 1;
            plan.slots.push((gc, Slot::Data(d)));
            let mut rel = d * CS;
            for s in &segs {
                plan.push_piece(rel, *s);
                rel += s.len();
            }
        }
        next_gc = next_gc.max(end);
    }
    Ok(plan)
}

/// Cluster offsets of the destination's metadata and data areas.
struct Layout {
    rt_clusters: u64,
    rb_clusters: u64,
    l1_off: u64,
    l2_off: u64,
    data_off: u64,
    total: u64,
}

fn layout(l1_clusters: u64, n_l2: u64, n_data: u64) -> Layout {
    let per_block = CS / 2;
    let (mut rt, mut rb) = (1u64, 1u64);
    loop {
        let total = 1 + rt + rb + l1_clusters + n_l2 + n_data;
        let (rb2, rt2) = (total.div_ceil(per_block), (total.div_ceil(per_block) * 8).div_ceil(CS));
        if (rb2, rt2) == (rb, rt) {
            let l1_off = (1 + rt + rb) * CS;
            let l2_off = l1_off + l1_clusters * CS;
            let data_off = l2_off + n_l2 * CS;
            return Layout { rt_clusters: rt, rb_clusters: rb, l1_off, l2_off, data_off, total };
        }
        (rb, rt) = (rb2.max(rb), rt2.max(rt));
    }
}

fn write_image(
    chain: &mut Chain,
    plan: &Plan,
    backing: Option<&(PathBuf, ImageFormat)>,
    staged: &Staged,
) -> Result<CopyStats> {
    let size = chain.layers[0].virtual_size();
    let l1_size = l1_entries_for(staged.tmp_path(), size.next_multiple_of(512))?;
    let per_l2 = CS / 8;
    let mut tables: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (gc, _) in &plan.slots {
        tables.entry(gc / per_l2).or_insert_with(|| vec![0; per_l2 as usize]);
    }
    let lay = layout((l1_size * 8).div_ceil(CS), tables.len() as u64, plan.n_data);
    let (f, tmp) = (&staged.file, staged.tmp_path());
    // The full length first: clones (FICLONERANGE) land inside the file, never past its end.
    f.set_len(lay.total * CS).map_err(ctx("extend", tmp))?;
    let mut stats = CopyStats { cloned_bytes: copy_pieces(chain, plan, lay.data_off, f, tmp)?, ..CopyStats::default() };
    for (gc, slot) in &plan.slots {
        let t = tables.get_mut(&(gc / per_l2)).expect("table made above");
        t[(gc % per_l2) as usize] = match slot {
            Slot::Data(d) => {
                stats.data_bytes += CS;
                (lay.data_off + d * CS) | COPIED
            }
            Slot::Zero => {
                stats.zero_bytes += CS;
                1
            }
        };
    }
    let mut l1 = vec![0u8; l1_size as usize * 8];
    for (k, (idx, t)) in tables.iter().enumerate() {
        let off = lay.l2_off + k as u64 * CS;
        l1[*idx as usize * 8..*idx as usize * 8 + 8].copy_from_slice(&(off | COPIED).to_be_bytes());
        f.write_all_at(&be_bytes(t), off).map_err(ctx("write L2 table of", tmp))?;
    }
    f.write_all_at(&l1, lay.l1_off).map_err(ctx("write L1 table of", tmp))?;
    let rb_off = (1 + lay.rt_clusters) * CS;
    let rt: Vec<u64> = (0..lay.rb_clusters).map(|k| rb_off + k * CS).collect();
    f.write_all_at(&be_bytes(&rt), CS).map_err(ctx("write refcount table of", tmp))?;
    let rb: Vec<u8> = (0..lay.total).flat_map(|_| 1u16.to_be_bytes()).collect();
    f.write_all_at(&rb, rb_off).map_err(ctx("write refcount blocks of", tmp))?;
    let name = backing.map(|(p, fmt)| (p.as_os_str().as_bytes(), *fmt));
    let header = encode_v3(&NewHeader {
        cluster_bits: CLUSTER_BITS,
        size: size.next_multiple_of(512),
        l1_size: l1_size as u32,
        l1_table_offset: lay.l1_off,
        refcount_table_offset: CS,
        refcount_table_clusters: lay.rt_clusters as u32,
        backing: name,
    });
    f.write_all_at(&header, 0).map_err(ctx("write header of", tmp))?;
    stats.file_size = lay.total * CS;
    Ok(stats)
}

fn be_bytes(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_be_bytes()).collect()
}

/// Copies the data pieces; returns the bytes shared by reflink rather than copied.
fn copy_pieces(chain: &Chain, plan: &Plan, data_off: u64, f: &File, tmp: &Path) -> Result<u64> {
    let mut buf = Vec::new();
    // Reflink is tried until the filesystem first refuses it (ext4, cross-device, tmpfs).
    let mut try_clone = true;
    let mut cloned = 0;
    for (rel, s) in &plan.pieces {
        let at = data_off + rel;
        match *s {
            Seg::File { layer, host, len } => {
                let (src, path) = match &chain.layers[layer] {
                    Layer::Qcow2(q) => (&q.file, &q.path),
                    Layer::Raw(r) => (&r.file, &r.path),
                };
                // Chain::open (local files) is the only way into a copy.
                let src = src.as_file().ok_or_else(|| invalid(path, "source", "full copies need local files"))?;
                if try_clone && len.is_multiple_of(CLONE_ALIGN) && host.is_multiple_of(CLONE_ALIGN) {
                    match clone_range(src, host, f, at, len) {
                        Ok(()) => {
                            cloned += len;
                            continue;
                        }
                        Err(e) if e.raw_os_error().is_some_and(|c| CLONE_REFUSED.contains(&c)) => try_clone = false,
                        Err(e) => return Err(crate::error::io("clone data into", tmp, e)),
                    }
                }
                copy_range(src, path, host, f, tmp, at, len, &mut buf)?;
            }
            Seg::Compressed { layer, host, clen, skip, len } => {
                let c = chain.decompress(layer, host, clen)?;
                let piece = &c[skip as usize..(skip + len) as usize];
                f.write_all_at(piece, at).map_err(ctx("write data to", tmp))?;
            }
            Seg::Zero(_) | Seg::Below(_) => {}
        }
    }
    Ok(cloned)
}

/// Alignment FICLONERANGE needs of offsets and lengths (a multiple of any filesystem block size
/// up to 64 KiB, which every cluster-aligned piece meets).
const CLONE_ALIGN: u64 = 64 << 10;

/// Errors meaning "this filesystem (or this pair of files) cannot share extents": copy instead.
const CLONE_REFUSED: [i32; 6] = [libc::EOPNOTSUPP, libc::EXDEV, libc::EINVAL, libc::ENOSYS, libc::ENOTTY, libc::EPERM];

/// Shares `len` bytes at `from` of `src` into `dst` at `to` (FICLONERANGE: reflink, no data
/// moves; XFS with reflink, btrfs, bcachefs).
fn clone_range(src: &File, from: u64, dst: &File, to: u64, len: u64) -> std::io::Result<()> {
    let arg =
        libc::file_clone_range { src_fd: src.as_raw_fd() as i64, src_offset: from, src_length: len, dest_offset: to };
    // SAFETY: both descriptors are open; `arg` is a valid file_clone_range for the call's duration.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONERANGE, &arg) };
    if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Copies `len` bytes by `copy_file_range`, falling back to read/write where unsupported.
#[allow(clippy::too_many_arguments)]
fn copy_range(
    src: &File,
    src_path: &Path,
    mut from: u64,
    dst: &File,
    dst_path: &Path,
    mut to: u64,
    mut len: u64,
    buf: &mut Vec<u8>,
) -> Result<()> {
    while len > 0 {
        let (mut fi, mut ti) = (from as i64, to as i64);
        let chunk = len.min(1 << 30) as usize;
        // SAFETY: both descriptors are open for the duration; offsets point to valid i64s.
        let n = unsafe { libc::copy_file_range(src.as_raw_fd(), &mut fi, dst.as_raw_fd(), &mut ti, chunk, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            let fallback = [libc::EXDEV, libc::EINVAL, libc::ENOSYS, libc::EOPNOTSUPP];
            if e.raw_os_error().is_some_and(|c| fallback.contains(&c)) {
                return copy_by_read(src, src_path, from, dst, dst_path, to, len, buf);
            }
            return Err(crate::error::io("copy data into", dst_path, e));
        }
        if n == 0 {
            return Err(corrupt(src_path, format!("data at {from:#x} lies beyond end of file")));
        }
        (from, to, len) = (from + n as u64, to + n as u64, len - n as u64);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn copy_by_read(
    src: &File,
    src_path: &Path,
    mut from: u64,
    dst: &File,
    dst_path: &Path,
    mut to: u64,
    mut len: u64,
    buf: &mut Vec<u8>,
) -> Result<()> {
    buf.resize(1 << 20, 0);
    while len > 0 {
        let n = len.min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], from).map_err(ctx("read data of", src_path))?;
        dst.write_all_at(&buf[..n], to).map_err(ctx("write data to", dst_path))?;
        (from, to, len) = (from + n as u64, to + n as u64, len - n as u64);
    }
    Ok(())
}
