//! The one place where this crate's failures become [`stagecore::Error`].
//!
//! Contract: a missing file is `NotFound` naming the path; a malformed image is `InvalidSpec`
//! whose `path` is the image file and whose `reason` says what is wrong; any other I/O failure is
//! `Backend { backend: "qcow2" }` whose message names the operation and the file.

use std::fmt;
use std::io;
use std::path::Path;

use stagecore::Error;

/// Backend name used in every [`Error::Backend`] of this crate.
pub(crate) const BACKEND: &str = "qcow2";

/// An I/O error with the operation and file it happened on.
#[derive(Debug)]
struct IoContext {
    context: String,
    source: io::Error,
}

impl fmt::Display for IoContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.context, self.source)
    }
}

impl std::error::Error for IoContext {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Maps an I/O error during `op` on `path`. `NotFound` becomes [`Error::NotFound`].
pub(crate) fn io(op: &str, path: &Path, e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::NotFound => Error::not_found("disk image", path.display().to_string()),
        io::ErrorKind::AlreadyExists => Error::already_exists("disk image", path.display().to_string()),
        io::ErrorKind::UnexpectedEof => corrupt(path, format!("{op}: unexpected end of file")),
        _ => Error::backend(BACKEND, IoContext { context: format!("{op} {}", path.display()), source: e }),
    }
}

/// A malformed or truncated image: [`Error::InvalidSpec`] naming the file.
pub(crate) fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::invalid(path.display().to_string(), reason)
}

/// A feature of an image this crate does not handle.
pub(crate) fn unsupported(operation: &'static str) -> Error {
    Error::not_supported(operation, BACKEND)
}

/// Shorthand used with `map_err`: `.map_err(ctx("read header", path))`.
pub(crate) fn ctx<'a>(op: &'a str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |e| io(op, path, e)
}
