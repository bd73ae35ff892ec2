//! The qcow2 header: parsing with validation, and serialising a fresh v3 header.
//!
//! Contract: [`Header::read`] either returns a header whose tables lie inside the file and whose
//! features this crate understands well enough to read metadata, or an error naming the file:
//! `NotQcow2` (short, wrong magic, unknown version), `UnsupportedFeature` (unknown incompatible
//! bits) or `Corrupt` with the first problem found. [`encode_v3`] produces cluster 0 of a new image.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use crate::error::{Feature, Result, corrupt, ctx, not_qcow2, unsupported};
use crate::source::ReadAt;
use crate::types::ImageFormat;

/// `QFI\xfb`.
pub(crate) const MAGIC: u32 = 0x5146_49fb;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Incompatible feature bits: dirty, corrupt, external data file, compression type, extended L2.
pub(crate) const INCOMPAT_DIRTY: u64 = 1;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = 0x1f;
/// Mask of the host offset in L1 entries and standard L2 entries.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "Refcount is exactly one" flag of L1/L2 entries.
pub(crate) const COPIED: u64 = 1 << 63;
/// Compressed-cluster flag of L2 entries.
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// Length of the v3 header this crate writes.
const V3_HEADER_LEN: usize = 104;

/// The fields of a qcow2 header this crate uses.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub(crate) version: u32,
    pub(crate) cluster_bits: u32,
    pub(crate) size: u64,
    pub(crate) crypt_method: u32,
    pub(crate) l1_size: u32,
    pub(crate) l1_table_offset: u64,
    pub(crate) refcount_table_offset: u64,
    pub(crate) refcount_table_clusters: u32,
    pub(crate) nb_snapshots: u32,
    pub(crate) incompatible: u64,
    pub(crate) refcount_order: u32,
    pub(crate) compression_type: u8,
    /// Backing file name exactly as stored.
    pub(crate) backing_file: Option<PathBuf>,
    /// Backing format from the header extension, as stored.
    pub(crate) backing_format: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads `len` bytes at 0 (fewer if the file is shorter).
fn read_prefix(file: &dyn ReadAt, path: &Path, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, 0).map_err(ctx("read header of", path))?;
    Ok(buf)
}

/// Whether the first bytes of a file are the qcow2 magic.
pub(crate) fn is_qcow2(file: &dyn ReadAt) -> bool {
    let mut m = [0u8; 4];
    file.read_exact_at(&mut m, 0).is_ok() && u32::from_be_bytes(m) == MAGIC
}

impl Header {
    /// Cluster size in bytes.
    pub(crate) fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are extended (128 bits: descriptor + subcluster bitmap).
    pub(crate) fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTENDED_L2 != 0
    }

    /// log2 of the number of L2 entries in one L2 table.
    pub(crate) fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2() { 4 } else { 3 }
    }

    /// Number of entries (8 or 16 bytes each) in one L2 table.
    pub(crate) fn l2_entries(&self) -> u64 {
        1 << self.l2_bits()
    }

    /// Reads and validates the header of `file` (`file_len` bytes long).
    pub(crate) fn read(file: &dyn ReadAt, path: &Path, file_len: u64) -> Result<Header> {
        if file_len < 72 {
            return Err(not_qcow2(path, format!("file is {file_len} bytes, a qcow2 header needs 72")));
        }
        let mut b = read_prefix(file, path, file_len.min(4096))?;
        let magic = be32(&b, 0);
        if magic != MAGIC {
            return Err(not_qcow2(path, format!("magic {magic:#010x}")));
        }
        let version = be32(&b, 4);
        if version != 2 && version != 3 {
            return Err(not_qcow2(path, format!("unsupported qcow2 version {version}")));
        }
        let cluster_bits = be32(&b, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(path, format!("cluster_bits {cluster_bits} outside 9..=21")));
        }
        let cs = 1u64 << cluster_bits;
        let (header_len, incompatible, refcount_order) = if version == 3 {
            if b.len() < V3_HEADER_LEN {
                return Err(corrupt(path, "truncated: v3 header needs 104 bytes"));
            }
            (be32(&b, 100) as u64, be64(&b, 72), be32(&b, 96))
        } else {
            (72, 0, 4)
        };
        if version == 3 && !(V3_HEADER_LEN as u64..=cs).contains(&header_len) {
            return Err(corrupt(path, format!("header_length {header_len} invalid")));
        }
        if incompatible & !INCOMPAT_KNOWN != 0 {
            return Err(unsupported(path, Feature::UnknownIncompatible(incompatible & !INCOMPAT_KNOWN)));
        }
        if incompatible & INCOMPAT_EXTENDED_L2 != 0 && cluster_bits < 14 {
            return Err(corrupt(path, format!("extended L2 entries need clusters of 16 KiB or more, not {cs}")));
        }
        if refcount_order > 6 {
            return Err(corrupt(path, format!("refcount_order {refcount_order} > 6")));
        }
        let need = cs.min(file_len);
        if (b.len() as u64) < need {
            b = read_prefix(file, path, need)?;
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(&b, 24),
            crypt_method: be32(&b, 32),
            l1_size: be32(&b, 36),
            l1_table_offset: be64(&b, 40),
            refcount_table_offset: be64(&b, 48),
            refcount_table_clusters: be32(&b, 56),
            nb_snapshots: be32(&b, 60),
            incompatible,
            refcount_order,
            compression_type: if header_len > 104 { b[104] } else { 0 },
            backing_file: None,
            backing_format: None,
        };
        h.read_backing(&b, path, header_len)?;
        h.validate_tables(path, file_len)?;
        Ok(h)
    }

    /// Parses the backing file name and the header extensions (both inside cluster 0).
    fn read_backing(&mut self, b: &[u8], path: &Path, header_len: u64) -> Result<()> {
        let bf_off = be64(b, 8);
        let bf_size = be32(b, 16) as u64;
        let limit = b.len() as u64;
        if bf_off != 0 {
            if bf_size > 1023 || bf_off.checked_add(bf_size).is_none_or(|end| end > limit) {
                return Err(corrupt(path, "backing file name lies outside the first cluster"));
            }
            let name = b[bf_off as usize..(bf_off + bf_size) as usize].to_vec();
            self.backing_file = Some(PathBuf::from(OsString::from_vec(name)));
        }
        if self.version < 3 && bf_off == 0 {
            return Ok(());
        }
        let ext_end = if bf_off != 0 { bf_off } else { limit };
        let mut at = if self.version == 3 { header_len } else { 72 };
        at = at.next_multiple_of(8);
        while at + 8 <= ext_end {
            let (typ, len) = (be32(b, at as usize), be32(b, at as usize + 4) as u64);
            if typ == 0 {
                break;
            }
            let data = at + 8;
            if data + len > ext_end {
                return Err(corrupt(path, format!("header extension {typ:#x} overruns")));
            }
            if typ == EXT_BACKING_FORMAT {
                let v = &b[data as usize..(data + len) as usize];
                self.backing_format = Some(String::from_utf8_lossy(v).into_owned());
            }
            at = data + len.next_multiple_of(8);
        }
        Ok(())
    }

    /// Checks that L1 and refcount tables are aligned, big enough and inside the file.
    fn validate_tables(&self, path: &Path, file_len: u64) -> Result<()> {
        let cs = self.cluster_size();
        let l2_span = cs * self.l2_entries();
        let needed_l1 = self.size.div_ceil(l2_span);
        if (self.l1_size as u64) < needed_l1 {
            return Err(corrupt(
                path,
                format!("L1 table has {} entries, virtual size needs {needed_l1}", self.l1_size),
            ));
        }
        for (name, off, len) in [
            ("L1 table", self.l1_table_offset, self.l1_size as u64 * 8),
            ("refcount table", self.refcount_table_offset, self.refcount_table_clusters as u64 * cs),
        ] {
            if len > 0 && !off.is_multiple_of(cs) {
                return Err(corrupt(path, format!("{name} offset {off:#x} not cluster aligned")));
            }
            if off.checked_add(len).is_none_or(|end| end > file_len) {
                return Err(corrupt(
                    path,
                    format!(
                        "truncated: {name} at {off:#x}+{len:#x} lies beyond the end of the file \
                         ({file_len} bytes)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Parameters of a new image's cluster 0.
pub(crate) struct NewHeader<'a> {
    pub(crate) cluster_bits: u32,
    pub(crate) size: u64,
    pub(crate) l1_size: u32,
    pub(crate) l1_table_offset: u64,
    pub(crate) refcount_table_offset: u64,
    pub(crate) refcount_table_clusters: u32,
    pub(crate) backing: Option<(&'a [u8], ImageFormat)>,
}

/// Encodes a v3 header (refcount width 16, no features), its backing-format extension and the
/// backing file name. The result fits in the first cluster for any backing name ≤ 1023 bytes.
pub(crate) fn encode_v3(n: &NewHeader<'_>) -> Vec<u8> {
    let mut b = vec![0u8; V3_HEADER_LEN];
    let put32 = |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut b, 0, MAGIC);
    put32(&mut b, 4, 3);
    put32(&mut b, 20, n.cluster_bits);
    put64(&mut b, 24, n.size);
    put32(&mut b, 36, n.l1_size);
    put64(&mut b, 40, n.l1_table_offset);
    put64(&mut b, 48, n.refcount_table_offset);
    put32(&mut b, 56, n.refcount_table_clusters);
    put32(&mut b, 96, 4);
    put32(&mut b, 100, V3_HEADER_LEN as u32);
    if let Some((name, fmt)) = n.backing {
        let f = fmt.as_str().as_bytes();
        b.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b.extend_from_slice(&(f.len() as u32).to_be_bytes());
        b.extend_from_slice(f);
        b.resize(b.len().next_multiple_of(8), 0);
        b.extend_from_slice(&[0u8; 8]); // end of extensions
        let off = b.len() as u64;
        put64(&mut b, 8, off);
        put32(&mut b, 16, name.len() as u32);
        b.extend_from_slice(name);
    } else {
        b.extend_from_slice(&[0u8; 8]);
    }
    b
}
