//! Tests of the typed API as a whole: over a [`Resolver`] (images held in memory) and through the
//! allocation-map cache of backing layers. They sit above every internal module, so that no
//! module below `typed` needs to reach up to it.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::alloc;
use crate::error::Error;
use crate::source::{ReadAt, Resolver};
use crate::types::{Extent, ImageFormat};

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
    crate::create_overlay(&mid, &base, ImageFormat::Raw, None).unwrap();
    crate::write_at(&mid, 1 << 20, b"middle").unwrap();
    let top = dir.path().join("top.qcow2");
    crate::create_overlay(&top, &mid, ImageFormat::Qcow2, None).unwrap();
    crate::write_at(&top, 40 << 20, b"top").unwrap();
    let mem = Memory::default();
    for p in [&base, &mid, &top] {
        mem.load(p);
    }
    assert_eq!(crate::info_in(&mem, &top).unwrap(), crate::info(&top).unwrap());
    assert_eq!(crate::chain_in(&mem, &top).unwrap().len(), 3);
    mem.read.store(0, Ordering::Relaxed);
    let changed = crate::changed_since_in(&mem, &top, &mid).unwrap();
    assert_eq!(changed, crate::changed_since(&top, &mid).unwrap());
    let metadata = mem.read.load(Ordering::Relaxed);
    assert!(metadata < 1 << 20, "the map reads metadata only, not the 64 MiB disk: {metadata} bytes");
    assert_eq!(crate::changed_since_in(&mem, &top, &base).unwrap(), crate::changed_since(&top, &base).unwrap());
    assert!(matches!(crate::changed_since_in(&mem, &top, Path::new("/elsewhere")), Err(Error::BaseNotInChain { .. })));
    let mut a = vec![0u8; 8192];
    let mut b = vec![0u8; 8192];
    crate::read_at_in(&mem, &top, (1 << 20) - 4096, &mut a).unwrap();
    crate::read_at(&top, (1 << 20) - 4096, &mut b).unwrap();
    assert_eq!(a, b);
    assert_eq!(crate::digest_in(&mem, &top).unwrap(), crate::digest(&top).unwrap());
    crate::write_at_in(&mem, &top, 50 << 20, b"remote write").unwrap();
    crate::write_at(&top, 50 << 20, b"remote write").unwrap();
    assert_eq!(mem.bytes(&top), std::fs::read(&top).unwrap(), "byte-identical to a local write");
    assert_eq!(mem.bytes(&mid), std::fs::read(&mid).unwrap(), "backing files are never written");
    let missing = Path::new("/nope.qcow2");
    assert!(matches!(crate::info_in(&mem, missing), Err(Error::NotFound { .. })));
}

#[test]
fn a_backing_layer_map_is_cached_and_a_write_to_it_misses() {
    let _g = alloc::TEST_LOCK.lock().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    File::create(&base).unwrap().set_len(64 << 20).unwrap();
    crate::create_overlay(&mid, &base, ImageFormat::Raw, None).unwrap();
    crate::write_at(&mid, 1 << 20, b"mid").unwrap();
    crate::create_overlay(&top, &mid, ImageFormat::Qcow2, None).unwrap();
    crate::write_at(&top, 8 << 20, b"top").unwrap();
    let cs = 64 << 10;
    let want = vec![Extent { offset: 1 << 20, length: cs }, Extent { offset: 8 << 20, length: cs }];

    let before = alloc::stats();
    assert_eq!(crate::changed_since(&top, &base).unwrap(), want);
    let first = alloc::stats();
    assert_eq!((first.hits - before.hits, first.misses - before.misses), (0, 1), "mid read once");
    assert_eq!(crate::changed_since(&top, &base).unwrap(), want);
    let second = alloc::stats();
    assert_eq!((second.hits - first.hits, second.misses - first.misses), (1, 0), "mid from the cache");

    // The top is never cached: a new write there shows at once.
    crate::write_at(&top, 16 << 20, b"more").unwrap();
    let got = crate::changed_since(&top, &base).unwrap();
    assert_eq!(got.len(), 3, "{got:?}");

    // A layer written behind the contract's back grows: the cache misses and sees the write.
    crate::write_at(&mid, 32 << 20, b"late").unwrap();
    let got = crate::changed_since(&top, &base).unwrap();
    assert!(got.contains(&Extent { offset: 32 << 20, length: cs }), "{got:?}");
    assert_eq!(alloc::stats().misses - second.misses, 1);
}

#[test]
fn nothing_below_the_base_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let bottom = dir.path().join("bottom.raw");
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    File::create(&bottom).unwrap().set_len(64 << 20).unwrap();
    crate::create_overlay(&base, &bottom, ImageFormat::Raw, None).unwrap();
    crate::create_overlay(&top, &base, ImageFormat::Qcow2, None).unwrap();
    crate::write_at(&top, 0, b"x").unwrap();
    let elsewhere = dir.path().join("elsewhere");
    std::fs::write(&elsewhere, b"x").unwrap();
    assert!(matches!(crate::changed_since(&top, &elsewhere), Err(Error::BaseNotInChain { .. })));
    std::fs::remove_file(&bottom).unwrap();
    assert_eq!(crate::changed_since(&top, &base).unwrap().len(), 1);
    assert!(matches!(crate::chain(&top), Err(Error::NotFound { .. })), "the whole chain does need it");
    assert!(matches!(crate::changed_since(&top, &elsewhere), Err(Error::NotFound { .. })), "a broken chain");
}
