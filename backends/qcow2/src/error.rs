//! This crate's own error type, and the one place where it becomes [`stagecore::Error`].
//!
//! Contract: every variant names the file it is about; there is no blanket `From<io::Error>`
//! (an I/O failure is always built with the operation and the file, by [`io`] / [`ctx`]).
//! [`Error::into_core`] (with the caller's backend name) keeps each variant's meaning:
//!
//! | qcow2 | stagecore |
//! |---|---|
//! | `NotFound` | `NotFound { kind, name: <path> }` |
//! | `AlreadyExists` | `AlreadyExists { kind: "disk image", name: <path> }` |
//! | `NotQcow2`, `Corrupt` | `InvalidSpec { path: <file>, reason }` |
//! | `UnsupportedFeature` | `NotSupported { operation: <feature>, backend: <caller> }` |
//! | `BaseNotInChain` | `InvalidSpec { path: "base", reason: "<base> is not in the backing chain of <top>" }` |
//! | `InvalidArgument` | `InvalidSpec { path: <argument name>, reason }` |
//! | `LayerChanged` | `Precondition("<file>: layer changed since it was sealed: <what>")` |
//! | `Io` | `Backend { backend: <caller>, source: <this error> }` |

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A qcow2 feature (or use of one) this crate does not handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Feature {
    /// Encrypted images (`crypt_method` ≠ 0): neither read nor written.
    Encryption,
    /// An external data file (incompatible feature bit 2).
    ExternalDataFile,
    /// Incompatible feature bits this crate does not know (the unknown bits).
    UnknownIncompatible(u64),
    /// A compression type other than deflate (0) and zstd (1), met when reading a compressed cluster.
    CompressionType(u8),
    /// Writing into an image with extended L2 entries (subclusters); reading is supported.
    ExtendedL2Write,
    /// Writing into an image with internal snapshots (clusters may be shared).
    WriteWithSnapshots,
    /// Writing into an image whose refcount width is not 16 bits (the value is `refcount_order`).
    WriteRefcountWidth(u32),
    /// Writing would need a bigger refcount table.
    GrowRefcountTable,
}

impl Feature {
    /// A fixed description, used as `operation` of [`stagecore::Error::NotSupported`].
    pub fn as_str(self) -> &'static str {
        match self {
            Feature::Encryption => "qcow2 encryption",
            Feature::ExternalDataFile => "qcow2 external data file",
            Feature::UnknownIncompatible(_) => "unknown qcow2 incompatible features",
            Feature::CompressionType(_) => "qcow2 compression type other than deflate and zstd",
            Feature::ExtendedL2Write => "writing qcow2 with extended L2 entries (subclusters)",
            Feature::WriteWithSnapshots => "writing qcow2 with internal snapshots",
            Feature::WriteRefcountWidth(_) => "writing qcow2 with a refcount width other than 16 bits",
            Feature::GrowRefcountTable => "growing the qcow2 refcount table",
        }
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())?;
        match *self {
            Feature::UnknownIncompatible(bits) => write!(f, " ({bits:#x})"),
            Feature::CompressionType(t) => write!(f, " (type {t})"),
            Feature::WriteRefcountWidth(order) => write!(f, " ({} bits)", 1u64 << order.min(63)),
            _ => Ok(()),
        }
    }
}

/// Everything that can go wrong in this crate. Every variant names the file concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file does not exist.
    #[error("{kind} not found: {}", path.display())]
    NotFound {
        /// `"disk image"`, `"backing file"` or `"directory"`.
        kind: &'static str,
        /// The path looked up.
        path: PathBuf,
    },
    /// The destination of a new image exists (nothing was replaced).
    #[error("disk image already exists: {}", path.display())]
    AlreadyExists {
        /// The existing path.
        path: PathBuf,
    },
    /// The file is not a qcow2 image (too short, wrong magic, unknown version).
    #[error("{}: not a qcow2 image: {what}", path.display())]
    NotQcow2 {
        /// The file.
        path: PathBuf,
        /// What gave it away.
        what: String,
    },
    /// The file is a qcow2 image but its metadata is inconsistent or truncated (or the chain loops).
    #[error("{}: corrupt qcow2 image: {what}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The first problem found.
        what: String,
    },
    /// The image uses a feature this crate does not handle (for this operation).
    #[error("{}: unsupported qcow2 feature: {feature}", path.display())]
    UnsupportedFeature {
        /// The file.
        path: PathBuf,
        /// The feature.
        feature: Feature,
    },
    /// `base` (or `stop_at`) is not a file of the backing chain of `top`.
    #[error("{} is not in the backing chain of {}", base.display(), top.display())]
    BaseNotInChain {
        /// The file that was looked for.
        base: PathBuf,
        /// The top of the chain that was searched.
        top: PathBuf,
    },
    /// An argument is out of range or malformed.
    #[error("{}: invalid {arg}: {reason}", path.display())]
    InvalidArgument {
        /// The image (or destination) the call was about.
        path: PathBuf,
        /// The argument's name (`offset`, `virtual_size`, `backing`, `stop_at`, `path`).
        arg: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A sealed layer is no longer what its [`crate::LayerSeal`] recorded.
    #[error("{}: layer changed since it was sealed: {what}", path.display())]
    LayerChanged {
        /// The layer file.
        path: PathBuf,
        /// What differs (first difference found).
        what: String,
    },
    /// Any other I/O failure.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operation, e.g. `"read L2 table of"`.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The file this error is about (for `BaseNotInChain`: the base that was looked for).
    pub fn path(&self) -> &Path {
        match self {
            Error::NotFound { path, .. }
            | Error::AlreadyExists { path }
            | Error::NotQcow2 { path, .. }
            | Error::Corrupt { path, .. }
            | Error::UnsupportedFeature { path, .. }
            | Error::InvalidArgument { path, .. }
            | Error::LayerChanged { path, .. }
            | Error::Io { path, .. } => path,
            Error::BaseNotInChain { base, .. } => base,
        }
    }

    /// Whether a drift engine should report the disk NOT_CHECKED (reason: this error's
    /// `Display`) rather than fail: the crate cannot see the layer's changes
    /// (`UnsupportedFeature`), the baseline layer left the chain (`BaseNotInChain`) or was
    /// rewritten behind our back (`LayerChanged`).
    pub fn is_not_checked(&self) -> bool {
        matches!(self, Error::UnsupportedFeature { .. } | Error::BaseNotInChain { .. } | Error::LayerChanged { .. })
    }
}

impl Error {
    /// This error as a [`stagecore::Error`] raised by `backend` (the caller's backend name):
    /// the mapping table above, with `backend` in `Backend` and `NotSupported`, and the
    /// qcow2 error kept as the source of `NotFound` / `AlreadyExists` / `Backend`.
    pub fn into_core(self, backend: &'static str) -> stagecore::Error {
        match self {
            Error::NotFound { kind, ref path } => {
                let name = path.display().to_string();
                stagecore::Error::not_found_because(kind, name, self)
            }
            Error::AlreadyExists { ref path } => {
                let name = path.display().to_string();
                stagecore::Error::already_exists_because("disk image", name, self)
            }
            Error::UnsupportedFeature { feature, .. } => stagecore::Error::not_supported(feature.as_str(), backend),
            e @ Error::Io { .. } => stagecore::Error::backend(backend, e),
            Error::NotQcow2 { path, what } => {
                stagecore::Error::invalid(path.display().to_string(), format!("not a qcow2 image: {what}"))
            }
            Error::Corrupt { path, what } => stagecore::Error::invalid(path.display().to_string(), what),
            e @ Error::BaseNotInChain { .. } => stagecore::Error::invalid("base", e.to_string()),
            Error::InvalidArgument { arg, reason, .. } => stagecore::Error::invalid(arg, reason),
            e @ Error::LayerChanged { .. } => stagecore::Error::Precondition(e.to_string()),
        }
    }
}

/// Maps an I/O error during `op` on `path`: `NotFound`, `AlreadyExists` and a short read
/// (`Corrupt`, truncated) get their own variants, the rest is [`Error::Io`].
pub(crate) fn io(op: &'static str, path: &Path, e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::NotFound => Error::NotFound { kind: "disk image", path: path.to_path_buf() },
        io::ErrorKind::AlreadyExists => Error::AlreadyExists { path: path.to_path_buf() },
        io::ErrorKind::UnexpectedEof => corrupt(path, format!("truncated: {op}: unexpected end of file")),
        _ => Error::Io { path: path.to_path_buf(), op, source: e },
    }
}

/// A malformed or truncated image.
pub(crate) fn corrupt(path: &Path, what: impl Into<String>) -> Error {
    Error::Corrupt { path: path.to_path_buf(), what: what.into() }
}

/// A file that is not qcow2.
pub(crate) fn not_qcow2(path: &Path, what: impl Into<String>) -> Error {
    Error::NotQcow2 { path: path.to_path_buf(), what: what.into() }
}

/// A feature of an image this crate does not handle.
pub(crate) fn unsupported(path: &Path, feature: Feature) -> Error {
    Error::UnsupportedFeature { path: path.to_path_buf(), feature }
}

/// A bad argument of a call about `path`.
pub(crate) fn invalid(path: &Path, arg: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidArgument { path: path.to_path_buf(), arg, reason: reason.into() }
}

/// Shorthand used with `map_err`: `.map_err(ctx("read header of", path))`.
pub(crate) fn ctx<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |e| io(op, path, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_into_stagecore_keeps_meaning_and_names_the_caller() {
        let p = Path::new("/x/base.qcow2");
        let e: stagecore::Error = unsupported(p, Feature::ExtendedL2Write).into_core("qemu");
        assert!(
            matches!(e, stagecore::Error::NotSupported { backend: "qemu", operation } if operation.contains("extended L2"))
        );
        let e: stagecore::Error = Error::BaseNotInChain { base: p.into(), top: "/x/top".into() }.into_core("qemu");
        assert!(
            matches!(&e, stagecore::Error::InvalidSpec { path, reason } if path == "base" && reason.contains("/x/base.qcow2"))
        );
        let e: stagecore::Error = corrupt(p, "bad L2").into_core("qemu");
        assert!(matches!(&e, stagecore::Error::InvalidSpec { path, .. } if path == "/x/base.qcow2"));
        let e: stagecore::Error = Error::LayerChanged { path: p.into(), what: "L1 table".into() }.into_core("qemu");
        assert!(matches!(&e, stagecore::Error::Precondition(m) if m.contains("base.qcow2") && m.contains("L1")));
        let e: stagecore::Error = io("read L1 of", p, io::Error::from_raw_os_error(libc::EIO)).into_core("qemu");
        assert!(matches!(&e, stagecore::Error::Backend { backend: "qemu", .. }));
        assert!(e.to_string().contains("read L1 of /x/base.qcow2"), "{e}");
        let e: stagecore::Error = io("open", p, io::ErrorKind::NotFound.into()).into_core("qemu");
        assert!(matches!(&e, stagecore::Error::NotFound { name, .. } if name == "/x/base.qcow2"));
    }

    #[test]
    fn not_checked_variants() {
        let p = Path::new("/x");
        assert!(unsupported(p, Feature::Encryption).is_not_checked());
        assert!(Error::LayerChanged { path: p.into(), what: String::new() }.is_not_checked());
        assert!(!corrupt(p, "x").is_not_checked());
        assert_eq!(unsupported(p, Feature::CompressionType(7)).path(), p);
        assert!(unsupported(p, Feature::CompressionType(7)).to_string().contains("type 7"));
    }
}
