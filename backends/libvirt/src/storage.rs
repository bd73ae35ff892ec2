//! Where image files live and how they are made, read and written: in this process's state
//! directory for a local URI ([`crate::layers`], direct file I/O), or on the host behind a remote
//! URI through libvirt's storage API only.
//!
//! Remote layout: one directory storage pool per environment, `stagecore-<env>`, with target
//! `<remote root>/<env>` on the host (default root `/var/lib/libvirt/images/stagecore`); every
//! file of the environment (disks, overlays, baseline and snapshot layers, serial logs) is a
//! volume of that pool. New disks are `virStorageVolCreateXML`, overlays the same with a
//! `<backingStore>`, same-host full copies `virStorageVolCreateXMLFrom` (libvirt flattens the
//! chain with `qemu-img convert` on the host). qcow2 metadata and data are read with
//! `virStorageVolDownload` (offset + length) and written with `virStorageVolUpload`, so
//! `stagecore_qcow2`'s allocation reader, chain reads and writes run unchanged over the wire
//! ([`VolResolver`]). No remote code path opens a local file.
//!
//! All functions here are blocking: call them inside [`crate::conn::Conn::run`].

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use stagecore::extent::Extent;
use stagecore::{Error, Result};
use stagecore_qcow2::{ImageFormat, ReadAt, Resolver};
use virt::connect::Connect;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;
use virt::sys;

use crate::conn::lv;
use crate::error::NAME;
use crate::layers::make_dir;
use crate::layers::{self, ImageInfo};

/// The default directory on a remote host under which environment pools are made.
pub(crate) const DEFAULT_REMOTE_ROOT: &str = "/var/lib/libvirt/images/stagecore";

/// Where the images of this backend live.
#[derive(Debug, Clone)]
pub(crate) enum Storage {
    /// Files under the local state directory.
    Local {
        /// The state directory.
        dir: PathBuf,
    },
    /// Volumes of per-environment pools under `root` on the remote host.
    Remote {
        /// The directory on the remote host.
        root: String,
        /// Bytes moved over streams so far (downloads + uploads), for benches and logs.
        moved: Arc<AtomicU64>,
    },
}

/// The pool of one environment on a remote host.
pub(crate) fn pool_name(env: &str) -> String {
    format!("stagecore-{env}")
}

fn file_name(path: &str) -> Result<String> {
    Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::invalid("image path", format!("{path} names no file")))
}

impl Storage {
    /// Whether images are remote volumes.
    pub(crate) fn is_remote(&self) -> bool {
        matches!(self, Storage::Remote { .. })
    }

    /// The directory of an environment's images (local path, or the path on the remote host).
    pub(crate) fn env_dir(&self, env: &str) -> String {
        match self {
            Storage::Local { dir } => dir.join(env).display().to_string(),
            Storage::Remote { root, .. } => format!("{}/{env}", root.trim_end_matches('/')),
        }
    }

    /// Where a layer made by a baseline, snapshot or revert goes (`layers/` locally; the
    /// environment's pool, which is flat, remotely).
    pub(crate) fn layer_path(&self, env: &str, file: &str) -> String {
        match self {
            Storage::Local { .. } => format!("{}/layers/{file}", self.env_dir(env)),
            Storage::Remote { .. } => format!("{}/{file}", self.env_dir(env)),
        }
    }

    /// Makes the directory of `path` (local) or the environment's pool (remote).
    pub(crate) fn ensure_dir(&self, c: &Connect, uri: &str, env: &str, path: &str) -> Result<()> {
        match self {
            Storage::Local { .. } => match Path::new(path).parent() {
                Some(p) => make_dir(p),
                None => Ok(()),
            },
            Storage::Remote { .. } => self.pool(c, uri, env).map(drop),
        }
    }

    /// The environment's pool, defined, built and started when missing.
    fn pool(&self, c: &Connect, uri: &str, env: &str) -> Result<StoragePool> {
        let name = pool_name(env);
        let pool = match c.lookup_storage_pool_by_name(&name) {
            Ok(p) => p,
            Err(_) => {
                let xml = format!(
                    "<pool type='dir'><name>{name}</name><target><path>{}</path></target></pool>",
                    self.env_dir(env)
                );
                let p = lv(uri, "storage pool", &name, c.define_storage_pool_xml(&xml, 0))?;
                lv(uri, "storage pool", &name, p.build(0))?;
                p
            }
        };
        if !pool.is_active().unwrap_or(false) {
            lv(uri, "storage pool", &name, pool.create(0))?;
        }
        Ok(pool)
    }

    /// Whether an image exists at `path`.
    pub(crate) fn exists(&self, c: &Connect, path: &str) -> bool {
        match self {
            Storage::Local { .. } => Path::new(path).exists(),
            Storage::Remote { .. } => lookup(c, path).is_ok(),
        }
    }

    /// Creates an empty image (`qcow2` or `raw`) of `size` bytes at `path` in `env`'s directory.
    pub(crate) fn create_image(
        &self,
        c: &Connect,
        uri: &str,
        env: &str,
        path: &str,
        format: &str,
        size: u64,
    ) -> Result<()> {
        match self {
            Storage::Local { .. } => {
                self.ensure_dir(c, uri, env, path)?;
                layers::create_image(Path::new(path), format, size)
            }
            Storage::Remote { .. } => {
                let pool = self.pool(c, uri, env)?;
                let name = file_name(path)?;
                let xml = format!(
                    "<volume><name>{name}</name><capacity unit='bytes'>{size}</capacity>\
                     <allocation unit='bytes'>0</allocation><target><format type='{format}'/></target></volume>"
                );
                lv(uri, "storage volume", path, StorageVol::create_xml(&pool, &xml, 0)).map(drop)
            }
        }
    }

    /// Creates a qcow2 overlay at `path` (in `env`'s directory) over `backing`.
    pub(crate) fn create_overlay(&self, c: &Connect, uri: &str, env: &str, path: &str, backing: &str) -> Result<()> {
        match self {
            Storage::Local { .. } => {
                self.ensure_dir(c, uri, env, path)?;
                layers::create_overlay(Path::new(path), Path::new(backing))
            }
            Storage::Remote { .. } => {
                let pool = self.pool(c, uri, env)?;
                let info = self.info(c, uri, backing)?;
                let fmt = if info.format == ImageFormat::Qcow2 { "qcow2" } else { "raw" };
                let name = file_name(path)?;
                let xml = format!(
                    "<volume><name>{name}</name><capacity unit='bytes'>{}</capacity>\
                     <target><format type='qcow2'/></target>\
                     <backingStore><path>{backing}</path><format type='{fmt}'/></backingStore></volume>",
                    info.virtual_size
                );
                lv(uri, "storage volume", path, StorageVol::create_xml(&pool, &xml, 0)).map(drop)
            }
        }
    }

    /// A full copy of `src`'s chain (allocated data only) as a new independent qcow2 at `dst`
    /// (same host).
    pub(crate) fn copy_full(&self, c: &Connect, uri: &str, env: &str, src: &str, dst: &str) -> Result<()> {
        match self {
            Storage::Local { .. } => {
                self.ensure_dir(c, uri, env, dst)?;
                layers::copy_allocated(Path::new(src), Path::new(dst))
            }
            Storage::Remote { .. } => {
                let pool = self.pool(c, uri, env)?;
                let info = self.info(c, uri, src)?;
                let from = lookup(c, src).map_err(|e| crate::error::map(&e, ctx(uri, src)))?;
                let name = file_name(dst)?;
                let xml = format!(
                    "<volume><name>{name}</name><capacity unit='bytes'>{}</capacity>\
                     <target><format type='qcow2'/></target></volume>",
                    info.virtual_size
                );
                lv(uri, "storage volume", dst, StorageVol::create_xml_from(&pool, &xml, &from, 0)).map(drop)
            }
        }
    }

    /// Renames a finished image into place (local rename; remote: a same-pool copy-free rename is
    /// not in libvirt's API, so a volume clone by `virStorageVolCreateXMLFrom` and delete).
    pub(crate) fn rename(&self, c: &Connect, uri: &str, env: &str, from: &str, to: &str) -> Result<()> {
        match self {
            Storage::Local { .. } => std::fs::rename(from, to).map_err(|e| crate::error::io(Path::new(to), e)),
            Storage::Remote { .. } => {
                self.copy_full(c, uri, env, from, to)?;
                self.remove_image(c, uri, from)
            }
        }
    }

    /// Removes one image (best effort cleanup after a failed operation).
    pub(crate) fn remove_image(&self, c: &Connect, uri: &str, path: &str) -> Result<()> {
        match self {
            Storage::Local { .. } => std::fs::remove_file(path).map_err(|e| crate::error::io(Path::new(path), e)),
            Storage::Remote { .. } => {
                let vol = lookup(c, path).map_err(|e| crate::error::map(&e, ctx(uri, path)))?;
                lv(uri, "storage volume", path, vol.delete(0))
            }
        }
    }

    /// Removes every image of `env` (local directory, or the pool with all its volumes).
    pub(crate) fn remove_env(&self, c: &Connect, uri: &str, env: &str) -> Result<()> {
        match self {
            Storage::Local { .. } => {
                let dir = PathBuf::from(self.env_dir(env));
                if dir.exists() {
                    std::fs::remove_dir_all(&dir).map_err(|e| crate::error::io(&dir, e))?;
                }
                Ok(())
            }
            Storage::Remote { .. } => {
                let name = pool_name(env);
                let Ok(pool) = c.lookup_storage_pool_by_name(&name) else { return Ok(()) };
                if !pool.is_active().unwrap_or(false) {
                    lv(uri, "storage pool", &name, pool.create(0))?;
                }
                let _ = pool.refresh(0);
                for vol in lv(uri, "storage pool", &name, pool.list_all_volumes(0))? {
                    let vname = vol.name().unwrap_or_default();
                    lv(uri, "storage volume", &vname, vol.delete(0))?;
                }
                lv(uri, "storage pool", &name, pool.destroy())?;
                lv(uri, "storage pool", &name, pool.delete(0))?;
                lv(uri, "storage pool", &name, pool.undefine())
            }
        }
    }

    /// Makes layers libvirt wrote itself (external snapshots) visible as volumes.
    pub(crate) fn refresh(&self, c: &Connect, env: &str) {
        if self.is_remote()
            && let Ok(pool) = c.lookup_storage_pool_by_name(&pool_name(env))
        {
            let _ = pool.refresh(0);
        }
    }

    /// Opens this storage's volumes by path over `c` (remote storage).
    pub(crate) fn resolver(&self, c: &Connect) -> VolResolver {
        let moved = match self {
            Storage::Remote { moved, .. } => moved.clone(),
            Storage::Local { .. } => Arc::new(AtomicU64::new(0)),
        };
        VolResolver { conn: c.clone(), moved }
    }

    /// Format and virtual size of one image.
    pub(crate) fn info(&self, c: &Connect, uri: &str, path: &str) -> Result<ImageInfo> {
        match self {
            Storage::Local { .. } => layers::info(Path::new(path)),
            Storage::Remote { .. } => {
                let r = self.resolver(c);
                match stagecore_qcow2::info_in(&r, Path::new(path)) {
                    Ok(i) => Ok(ImageInfo { format: i.format, virtual_size: i.virtual_size }),
                    Err(stagecore_qcow2::Error::NotQcow2 { .. }) => {
                        let vol = lookup(c, path).map_err(|e| crate::error::map(&e, ctx(uri, path)))?;
                        Ok(ImageInfo { format: ImageFormat::Raw, virtual_size: physical(&vol).map_err(io_err(path))? })
                    }
                    Err(e) => Err(crate::error::qcow2(e)),
                }
            }
        }
    }

    /// Extents changed in `top`'s chain above `base` and the granularity; `None` when `base`
    /// is not in the chain. Remote: metadata read over download streams only.
    pub(crate) fn changed_since(
        &self,
        c: &Connect,
        uri: &str,
        top: &str,
        base: &str,
    ) -> Result<Option<(Vec<Extent>, u64)>> {
        match self {
            Storage::Local { .. } => layers::changed_since(Path::new(top), Path::new(base)),
            Storage::Remote { .. } => {
                if self.info(c, uri, top)?.format == ImageFormat::Raw {
                    return Ok((top == base).then(|| (Vec::new(), 1)));
                }
                let r = self.resolver(c);
                let chain = stagecore_qcow2::chain_in(&r, Path::new(top)).map_err(crate::error::qcow2)?;
                let Some(depth) = chain.iter().position(|i| i.path == Path::new(base)) else { return Ok(None) };
                let granularity = chain[..depth].iter().filter_map(|i| i.cluster_size).min().unwrap_or(1);
                let extents = stagecore_qcow2::changed_since_in(&r, Path::new(top), Path::new(base))
                    .map_err(crate::error::qcow2)?;
                Ok(Some((extents, granularity)))
            }
        }
    }

    /// Every extent the chain of `top` allocates (all layers), for streaming a full copy.
    pub(crate) fn allocated(&self, c: &Connect, uri: &str, top: &str) -> Result<Vec<Extent>> {
        let info = self.info(c, uri, top)?;
        if info.format == ImageFormat::Raw {
            return Ok(vec![Extent { offset: 0, length: info.virtual_size }]);
        }
        let r = self.resolver(c);
        let local;
        let res: &dyn Resolver = match self {
            Storage::Local { .. } => {
                local = LocalFiles;
                &local
            }
            Storage::Remote { .. } => &r,
        };
        let mut all = Vec::new();
        for layer in stagecore_qcow2::chain_in(res, Path::new(top)).map_err(crate::error::qcow2)? {
            if layer.format == ImageFormat::Raw {
                all.push(Extent { offset: 0, length: layer.virtual_size.min(info.virtual_size) });
            } else {
                all.extend(stagecore_qcow2::allocated_extents_in(res, &layer.path).map_err(crate::error::qcow2)?);
            }
        }
        Ok(stagecore::extent::normalize(all))
    }

    /// Reads `len` guest bytes at `offset` (the caller checked the range).
    pub(crate) fn read_at(&self, c: &Connect, uri: &str, top: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        match self {
            Storage::Local { .. } => layers::read_at(Path::new(top), offset, len),
            Storage::Remote { .. } => {
                let mut buf = vec![0u8; len as usize];
                if self.info(c, uri, top)?.format == ImageFormat::Raw {
                    self.resolver(c)
                        .open(Path::new(top), false)
                        .and_then(|v| v.read_exact_at(&mut buf, offset))
                        .map_err(io_err(top))?;
                } else {
                    stagecore_qcow2::read_at_in(&self.resolver(c), Path::new(top), offset, &mut buf)
                        .map_err(crate::error::qcow2)?;
                }
                Ok(buf)
            }
        }
    }

    /// Writes `data` at guest `offset` into the top image (never while QEMU has it open).
    pub(crate) fn write_at(&self, c: &Connect, uri: &str, top: &str, offset: u64, data: &[u8]) -> Result<()> {
        match self {
            Storage::Local { .. } => layers::write_at(Path::new(top), offset, data),
            Storage::Remote { .. } => {
                if self.info(c, uri, top)?.format == ImageFormat::Raw {
                    return self
                        .resolver(c)
                        .open(Path::new(top), true)
                        .and_then(|v| v.write_all_at(data, offset))
                        .map_err(io_err(top));
                }
                stagecore_qcow2::write_at_in(&self.resolver(c), Path::new(top), offset, data)
                    .map_err(crate::error::qcow2)
            }
        }
    }

    /// SHA-256 of the guest-visible content.
    pub(crate) fn digest(&self, c: &Connect, uri: &str, top: &str) -> Result<[u8; 32]> {
        match self {
            Storage::Local { .. } => layers::digest(Path::new(top)),
            Storage::Remote { .. } => {
                if self.info(c, uri, top)?.format == ImageFormat::Raw {
                    use sha2::Digest as _;
                    let size = self.info(c, uri, top)?.virtual_size;
                    let mut h = sha2::Sha256::new();
                    let mut off = 0;
                    while off < size {
                        let n = (size - off).min(4 << 20);
                        h.update(self.read_at(c, uri, top, off, n)?);
                        off += n;
                    }
                    return Ok(h.finalize().into());
                }
                stagecore_qcow2::digest_in(&self.resolver(c), Path::new(top)).map_err(crate::error::qcow2)
            }
        }
    }

    /// Bytes moved over streams so far (remote only).
    pub(crate) fn moved(&self) -> u64 {
        match self {
            Storage::Remote { moved, .. } => moved.load(Ordering::Relaxed),
            Storage::Local { .. } => 0,
        }
    }
}

fn ctx<'a>(uri: &'a str, path: &'a str) -> crate::error::Ctx<'a> {
    crate::error::Ctx { uri, kind: "storage volume", name: path }
}

fn io_err(path: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::not_found_because("storage volume", path, e)
        } else {
            Error::backend_msg(NAME, format!("storage volume {path}: {e}"))
        }
    }
}

/// Looks a volume up by path; refreshes the pools once when libvirt does not know it yet (a file
/// libvirt wrote itself, such as an external snapshot's overlay).
fn lookup(c: &Connect, path: &str) -> std::result::Result<StorageVol, virt::error::Error> {
    match c.lookup_storage_vol_by_path(path) {
        Ok(v) => Ok(v),
        Err(_) => {
            if let Ok(pools) = c.list_all_storage_pools(sys::VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE) {
                for p in pools {
                    let _ = p.refresh(0);
                }
            }
            c.lookup_storage_vol_by_path(path)
        }
    }
}

/// The file length of a volume (not its capacity).
fn physical(vol: &StorageVol) -> io::Result<u64> {
    vol.info_flags(sys::VIR_STORAGE_VOL_GET_PHYSICAL).map(|i| i.allocation).map_err(to_io)
}

fn to_io(e: virt::error::Error) -> io::Error {
    let kind = match e.code().unwrap_or(virt::error::ErrorNumber::InternalError) {
        virt::error::ErrorNumber::NoStorageVolume => io::ErrorKind::NotFound,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e.message().to_string())
}

/// Opens storage volumes of one connection by path, for `stagecore_qcow2`'s `*_in` functions.
pub(crate) struct VolResolver {
    conn: Connect,
    moved: Arc<AtomicU64>,
}

impl Resolver for VolResolver {
    fn open(&self, path: &Path, _write: bool) -> io::Result<Box<dyn ReadAt>> {
        let p = path.to_string_lossy();
        let vol = lookup(&self.conn, &p).map_err(to_io)?;
        Ok(Box::new(RemoteVol { vol, conn: self.conn.clone(), moved: self.moved.clone() }))
    }
}

/// One storage volume as a byte source: reads are `virStorageVolDownload(offset, length)`,
/// writes `virStorageVolUpload(offset, length)`.
pub(crate) struct RemoteVol {
    vol: StorageVol,
    conn: Connect,
    moved: Arc<AtomicU64>,
}

impl ReadAt for RemoteVol {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let stream = Stream::new(&self.conn, 0).map_err(to_io)?;
        self.vol.download(&stream, offset, buf.len() as u64, 0).map_err(to_io)?;
        let mut done = 0;
        while done < buf.len() {
            match stream.recv(&mut buf[done..]).map_err(to_io)? {
                0 => break,
                n => done += n as usize,
            }
        }
        if done < buf.len() {
            let _ = stream.abort();
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        stream.finish().map_err(to_io)?;
        self.moved.fetch_add(done as u64, Ordering::Relaxed);
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        physical(&self.vol)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let stream = Stream::new(&self.conn, 0).map_err(to_io)?;
        self.vol.upload(&stream, offset, data.len() as u64, 0).map_err(to_io)?;
        let mut done = 0;
        while done < data.len() {
            match stream.send(&data[done..]).map_err(to_io)? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => done += n as usize,
            }
        }
        stream.finish().map_err(to_io)?;
        self.moved.fetch_add(done as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Only grows (what qcow2 allocation needs): uploads zeros up to `len`.
    fn set_len(&self, len: u64) -> io::Result<()> {
        let now = self.size()?;
        if len < now {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "remote volumes are never truncated"));
        }
        let mut at = now;
        let zeros = vec![0u8; 1 << 20];
        while at < len {
            let n = (len - at).min(zeros.len() as u64) as usize;
            self.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// Local files as a [`Resolver`] (for code shared by both modes).
struct LocalFiles;

impl Resolver for LocalFiles {
    fn open(&self, path: &Path, write: bool) -> io::Result<Box<dyn ReadAt>> {
        Ok(Box::new(std::fs::OpenOptions::new().read(true).write(write).open(path)?))
    }
}
