//! [`Seals`]: the [`LayerSeal`]s of an environment's read-only layers, kept in its record, made
//! when a baseline freezes layers and checked before anything trusts them again (drift, staging,
//! promotion).
//!
//! Contract: one seal per file, keyed by the file's canonical path (a path that does not resolve
//! is kept as given; layers read through a [`Resolver`] — the `*_in` methods — are keyed by the
//! path as given). [`Seals::seal_chains`] seals a layer and every file below it (what a clone
//! of the layer reads; a raw layer is a chain of itself); [`Seals::verify_chains`] checks every *sealed* file of those chains and
//! fails on the first that no longer matches with `stagecore::Error::Precondition("<file>: layer
//! changed since it was sealed: <what>")` — a file without a seal (a record written before seals
//! existed) is not checked. A backend that rewrites a sealed layer itself (merging a chain,
//! rewriting a backing-file name) calls [`Seals::reseal`] or [`Seals::remove`] in the same step.
//! The `*_in` methods do the same over a [`Resolver`] (a remote host's storage volumes): seals
//! without a modification time ([`crate::seal_in`]), checked in full every time.
//! All calls are blocking file I/O on metadata (header, L1/L2 and refcount tables), never data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::chain::Chain;
use crate::seal::{self as seal_mod, LayerSeal};
use crate::source::Resolver;

/// The seals of a set of layer files (see the module docs). Serialises as a JSON object
/// `{ "<file>": LayerSeal, ... }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seals(BTreeMap<PathBuf, LayerSeal>);

/// The key of `path`: canonical when it resolves on the local filesystem; as given when read
/// through a resolver (`at`).
fn key(at: At<'_>, path: &Path) -> PathBuf {
    match at {
        None => std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
        Some(_) => path.to_path_buf(),
    }
}

/// How layers are opened: local files (`None`) or through a resolver.
type At<'a> = Option<&'a dyn Resolver>;

/// Every file of the chain of `layer` (the layer first); a raw layer is a chain of itself.
fn chain_files(at: At<'_>, layer: &Path) -> crate::Result<Vec<PathBuf>> {
    match Chain::open_in(at, layer, false).and_then(|c| c.infos()) {
        Ok(chain) => Ok(chain.into_iter().map(|i| i.path).collect()),
        Err(Error::NotQcow2 { path, .. }) if path == layer => Ok(vec![layer.to_path_buf()]),
        Err(e) => Err(e),
    }
}

fn seal_one(at: At<'_>, path: &Path) -> crate::Result<LayerSeal> {
    match at {
        None => seal_mod::seal(path),
        Some(r) => seal_mod::seal_in(r, path),
    }
}

fn verify_one(at: At<'_>, path: &Path, seal: &LayerSeal) -> crate::Result<()> {
    match at {
        None => seal_mod::verify(path, seal),
        Some(r) => seal_mod::verify_in(r, path, seal),
    }
}

impl Seals {
    /// No seals.
    pub fn new() -> Self {
        Seals::default()
    }

    /// Whether there are no seals.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many files are sealed.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The seal of `path`, if it is sealed.
    pub fn get(&self, path: &Path) -> Option<&LayerSeal> {
        self.0.get(&key(None, path)).or_else(|| self.0.get(path))
    }

    /// Whether `path` is sealed.
    pub fn contains(&self, path: &Path) -> bool {
        self.get(path).is_some()
    }

    /// Every sealed file with its seal.
    pub fn iter(&self) -> impl Iterator<Item = (&Path, &LayerSeal)> {
        self.0.iter().map(|(p, s)| (p.as_path(), s))
    }

    /// Records `seal` for `path` (replacing an earlier one).
    pub fn insert(&mut self, path: &Path, seal: LayerSeal) {
        self.0.insert(key(None, path), seal);
    }

    /// Forgets the seal of `path`, returning it.
    pub fn remove(&mut self, path: &Path) -> Option<LayerSeal> {
        self.0.remove(&key(None, path)).or_else(|| self.0.remove(path))
    }

    /// Keeps only the seals for which `keep(file, seal)` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&Path, &LayerSeal) -> bool) {
        self.0.retain(|p, s| keep(p, s));
    }

    /// Adds every seal of `other` (a seal of the same file is replaced by `other`'s).
    pub fn extend(&mut self, other: Seals) {
        self.0.extend(other.0);
    }

    /// Moves the seal of `old` to `new` (a file renamed or hard-linked without rewriting it).
    pub fn rename(&mut self, old: &Path, new: &Path) {
        if let Some(s) = self.remove(old) {
            self.0.insert(new.to_path_buf(), s);
        }
    }

    /// Seals each of `paths` (replacing earlier seals). `backend` names the caller in errors.
    pub fn seal_all<P: AsRef<Path>>(
        &mut self,
        paths: impl IntoIterator<Item = P>,
        backend: &'static str,
    ) -> stagecore::Result<()> {
        self.seal_all_at(None, paths, backend)
    }

    /// [`Seals::seal_all`] of layers opened through `resolver` ([`crate::seal_in`]: no
    /// modification time); each is keyed by its path as given.
    pub fn seal_all_in<P: AsRef<Path>>(
        &mut self,
        resolver: &dyn Resolver,
        paths: impl IntoIterator<Item = P>,
        backend: &'static str,
    ) -> stagecore::Result<()> {
        self.seal_all_at(Some(resolver), paths, backend)
    }

    fn seal_all_at<P: AsRef<Path>>(
        &mut self,
        at: At<'_>,
        paths: impl IntoIterator<Item = P>,
        backend: &'static str,
    ) -> stagecore::Result<()> {
        for p in paths {
            let p = p.as_ref();
            let s = seal_one(at, p).map_err(|e| e.into_core(backend))?;
            self.0.insert(key(at, p), s);
        }
        Ok(())
    }

    /// Seals every file of the chain of each of `layers`: the layer and all its backing files.
    pub fn seal_chains<P: AsRef<Path>>(
        &mut self,
        layers: impl IntoIterator<Item = P>,
        backend: &'static str,
    ) -> stagecore::Result<()> {
        self.seal_chains_at(None, layers, backend)
    }

    /// [`Seals::seal_chains`] with every file of the chains opened through `resolver`.
    pub fn seal_chains_in<P: AsRef<Path>>(
        &mut self,
        resolver: &dyn Resolver,
        layers: impl IntoIterator<Item = P>,
        backend: &'static str,
    ) -> stagecore::Result<()> {
        self.seal_chains_at(Some(resolver), layers, backend)
    }

    fn seal_chains_at<P: AsRef<Path>>(
        &mut self,
        at: At<'_>,
        layers: impl IntoIterator<Item = P>,
        backend: &'static str,
    ) -> stagecore::Result<()> {
        for l in layers {
            let files = chain_files(at, l.as_ref()).map_err(|e| e.into_core(backend))?;
            self.seal_all_at(at, files, backend)?;
        }
        Ok(())
    }

    /// The seals of every sealed file of the chains of `layers`, as a new set (e.g. to copy
    /// production's seals of a baseline's layers into a stage's record).
    pub fn of_chains<P: AsRef<Path>>(
        &self,
        layers: impl IntoIterator<Item = P>,
        backend: &'static str,
    ) -> stagecore::Result<Seals> {
        self.of_chains_at(None, layers, backend)
    }

    /// [`Seals::of_chains`] with the chains read through `resolver`.
    pub fn of_chains_in<P: AsRef<Path>>(
        &self,
        resolver: &dyn Resolver,
        layers: impl IntoIterator<Item = P>,
        backend: &'static str,
    ) -> stagecore::Result<Seals> {
        self.of_chains_at(Some(resolver), layers, backend)
    }

    fn of_chains_at<P: AsRef<Path>>(
        &self,
        at: At<'_>,
        layers: impl IntoIterator<Item = P>,
        backend: &'static str,
    ) -> stagecore::Result<Seals> {
        let mut out = Seals::new();
        for l in layers {
            for f in chain_files(at, l.as_ref()).map_err(|e| e.into_core(backend))? {
                if let Some(s) = self.get(&f) {
                    out.0.insert(key(at, &f), s.clone());
                }
            }
        }
        Ok(out)
    }

    /// Checks each of `paths` that has a seal: `Precondition` naming the first file that no
    /// longer matches (`NotFound` when a sealed file is gone).
    pub fn verify_all<P: AsRef<Path>>(
        &self,
        paths: impl IntoIterator<Item = P>,
        backend: &'static str,
    ) -> stagecore::Result<()> {
        self.verify_all_at(None, paths, backend)
    }

    /// [`Seals::verify_all`] with each file opened through `resolver` ([`crate::verify_in`]:
    /// metadata read again every time).
    pub fn verify_all_in<P: AsRef<Path>>(
        &self,
        resolver: &dyn Resolver,
        paths: impl IntoIterator<Item = P>,
        backend: &'static str,
    ) -> stagecore::Result<()> {
        self.verify_all_at(Some(resolver), paths, backend)
    }

    fn verify_all_at<P: AsRef<Path>>(
        &self,
        at: At<'_>,
        paths: impl IntoIterator<Item = P>,
        backend: &'static str,
    ) -> stagecore::Result<()> {
        for p in paths {
            let p = p.as_ref();
            if let Some(s) = self.get(p) {
                verify_one(at, p, s).map_err(|e| e.into_core(backend))?;
            }
        }
        Ok(())
    }

    /// Checks every sealed file of the chain of each of `layers`. The layer itself is checked
    /// before its chain is walked, so a rewritten header is reported as the changed layer it
    /// is (not as whatever its new backing name leads to).
    pub fn verify_chains<P: AsRef<Path>>(
        &self,
        layers: impl IntoIterator<Item = P>,
        backend: &'static str,
    ) -> stagecore::Result<()> {
        self.verify_chains_at(None, layers, backend)
    }

    /// [`Seals::verify_chains`] with every file of the chains opened through `resolver`.
    pub fn verify_chains_in<P: AsRef<Path>>(
        &self,
        resolver: &dyn Resolver,
        layers: impl IntoIterator<Item = P>,
        backend: &'static str,
    ) -> stagecore::Result<()> {
        self.verify_chains_at(Some(resolver), layers, backend)
    }

    fn verify_chains_at<P: AsRef<Path>>(
        &self,
        at: At<'_>,
        layers: impl IntoIterator<Item = P>,
        backend: &'static str,
    ) -> stagecore::Result<()> {
        for l in layers {
            let l = l.as_ref();
            self.verify_all_at(at, [l], backend)?;
            let files = chain_files(at, l).map_err(|e| e.into_core(backend))?;
            self.verify_all_at(at, files.iter().skip(1), backend)?;
        }
        Ok(())
    }

    /// Seals `path` again if it is sealed (after the caller itself rewrote it without changing
    /// what it reads); returns whether it was sealed.
    pub fn reseal(&mut self, path: &Path, backend: &'static str) -> stagecore::Result<bool> {
        if !self.contains(path) {
            return Ok(false);
        }
        match seal_mod::seal(path) {
            Ok(s) => {
                self.remove(path);
                self.insert(path, s);
                Ok(true)
            }
            Err(e) => {
                // A seal that cannot be renewed must not stay: it would fail every later check.
                self.remove(path);
                Err(Error::into_core(e, backend))
            }
        }
    }
}
