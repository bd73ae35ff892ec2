//! Rollback of half-done work: what an operation created, removed again in reverse order when it
//! fails, so bad input never leaves half-defined domains, networks or files behind (invariant 6).

use std::path::PathBuf;

use crate::conn::Conn;

/// Things created so far by one operation.
#[derive(Debug, Default)]
pub(crate) struct Undo {
    /// Domains defined (undefined on rollback, destroyed first if running).
    pub(crate) domains: Vec<String>,
    /// Networks defined (destroyed and undefined on rollback).
    pub(crate) networks: Vec<String>,
    /// Files created.
    pub(crate) files: Vec<PathBuf>,
    /// Directories created (removed if empty... or entirely, when this operation made them).
    pub(crate) dirs: Vec<PathBuf>,
    /// A remote environment whose storage pool (and every volume in it) this operation made.
    pub(crate) images: Option<(crate::storage::Storage, String)>,
}

impl Undo {
    /// Removes everything recorded; failures are logged, not returned (the original error wins).
    pub(crate) async fn rollback(self, conn: &Conn) {
        let Undo { domains, networks, files, dirs, images } = self;
        let r = conn
            .run(move |c, uri| {
                for d in domains.iter().rev() {
                    if let Ok(dom) = c.lookup_domain_by_name(d) {
                        let _ = dom.destroy();
                        // Keep any NVRAM: a domain this operation defined has its NVRAM in the
                        // operation's directory (removed below), never someone else's.
                        let flags = virt::sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM;
                        if let Err(e) = dom.undefine_flags(flags).or_else(|_| dom.undefine()) {
                            tracing::warn!(domain = %d, error = %e, "rollback could not undefine");
                        }
                    }
                }
                for n in networks.iter().rev() {
                    if let Ok(net) = c.lookup_network_by_name(n) {
                        let _ = net.destroy();
                        if let Err(e) = net.undefine() {
                            tracing::warn!(network = %n, error = %e, "rollback could not undefine");
                        }
                    }
                }
                if let Some((storage, env)) = &images
                    && let Err(e) = storage.remove_env(c, uri, env)
                {
                    tracing::warn!(environment = %env, error = %e, "rollback could not remove the storage pool");
                }
                Ok(())
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "rollback failed");
        }
        for f in files.iter().rev() {
            let _ = std::fs::remove_file(f);
        }
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
