//! [`LibvirtEnvironment`], the handle every module works on (the crate's core module: it
//! depends on the connection, storage and machine loading only, never on the modules that
//! implement the environment's operations), and its raw disk I/O ([`DiskIo`]).

use std::sync::Arc;

use async_trait::async_trait;
use stagecore::{DiskIo, Error, Result};

use crate::machines::Machine;
use crate::shared::Shared;

/// A handle on one environment. Cheap to clone; every call reads the current state from libvirt.
#[derive(Debug, Clone)]
pub struct LibvirtEnvironment {
    pub(crate) name: String,
    pub(crate) shared: Arc<Shared>,
}

/// The domain names of the running machines in `ms`, only those named in `only` if given.
pub(crate) fn running(ms: Vec<Machine>, only: Option<&[String]>) -> Vec<String> {
    ms.into_iter()
        .filter(|m| m.active() && only.is_none_or(|o| o.iter().any(|n| n == m.name())))
        .map(|m| m.instance)
        .collect()
}

impl LibvirtEnvironment {
    pub(crate) async fn machines(&self) -> Result<Vec<Machine>> {
        self.shared.machines(&self.name).await
    }

    /// For a stage: per machine, what of production's host-side files the stage could not make
    /// its own (devices dropped, NVRAM not copied, TPM state new), one sentence each; machines
    /// with nothing to say are left out. Empty for a production. See `docs/backends/libvirt.md`
    /// ("Host-side files").
    pub async fn host_file_notes(&self) -> Result<std::collections::BTreeMap<String, Vec<String>>> {
        Ok(self
            .machines()
            .await?
            .into_iter()
            .filter(|m| !m.record.host_notes.is_empty())
            .map(|m| (m.name().to_string(), m.record.host_notes))
            .collect())
    }

    /// Resumes the paused domain `instance`.
    pub(crate) async fn resume_domain(&self, instance: &str) -> Result<()> {
        let name = instance.to_string();
        self.shared.conn.call("domain", instance, move |c| c.lookup_domain_by_name(&name)?.resume().map(drop)).await
    }

    /// Starts the named domains (in parallel, see [`crate::conn::each_domain`]).
    pub(crate) async fn start_domains(&self, names: Vec<String>) -> Result<()> {
        self.shared.conn.run(move |c, uri| crate::conn::each_domain(c, uri, &names, |_, d| d.create().map(drop))).await
    }

    /// Hard-stops (destroys) the named domains, in parallel.
    pub(crate) async fn stop_domains(&self, names: Vec<String>) -> Result<()> {
        self.shared.conn.run(move |c, uri| crate::conn::each_domain(c, uri, &names, |_, d| d.destroy())).await
    }

    /// The top image of `machine`/`disk` (a local file, or a volume path on the remote host) and
    /// whether the domain runs.
    pub(crate) async fn top(&self, machine: &str, disk: &str) -> Result<(String, bool)> {
        let ms = self.machines().await?;
        let m = ms
            .iter()
            .find(|m| m.name() == machine)
            .ok_or_else(|| Error::not_found("machine", format!("{}/{machine}", self.name)))?;
        let (_, d) = m
            .parsed
            .disks()
            .find(|(n, _)| n == disk)
            .ok_or_else(|| Error::not_found("disk", format!("{}/{machine}/{disk}", self.name)))?;
        let path = d.path().ok_or_else(|| Error::not_found("disk file", format!("{}/{machine}/{disk}", self.name)))?;
        Ok((path, m.active()))
    }

    /// Runs a blocking storage call (see [`crate::storage`]) on the connection's worker.
    pub(crate) async fn images<T: Send + 'static>(
        &self,
        f: impl FnOnce(&crate::storage::Storage, &virt::connect::Connect, &str) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let storage = self.shared.storage.clone();
        self.shared.conn.run(move |c, uri| f(&storage, c, uri)).await
    }
}

#[async_trait]
impl DiskIo for LibvirtEnvironment {
    async fn read(&self, machine: &str, disk: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        let (top, _) = self.top(machine, disk).await?;
        let t = top.clone();
        let size = self.images(move |s, c, uri| s.info(c, uri, &t)).await?.virtual_size;
        stagecore::toolbox::check_range(&self.name, machine, disk, size, offset, length)?;
        self.images(move |s, c, uri| s.read_at(c, uri, &top, offset, length)).await
    }

    async fn write(&self, machine: &str, disk: &str, offset: u64, data: &[u8]) -> Result<()> {
        let (top, active) = self.top(machine, disk).await?;
        if active {
            return Err(Error::Precondition(format!(
                "{}/{machine} is running; stop it before writing its disk from outside",
                self.name
            )));
        }
        let t = top.clone();
        let size = self.images(move |s, c, uri| s.info(c, uri, &t)).await?.virtual_size;
        stagecore::toolbox::check_range(&self.name, machine, disk, size, offset, data.len() as u64)?;
        let data = data.to_vec();
        self.images(move |s, c, uri| s.write_at(c, uri, &top, offset, &data)).await
    }

    async fn digest(&self, machine: &str, disk: &str) -> Result<[u8; 32]> {
        let (top, _) = self.top(machine, disk).await?;
        self.images(move |s, c, uri| s.digest(c, uri, &top)).await
    }
}
