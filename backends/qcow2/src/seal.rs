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
//!
//! Over a [`Resolver`] ([`seal_in`](crate::seal_in), [`verify_in`](crate::verify_in): a remote
//! storage volume read over a stream) the same hashes are computed by the same code, but a source
//! has no modification time, device or inode: such a seal has `mtime_ns: None` and is a
//! metadata-only seal — an in-place overwrite of an already allocated data cluster (which
//! changes no table) is not seen — and every check reads the metadata again (no cache).
//!
//! A process remembers which files it verified in full ([`VerifiedCache`]): a later check of the
//! same file against the same seal, while the file's device, inode, size, mtime and ctime are
//! all as they were, is answered by one `stat`. Nothing can write a file or change its times
//! without setting its ctime to the current time, so a changed layer always misses the cache; a
//! file changed less than two seconds before a full check is not cached (coarse timestamps).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result, ctx};
use crate::header::{OFFSET_MASK, is_qcow2};
use crate::layer::{Qcow2Layer, open_file, open_source};
use crate::source::{ReadAt, Resolver, Source};
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
    /// (e.g. for a layer copied without keeping times, or sealed over a resolver by
    /// [`seal_in`](crate::seal_in), which has no times).
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
    seal_source(path, Source::File(file), meta.len(), Some(mtime_ns(&meta)))
}

/// See [`crate::seal_in`]: the same hashes over a source `resolver` opens; no modification time.
pub(crate) fn seal_in(resolver: &dyn Resolver, path: &Path) -> Result<LayerSeal> {
    let file = open_source(Some(resolver), path, false)?;
    let size = file.size().map_err(ctx("stat", path))?;
    seal_source(path, file, size, None)
}

/// The seal of the opened layer `file` of `size` bytes (`mtime`: its modification time when
/// the source has one): the one hashing of [`seal`] and [`seal_in`].
fn seal_source(path: &Path, file: Source, size: u64, mtime: Option<i64>) -> Result<LayerSeal> {
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
    let q = Qcow2Layer::from_source(path, file)?;
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

/// See [`crate::verify`]: answered from [`VERIFIED`] when the file's inode is exactly as it was
/// at an earlier full check against the same seal, else checked in full.
pub(crate) fn verify(path: &Path, want: &LayerSeal) -> Result<()> {
    verify_with(&VERIFIED, path, want).map(drop)
}

/// [`verify`] against `cache`; returns whether the answer came from the cache.
pub(crate) fn verify_with(cache: &VerifiedCache, path: &Path, want: &LayerSeal) -> Result<bool> {
    let started = std::time::SystemTime::now();
    let meta = std::fs::metadata(path).map_err(ctx("stat", path))?;
    let stamp = Stamp::of(&meta);
    if cache.hit(path, &stamp, want) {
        return Ok(true);
    }
    verify_full(path, want)?;
    cache.record(path, stamp, want, started);
    Ok(false)
}

/// What identifies one state of a file: if none of it changed, the file was not written (a write
/// or a metadata change sets the ctime to the current time, and nothing but the clock sets it back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime_ns: mtime_ns(m),
            ctime_ns: m.ctime().saturating_mul(1_000_000_000).saturating_add(m.ctime_nsec()),
        }
    }
}

/// A file whose ctime is closer than this to the start of a full check is not cached: file
/// times tick coarsely (a jiffy), so a write in the same tick as the check could leave the
/// stamp unchanged (git's "racy" index entries, the same rule).
const RACY_NS: i64 = 2_000_000_000;

/// At most this many files are remembered; past it the cache starts over.
const CACHE_FILES: usize = 65_536;

/// Files verified in full, with the [`Stamp`] they had then and the seal they matched. Seal
/// checks run before every drift report, stage and promotion and read every L2 table; with this
/// cache a layer nobody touched costs one `stat`.
#[derive(Debug, Default)]
pub(crate) struct VerifiedCache {
    files: std::sync::Mutex<std::collections::HashMap<std::path::PathBuf, (Stamp, LayerSeal)>>,
}

impl VerifiedCache {
    fn hit(&self, path: &Path, stamp: &Stamp, want: &LayerSeal) -> bool {
        let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files.get(path).is_some_and(|(s, seal)| s == stamp && seal == want)
    }

    fn record(&self, path: &Path, stamp: Stamp, want: &LayerSeal, started: std::time::SystemTime) {
        let started_ns = started
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if started_ns.saturating_sub(stamp.ctime_ns) < RACY_NS {
            files.remove(path);
            return;
        }
        if files.len() >= CACHE_FILES {
            files.clear();
        }
        files.insert(path.to_path_buf(), (stamp, want.clone()));
    }
}

/// The process's cache behind [`verify`].
static VERIFIED: std::sync::LazyLock<VerifiedCache> = std::sync::LazyLock::new(VerifiedCache::default);

/// Checks `path` against `want` by reading its metadata again.
fn verify_full(path: &Path, want: &LayerSeal) -> Result<()> {
    compare(path, want, &seal(path)?)
}

/// See [`crate::verify_in`]: a full check over a source `resolver` opens (no cache: a remote
/// source has no inode whose ctime would tell that it was written).
pub(crate) fn verify_in(resolver: &dyn Resolver, path: &Path, want: &LayerSeal) -> Result<()> {
    compare(path, want, &seal_in(resolver, path)?)
}

/// `Ok` when `now` (a fresh seal of `path`) matches `want`, else `LayerChanged` naming the first
/// difference. A modification time is compared only when both seals have one.
fn compare(path: &Path, want: &LayerSeal, now: &LayerSeal) -> Result<()> {
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
    if let (Some(t), Some(n)) = (want.mtime_ns, now.mtime_ns)
        && n != t
    {
        return changed(format!("modification time {t} is now {n} (ns since epoch): the file was written"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};

    use super::*;

    /// A qcow2 with one allocated cluster, sealed, and old enough to be cached.
    fn sealed(d: &tempfile::TempDir) -> (std::path::PathBuf, LayerSeal) {
        let p = d.path().join("l.qcow2");
        crate::create_empty(&p, ImageFormat::Qcow2, 1 << 20).unwrap();
        let s = seal(&p).unwrap();
        (p, s)
    }

    /// ctime cannot be set back: wait until a file written now is past the racy window.
    fn wait_past_racy_window() {
        std::thread::sleep(std::time::Duration::from_nanos(RACY_NS as u64 + 100_000_000));
    }

    #[test]
    fn a_fresh_file_is_checked_in_full_every_time() {
        let d = tempfile::tempdir().unwrap();
        let (p, s) = sealed(&d);
        let cache = VerifiedCache::default();
        assert!(!verify_with(&cache, &p, &s).unwrap(), "first check is full");
        assert!(!verify_with(&cache, &p, &s).unwrap(), "a file changed within the racy window is not cached");
    }

    #[test]
    fn an_untouched_file_is_answered_from_the_cache_and_a_rewrite_with_its_mtime_put_back_is_not() {
        let d = tempfile::tempdir().unwrap();
        let (p, s) = sealed(&d);
        wait_past_racy_window();
        let cache = VerifiedCache::default();
        assert!(!verify_with(&cache, &p, &s).unwrap());
        assert!(verify_with(&cache, &p, &s).unwrap(), "unchanged stamp: from the cache");
        // Another seal of the same file is not the one checked: full check (and then cached).
        let other = s.clone().without_mtime();
        assert!(!verify_with(&cache, &p, &other).unwrap());
        assert!(!verify_with(&cache, &p, &s).unwrap());
        assert!(verify_with(&cache, &p, &s).unwrap());
        // Rewrite the header's backing-name area behind our back, then put the mtime back: only
        // the ctime tells, and it misses the cache.
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.seek(SeekFrom::Start(512)).unwrap();
        f.write_all(b"rewritten").unwrap();
        f.set_times(std::fs::FileTimes::new().set_modified(mtime)).unwrap();
        drop(f);
        match verify_with(&cache, &p, &s) {
            Err(Error::LayerChanged { what, .. }) => assert!(what.contains("header"), "{what}"),
            other => panic!("a rewritten layer passed: {other:?}"),
        }
    }
}
