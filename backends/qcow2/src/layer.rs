//! One layer of a chain, opened: a qcow2 file (header + L1 table, L2 tables on demand) or a raw
//! file; guest-cluster lookups and this layer's own allocation map.
//!
//! Contract: [`Qcow2Layer::allocated`] reads the L1 table and only the L2 tables it references,
//! so its cost grows with the allocated part of the layer, not with the virtual size. Every
//! metadata offset is checked against the file before it is used. Extended L2 entries
//! (subclusters, 1/32 of a cluster each) are decoded into [`Mapping::Sub`] unless the whole
//! cluster is in one state; allocation maps then have subcluster granularity, as qemu's.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Feature, Result, corrupt, ctx, unsupported};
use crate::header::{COMPRESSED, Header, INCOMPAT_DATA_FILE, OFFSET_MASK, is_qcow2};
use crate::source::{ReadAt, Resolver, Source};
use crate::types::{Extent, ImageFormat, push_extent};

/// Where the content of one guest cluster of a qcow2 layer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Not allocated here: read the backing file.
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster (or 0).
    Zero { host: u64 },
    /// Plain data at this host offset; `copied` = refcount is exactly one.
    Data { host: u64, copied: bool },
    /// Compressed data (deflate or zstd, per the header): `len` bytes at `host`.
    Compressed { host: u64, len: u64 },
    /// Extended L2 entry whose subclusters differ: bit `i` of `alloc` = subcluster `i` holds data
    /// at `host + i * subcluster size`; bit `i` of `zero` = it reads as zeros; neither = read
    /// the backing file.
    Sub { host: u64, alloc: u32, zero: u32 },
}

/// Number of subclusters in a cluster with extended L2 entries.
pub(crate) const SUBCLUSTERS: u64 = 32;

/// An opened qcow2 file.
pub(crate) struct Qcow2Layer {
    pub(crate) path: PathBuf,
    pub(crate) file: Source,
    pub(crate) file_len: u64,
    pub(crate) header: Header,
    pub(crate) l1: Vec<u64>,
    l2_cache: HashMap<u64, Arc<Vec<u64>>>,
}

/// An opened raw file.
pub(crate) struct RawLayer {
    pub(crate) path: PathBuf,
    pub(crate) file: Source,
    pub(crate) len: u64,
}

/// One opened layer.
pub(crate) enum Layer {
    Qcow2(Qcow2Layer),
    Raw(RawLayer),
}

/// Opens `path` read-only or read-write, mapping errors with the path.
pub(crate) fn open_file(path: &Path, write: bool) -> Result<File> {
    OpenOptions::new().read(true).write(write).open(path).map_err(ctx("open", path))
}

fn file_len(file: &dyn ReadAt, path: &Path) -> Result<u64> {
    file.size().map_err(ctx("stat", path))
}

/// Opens `path` as a [`Source`]: a local file, or through `resolver` when given.
pub(crate) fn open_source(resolver: Option<&dyn Resolver>, path: &Path, write: bool) -> Result<Source> {
    match resolver {
        None => Ok(Source::File(open_file(path, write)?)),
        Some(r) => Ok(Source::Other(r.open(path, write).map_err(ctx("open", path))?)),
    }
}

impl Layer {
    /// Opens `path` as `format`; `None` probes the qcow2 magic. Through `resolver` when given.
    pub(crate) fn open(
        resolver: Option<&dyn Resolver>,
        path: &Path,
        format: Option<ImageFormat>,
        write: bool,
    ) -> Result<Layer> {
        let file = open_source(resolver, path, write)?;
        let format = format.unwrap_or(if is_qcow2(&file) { ImageFormat::Qcow2 } else { ImageFormat::Raw });
        match format {
            ImageFormat::Qcow2 => Ok(Layer::Qcow2(Qcow2Layer::from_source(path, file)?)),
            ImageFormat::Raw => {
                let len = file_len(&file, path)?;
                Ok(Layer::Raw(RawLayer { path: path.to_path_buf(), file, len }))
            }
        }
    }

    /// Guest-visible size of this layer.
    pub(crate) fn virtual_size(&self) -> u64 {
        match self {
            Layer::Qcow2(q) => q.header.size,
            Layer::Raw(r) => r.len,
        }
    }

    /// The file of this layer.
    pub(crate) fn path(&self) -> &Path {
        match self {
            Layer::Qcow2(q) => &q.path,
            Layer::Raw(r) => &r.path,
        }
    }

    /// Guest ranges this layer defines itself (qcow2: L2 allocation; raw: data extents).
    pub(crate) fn allocated(&mut self) -> Result<Vec<Extent>> {
        match self {
            Layer::Qcow2(q) => q.allocated(),
            Layer::Raw(r) => r.data_extents(),
        }
    }
}

impl RawLayer {
    /// Data extents by SEEK_DATA/SEEK_HOLE (the whole file if the filesystem cannot tell).
    pub(crate) fn data_extents(&self) -> Result<Vec<Extent>> {
        let Some(file) = self.file.as_file() else {
            // Not a local file: no SEEK_DATA, so all of it counts as data.
            let mut out = Vec::new();
            push_extent(&mut out, 0, self.len);
            return Ok(out);
        };
        let fd = file.as_raw_fd();
        let mut out = Vec::new();
        let mut pos: i64 = 0;
        let len = self.len as i64;
        while pos < len {
            // SAFETY: lseek on a valid, owned descriptor has no memory effects.
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break;
                }
                return Err(crate::error::io("seek data in", &self.path, e));
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let hole = if hole < 0 { len } else { hole.min(len) };
            push_extent(&mut out, data as u64, (hole - data) as u64);
            pos = hole;
        }
        Ok(out)
    }
}

impl Qcow2Layer {
    /// Reads the header and the L1 table of an opened qcow2 file.
    pub(crate) fn from_file(path: &Path, file: File) -> Result<Qcow2Layer> {
        Qcow2Layer::from_source(path, Source::File(file))
    }

    /// Reads the header and the L1 table of an opened source.
    pub(crate) fn from_source(path: &Path, file: Source) -> Result<Qcow2Layer> {
        let file_len = file_len(&file, path)?;
        let header = Header::read(&file, path, file_len)?;
        if header.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported(path, Feature::ExternalDataFile));
        }
        let mut raw = vec![0u8; header.l1_size as usize * 8];
        file.read_exact_at(&mut raw, header.l1_table_offset).map_err(ctx("read L1 of", path))?;
        let l1 = raw.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().expect("8"))).collect();
        Ok(Qcow2Layer { path: path.to_path_buf(), file, file_len, header, l1, l2_cache: HashMap::new() })
    }

    /// Reads the L2 table at `off` (cached).
    pub(crate) fn l2_table(&mut self, off: u64) -> Result<Arc<Vec<u64>>> {
        if let Some(t) = self.l2_cache.get(&off) {
            return Ok(t.clone());
        }
        let t = Arc::new(self.read_l2_uncached(off)?);
        if self.l2_cache.len() >= 256 {
            self.l2_cache.clear();
        }
        self.l2_cache.insert(off, t.clone());
        Ok(t)
    }

    fn read_l2_uncached(&self, off: u64) -> Result<Vec<u64>> {
        let cs = self.header.cluster_size();
        if !off.is_multiple_of(cs) || off + cs > self.file_len {
            return Err(corrupt(&self.path, format!("L2 table offset {off:#x} unaligned or beyond end of file")));
        }
        let mut raw = vec![0u8; cs as usize];
        self.file.read_exact_at(&mut raw, off).map_err(ctx("read L2 table of", &self.path))?;
        Ok(raw.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().expect("8"))).collect())
    }

    /// Replaces one cached L2 entry after it was written to disk.
    pub(crate) fn update_cached_l2(&mut self, l2_off: u64, idx: usize, entry: u64) {
        if let Some(t) = self.l2_cache.get_mut(&l2_off) {
            Arc::make_mut(t)[idx] = entry;
        }
    }

    /// Entry `idx` of an L2 table: the descriptor and (extended L2 only, else 0) the bitmap.
    pub(crate) fn entry(&self, table: &[u64], idx: usize) -> (u64, u64) {
        if self.header.extended_l2() { (table[2 * idx], table[2 * idx + 1]) } else { (table[idx], 0) }
    }

    /// Decodes one L2 entry (`bitmap`: the subcluster bitmap of an extended entry, else 0).
    pub(crate) fn decode(&self, e: u64, bitmap: u64) -> Result<Mapping> {
        if e & COMPRESSED != 0 {
            let x = 62 - (self.header.cluster_bits - 8);
            let host = e & ((1u64 << x) - 1);
            let sectors = (e & !(COMPRESSED | (1 << 63))) >> x;
            return Ok(Mapping::Compressed { host, len: (sectors + 1) * 512 - (host & 511) });
        }
        let host = e & OFFSET_MASK;
        if !self.header.extended_l2() {
            return Ok(if self.header.version >= 3 && e & 1 != 0 {
                Mapping::Zero { host }
            } else if host != 0 {
                Mapping::Data { host, copied: e & (1 << 63) != 0 }
            } else {
                Mapping::Unallocated
            });
        }
        // Extended L2: bit 0 of the descriptor is unused; the bitmap says it all.
        let (alloc, zero) = (bitmap as u32, (bitmap >> 32) as u32);
        if alloc & zero != 0 {
            return Err(corrupt(
                &self.path,
                format!("subcluster bitmap {bitmap:#018x} marks subclusters both allocated and zero"),
            ));
        }
        if host == 0 && alloc != 0 {
            return Err(corrupt(
                &self.path,
                format!("subcluster bitmap {bitmap:#018x} allocates subclusters of an unallocated cluster"),
            ));
        }
        Ok(match (alloc, zero) {
            (u32::MAX, _) => Mapping::Data { host, copied: e & (1 << 63) != 0 },
            (_, u32::MAX) => Mapping::Zero { host },
            (0, 0) => Mapping::Unallocated,
            _ => Mapping::Sub { host, alloc, zero },
        })
    }

    /// Mapping of guest cluster number `gc`.
    pub(crate) fn mapping(&mut self, gc: u64) -> Result<Mapping> {
        let l2_bits = self.header.l2_bits();
        let l1e = self.l1.get((gc >> l2_bits) as usize).copied().unwrap_or(0);
        let l2_off = l1e & OFFSET_MASK;
        if l2_off == 0 {
            return Ok(Mapping::Unallocated);
        }
        let t = self.l2_table(l2_off)?;
        let (e, bitmap) = self.entry(&t, (gc & ((1 << l2_bits) - 1)) as usize);
        let m = self.decode(e, bitmap)?;
        if let Mapping::Data { host, .. } | Mapping::Sub { host, .. } = m
            && !host.is_multiple_of(self.header.cluster_size())
        {
            return Err(corrupt(&self.path, format!("data cluster {host:#x} not aligned")));
        }
        Ok(m)
    }

    /// Guest ranges allocated in this layer (data, zero and compressed clusters or
    /// subclusters), merged.
    pub(crate) fn allocated(&mut self) -> Result<Vec<Extent>> {
        let cs = self.header.cluster_size();
        let sc = cs / SUBCLUSTERS;
        let per_l2 = self.header.l2_entries();
        let size = self.header.size;
        let mut out = Vec::new();
        for i in 0..self.l1.len() {
            let l2_off = self.l1[i] & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            let table = self.read_l2_uncached(l2_off)?;
            for j in 0..per_l2 as usize {
                let guest = (i as u64 * per_l2 + j as u64) * cs;
                if guest >= size {
                    break;
                }
                let (e, bitmap) = self.entry(&table, j);
                if e == 0 && bitmap == 0 {
                    continue; // unallocated: the common case of a sparse table, no decoding
                }
                match self.decode(e, bitmap)? {
                    Mapping::Unallocated => {}
                    Mapping::Sub { alloc, zero, .. } => {
                        let present = alloc | zero;
                        for k in 0..SUBCLUSTERS {
                            let at = guest + k * sc;
                            if present & (1 << k) != 0 && at < size {
                                push_extent(&mut out, at, sc.min(size - at));
                            }
                        }
                    }
                    _ => push_extent(&mut out, guest, cs.min(size - guest)),
                }
            }
        }
        Ok(out)
    }
}
