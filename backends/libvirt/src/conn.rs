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

/// How many per-domain calls [`each_domain`] makes at once.
const PARALLEL_DOMAINS: usize = 8;

/// Runs `op(name, domain)` on every domain in `names` inside a [`Conn::run`] closure, up to
/// [`PARALLEL_DOMAINS`] at a time on scoped threads (libvirt connections are thread-safe and its
/// daemon serialises jobs per domain only): a stop waits for QEMU to flush and exit, ~2 s per
/// domain under TCG, so a loop made stopping N machines take N times that. Every domain is tried;
/// the first error (in `names` order) is returned.
pub(crate) fn each_domain<F>(c: &Connect, uri: &str, names: &[String], op: F) -> Result<()>
where
    F: Fn(&str, &virt::domain::Domain) -> std::result::Result<(), virt::error::Error> + Sync,
{
    let one = |n: &String| -> Result<()> {
        let dom = lv(uri, "domain", n, c.lookup_domain_by_name(n))?;
        lv(uri, "domain", n, op(n, &dom))
    };
    let mut results = Vec::with_capacity(names.len());
    for chunk in names.chunks(PARALLEL_DOMAINS) {
        std::thread::scope(|s| {
            let handles: Vec<_> = chunk.iter().map(|n| s.spawn(|| one(n))).collect();
            results.extend(handles.into_iter().map(|h| {
                h.join().unwrap_or_else(|_| Err(Error::backend_msg(NAME, "a libvirt worker thread panicked")))
            }));
        });
    }
    results.into_iter().collect()
}
