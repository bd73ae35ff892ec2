//! qcow2 layer operations, for now through `qemu-img` / `qemu-io` (std::process).
//!
//! This is the ONE place that touches image files. It will switch to the shared in-process
//! `stagecore-qcow2` crate (same function shapes: overlay creation, info, chain, changed_since,
//! allocated-only copy, read/write/digest) once its API settles. All functions block; callers
//! run them on `spawn_blocking`. Reads use `-U` (force-share) so they work on images a running
//! QEMU holds; writes need the image to be free (machine stopped).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use stagecore::extent::{self, Extent};
use stagecore::{Error, Result};

use crate::error;

/// What `qemu-img info` says about one image.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ImageInfo {
    /// The file name.
    pub(crate) filename: String,
    /// `qcow2`, `raw`, …
    pub(crate) format: String,
    /// Virtual size in bytes.
    #[serde(rename = "virtual-size")]
    pub(crate) virtual_size: u64,
    /// Cluster size (qcow2 only).
    #[serde(rename = "cluster-size", default)]
    pub(crate) cluster_size: Option<u64>,
}

fn run(tool: &str, args: &[&str], subject: &Path) -> Result<Vec<u8>> {
    let out = Command::new(tool).args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Unreachable { endpoint: tool.into(), reason: format!("{tool} is not installed") }
        } else {
            error::io(subject, e)
        }
    })?;
    if !out.status.success() {
        return Err(error::tool(tool, subject, &out.stderr));
    }
    Ok(out.stdout)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Creates an empty image of `format` and `size` bytes (fails if `path` exists).
pub(crate) fn create_image(path: &Path, format: &str, size: u64) -> Result<()> {
    if path.exists() {
        return Err(Error::already_exists("image", path.display().to_string()));
    }
    run("qemu-img", &["create", "-q", "-f", format, s(path), &size.to_string()], path).map(drop)
}

/// Creates a qcow2 overlay at `path` over `backing` (fails if `path` exists).
pub(crate) fn create_overlay(path: &Path, backing: &Path) -> Result<()> {
    if path.exists() {
        return Err(Error::already_exists("image", path.display().to_string()));
    }
    let format = info(backing)?.format;
    let args = ["create", "-q", "-f", "qcow2", "-F", &format, "-b", s(backing), s(path)];
    run("qemu-img", &args, path).map(drop)
}

/// `qemu-img info` of one image.
pub(crate) fn info(path: &Path) -> Result<ImageInfo> {
    let out = run("qemu-img", &["info", "-U", "--output=json", s(path)], path)?;
    serde_json::from_slice(&out).map_err(|e| error::json("qemu-img info", e))
}

/// The chain from `top` down to its base, with canonical paths.
pub(crate) fn chain(top: &Path) -> Result<Vec<(PathBuf, ImageInfo)>> {
    let out = run("qemu-img", &["info", "-U", "--backing-chain", "--output=json", s(top)], top)?;
    let infos: Vec<ImageInfo> = serde_json::from_slice(&out).map_err(|e| error::json("qemu-img info", e))?;
    Ok(infos.into_iter().map(|i| (canonical(Path::new(&i.filename)), i)).collect())
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

#[derive(Deserialize)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: usize,
}

/// Extents allocated in the layers of `top`'s chain above `base` (guest offsets) and the
/// granularity (smallest cluster size of those layers); `None` when `base` is not in the chain.
pub(crate) fn changed_since(top: &Path, base: &Path) -> Result<Option<(Vec<Extent>, u64)>> {
    let base = canonical(base);
    let chain = chain(top)?;
    let Some(depth) = chain.iter().position(|(p, _)| *p == base) else { return Ok(None) };
    let granularity = chain[..depth].iter().filter_map(|(_, i)| i.cluster_size).min().unwrap_or(1);
    let out = run("qemu-img", &["map", "-U", "--output=json", s(top)], top)?;
    let map: Vec<MapEntry> = serde_json::from_slice(&out).map_err(|e| error::json("qemu-img map", e))?;
    let extents =
        map.iter().filter(|e| e.depth < depth).map(|e| Extent { offset: e.start, length: e.length }).collect();
    Ok(Some((extent::normalize(extents), granularity)))
}

/// Copies what `src`'s chain allocates into a new independent qcow2 image `dst`.
pub(crate) fn copy_allocated(src: &Path, dst: &Path) -> Result<()> {
    if dst.exists() {
        return Err(Error::already_exists("image", dst.display().to_string()));
    }
    let r = run("qemu-img", &["convert", "-U", "-O", "qcow2", s(src), s(dst)], src).map(drop);
    if r.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    r
}

/// Reads `len` guest bytes at `offset` (a raw window over the chain, converted to a temp file).
pub(crate) fn read_at(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    const BS: u64 = 512;
    let start = offset / BS * BS;
    let end = (offset + len).div_ceil(BS) * BS;
    let dir = tempfile::tempdir().map_err(|e| error::io(path, e))?;
    let out = dir.path().join("window.raw");
    let format = info(path)?.format;
    let opts = format!(
        "driver=raw,offset={start},size={},file.driver={format},file.file.filename={}",
        end - start,
        s(path).replace(',', ",,")
    );
    run("qemu-img", &["convert", "-U", "--image-opts", &opts, "-O", "raw", s(&out)], path)?;
    let data = std::fs::read(&out).map_err(|e| error::io(&out, e))?;
    let from = (offset - start) as usize;
    let mut bytes = data.get(from..).unwrap_or_default().to_vec();
    bytes.resize(len as usize, 0);
    Ok(bytes)
}

/// Writes `data` at `offset` into the top image (the image must not be in use).
pub(crate) fn write_at(path: &Path, offset: u64, data: &[u8]) -> Result<()> {
    let mut tmp = tempfile::NamedTempFile::new().map_err(|e| error::io(path, e))?;
    tmp.write_all(data).and_then(|_| tmp.flush()).map_err(|e| error::io(tmp.path(), e))?;
    let cmd = format!("write -q -s {} {offset} {}", s(tmp.path()), data.len());
    let out = run("qemu-io", &["-c", &cmd, s(path)], path)?;
    let text = String::from_utf8_lossy(&out);
    if text.contains("failed") || text.contains("Permission") {
        return Err(Error::backend_msg(error::NAME, format!("qemu-io on {}: {}", path.display(), text.trim())));
    }
    Ok(())
}

/// SHA-256 of the whole guest-visible content.
pub(crate) fn digest(path: &Path) -> Result<[u8; 32]> {
    let dir = tempfile::tempdir().map_err(|e| error::io(path, e))?;
    let raw = dir.path().join("flat.raw");
    run("qemu-img", &["convert", "-U", "-O", "raw", s(path), s(&raw)], path)?;
    let mut f = std::fs::File::open(&raw).map_err(|e| error::io(&raw, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| error::io(&raw, e))?;
    Ok(h.finalize().into())
}
