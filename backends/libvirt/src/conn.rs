//! The async wrapper around one libvirt connection.
//!
//! libvirt's C API blocks, and its last error is per thread. Every call goes through
//! [`Conn::call`], which runs the closure on tokio's blocking pool; the `virt` wrappers read
//! libvirt's error right after the C call on that same thread, inside the closure, and the closure
//! maps it with [`crate::error::map`] before returning. Nothing else in this crate touches
//! [`virt::connect::Connect`] directly.

use std::sync::Arc;

use stagecore::{Error, Result};
use virt::connect::Connect;

use crate::error::{self, Ctx, NAME};

/// A shared connection to libvirtd (or the `test:///` driver).
#[derive(Clone)]
pub(crate) struct Conn {
    uri: Arc<str>,
    inner: Arc<Connect>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("uri", &self.uri).finish()
    }
}

impl Conn {
    /// Opens `uri` on a blocking thread. Failures are `Unreachable` / `Unauthenticated`.
    pub(crate) async fn open(uri: &str) -> Result<Self> {
        let owned = uri.to_string();
        let inner = tokio::task::spawn_blocking(move || {
            // Errors are returned to callers; libvirt must not also print them to stderr.
            virt::error::clear_error_callback();
            Connect::open(Some(&owned)).map_err(|e| {
                let mapped = error::map(&e, Ctx { uri: &owned, kind: "connection", name: &owned });
                match mapped {
                    Error::Unauthenticated { .. } | Error::Unreachable { .. } => mapped,
                    _ => Error::Unreachable { endpoint: owned.clone(), reason: e.message().to_string() },
                }
            })
        })
        .await
        .map_err(|e| Error::backend_msg(NAME, format!("libvirt worker failed: {e}")))??;
        Ok(Conn { uri: uri.into(), inner: Arc::new(inner) })
    }

    /// The URI this connection was opened with.
    pub(crate) fn uri(&self) -> &str {
        &self.uri
    }

    /// Runs `f` on the blocking pool; a libvirt error is mapped there, naming `kind` `name`.
    pub(crate) async fn call<T, F>(&self, kind: &'static str, name: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> std::result::Result<T, virt::error::Error> + Send + 'static,
    {
        let (inner, uri, name) = (self.inner.clone(), self.uri.clone(), name.to_string());
        stagecore::toolbox::blocking(NAME, move || {
            f(&inner).map_err(|e| error::map(&e, Ctx { uri: &uri, kind, name: &name }))
        })
        .await
    }

    /// Like [`Conn::call`], for closures that already produce [`stagecore::Error`]s (several
    /// calls with their own contexts).
    pub(crate) async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connect, &str) -> Result<T> + Send + 'static,
    {
        let (inner, uri) = (self.inner.clone(), self.uri.clone());
        stagecore::toolbox::blocking(NAME, move || f(&inner, &uri)).await
    }
}

/// Maps a libvirt error inside a [`Conn::run`] closure.
pub(crate) fn lv<T>(
    uri: &str,
    kind: &'static str,
    name: &str,
    r: std::result::Result<T, virt::error::Error>,
) -> Result<T> {
    r.map_err(|e| error::map(&e, Ctx { uri, kind, name }))
}
