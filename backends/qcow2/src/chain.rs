//! Backing chains: opening every layer from a top image down to its base, with loop detection,
//! qemu's rules for relative backing names, and descriptions of each layer.
//!
//! Contract: [`Chain::open`] returns the layers top first; a missing backing file is `NotFound`
//! (kind `"backing file"`) naming the resolved path, a loop is `Corrupt` naming the file that
//! closes it, and the top must be a qcow2 image.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Feature, Result, corrupt, ctx, unsupported};
use crate::header::{Header, is_qcow2};
use crate::layer::{Layer, Qcow2Layer, open_file, open_source};
use crate::source::{ReadAt, Resolver, Source};
use crate::types::{ImageFormat, ImageInfo};

/// Longest chain accepted (qemu refuses deeper ones too).
const MAX_DEPTH: usize = 1000;

/// All layers of a chain, top first.
pub(crate) struct Chain {
    pub(crate) layers: Vec<Layer>,
    /// Whether the layers came from a resolver (identity by path) rather than local files.
    resolved: bool,
}

/// Resolves a stored backing name the way qemu does: relative names are relative to the
/// directory of the image that names them.
pub(crate) fn resolve_backing(image: &Path, name: &Path) -> PathBuf {
    if name.is_absolute() { name.to_path_buf() } else { image.parent().unwrap_or(Path::new(".")).join(name) }
}

/// Parses a backing-format string from a header.
pub(crate) fn parse_backing_format(path: &Path, s: Option<&str>) -> Result<Option<ImageFormat>> {
    match s {
        None => Ok(None),
        Some("qcow2") => Ok(Some(ImageFormat::Qcow2)),
        Some("raw") => Ok(Some(ImageFormat::Raw)),
        Some(other) => Err(corrupt(path, format!("unsupported backing format `{other}`"))),
    }
}

/// Identity of a layer for loop detection and `base` lookups.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Ident {
    /// (device, inode) of a local file.
    Inode(u64, u64),
    /// The path a resolver opened.
    Path(PathBuf),
}

/// Identity of an opened source: (device, inode) for files, the path otherwise.
pub(crate) fn identity(file: &Source, path: &Path) -> Result<Ident> {
    match file.as_file() {
        Some(f) => file_identity(f, path),
        None => Ok(Ident::Path(path.to_path_buf())),
    }
}

fn file_identity(file: &File, path: &Path) -> Result<Ident> {
    let m = file.metadata().map_err(ctx("stat", path))?;
    Ok(Ident::Inode(m.dev(), m.ino()))
}

/// Opens the qcow2 header of `path` only (no tables) and describes it.
pub(crate) fn describe(resolver: Option<&dyn Resolver>, path: &Path) -> Result<ImageInfo> {
    let file = open_source(resolver, path, false)?;
    describe_source(&file, path)
}

/// Describes the qcow2 image already opened as `file` (its header only).
pub(crate) fn describe_source(file: &Source, path: &Path) -> Result<ImageInfo> {
    let len = file.size().map_err(ctx("stat", path))?;
    let h = Header::read(file, path, len)?;
    info_of(path, &h)
}

fn info_of(path: &Path, h: &Header) -> Result<ImageInfo> {
    Ok(ImageInfo {
        path: path.to_path_buf(),
        format: ImageFormat::Qcow2,
        virtual_size: h.size,
        cluster_size: Some(h.cluster_size()),
        backing_file: h.backing_file.as_deref().map(|b| resolve_backing(path, b)),
        backing_format: parse_backing_format(path, h.backing_format.as_deref())?,
    })
}

impl Chain {
    /// Opens `top` (qcow2) and every backing file below it.
    pub(crate) fn open(top: &Path, write_top: bool) -> Result<Chain> {
        Chain::open_in(None, top, write_top)
    }

    /// Opens `top` (qcow2) and every backing file below it through `resolver` (local files when
    /// `None`).
    pub(crate) fn open_in(resolver: Option<&dyn Resolver>, top: &Path, write_top: bool) -> Result<Chain> {
        let mut layers = vec![Layer::open(resolver, top, Some(ImageFormat::Qcow2), write_top)?];
        let mut seen = HashSet::new();
        loop {
            let last = layers.last().expect("non-empty");
            let Layer::Qcow2(q) = last else { break };
            if !seen.insert(identity(&q.file, &q.path)?) {
                return Err(corrupt(&q.path, "backing chain contains a loop"));
            }
            let Some(name) = q.header.backing_file.as_deref() else { break };
            let next = resolve_backing(&q.path, name);
            let fmt = parse_backing_format(&q.path, q.header.backing_format.as_deref())?;
            if layers.len() >= MAX_DEPTH {
                return Err(corrupt(top, format!("backing chain deeper than {MAX_DEPTH}")));
            }
            let layer = Layer::open(resolver, &next, fmt, false).map_err(|e| match e {
                Error::NotFound { path, .. } => Error::NotFound { kind: "backing file", path },
                other => other,
            })?;
            if let Layer::Raw(r) = &layer
                && !seen.insert(identity(&r.file, &r.path)?)
            {
                return Err(corrupt(&q.path, "backing chain contains a loop"));
            }
            layers.push(layer);
        }
        Ok(Chain { layers, resolved: resolver.is_some() })
    }

    /// The top layer as qcow2.
    pub(crate) fn top(&mut self) -> &mut Qcow2Layer {
        match &mut self.layers[0] {
            Layer::Qcow2(q) => q,
            Layer::Raw(_) => unreachable!("Chain::open only accepts a qcow2 top"),
        }
    }

    /// Index of the layer that is the same file as `base`; `BaseNotInChain` if none is.
    pub(crate) fn index_of(&self, base: &Path) -> Result<usize> {
        let id = if self.resolved {
            Ident::Path(base.to_path_buf())
        } else {
            file_identity(&open_file(base, false)?, base)?
        };
        for (i, l) in self.layers.iter().enumerate() {
            let f = match l {
                Layer::Qcow2(q) => &q.file,
                Layer::Raw(r) => &r.file,
            };
            if identity(f, l.path())? == id {
                return Ok(i);
            }
        }
        Err(Error::BaseNotInChain { base: base.to_path_buf(), top: self.layers[0].path().to_path_buf() })
    }

    /// Describes every layer, top first.
    pub(crate) fn infos(&self) -> Result<Vec<ImageInfo>> {
        self.layers
            .iter()
            .map(|l| match l {
                Layer::Qcow2(q) => info_of(&q.path, &q.header),
                Layer::Raw(r) => Ok(ImageInfo {
                    path: r.path.clone(),
                    format: ImageFormat::Raw,
                    virtual_size: r.len,
                    cluster_size: None,
                    backing_file: None,
                    backing_format: None,
                }),
            })
            .collect()
    }
}

/// Size of a would-be backing file declared as `format`, checking that a qcow2 one is qcow2.
pub(crate) fn backing_size(path: &Path, format: ImageFormat) -> Result<u64> {
    let file = open_file(path, false).map_err(|e| match e {
        Error::NotFound { path, .. } => Error::NotFound { kind: "backing file", path },
        other => other,
    })?;
    let len = file.metadata().map_err(ctx("stat", path))?.len();
    match format {
        ImageFormat::Raw => Ok(len),
        ImageFormat::Qcow2 if !is_qcow2(&file) => Err(crate::error::not_qcow2(path, "declared as qcow2 backing file")),
        ImageFormat::Qcow2 => Ok(Header::read(&file, path, len)?.size),
    }
}

/// Fails with `UnsupportedFeature` if the layer's data cannot be read by this crate.
pub(crate) fn check_readable(q: &Qcow2Layer) -> Result<()> {
    if q.header.crypt_method != 0 {
        return Err(unsupported(&q.path, Feature::Encryption));
    }
    Ok(())
}
