//! State shared by the backend and its environment handles: the connection, the state directory
//! and the helpers that load and save an environment's machines and build its spec.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use stagecore::{EnvironmentSpec, Error, NetworkSpec, Result};
use virt::connect::Connect;

use crate::conn::{Conn, lv};
use crate::machines::{self, Machine, Store};
use crate::registry;

/// Connection, state directory and settings.
#[derive(Debug, Clone)]
pub(crate) struct Shared {
    /// The libvirt connection.
    pub(crate) conn: Conn,
    /// Where images, baselines' XML and the registry live.
    pub(crate) dir: PathBuf,
    /// `<domain type=…>` for domains created from a spec (`qemu` = TCG, `kvm`, `test`).
    pub(crate) domain_type: String,
    /// How long `start` waits for the guest agents of one wave before starting the next.
    pub(crate) start_wait: std::time::Duration,
    /// Where image files live: the state directory (local URI) or storage pools on the host.
    pub(crate) storage: crate::storage::Storage,
}

/// The default of [`Shared::start_wait`].
pub(crate) const DEFAULT_START_WAIT: std::time::Duration = std::time::Duration::from_secs(90);

impl Shared {
    /// The directory of one environment's files in the (local) state directory: baselines' XML
    /// for every URI, and the image files too for a local one.
    pub(crate) fn env_dir(&self, env: &str) -> PathBuf {
        self.dir.join(env)
    }

    /// The machines of `env`; `NotFound` when it has none.
    pub(crate) async fn machines(&self, env: &str) -> Result<Vec<Machine>> {
        stagecore::name::validate("environment", env)?;
        let entries = registry::load(&self.dir, env)?;
        let owned = env.to_string();
        let uri = self.conn.uri().to_string();
        let ms = self.conn.run(move |c, _| machines::load(c, &uri, &owned, entries.as_deref())).await?;
        if ms.is_empty() {
            return Err(Error::not_found("environment", env));
        }
        Ok(ms)
    }

    /// Whether an environment called `env` exists.
    pub(crate) async fn exists(&self, env: &str) -> Result<bool> {
        match self.machines(env).await {
            Ok(_) => Ok(true),
            Err(Error::NotFound { kind: "environment", .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Saves the records of `ms` (metadata or registry).
    pub(crate) async fn save(&self, env: &str, ms: &[Machine]) -> Result<()> {
        let meta: Vec<Machine> = ms.iter().filter(|m| m.store == Store::Metadata).cloned().collect();
        if !meta.is_empty() {
            self.conn.run(move |c, uri| machines::save_metadata(c, uri, &meta)).await?;
        }
        let reg: Vec<registry::Entry> = ms
            .iter()
            .filter(|m| m.store == Store::Registry)
            .map(|m| registry::Entry { instance: m.instance.clone(), record: m.record.clone() })
            .collect();
        if !reg.is_empty() {
            registry::store(&self.dir, env, &reg)?;
        }
        Ok(())
    }

    /// The spec of `env` from its machines.
    pub(crate) async fn spec_of(&self, env: &str, ms: &[Machine]) -> Result<EnvironmentSpec> {
        let ms2 = ms.to_vec();
        let sizes = self.conn.run(move |c, uri| Ok(disk_sizes(c, uri, &ms2))).await?;
        Ok(spec_from(env, ms, &sizes))
    }
}

/// Whether a URI names the local host (no host part).
pub(crate) fn is_local(uri: &str) -> bool {
    match uri.split_once("://") {
        Some((_, rest)) => rest.starts_with('/'),
        None => true,
    }
}

type Sizes = BTreeMap<(String, String), u64>;

fn disk_sizes(c: &Connect, uri: &str, ms: &[Machine]) -> Sizes {
    let mut out = BTreeMap::new();
    for m in ms {
        let Ok(dom) = lv(uri, "domain", &m.instance, c.lookup_domain_by_name(&m.instance)) else { continue };
        for (name, d) in m.parsed.disks() {
            if let Ok(info) = dom.block_info(&d.target.dev, 0) {
                out.insert((m.record.machine.clone(), name), info.capacity);
            }
        }
    }
    out
}

/// Builds the spec from machines and their disk sizes.
pub(crate) fn spec_from(env: &str, ms: &[Machine], sizes: &Sizes) -> EnvironmentSpec {
    let mut networks = BTreeSet::new();
    let mut machines = Vec::new();
    let mut labels = BTreeMap::new();
    let mut cidrs = BTreeMap::new();
    for m in ms {
        let reverse: BTreeMap<&str, &str> = m.record.networks.iter().map(|(l, n)| (n.as_str(), l.as_str())).collect();
        let net_name = |n: &str| reverse.get(n).map(|s| s.to_string()).unwrap_or_else(|| n.to_string());
        let size = |d: &crate::xml::domain::Disk| sizes.get(&(m.record.machine.clone(), d.logical())).copied();
        let mut spec = m.parsed.machine_spec(&m.record.machine, net_name, size);
        for d in &mut spec.disks {
            if let Some(source) = m.record.sources.get(&d.name) {
                d.source.clone_from(source);
            }
        }
        spec.labels = m.labels.clone();
        spec.after.clone_from(&m.record.after);
        networks.extend(spec.nics.iter().map(|n| n.network.clone()));
        labels.extend(m.record.env_labels.clone());
        cidrs.extend(m.record.cidrs.clone());
        machines.push(spec);
    }
    let networks = networks.into_iter().map(|name| NetworkSpec { cidr: cidrs.get(&name).cloned(), name }).collect();
    EnvironmentSpec { name: env.into(), machines, networks, labels }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_host_less_uris_are_local() {
        for uri in ["qemu:///system", "test:///default", "qemu:///session"] {
            assert!(super::is_local(uri), "{uri}");
        }
        for uri in ["qemu+ssh://host/system", "qemu+tcp://127.0.0.1/system"] {
            assert!(!super::is_local(uri), "{uri}");
        }
    }
}
