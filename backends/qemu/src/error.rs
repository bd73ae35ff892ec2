//! The one place where this crate's failures become [`stagecore::Error`].
//!
//! qcow2 errors go through [`qcow2`] (typed calls, mapped once). Every constructor names what
//! failed and where (socket path, binary path, command name). QMP error replies keep their class
//! and description as a `QmpCommandError` source inside [`Error::Backend`], so callers can
//! downcast (see `qmp::command_error`). This module depends on no other module of the crate.

use std::path::Path;
use std::time::Duration;

use stagecore::Error;

/// The backend name used in every error.
pub(crate) const BACKEND: &str = "qemu";

/// The QMP socket (or another endpoint) cannot be reached or was lost.
pub(crate) fn unreachable(endpoint: &Path, reason: impl Into<String>) -> Error {
    Error::Unreachable { endpoint: endpoint.display().to_string(), reason: reason.into() }
}

/// An operation did not finish within `limit`.
pub(crate) fn timeout(operation: impl Into<String>, limit: Duration) -> Error {
    Error::Timeout { operation: operation.into(), seconds: limit.as_secs_f64() }
}

/// QEMU answered a command with `{"error": {"class", "desc"}}`.
/// (`err` is the `QmpCommandError`, kept as the source.)
pub(crate) fn command(err: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::backend(BACKEND, err)
}

/// A protocol violation or unexpected reply shape.
pub(crate) fn protocol(socket: &Path, what: impl std::fmt::Display) -> Error {
    Error::backend_msg(BACKEND, format!("QMP protocol error on {}: {what}", socket.display()))
}

/// Any other backend failure, as a message.
pub(crate) fn msg(what: impl std::fmt::Display) -> Error {
    Error::backend_msg(BACKEND, what)
}

/// A failure of the in-process qcow2 code, as an error of this backend: the one place qcow2
/// errors are mapped (every call goes through `stagecore_qcow2::typed` and this function, never
/// through the `From` conversion that would name backend "qcow2").
pub(crate) fn qcow2(e: stagecore_qcow2::Error) -> Error {
    e.into_core(BACKEND)
}

/// An I/O failure on a named path.
pub(crate) fn io(action: &str, path: &Path, e: &std::io::Error) -> Error {
    Error::backend_msg(BACKEND, format!("{action} {}: {e}", path.display()))
}

/// The QEMU binary could not be started.
pub(crate) fn binary(binary: &Path, e: &std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::NotFound => Error::not_found("qemu binary", binary.display().to_string()),
        _ => Error::backend_msg(BACKEND, format!("cannot execute qemu binary {}: {e}", binary.display())),
    }
}
