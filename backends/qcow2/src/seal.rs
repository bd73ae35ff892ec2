//! Integrity records of read-only layers: [`LayerSeal`], made by [`seal`](crate::seal) and
//! checked by [`verify`](crate::verify).
//!
//! Contract: a seal covers the file's size and modification time and, for qcow2, SHA-256 of
//! cluster 0 (header, extensions, backing name), of the L1 table, of every L2 table the L1
//! references (in L1 order) and of the refcount table. It reads metadata only — never guest
//! data — so its cost follows the number of allocated L2 tables, like [`crate::changed_since`].
//! Any change that allocates, frees, snapshots, reverts, rebases, resizes or rewrites the
//! header changes a hash; an in-place overwrite of an already allocated data cluster changes
//! only the modification time (which the seal records, so it is caught too unless someone
//! resets the mtime on purpose). [`verify`](crate::verify) names the first difference in
//! [`Error::LayerChanged`](crate::error::Error::LayerChanged).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result, ctx};
use crate::header::{OFFSET_MASK, is_qcow2};
use crate::layer::{Qcow2Layer, open_file};
use crate::source::ReadAt;
use crate::types::ImageFormat;

/// What a read-only layer looked like when it was sealed. Serialise it next to the baseline
/// record; compare with [`verify`](crate::verify) before trusting the layer again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LayerSeal {
    /// Format the file was sealed as (raw layers get only `size` and `mtime_ns`).
    pub format: ImageFormat,
    /// File length in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch. `None`: not checked by [`verify`](crate::verify)
    /// (e.g. for a layer copied without keeping times).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime_ns: Option<i64>,
    /// SHA-256 (hex) of cluster 0: header, header extensions, backing file name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_sha256: Option<String>,
    /// SHA-256 (hex) of the L1 table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l1_sha256: Option<String>,
    /// SHA-256 (hex) of the L2 tables referenced by the L1 table, in L1 order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l2_sha256: Option<String>,
    /// SHA-256 (hex) of the refcount table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refcount_table_sha256: Option<String>,
}

impl LayerSeal {
    /// The same seal without the modification time (then [`verify`](crate::verify) checks metadata only).
    pub fn without_mtime(mut self) -> LayerSeal {
        self.mtime_ns = None;
        self
    }
}

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn read_region(file: &dyn ReadAt, path: &Path, off: u64, len: u64, what: &'static str, h: &mut Sha256) -> Result<()> {
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], off + done).map_err(ctx(what, path))?;
        h.update(&buf[..n]);
        done += n as u64;
    }
    Ok(())
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec())
}

/// See [`crate::seal`].
pub(crate) fn seal(path: &Path) -> Result<LayerSeal> {
    let file = open_file(path, false)?;
    let meta = file.metadata().map_err(ctx("stat", path))?;
    let (size, mtime) = (meta.len(), Some(mtime_ns(&meta)));
    if !is_qcow2(&file) {
        return Ok(LayerSeal {
            format: ImageFormat::Raw,
            size,
            mtime_ns: mtime,
            header_sha256: None,
            l1_sha256: None,
            l2_sha256: None,
            refcount_table_sha256: None,
        });
    }
    let q = Qcow2Layer::from_file(path, file)?;
    let h = &q.header;
    let cs = h.cluster_size();
    let mut header = Sha256::new();
    read_region(&q.file, path, 0, cs.min(size), "read header of", &mut header)?;
    let mut l1 = Sha256::new();
    for e in &q.l1 {
        l1.update(e.to_be_bytes());
    }
    let mut l2 = Sha256::new();
    for e in &q.l1 {
        let off = e & OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(cs) || off.checked_add(cs).is_none_or(|end| end > size) {
            return Err(crate::error::corrupt(
                path,
                format!("L2 table offset {off:#x} unaligned or beyond end of file"),
            ));
        }
        read_region(&q.file, path, off, cs, "read L2 table of", &mut l2)?;
    }
    let mut rt = Sha256::new();
    let rt_len = h.refcount_table_clusters as u64 * cs;
    read_region(&q.file, path, h.refcount_table_offset, rt_len, "read refcount table of", &mut rt)?;
    Ok(LayerSeal {
        format: ImageFormat::Qcow2,
        size,
        mtime_ns: mtime,
        header_sha256: Some(hex(header.finalize())),
        l1_sha256: Some(hex(l1.finalize())),
        l2_sha256: Some(hex(l2.finalize())),
        refcount_table_sha256: Some(hex(rt.finalize())),
    })
}

/// See [`crate::verify`].
pub(crate) fn verify(path: &Path, want: &LayerSeal) -> Result<()> {
    let now = seal(path)?;
    let changed = |what: String| Err(Error::LayerChanged { path: path.to_path_buf(), what });
    if now.format != want.format {
        return changed(format!("format {} is now {}", want.format, now.format));
    }
    if now.size != want.size {
        return changed(format!("file size {} is now {} bytes", want.size, now.size));
    }
    for (name, a, b) in [
        ("header (cluster 0)", &want.header_sha256, &now.header_sha256),
        ("L1 table", &want.l1_sha256, &now.l1_sha256),
        ("L2 tables", &want.l2_sha256, &now.l2_sha256),
        ("refcount table", &want.refcount_table_sha256, &now.refcount_table_sha256),
    ] {
        if a.is_some() && a != b {
            return changed(format!("{name} differs from the seal"));
        }
    }
    if let Some(t) = want.mtime_ns
        && now.mtime_ns != Some(t)
    {
        return changed(format!(
            "modification time {} is now {} (ns since epoch): the file was written",
            t,
            now.mtime_ns.unwrap_or_default()
        ));
    }
    Ok(())
}
