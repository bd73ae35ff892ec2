//! The one error type of stagecore.
//!
//! Every backend keeps its own private error details and maps them into [`Error`] in one place.
//! Variants say *what* went wrong and *where*; none of them ever carries a secret (passwords,
//! session tokens): backends must redact before building an error, and [`Secret`] makes that easy.

use std::fmt;

/// A boxed error source, as kept by [`Error::Backend`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type used throughout stagecore.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in stagecore.
///
/// The enum is `#[non_exhaustive]`: match the variants you care about and keep a fallback arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A named object (environment, machine, disk, snapshot, baseline, receipt, ...) does not exist.
    #[error("{kind} not found: {name}")]
    NotFound {
        /// What kind of object was looked up, e.g. `"environment"`, `"machine"`.
        kind: &'static str,
        /// The name (or path) that was looked up.
        name: String,
        /// What the lookup failed on (the hypervisor's answer, the I/O error), when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// An object with this name already exists.
    #[error("{kind} already exists: {name}")]
    AlreadyExists {
        /// What kind of object, e.g. `"environment"`.
        kind: &'static str,
        /// The clashing name.
        name: String,
        /// What reported the clash (the hypervisor's answer, the I/O error), when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// A spec or argument is malformed; `path` names the field, e.g. `machines[1].disks[0].source`.
    #[error("invalid spec at `{path}`: {reason}")]
    InvalidSpec {
        /// Field path inside the spec or argument (`machines[1].name`, `clone.name_prefix`).
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The backend cannot do this operation (see [`crate::Capabilities`]).
    #[error("operation `{operation}` is not supported by the {backend} backend")]
    NotSupported {
        /// The operation that was asked for, e.g. `"memory_snapshot"`.
        operation: &'static str,
        /// The backend's name.
        backend: &'static str,
    },
    /// Another holder has the lock on this environment (e.g. a promotion is running).
    #[error("{resource} is locked by {holder}")]
    Locked {
        /// What is locked, e.g. `environment prod`.
        resource: String,
        /// Who holds the lock (process, host, promotion id).
        holder: String,
    },
    /// A precondition does not hold (production drifted from the baseline, wrong state, ...).
    #[error("precondition failed: {0}")]
    Precondition(String),
    /// Credentials were rejected or a session expired and could not be renewed.
    #[error("unauthenticated at {endpoint}: {reason}")]
    Unauthenticated {
        /// Where authentication failed (URL without credentials, URI).
        endpoint: String,
        /// Why, as the server said it (never the credentials themselves).
        reason: String,
    },
    /// The hypervisor, daemon or server cannot be reached (possibly temporarily).
    #[error("cannot reach {endpoint}: {reason}")]
    Unreachable {
        /// The endpoint (socket path, URI, URL without credentials).
        endpoint: String,
        /// Why it could not be reached.
        reason: String,
    },
    /// The operation did not finish in time.
    #[error("{operation} timed out after {seconds:.1} s")]
    Timeout {
        /// The operation that timed out.
        operation: String,
        /// How long was waited.
        seconds: f64,
    },
    /// A guest command of a change (or gate) exited non-zero.
    #[error("guest command `{command}` in {machine} exited with {exit_code}: {stderr}")]
    GuestCommand {
        /// `environment/machine` it ran in.
        machine: String,
        /// The argv as one line (no stdin, no environment values).
        command: String,
        /// Its exit code.
        exit_code: i32,
        /// Its standard error (trimmed, at most 4 KiB).
        stderr: String,
    },
    /// A backend-specific failure, with its source.
    #[error("{backend} backend: {source}")]
    Backend {
        /// The backend's name (`memory`, `qemu`, `libvirt`, `vsphere`, or a third-party backend's).
        backend: &'static str,
        /// The underlying error (already free of secrets).
        #[source]
        source: BoxError,
        /// Whether the same call may succeed later, decided where the error was raised.
        temporary: bool,
    },
    /// A file of stagecore's own (a record, the promotion journal, a receipt) could not be
    /// read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done (`reading`, `writing`, `locking`, ...).
        action: &'static str,
        /// The file or directory.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A failure inside stagecore's own engines (drift, promotion, the toolbox), not a backend's:
    /// a corrupt journal, a record that cannot be serialised.
    #[error("stagecore {component}: {source}")]
    Core {
        /// The part of stagecore (`promotion`, `drift`, `toolbox`, ...).
        component: &'static str,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// An operation failed and its rollback could not undo everything: `left` says exactly
    /// what is still there (invariant 4), `source` why the operation failed.
    #[error("{operation} failed ({source}); rollback left behind: {}", left.join("; "))]
    LeftBehind {
        /// The operation that failed, e.g. `stage try-1`.
        operation: String,
        /// What could not be undone, one entry per step, each with the reason.
        left: Vec<String>,
        /// Why the operation failed.
        source: Box<Error>,
    },
}

impl Error {
    /// Builds [`Error::NotFound`].
    pub fn not_found(kind: &'static str, name: impl Into<String>) -> Self {
        Error::NotFound { kind, name: name.into(), source: None }
    }

    /// Builds [`Error::NotFound`] with what the lookup failed on.
    pub fn not_found_because(kind: &'static str, name: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::NotFound { kind, name: name.into(), source: Some(source.into()) }
    }

    /// Builds [`Error::AlreadyExists`].
    pub fn already_exists(kind: &'static str, name: impl Into<String>) -> Self {
        Error::AlreadyExists { kind, name: name.into(), source: None }
    }

    /// Builds [`Error::AlreadyExists`] with what reported the clash.
    pub fn already_exists_because(kind: &'static str, name: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::AlreadyExists { kind, name: name.into(), source: Some(source.into()) }
    }

    /// Builds [`Error::Io`] for a file at `path`.
    pub fn io(action: &'static str, path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io { action, path: path.as_ref().display().to_string(), source }
    }

    /// Builds [`Error::Core`] for a failure inside stagecore's own `component`.
    pub fn core(component: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Core { component, source: source.into() }
    }

    /// Builds [`Error::InvalidSpec`].
    pub fn invalid(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidSpec { path: path.into(), reason: reason.into() }
    }

    /// Builds [`Error::NotSupported`].
    pub fn not_supported(operation: &'static str, backend: &'static str) -> Self {
        Error::NotSupported { operation, backend }
    }

    /// Builds [`Error::Backend`] from any error source.
    pub fn backend(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Backend { backend, source: source.into(), temporary: false }
    }

    /// Builds [`Error::Backend`] for a failure the same call may overcome later (a busy
    /// hypervisor, a lost connection that the backend reconnects).
    pub fn backend_temporary(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Backend { backend, source: source.into(), temporary: true }
    }

    /// Builds [`Error::Backend`] from a message.
    pub fn backend_msg(backend: &'static str, message: impl fmt::Display) -> Self {
        Error::Backend { backend, source: message.to_string().into(), temporary: false }
    }

    /// Builds [`Error::GuestCommand`] from a command's output; stderr is trimmed and capped at 4 KiB.
    pub fn guest_command(machine: impl Into<String>, command: impl Into<String>, output: &crate::GuestOutput) -> Self {
        let text = String::from_utf8_lossy(&output.stderr);
        let mut stderr = text.trim().to_string();
        if stderr.len() > 4096 {
            let mut cut = 4096;
            while !stderr.is_char_boundary(cut) {
                cut -= 1;
            }
            stderr.truncate(cut);
            stderr.push('…');
        }
        Error::GuestCommand { machine: machine.into(), command: command.into(), exit_code: output.exit_code, stderr }
    }

    /// Whether retrying the same call later may succeed: unreachable hosts, timeouts, locks, and
    /// backend errors raised as temporary ([`Error::backend_temporary`]).
    pub fn is_temporary(&self) -> bool {
        match self {
            Error::Unreachable { .. } | Error::Timeout { .. } | Error::Locked { .. } => true,
            Error::Backend { temporary, .. } => *temporary,
            _ => false,
        }
    }
}

/// A secret string (password, session token) whose `Debug` and `Display` never show the value.
///
/// ```
/// use stagecore::Secret;
/// let s = Secret::new("hunter2");
/// assert_eq!(format!("{s:?}"), "Secret(***)");
/// assert_eq!(s.expose(), "hunter2");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value itself; call only where it is sent to its destination.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}
