//! Guest-visible reads through a chain: resolving a guest range into pieces of layer files,
//! zeros and compressed clusters, then reading those pieces.
//!
//! Contract: [`Chain::resolve`] describes exactly what the guest reads (qemu semantics: an
//! unallocated cluster reads the backing file; beyond a backing file's size reads zeros; beyond
//! the bottom layer reads zeros). Layers at or below `floor` are reported as [`Seg::Below`].

use crate::source::ReadAt as _;

use std::io::Read as _;

use crate::chain::{Chain, check_readable};
use crate::error::{Feature, Result, corrupt, ctx, invalid, unsupported};
use crate::layer::{Layer, Mapping, SUBCLUSTERS};

/// One piece of a resolved guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seg {
    /// `len` bytes at `host` in the file of layer `layer`.
    File { layer: usize, host: u64, len: u64 },
    /// `len` bytes of zeros.
    Zero(u64),
    /// `len` bytes starting `skip` bytes into the compressed cluster at `host` (`clen` bytes).
    Compressed { layer: usize, host: u64, clen: u64, skip: u64, len: u64 },
    /// `len` bytes defined by the layers at or below the floor.
    Below(u64),
}

impl Seg {
    /// Guest bytes covered.
    pub(crate) fn len(&self) -> u64 {
        match *self {
            Seg::File { len, .. } | Seg::Compressed { len, .. } => len,
            Seg::Zero(len) | Seg::Below(len) => len,
        }
    }
}

/// Appends a segment, merging it with the previous one where they continue each other.
pub(crate) fn push_seg(out: &mut Vec<Seg>, s: Seg) {
    if s.len() == 0 {
        return;
    }
    match (out.last_mut(), s) {
        (Some(Seg::Zero(a)), Seg::Zero(b)) | (Some(Seg::Below(a)), Seg::Below(b)) => *a += b,
        (Some(Seg::File { layer: la, host: ha, len: a }), Seg::File { layer: lb, host: hb, len: b })
            if *la == lb && *ha + *a == hb =>
        {
            *a += b
        }
        _ => out.push(s),
    }
}

impl Chain {
    /// Resolves guest bytes `off..off+len` as seen from layer `level`, stopping at `floor`.
    pub(crate) fn resolve(&mut self, level: usize, floor: usize, off: u64, len: u64, out: &mut Vec<Seg>) -> Result<()> {
        if level >= floor || level >= self.layers.len() {
            let below = floor < self.layers.len() && level >= floor;
            push_seg(out, if below { Seg::Below(len) } else { Seg::Zero(len) });
            return Ok(());
        }
        let vs = self.layers[level].virtual_size();
        let inside = if off >= vs { 0 } else { len.min(vs - off) };
        let q = match &mut self.layers[level] {
            Layer::Raw(_) => {
                push_seg(out, Seg::File { layer: level, host: off, len: inside });
                push_seg(out, Seg::Zero(len - inside));
                return Ok(());
            }
            Layer::Qcow2(q) => q,
        };
        check_readable(q)?;
        let cs = q.header.cluster_size();
        let (mut pos, end) = (off, off + inside);
        while pos < end {
            let in_off = pos % cs;
            let n = (cs - in_off).min(end - pos);
            let q = match &mut self.layers[level] {
                Layer::Qcow2(q) => q,
                Layer::Raw(_) => unreachable!("checked above"),
            };
            match q.mapping(pos / cs)? {
                Mapping::Data { host, .. } => push_seg(out, Seg::File { layer: level, host: host + in_off, len: n }),
                Mapping::Zero { .. } => push_seg(out, Seg::Zero(n)),
                Mapping::Compressed { host, len } => {
                    push_seg(out, Seg::Compressed { layer: level, host, clen: len, skip: in_off, len: n })
                }
                Mapping::Unallocated => self.resolve(level + 1, floor, pos, n, out)?,
                Mapping::Sub { host, alloc, zero } => {
                    let sc = cs / SUBCLUSTERS;
                    let (mut p, stop) = (in_off, in_off + n);
                    while p < stop {
                        let k = p / sc;
                        let m = (sc - p % sc).min(stop - p);
                        if alloc & (1 << k) != 0 {
                            push_seg(out, Seg::File { layer: level, host: host + p, len: m });
                        } else if zero & (1 << k) != 0 {
                            push_seg(out, Seg::Zero(m));
                        } else {
                            self.resolve(level + 1, floor, pos - in_off + p, m, out)?;
                        }
                        p += m;
                    }
                }
            }
            pos += n;
        }
        push_seg(out, Seg::Zero(len - inside));
        Ok(())
    }

    /// Reads guest bytes at `off` into `buf` (the whole chain; `off + len` within the top).
    pub(crate) fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.layers[0].virtual_size();
        if off.checked_add(buf.len() as u64).is_none_or(|e| e > size) {
            return Err(invalid(
                self.layers[0].path(),
                "offset",
                format!("read of {} bytes at {off} beyond virtual size {size}", buf.len()),
            ));
        }
        let mut segs = Vec::new();
        let all = self.layers.len();
        self.resolve(0, all, off, buf.len() as u64, &mut segs)?;
        let mut pos = 0usize;
        for s in segs {
            let n = s.len() as usize;
            let dst = &mut buf[pos..pos + n];
            match s {
                Seg::File { layer, host, .. } => self.read_file(layer, host, dst)?,
                Seg::Zero(_) | Seg::Below(_) => dst.fill(0),
                Seg::Compressed { layer, host, clen, skip, .. } => {
                    let c = self.decompress(layer, host, clen)?;
                    dst.copy_from_slice(&c[skip as usize..skip as usize + n]);
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Reads `dst.len()` bytes at `host` of layer `layer`'s file.
    pub(crate) fn read_file(&self, layer: usize, host: u64, dst: &mut [u8]) -> Result<()> {
        let (file, path) = match &self.layers[layer] {
            Layer::Qcow2(q) => (&q.file, &q.path),
            Layer::Raw(r) => (&r.file, &r.path),
        };
        file.read_exact_at(dst, host).map_err(ctx("read data cluster of", path))
    }

    /// Decompresses the compressed cluster at `host` (`clen` bytes) of layer `layer`: raw
    /// deflate for compression type 0, one zstd frame for type 1 (bytes after the frame, up to
    /// the sector-rounded `clen`, are ignored, as qemu does).
    pub(crate) fn decompress(&self, layer: usize, host: u64, clen: u64) -> Result<Vec<u8>> {
        let Layer::Qcow2(q) = &self.layers[layer] else {
            unreachable!("compressed clusters only exist in qcow2 layers")
        };
        let cs = q.header.cluster_size() as usize;
        let clen = clen.min(q.file_len.saturating_sub(host));
        let mut raw = vec![0u8; clen as usize];
        q.file.read_exact_at(&mut raw, host).map_err(ctx("read compressed cluster of", &q.path))?;
        match q.header.compression_type {
            0 => {
                let out = miniz_oxide::inflate::decompress_to_vec_with_limit(&raw, cs)
                    .map_err(|e| corrupt(&q.path, format!("compressed cluster at {host:#x} does not inflate: {e}")))?;
                if out.len() != cs {
                    return Err(corrupt(&q.path, format!("compressed cluster at {host:#x} is short")));
                }
                Ok(out)
            }
            1 => {
                let bad = |e: &dyn std::fmt::Display| {
                    corrupt(&q.path, format!("zstd-compressed cluster at {host:#x} does not decode: {e}"))
                };
                let mut dec = ruzstd::decoding::StreamingDecoder::new(&raw[..]).map_err(|e| bad(&e))?;
                let mut out = vec![0u8; cs];
                dec.read_exact(&mut out).map_err(|e| bad(&e))?;
                Ok(out)
            }
            t => Err(unsupported(&q.path, Feature::CompressionType(t))),
        }
    }
}
