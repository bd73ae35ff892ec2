//! Swap promotion: production's domains take the stage's content and the stage's domains take
//! production's, each keeping its own identity.
//!
//! Per machine, production's domain is redefined from the stage's XML (disks, memory, vCPUs,
//! devices) with production's name, UUID, MACs (per logical NIC), networks and record; the
//! stage's domain gets production's XML with the stage's identity, fenced networks and record.
//! The records' reported disk sources move with the disks, so the spec says which content an
//! environment runs. Both sides are shut off first and left shut off (the promotion engine restarts
//! production when it ran). Only definitions change — no file is touched — so it works on remote
//! URIs too. A failed redefinition puts every old definition back. Calling it again swaps back.

use std::collections::BTreeMap;

use stagecore::{Error, PowerState, Result, Role};

use crate::conn::lv;
use crate::machines::{Machine, Store};
use crate::shared::Shared;
use crate::xml::meta::{self, MachineRecord};
use crate::xml::{edit, tree::Element};

/// Swaps `production` and its stage `stage`; see the module docs.
#[tracing::instrument(skip(shared))]
pub(crate) async fn swap(shared: &Shared, production: &str, stage: &str) -> Result<()> {
    let ps = shared.machines(production).await?;
    let ss = shared.machines(stage).await?;
    match &ss[0].record.role {
        Role::Stage(info) if info.source == production => {}
        _ => return Err(Error::Precondition(format!("{stage} is not a stage of {production}"))),
    }
    let names = |ms: &[Machine]| ms.iter().map(|m| m.name().to_string()).collect::<Vec<_>>();
    if names(&ps) != names(&ss) {
        return Err(Error::Precondition(format!(
            "{production} has machines {:?} but {stage} has {:?}; swap needs the same machines",
            names(&ps),
            names(&ss)
        )));
    }
    let (mut new_ps, mut new_ss) = (ps.clone(), ss.clone());
    let mut plans = Vec::new();
    for ((p, s), (np, ns)) in ps.iter().zip(&ss).zip(new_ps.iter_mut().zip(new_ss.iter_mut())) {
        std::mem::swap(&mut np.record.sources, &mut ns.record.sources);
        np.power = PowerState::Stopped;
        ns.power = PowerState::Stopped;
        let p_xml = rebuild(&s.tree, s, p, &np.record)?;
        let s_xml = rebuild(&p.tree, p, s, &ns.record)?;
        plans.push((p.instance.clone(), p.active(), p.tree.render(), p_xml));
        plans.push((s.instance.clone(), s.active(), s.tree.render(), s_xml));
    }
    shared.conn.run(move |c, uri| redefine(c, uri, &plans)).await?;
    // Records kept in the registry (attached productions) are saved there; metadata ones are
    // already in the new definitions.
    let registry = |ms: Vec<Machine>| ms.into_iter().filter(|m| m.store == Store::Registry).collect::<Vec<_>>();
    let (reg_p, reg_s) = (registry(new_ps), registry(new_ss));
    if !reg_p.is_empty() {
        shared.save(production, &reg_p).await?;
    }
    if !reg_s.is_empty() {
        shared.save(stage, &reg_s).await?;
    }
    Ok(())
}

/// `content`'s definition (taken from machine `from`) dressed in `to`'s identity and `record`.
fn rebuild(content: &Element, from: &Machine, to: &Machine, record: &MachineRecord) -> Result<String> {
    let mut tree = content.clone();
    meta::strip(&mut tree);
    edit::set_identity(&mut tree, &to.instance, &to.uuid);
    // Sockets and log files stay with the domain: a swap never points production at files in the
    // stage's directory (removed with the stage) or the stage at production's.
    crate::hostfiles::keep_own(&mut tree, &to.tree);
    let macs: BTreeMap<String, String> = nics(to).into_iter().filter_map(|(nic, _, mac)| Some((nic, mac?))).collect();
    edit::set_macs(&mut tree, &macs);
    let reverse: BTreeMap<String, String> = from.record.networks.iter().map(|(l, n)| (n.clone(), l.clone())).collect();
    let targets: BTreeMap<String, String> = nics(from)
        .into_iter()
        .map(|(_, logical, _)| {
            let libvirt = to.record.networks.get(&logical).cloned().unwrap_or_else(|| logical.clone());
            (logical, libvirt)
        })
        .collect();
    edit::set_networks(&mut tree, &targets, |n| reverse.get(n).cloned().unwrap_or_else(|| n.to_string()));
    if to.store == Store::Metadata {
        meta::set(&mut tree, &to.labels, record)?;
    }
    Ok(tree.render())
}

/// (logical NIC, logical network, MAC) of a machine.
fn nics(m: &Machine) -> Vec<(String, String, Option<String>)> {
    let reverse: BTreeMap<&str, &str> = m.record.networks.iter().map(|(l, n)| (n.as_str(), l.as_str())).collect();
    let logical = |n: &str| reverse.get(n).map(|s| s.to_string()).unwrap_or_else(|| n.to_string());
    let spec = m.parsed.machine_spec(m.name(), logical, |_| None);
    spec.nics.into_iter().map(|n| (n.name, n.network, n.mac)).collect()
}

/// Shuts off every domain of `plans` that runs, defines the new XMLs; on failure puts the old
/// ones back (best effort) and returns the first error.
fn redefine(c: &virt::connect::Connect, uri: &str, plans: &[(String, bool, String, String)]) -> Result<()> {
    for (name, active, _, _) in plans {
        if *active {
            let dom = lv(uri, "domain", name, c.lookup_domain_by_name(name))?;
            if let Err(e) = lv(uri, "domain", name, dom.destroy()) {
                tracing::warn!(domain = %name, error = %e, "could not shut off before swapping");
            }
        }
    }
    for (i, (name, _, _, new)) in plans.iter().enumerate() {
        if let Err(e) = lv(uri, "domain", name, c.define_domain_xml(new)) {
            for (n, _, old, _) in &plans[..i] {
                if let Err(e) = c.define_domain_xml(old) {
                    tracing::error!(domain = %n, error = %e, "could not restore a definition after a failed swap");
                }
            }
            return Err(e);
        }
    }
    Ok(())
}
