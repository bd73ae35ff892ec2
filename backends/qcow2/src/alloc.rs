//! What changed above a base layer: the chain walked lazily from the top down to the base (never
//! below it), with a bounded process-wide cache of the allocation maps of read-only layers.
//!
//! Contract: [`changed_since`] opens only the layers from the top down to `base` (a missing or
//! unreadable file *below* the base does not matter to the answer and is not touched). The top
//! layer is always read afresh (a guest writes it). A backing layer — read-only by the qcow2
//! contract — is looked up in the cache by (device, inode, size, mtime, ctime, hash of its first
//! 4 KiB): any write that grows the file, touches its timestamps or rewrites its header misses
//! the cache. The cache holds at most [`MAX_ENTRIES`] maps and [`MAX_EXTENTS`] extents in all;
//! the oldest entries go first.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::chain::{Ident, describe_source, identity, parse_backing_format, resolve_backing};
use crate::error::{Error, Result, corrupt, ctx};
use crate::header::is_qcow2;
use crate::layer::{Qcow2Layer, open_file, open_source};
use crate::source::{Resolver, Source};
use crate::types::{Extent, ImageFormat, ImageInfo, merge_extents};

/// Most allocation maps the cache holds.
pub(crate) const MAX_ENTRIES: usize = 4096;
/// Most extents the cache holds over all its maps (16 bytes each: 16 MiB).
pub(crate) const MAX_EXTENTS: usize = 1 << 20;
/// Longest chain walked (as [`Chain`](crate::chain::Chain)).
const MAX_DEPTH: usize = 1000;

/// What identifies one unchanged version of a layer file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    header: u64,
}

/// Where a chain continues below a layer: the resolved backing file and its recorded format.
type Backing = Option<(PathBuf, Option<ImageFormat>)>;

/// A cached layer: its own allocation and where its chain continues.
struct Entry {
    extents: Arc<Vec<Extent>>,
    backing: Backing,
}

#[derive(Default)]
struct Cache {
    map: HashMap<Key, Entry>,
    order: VecDeque<Key>,
    extents: usize,
}

static CACHE: Mutex<Option<Cache>> = Mutex::new(None);
static HITS: AtomicU64 = AtomicU64::new(0);
static MISSES: AtomicU64 = AtomicU64::new(0);

/// Serialises the tests (here and in `typed`) that read the process-wide counters or empty the cache.
#[cfg(test)]
pub(crate) static TEST_LOCK: Mutex<()> = Mutex::new(());

/// Counters of the allocation-map cache of read-only layers (process-wide).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CacheStats {
    /// Backing layers whose map came from the cache.
    pub hits: u64,
    /// Backing layers whose map was read from the file (and then cached).
    pub misses: u64,
    /// Maps held now.
    pub entries: usize,
}

/// The cache's counters.
pub(crate) fn stats() -> CacheStats {
    let entries = CACHE.lock().map(|c| c.as_ref().map_or(0, |c| c.map.len())).unwrap_or(0);
    CacheStats { hits: HITS.load(Ordering::Relaxed), misses: MISSES.load(Ordering::Relaxed), entries }
}

/// Empties the cache (counters stay).
pub(crate) fn clear() {
    if let Ok(mut c) = CACHE.lock() {
        *c = None;
    }
}

fn key_of(file: &File, path: &Path) -> Result<Key> {
    let m = file.metadata().map_err(ctx("stat", path))?;
    let mut head = vec![0u8; m.len().min(4096) as usize];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut head, 0).map_err(ctx("read header of", path))?;
    let mut h = DefaultHasher::new();
    head.hash(&mut h);
    Ok(Key {
        dev: m.dev(),
        ino: m.ino(),
        size: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
        header: h.finish(),
    })
}

fn lookup(key: &Key) -> Option<(Arc<Vec<Extent>>, Backing)> {
    let c = CACHE.lock().ok()?;
    let e = c.as_ref()?.map.get(key)?;
    Some((e.extents.clone(), e.backing.clone()))
}

fn insert(key: Key, extents: Arc<Vec<Extent>>, backing: Backing) {
    if extents.len() > MAX_EXTENTS / 4 {
        return; // one huge map would push everything else out
    }
    let Ok(mut guard) = CACHE.lock() else { return };
    let c = guard.get_or_insert_with(Cache::default);
    if c.map.contains_key(&key) {
        return;
    }
    while !c.order.is_empty() && (c.map.len() >= MAX_ENTRIES || c.extents + extents.len() > MAX_EXTENTS) {
        let old = c.order.pop_front().expect("non-empty");
        if let Some(e) = c.map.remove(&old) {
            c.extents -= e.extents.len();
        }
    }
    c.extents += extents.len();
    c.order.push_back(key.clone());
    c.map.insert(key, Entry { extents, backing });
}

/// See [`crate::changed_since`]: the union of the allocation of the layers from `top`
/// down to, excluding, `base`, opening nothing below `base`.
pub(crate) fn changed_since(resolver: Option<&dyn Resolver>, top: &Path, base: &Path) -> Result<Vec<Extent>> {
    walk(resolver, top, base, None)
}

/// See [`crate::info_and_changed_since`]: the top is opened once for both answers.
pub(crate) fn info_and_changed_since(top: &Path, base: &Path) -> Result<(ImageInfo, Result<Vec<Extent>>)> {
    let src = open_source(None, top, false)?;
    let info = describe_source(&src, top)?;
    Ok((info, walk(None, top, base, Some(src))))
}

/// The walk of [`changed_since`]; `opened` is the top when the caller opened it already.
fn walk(resolver: Option<&dyn Resolver>, top: &Path, base: &Path, mut opened: Option<Source>) -> Result<Vec<Extent>> {
    let base_id = match resolver {
        None => {
            let f = open_file(base, false)?;
            identity(&Source::File(f), base)?
        }
        Some(_) => Ident::Path(base.to_path_buf()),
    };
    let not_in_chain = || Error::BaseNotInChain { base: base.to_path_buf(), top: top.to_path_buf() };
    let (mut path, mut format) = (top.to_path_buf(), Some(ImageFormat::Qcow2));
    let mut seen = HashSet::new();
    let mut all: Vec<Extent> = Vec::new();
    for depth in 0..MAX_DEPTH {
        let src = match opened.take() {
            Some(src) => src,
            None => open_source(resolver, &path, false).map_err(|e| match e {
                Error::NotFound { path, .. } if depth > 0 => Error::NotFound { kind: "backing file", path },
                other => other,
            })?,
        };
        let id = identity(&src, &path)?;
        if id == base_id {
            return Ok(merge_extents(all));
        }
        if !seen.insert(id) {
            return Err(corrupt(&path, "backing chain contains a loop"));
        }
        let qcow2 = match format {
            Some(ImageFormat::Qcow2) => true,
            Some(ImageFormat::Raw) => false,
            None => is_qcow2(&src),
        };
        if !qcow2 {
            // A raw file ends the chain, and it is not the base.
            return Err(not_in_chain());
        }
        // Backing layers of local files are read-only: their maps may come from the cache.
        let key = match (depth, src.as_file()) {
            (1.., Some(f)) => Some(key_of(f, &path)?),
            _ => None,
        };
        let cached = key.as_ref().and_then(lookup);
        let backing = match cached {
            Some((extents, backing)) => {
                HITS.fetch_add(1, Ordering::Relaxed);
                all.extend(extents.iter().copied());
                backing
            }
            None => {
                let mut q = Qcow2Layer::from_source(&path, src)?;
                let extents = Arc::new(q.allocated()?);
                let backing = match q.header.backing_file.as_deref() {
                    None => None,
                    Some(name) => Some((
                        resolve_backing(&q.path, name),
                        parse_backing_format(&q.path, q.header.backing_format.as_deref())?,
                    )),
                };
                all.extend(extents.iter().copied());
                if let Some(key) = key {
                    MISSES.fetch_add(1, Ordering::Relaxed);
                    insert(key, extents, backing.clone());
                }
                backing
            }
        };
        let Some((next, fmt)) = backing else { return Err(not_in_chain()) };
        (path, format) = (next, fmt);
    }
    Err(corrupt(top, format!("backing chain deeper than {MAX_DEPTH}")))
}

#[cfg(test)]
mod tests {
    use super::TEST_LOCK as LOCK;
    use super::*;

    #[test]
    fn the_cache_stays_bounded() {
        let _g = LOCK.lock().unwrap();
        let key = |i: u64| Key { dev: u64::MAX, ino: i, size: 0, mtime: (0, 0), ctime: (0, 0), header: 0 };
        let one = Arc::new(vec![Extent { offset: 0, length: 1 }]);
        for i in 0..(MAX_ENTRIES as u64 + 10) {
            insert(key(i), one.clone(), None);
        }
        {
            let guard = CACHE.lock().unwrap();
            let c = guard.as_ref().unwrap();
            assert!(c.map.len() <= MAX_ENTRIES && c.order.len() == c.map.len());
            assert!(!c.map.contains_key(&key(0)), "the oldest went first");
            assert!(c.map.contains_key(&key(MAX_ENTRIES as u64 + 9)));
        }
        clear();
        assert_eq!(stats().entries, 0);
    }
}
