//! Freezing every disk of an environment at one instant: quiesce the guests whose agent answers
//! ([`crate::quiesce`]: `guest-fsfreeze-freeze`), suspend all running domains, put a new qcow2
//! overlay on every disk (an external disk-only atomic snapshot per running domain; by hand plus a
//! redefinition for shut-off ones), resume, thaw. The previous top files become read-only layers:
//! a baseline's or a snapshot's.

use std::collections::BTreeMap;

use stagecore::{Error, PowerState, Result};
use virt::sys;

use crate::conn::lv;
use crate::env::LibvirtEnvironment;
use crate::error::NAME;
use crate::machines::Machine;
use crate::quiesce::{self, Consistencies};
use crate::shared::Shared;
use crate::xml::edit;
use crate::xml::tree::Element;

/// Per machine (same order as given): logical disk → the file that was the top and is now frozen.
pub(crate) type Frozen = Vec<BTreeMap<String, String>>;

/// One disk to freeze.
#[derive(Debug, Clone)]
struct Plan {
    disk: String,
    target: String,
    current: String,
    next: String,
}

fn plans(shared: &Shared, env: &str, m: &Machine, tag: &str) -> Result<Vec<Plan>> {
    m.parsed
        .disks()
        .map(|(disk, d)| {
            let current =
                d.path().filter(|_| d.source.as_ref().is_some_and(|s| s.file.is_some())).ok_or_else(|| {
                    Error::invalid(
                        format!("{env}/{}/{disk}", m.name()),
                        "only file-backed disks can be layered; this disk has no <source file=…>",
                    )
                })?;
            let next = shared.storage.layer_path(env, &format!("{}.{disk}.{tag}.qcow2", m.name()));
            Ok(Plan { disk, target: d.target.dev.clone(), current, next })
        })
        .collect()
}

fn snapshot_xml(tag: &str, plans: &[Plan], tree: &Element) -> String {
    let mut disks = String::new();
    for p in plans {
        disks.push_str(&format!(
            "<disk name='{}' snapshot='external'><driver type='qcow2'/><source file='{}'/></disk>",
            p.target, p.next
        ));
    }
    let modeled: Vec<&str> = plans.iter().map(|p| p.target.as_str()).collect();
    if let Some(devices) = tree.child("devices") {
        for d in devices.elements().filter(|e| e.name == "disk") {
            let dev = d.child("target").and_then(|t| t.attr("dev")).unwrap_or_default();
            if !modeled.contains(&dev) {
                disks.push_str(&format!("<disk name='{dev}' snapshot='no'/>"));
            }
        }
    }
    format!("<domainsnapshot><name>{tag}</name><memory snapshot='no'/><disks>{disks}</disks></domainsnapshot>")
}

/// Captures every disk of `ms` at one instant, application-consistent where the guest agent
/// answers; `tag` makes file names unique (`bl-…`, `snap-…`). Returns the frozen layers and the
/// consistency each machine reached (see [`crate::quiesce`]).
///
/// The work runs in a task of its own, so a caller that gives up (drops this future) cannot leave
/// a guest frozen: the thaw still runs.
pub(crate) async fn freeze(env: &LibvirtEnvironment, ms: &[Machine], tag: &str) -> Result<(Frozen, Consistencies)> {
    let (env, ms, tag) = (env.clone(), ms.to_vec(), tag.to_string());
    tokio::spawn(async move { quiesce::around(&env, &ms, || capture(&env.shared, &env.name, &ms, &tag)).await })
        .await
        .map_err(|e| Error::backend_msg(NAME, format!("freeze worker failed: {e}")))?
}

/// Puts a new layer on every disk of `ms` at one instant (crash-consistent on its own).
async fn capture(shared: &Shared, env: &str, ms: &[Machine], tag: &str) -> Result<Frozen> {
    let all: Vec<Vec<Plan>> = ms.iter().map(|m| plans(shared, env, m, tag)).collect::<Result<_>>()?;
    let (storage, env_name) = (shared.storage.clone(), env.to_string());
    let work: Vec<(String, bool, Element, Vec<Plan>)> =
        ms.iter().zip(&all).map(|(m, p)| (m.instance.clone(), m.active(), m.tree.clone(), p.clone())).collect();
    let running: Vec<String> =
        ms.iter().filter(|m| m.power == PowerState::Running).map(|m| m.instance.clone()).collect();
    let tag = tag.to_string();
    shared
        .conn
        .run(move |c, uri| {
            if let Some(p) = work.iter().flat_map(|w| w.3.first()).next() {
                storage.ensure_dir(c, uri, &env_name, &p.next)?;
            }
            let mut suspended = Vec::new();
            let result = (|| {
                for name in &running {
                    let dom = lv(uri, "domain", name, c.lookup_domain_by_name(name))?;
                    lv(uri, "domain", name, dom.suspend())?;
                    suspended.push(dom);
                }
                for (name, active, tree, plans) in &work {
                    let dom = lv(uri, "domain", name, c.lookup_domain_by_name(name))?;
                    if *active {
                        let flags = sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                            | sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
                            | sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA;
                        lv(uri, "domain", name, dom.create_snapshot_xml(&snapshot_xml(&tag, plans, tree), flags))
                            .map(drop)?;
                    } else {
                        let mut tree = tree.clone();
                        let mut paths = BTreeMap::new();
                        for p in plans {
                            storage.create_overlay(c, uri, &env_name, &p.next, &p.current)?;
                            paths.insert(p.disk.clone(), p.next.clone());
                        }
                        edit::set_disk_sources(&mut tree, &paths);
                        lv(uri, "domain", name, c.define_domain_xml(&tree.render())).map(drop)?;
                    }
                }
                Ok(())
            })();
            for dom in suspended {
                if let Err(e) = dom.resume() {
                    tracing::error!(error = %e, "could not resume a domain after freezing");
                }
            }
            // The overlays libvirt wrote for running domains become volumes of the pool.
            storage.refresh(c, &env_name);
            result
        })
        .await?;
    Ok(all.iter().map(|ps| ps.iter().map(|p| (p.disk.clone(), p.current.clone())).collect()).collect())
}
