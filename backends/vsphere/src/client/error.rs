//! The one place where vSphere failures become [`stagecore::Error`].
//!
//! Contract: `/api` error bodies (`{"error_type","messages":[{"id","default_message","args"}]}`),
//! VI/JSON faults (`{"_typeName":"...","faultCause":..,"faultMessage":[..]}`, also inside
//! `TaskInfo.error`) and transport failures are mapped here and nowhere else. Mapped errors name the
//! endpoint (origin + path, never credentials or tokens); the fault type and message are kept in a
//! [`VsphereFault`], which is the source of `Error::Backend` and can be downcast.

use crate::BACKEND;
use serde_json::Value;
use stagecore::Error;
use std::fmt;

/// A vSphere fault: which API, its type (`NOT_FOUND`, `InvalidArgument`, ...) and its message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsphereFault {
    /// `error_type` of an `/api` error or `_typeName` of a vim25 fault.
    pub fault_type: String,
    /// The server's message(s), joined.
    pub message: String,
    /// Where it happened: `METHOD path` or `task task-12 (CloneVM_Task)`.
    pub context: String,
}

impl fmt::Display for VsphereFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}: {}", self.fault_type, self.context, self.message)
    }
}

impl std::error::Error for VsphereFault {}

fn backend(fault: VsphereFault) -> Error {
    Error::backend(BACKEND, fault)
}

/// Maps an `/api` error response.
pub(crate) fn rest_error(status: u16, body: &[u8], context: &str, endpoint: &str) -> Error {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let error_type = v["error_type"].as_str().map(str::to_string).unwrap_or_else(|| match status {
        401 => "UNAUTHENTICATED".into(),
        404 => "NOT_FOUND".into(),
        503 => "SERVICE_UNAVAILABLE".into(),
        _ => format!("HTTP_{status}"),
    });
    let message = v["messages"]
        .as_array()
        .map(|m| m.iter().filter_map(|x| x["default_message"].as_str()).collect::<Vec<_>>().join("; "))
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| format!("HTTP {status}"));
    let fault = VsphereFault { fault_type: error_type, message, context: context.to_string() };
    match fault.fault_type.as_str() {
        "NOT_FOUND" => Error::not_found_because("vSphere object", format!("{context}: {}", fault.message), fault),
        "ALREADY_EXISTS" => {
            Error::already_exists_because("vSphere object", format!("{context}: {}", fault.message), fault)
        }
        "INVALID_ARGUMENT"
        | "INVALID_REQUEST"
        | "UNEXPECTED_INPUT"
        | "INVALID_ELEMENT_TYPE"
        | "INVALID_ELEMENT_CONFIGURATION" => Error::invalid(context, fault.message),
        "UNAUTHENTICATED" => Error::Unauthenticated { endpoint: endpoint.to_string(), reason: fault.message },
        // The server answered and did not take the request: the same call may work later.
        "SERVICE_UNAVAILABLE" => Error::backend_temporary(BACKEND, fault),
        "TIMED_OUT" => Error::Timeout { operation: context.to_string(), seconds: 0.0 },
        "RESOURCE_BUSY" | "RESOURCE_IN_USE" | "CONCURRENT_CHANGE" => {
            Error::Locked { resource: context.to_string(), holder: format!("vCenter ({})", fault.message) }
        }
        "NOT_ALLOWED_IN_CURRENT_STATE" => Error::Precondition(format!("{context}: {}", fault.message)),
        _ => backend(fault),
    }
}

/// Reads a vim25 fault object (a `MethodFault`, or a `LocalizedMethodFault` wrapping one).
pub(crate) fn parse_fault(v: &Value, context: &str) -> VsphereFault {
    let inner = if v.get("fault").is_some_and(Value::is_object) { &v["fault"] } else { v };
    let fault_type = inner["_typeName"].as_str().unwrap_or("UnknownFault").to_string();
    let mut messages: Vec<String> = inner["faultMessage"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["message"].as_str().map(str::to_string))
        .collect();
    if let Some(m) = v["localizedMessage"].as_str().or_else(|| inner["msg"].as_str()) {
        messages.push(m.to_string());
    }
    if let Some(cause) = inner.get("faultCause").filter(|c| c.is_object()) {
        let c = parse_fault(cause, context);
        messages.push(format!("caused by {}: {}", c.fault_type, c.message));
    }
    let message = if messages.is_empty() { fault_type.clone() } else { messages.join("; ") };
    VsphereFault { fault_type, message, context: context.to_string() }
}

/// Maps a vim25 fault (method call or task error).
pub(crate) fn vim_fault(v: &Value, context: &str, endpoint: &str) -> Error {
    let fault = parse_fault(v, context);
    match fault.fault_type.as_str() {
        "NotAuthenticated" | "InvalidLogin" => {
            Error::Unauthenticated { endpoint: endpoint.to_string(), reason: fault.message }
        }
        "ManagedObjectNotFound" => {
            Error::not_found_because("vSphere managed object", format!("{context}: {}", fault.message), fault)
        }
        "DuplicateName" | "AlreadyExists" => {
            Error::already_exists_because("vSphere object", format!("{context}: {}", fault.message), fault)
        }
        "InvalidArgument" | "InvalidRequest" | "InvalidType" | "InvalidName" | "InvalidDeviceSpec" => {
            Error::invalid(context, format!("{}: {}", fault.fault_type, fault.message))
        }
        "TaskInProgress" | "SnapshotLocked" | "ResourceInUse" | "ConcurrentAccess" => {
            Error::Locked { resource: context.to_string(), holder: format!("vCenter ({})", fault.message) }
        }
        "InvalidPowerState" | "InvalidState" => Error::Precondition(format!("{context}: {}", fault.message)),
        "HostCommunication" | "HostNotConnected" | "HostNotReachable" => {
            Error::Unreachable { endpoint: endpoint.to_string(), reason: fault.message }
        }
        _ => backend(fault),
    }
}

/// An HTTP 503 without a fault body (either API): the server did not take the request, so it is
/// temporary ([`Error::is_temporary`]) and the retry loop may send even a non-idempotent call
/// again (see `retry.rs`).
pub(crate) fn service_unavailable(context: &str) -> Error {
    Error::backend_temporary(
        BACKEND,
        VsphereFault { fault_type: "SERVICE_UNAVAILABLE".into(), message: "HTTP 503".into(), context: context.into() },
    )
}

/// Whether a vim25 fault body says the session is gone.
pub(crate) fn is_not_authenticated(v: &Value) -> bool {
    v["_typeName"] == "NotAuthenticated"
}

/// Maps a transport failure. `retryable` tells whether trying again may help.
pub(crate) fn transport(e: &reqwest::Error, endpoint: &str, context: &str) -> (Error, bool) {
    let chain = error_chain(e);
    // TLS trust failures are permanent: retrying will not make the certificate trusted.
    if chain.contains("certificate") || chain.contains("UnknownIssuer") {
        let reason = format!("TLS certificate not trusted ({chain}); give its CA with `ca_cert_pem`");
        return (Error::Unreachable { endpoint: endpoint.to_string(), reason }, false);
    }
    if e.is_timeout() {
        return (Error::Timeout { operation: context.to_string(), seconds: 0.0 }, true);
    }
    let retryable = e.is_connect() || e.is_request() || e.is_body();
    (Error::Unreachable { endpoint: endpoint.to_string(), reason: chain }, retryable)
}

/// A request that is not safe to repeat failed after it may have reached the server (timeout,
/// connection lost mid-request): it is not retried, and the error says so.
pub(crate) fn maybe_applied(e: &reqwest::Error, endpoint: &str, context: &str) -> Error {
    let note = "not retried: the server may already have carried it out; check before repeating";
    if e.is_timeout() {
        return Error::Timeout { operation: format!("{context} ({note})"), seconds: 0.0 };
    }
    Error::Unreachable { endpoint: endpoint.to_string(), reason: format!("{context}: {} ({note})", error_chain(e)) }
}

fn error_chain(e: &reqwest::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}

/// A response that is not what the API documents (unparseable JSON, missing field).
pub(crate) fn malformed(context: &str, what: impl fmt::Display) -> Error {
    backend(VsphereFault {
        fault_type: "MalformedResponse".into(),
        message: what.to_string(),
        context: context.to_string(),
    })
}

/// The error for a task that was cancelled through a cancellation token.
pub(crate) fn cancelled(context: &str) -> Error {
    backend(VsphereFault {
        fault_type: "RequestCanceled".into(),
        message: "cancelled by the caller".into(),
        context: context.to_string(),
    })
}
