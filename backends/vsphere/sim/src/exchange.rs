//! The request/reply model and sessions the server and the API handlers (`rest`, `vim`,
//! `guest`) share: the server parses requests and sends replies, the handlers answer them, and
//! neither imports the other.

use crate::{Session, Shared, lock};
use axum::body::Bytes;
use axum::http::{HeaderMap, Method};
use serde_json::{Value, json};
use std::time::Instant;

/// A parsed request.
pub(crate) struct Req {
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) query: Vec<(String, String)>,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Option<Value>,
    pub(crate) raw_body_invalid: bool,
    pub(crate) raw: Bytes,
}

impl Req {
    pub(crate) fn query(&self, key: &str) -> Vec<&str> {
        self.query.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
    }
    pub(crate) fn full_path(&self) -> String {
        if self.query.is_empty() {
            self.path.clone()
        } else {
            let q: Vec<String> = self.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{}?{}", self.path, q.join("&"))
        }
    }
}

/// A reply before serialisation.
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: Option<Value>,
    pub(crate) headers: Vec<(&'static str, String)>,
    /// A non-JSON body (guest file downloads).
    pub(crate) octets: Option<Vec<u8>>,
}

impl Reply {
    pub(crate) fn json(status: u16, body: Value) -> Reply {
        Reply { status, body: Some(body), headers: Vec::new(), octets: None }
    }
    pub(crate) fn empty(status: u16) -> Reply {
        Reply { status, body: None, headers: Vec::new(), octets: None }
    }
    pub(crate) fn bytes(status: u16, data: Vec<u8>) -> Reply {
        Reply { status, body: None, headers: Vec::new(), octets: Some(data) }
    }
}

/// Whether a `Host` header names the HTTPS listener.
pub(crate) fn is_https(shared: &Shared, host: &str) -> bool {
    let port = host.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
    port.is_some() && port == shared.https_port.get().copied()
}

/// Creates a session token of the given kind.
pub(crate) fn new_session(shared: &Shared, vim: bool) -> String {
    let token = uuid::Uuid::new_v4().simple().to_string();
    lock(&shared.sessions).insert(token.clone(), Session { vim, expires: Instant::now() + shared.session_ttl });
    lock(&shared.stats).issued_tokens.push(token.clone());
    token
}

/// Whether the request carries a live session token of the given kind.
pub(crate) fn authenticated(shared: &Shared, req: &Req, vim: bool) -> bool {
    let Some(token) = req.headers.get("vmware-api-session-id").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let sessions = lock(&shared.sessions);
    sessions.get(token).is_some_and(|s| s.vim == vim && s.expires > Instant::now())
}

/// Removes the request's session.
pub(crate) fn end_session(shared: &Shared, req: &Req) {
    if let Some(token) = req.headers.get("vmware-api-session-id").and_then(|v| v.to_str().ok()) {
        lock(&shared.sessions).remove(token);
    }
}

/// An `/api` error body.
pub(crate) fn error(status: u16, error_type: &str, message: impl Into<String>) -> Reply {
    let message = message.into();
    Reply::json(
        status,
        json!({
            "error_type": error_type,
            "messages": [{"id": format!("vapi.std.errors.{}", error_type.to_ascii_lowercase()), "default_message": message, "args": []}],
        }),
    )
}
