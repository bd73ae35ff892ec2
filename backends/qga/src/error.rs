//! The crate's private error details and their one mapping into [`stagecore::Error`].

use std::fmt;
use std::time::Duration;

/// The backend name used in [`stagecore::Error::Backend`].
pub(crate) const BACKEND: &str = "qga";

/// An `error` reply of the guest agent to one command.
///
/// Transports build it (with [`AgentFailure::new`]) from the agent's `{"error": {"class", "desc"}}` and turn it
/// into a [`stagecore::Error`] with `.into()`: [`stagecore::Error::Backend`] with backend `"qga"` and this value
/// as its source, so callers can `downcast_ref::<AgentFailure>()` to see the class and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentFailure {
    /// Who was asked (the transport's label, e.g. `prod/web`).
    pub label: String,
    /// The agent command, e.g. `guest-file-open`.
    pub command: String,
    /// The agent's error class, e.g. `GenericError` (empty when the transport does not know it).
    pub class: String,
    /// The agent's description, e.g. `failed to open file '/x' (mode: 'r'): No such file or directory`.
    pub desc: String,
}

impl AgentFailure {
    /// An error reply of `command` as asked through the transport labelled `label`.
    pub fn new(
        label: impl Into<String>,
        command: impl Into<String>,
        class: impl Into<String>,
        desc: impl Into<String>,
    ) -> Self {
        AgentFailure { label: label.into(), command: command.into(), class: class.into(), desc: desc.into() }
    }

    /// Whether the agent said the file or directory does not exist.
    pub fn is_no_such_file(&self) -> bool {
        self.desc.contains("No such file or directory")
    }
}

impl fmt::Display for AgentFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.class.is_empty() {
            write!(f, "guest agent of {}: `{}` failed: {}", self.label, self.command, self.desc)
        } else {
            write!(f, "guest agent of {}: `{}` failed: {}: {}", self.label, self.command, self.class, self.desc)
        }
    }
}

impl std::error::Error for AgentFailure {}

impl From<AgentFailure> for stagecore::Error {
    fn from(failure: AgentFailure) -> Self {
        stagecore::Error::backend(BACKEND, failure)
    }
}

/// Everything that goes wrong inside this crate, before it becomes a [`stagecore::Error`].
#[derive(Debug)]
pub(crate) enum AgentError {
    /// The agent answered with an error.
    Reply(AgentFailure),
    /// The agent's answer was not what the protocol says (bad JSON, missing fields, too long).
    Protocol { label: String, command: String, detail: String },
    /// Connecting, reading or writing failed, or the peer closed the connection.
    Io { label: String, endpoint: String, detail: String },
    /// The operation did not finish in time.
    Timeout { operation: String, waited: Duration },
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentError::Reply(r) => r.fmt(f),
            AgentError::Protocol { label, command, detail } => {
                write!(f, "guest agent of {label}: protocol error in `{command}`: {detail}")
            }
            AgentError::Io { label, endpoint, detail } => write!(f, "guest agent of {label} at {endpoint}: {detail}"),
            AgentError::Timeout { operation, waited } => {
                write!(f, "{operation} timed out after {:.1} s", waited.as_secs_f64())
            }
        }
    }
}

impl std::error::Error for AgentError {}

impl From<AgentError> for stagecore::Error {
    fn from(e: AgentError) -> Self {
        match e {
            AgentError::Reply(r) => r.into(),
            AgentError::Protocol { .. } => stagecore::Error::backend(BACKEND, e),
            AgentError::Io { label, endpoint, detail } => stagecore::Error::Unreachable {
                endpoint: format!("guest agent of {label} ({endpoint})"),
                reason: detail,
            },
            AgentError::Timeout { operation, waited } => {
                stagecore::Error::Timeout { operation, seconds: waited.as_secs_f64() }
            }
        }
    }
}

/// The agent's failure behind a [`stagecore::Error`], if it is one.
pub(crate) fn agent_failure(e: &stagecore::Error) -> Option<&AgentFailure> {
    match e {
        stagecore::Error::Backend { backend: BACKEND, source, .. } => source.downcast_ref::<AgentFailure>(),
        _ => None,
    }
}

/// Whether `e` is the agent saying a path does not exist.
pub(crate) fn is_no_such_file(e: &stagecore::Error) -> bool {
    agent_failure(e).is_some_and(AgentFailure::is_no_such_file)
}
