//! Loading an environment's domains (inactive XML, parsed view, our record, power state) and
//! saving records back. Blocking: runs inside [`crate::conn::Conn::run`].

use std::collections::BTreeMap;

use stagecore::{Error, PowerState, Result};
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::sys;

use crate::conn::lv;
use crate::registry::Entry;
use crate::xml::domain::DomainXml;
use crate::xml::meta::{self, MachineRecord};
use crate::xml::tree::Element;

/// Where a domain's record is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Store {
    /// In the domain's `<metadata>` (domains this crate defined).
    Metadata,
    /// In the local registry (attached production).
    Registry,
}

/// One domain of an environment.
#[derive(Debug, Clone)]
pub(crate) struct Machine {
    /// Domain name.
    pub(crate) instance: String,
    /// Domain UUID.
    pub(crate) uuid: String,
    /// The inactive (persistent) XML as a tree.
    pub(crate) tree: Element,
    /// Its typed view.
    pub(crate) parsed: DomainXml,
    /// Labels from our metadata.
    pub(crate) labels: BTreeMap<String, String>,
    /// Our record.
    pub(crate) record: MachineRecord,
    /// Where the record lives.
    pub(crate) store: Store,
    /// Power state.
    pub(crate) power: PowerState,
}

impl Machine {
    /// The logical name.
    pub(crate) fn name(&self) -> &str {
        &self.record.machine
    }

    /// Whether QEMU runs (running or paused).
    pub(crate) fn active(&self) -> bool {
        matches!(self.power, PowerState::Running | PowerState::Paused)
    }
}

/// Power state of a domain.
pub(crate) fn power(uri: &str, dom: &Domain, name: &str) -> Result<PowerState> {
    let (state, _) = lv(uri, "domain", name, dom.state())?;
    Ok(match state.unwrap_or(DomainState::NoState) {
        DomainState::Running | DomainState::Blocked => PowerState::Running,
        DomainState::Paused | DomainState::PMSuspended => PowerState::Paused,
        DomainState::Shutoff | DomainState::Shutdown | DomainState::Crashed => PowerState::Stopped,
        DomainState::NoState => PowerState::Unknown,
    })
}

/// Inactive XML of a domain as a tree.
pub(crate) fn tree(uri: &str, dom: &Domain, name: &str) -> Result<Element> {
    let xml = lv(uri, "domain", name, dom.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE))?;
    Element::parse(&xml, &format!("domain {name}"))
}

fn machine(
    uri: &str,
    dom: &Domain,
    instance: &str,
    tree: Element,
    record: MachineRecord,
    store: Store,
) -> Result<Machine> {
    let parsed = DomainXml::parse(&tree.render(), instance)?;
    Ok(Machine {
        instance: instance.into(),
        uuid: parsed.uuid.clone().unwrap_or_default(),
        labels: meta::labels(&tree),
        parsed,
        tree,
        record,
        store,
        power: power(uri, dom, instance)?,
    })
}

/// Every domain on the host with its tree (domains that vanish while listing are skipped).
pub(crate) fn all(conn: &Connect, uri: &str) -> Result<Vec<(Domain, String, Element)>> {
    let doms = lv(uri, "connection", uri, conn.list_all_domains(0))?;
    let mut out = Vec::new();
    for dom in doms {
        let Ok(name) = dom.name() else { continue };
        match tree(uri, &dom, &name) {
            Ok(t) => out.push((dom, name, t)),
            Err(Error::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The machines of environment `env`: domains whose metadata record names it, plus the
/// registry's `entries`. Sorted by logical name.
pub(crate) fn load(conn: &Connect, uri: &str, env: &str, entries: Option<&[Entry]>) -> Result<Vec<Machine>> {
    let mut out = Vec::new();
    if let Some(entries) = entries {
        for e in entries {
            let dom = lv(uri, "domain", &e.instance, conn.lookup_domain_by_name(&e.instance))?;
            let t = tree(uri, &dom, &e.instance)?;
            out.push(machine(uri, &dom, &e.instance, t, e.record.clone(), Store::Registry)?);
        }
    } else {
        for (dom, name, t) in all(conn, uri)? {
            if let Some(rec) = meta::record(&t, &name)?.filter(|r| r.environment == env) {
                out.push(machine(uri, &dom, &name, t, rec, Store::Metadata)?);
            }
        }
    }
    out.sort_by(|a, b| a.record.machine.cmp(&b.record.machine));
    Ok(out)
}

/// Writes the metadata records of `ms` back into their domains' definitions (config, and live when
/// running), on several domains at once ([`crate::conn::each_domain`]).
pub(crate) fn save_metadata(conn: &Connect, uri: &str, ms: &[Machine]) -> Result<()> {
    let kind = sys::VIR_DOMAIN_METADATA_ELEMENT as i32;
    let mut jobs = std::collections::BTreeMap::new();
    for m in ms {
        let mut flags = sys::VIR_DOMAIN_AFFECT_CONFIG;
        if m.active() {
            flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        jobs.insert(m.instance.as_str(), (meta::fragment(&m.labels, &m.record)?.render(), flags));
    }
    let names: Vec<String> = ms.iter().map(|m| m.instance.clone()).collect();
    crate::conn::each_domain(conn, uri, &names, |n, dom| {
        let (xml, flags) = &jobs[n];
        dom.set_metadata(kind, Some(xml), Some(meta::PREFIX), Some(meta::NS), *flags).map(drop)
    })
}
