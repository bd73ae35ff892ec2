//! Byte sources behind layers: local files (the default) or anything that can read at an offset,
//! such as a remote storage volume read through a libvirt stream.
//!
//! Contract: [`ReadAt::read_exact_at`] fills the whole buffer or fails (`UnexpectedEof` when the
//! source is shorter); [`ReadAt::size`] is the current length in bytes. Writes are optional
//! (read-only sources keep the defaults, which fail with `Unsupported`). A [`Resolver`] opens the
//! top image and every backing file by the path the chain names; functions given a resolver never
//! touch the local filesystem.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Positional reads (and optionally writes) of one image's bytes.
pub trait ReadAt: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// The length in bytes.
    fn size(&self) -> io::Result<u64>;

    /// Writes all of `data` at `offset` (the default refuses: read-only source).
    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let _ = (data, offset);
        Err(io::Error::new(io::ErrorKind::Unsupported, "read-only source"))
    }

    /// Extends (or truncates) the source to `len` bytes (the default refuses: read-only source).
    fn set_len(&self, len: u64) -> io::Result<()> {
        let _ = len;
        Err(io::Error::new(io::ErrorKind::Unsupported, "read-only source"))
    }
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, data, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
}

/// Opens images by path: the top image and each backing file as the chain names it (relative
/// names are resolved against the naming image's directory first, as qemu does).
pub trait Resolver: Send + Sync {
    /// Opens `path`, for writing when `write` (only ever the top image). A missing image must be
    /// an error of kind `NotFound`.
    fn open(&self, path: &Path, write: bool) -> io::Result<Box<dyn ReadAt>>;
}

/// What a layer reads from.
pub(crate) enum Source {
    /// A local file (identity by device and inode; `copy_file_range` and `SEEK_DATA` work).
    File(File),
    /// A source opened by a [`Resolver`] (identity by path).
    Other(Box<dyn ReadAt>),
}

impl Source {
    fn inner(&self) -> &dyn ReadAt {
        match self {
            Source::File(f) => f,
            Source::Other(o) => o.as_ref(),
        }
    }

    /// The local file, if this is one.
    pub(crate) fn as_file(&self) -> Option<&File> {
        match self {
            Source::File(f) => Some(f),
            Source::Other(_) => None,
        }
    }
}

impl ReadAt for Source {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner().read_exact_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        self.inner().size()
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.inner().write_all_at(data, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner().set_len(len)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::typed;

    /// Images held in memory by path, counting the bytes read (a stand-in for a remote host).
    #[derive(Default)]
    struct Memory {
        files: Mutex<HashMap<PathBuf, Arc<Mutex<Vec<u8>>>>>,
        read: Arc<AtomicU64>,
    }

    struct Handle(Arc<Mutex<Vec<u8>>>, Arc<AtomicU64>, bool);

    impl ReadAt for Handle {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let v = self.0.lock().unwrap();
            let end = offset as usize + buf.len();
            if end > v.len() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            buf.copy_from_slice(&v[offset as usize..end]);
            self.1.fetch_add(buf.len() as u64, Ordering::Relaxed);
            Ok(())
        }
        fn size(&self) -> io::Result<u64> {
            Ok(self.0.lock().unwrap().len() as u64)
        }
        fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
            if !self.2 {
                return Err(io::ErrorKind::PermissionDenied.into());
            }
            let mut v = self.0.lock().unwrap();
            let end = offset as usize + data.len();
            if v.len() < end {
                v.resize(end, 0);
            }
            v[offset as usize..end].copy_from_slice(data);
            Ok(())
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.0.lock().unwrap().resize(len as usize, 0);
            Ok(())
        }
    }

    impl Resolver for Memory {
        fn open(&self, path: &Path, write: bool) -> io::Result<Box<dyn ReadAt>> {
            let files = self.files.lock().unwrap();
            let f = files.get(path).ok_or(io::ErrorKind::NotFound)?;
            Ok(Box::new(Handle(f.clone(), self.read.clone(), write)))
        }
    }

    impl Memory {
        fn load(&self, p: &Path) {
            self.files.lock().unwrap().insert(p.to_path_buf(), Arc::new(Mutex::new(std::fs::read(p).unwrap())));
        }
        fn bytes(&self, p: &Path) -> Vec<u8> {
            self.files.lock().unwrap()[p].lock().unwrap().clone()
        }
    }

    #[test]
    fn a_resolver_reads_maps_and_writes_like_local_files() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 64 << 20]).unwrap();
        let mid = dir.path().join("mid.qcow2");
        typed::create_overlay(&mid, &base, crate::ImageFormat::Raw, None).unwrap();
        typed::write_at(&mid, 1 << 20, b"middle").unwrap();
        let top = dir.path().join("top.qcow2");
        typed::create_overlay(&top, &mid, crate::ImageFormat::Qcow2, None).unwrap();
        typed::write_at(&top, 40 << 20, b"top").unwrap();
        let mem = Memory::default();
        for p in [&base, &mid, &top] {
            mem.load(p);
        }
        assert_eq!(typed::info_in(&mem, &top).unwrap(), typed::info(&top).unwrap());
        assert_eq!(typed::chain_in(&mem, &top).unwrap().len(), 3);
        mem.read.store(0, Ordering::Relaxed);
        let changed = typed::changed_since_in(&mem, &top, &mid).unwrap();
        assert_eq!(changed, typed::changed_since(&top, &mid).unwrap());
        let metadata = mem.read.load(Ordering::Relaxed);
        assert!(metadata < 1 << 20, "the map reads metadata only, not the 64 MiB disk: {metadata} bytes");
        assert_eq!(typed::changed_since_in(&mem, &top, &base).unwrap(), typed::changed_since(&top, &base).unwrap());
        assert!(matches!(
            typed::changed_since_in(&mem, &top, Path::new("/elsewhere")),
            Err(crate::Error::BaseNotInChain { .. })
        ));
        let mut a = vec![0u8; 8192];
        let mut b = vec![0u8; 8192];
        typed::read_at_in(&mem, &top, (1 << 20) - 4096, &mut a).unwrap();
        typed::read_at(&top, (1 << 20) - 4096, &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(typed::digest_in(&mem, &top).unwrap(), typed::digest(&top).unwrap());
        typed::write_at_in(&mem, &top, 50 << 20, b"remote write").unwrap();
        typed::write_at(&top, 50 << 20, b"remote write").unwrap();
        assert_eq!(mem.bytes(&top), std::fs::read(&top).unwrap(), "byte-identical to a local write");
        assert_eq!(mem.bytes(&mid), std::fs::read(&mid).unwrap(), "backing files are never written");
        let missing = Path::new("/nope.qcow2");
        assert!(matches!(typed::info_in(&mem, missing), Err(crate::Error::NotFound { .. })));
    }
}
