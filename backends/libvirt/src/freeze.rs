//! Freezing every disk of an environment at one instant: quiesce the guests whose agent answers
//! ([`crate::quiesce`]: `guest-fsfreeze-freeze`), suspend all running domains, put a new qcow2
//! overlay on every disk (an external disk-only atomic snapshot per running domain; by hand plus a
//! redefinition for shut-off ones), resume, thaw. The previous top files become read-only layers:
//! a baseline's or a snapshot's.
//!
//! Crash safety: every domain is marked durably before it is suspended and unmarked after it
//! was resumed ([`crate::markers`], `suspended/<domain>.json`); the next open of the environment
//! resumes a domain whose marker a dead process left ([`resume_leftovers`]). A killed capture
//! leaves no unrecorded data either: a running domain that libvirt already moved onto its new
//! layer keeps running on it (the domain's definition is the record of its chain), a shut-off
//! one is on its old or its new definition, whole.

use std::collections::BTreeMap;

use stagecore::{Error, PowerState, Result};
use virt::sys;

use crate::conn::lv;
use crate::error::NAME;
use crate::handle::LibvirtEnvironment;
use crate::machines::Machine;
use crate::markers::{self, Kind};
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

/// Refuses, before anything is touched, a machine whose disks libvirt cannot put an external
/// layer on: `<transient/>` and `<shareable/>` disks (block jobs and external snapshots are not
/// supported on them), and a layer file that already exists.
fn precheck(
    c: &virt::connect::Connect,
    storage: &crate::storage::Storage,
    env: &str,
    m: &Machine,
    plans: &[Plan],
) -> Result<()> {
    let Some(devices) = m.tree.child("devices") else { return Ok(()) };
    for d in devices.elements().filter(|e| e.name == "disk" && e.attr("device").unwrap_or("disk") == "disk") {
        let dev = d.child("target").and_then(|t| t.attr("dev")).unwrap_or_default();
        for (flag, what) in [("transient", "a <transient/> disk"), ("shareable", "a <shareable/> disk")] {
            if d.child(flag).is_some() {
                return Err(Error::invalid(
                    format!("{env}/{}/{dev}", m.name()),
                    format!(
                        "{what} cannot be layered (libvirt supports no external snapshot or block job on it); \
                         nothing was changed in {env}"
                    ),
                ));
            }
        }
    }
    for p in plans {
        if storage.exists(c, &p.next) {
            return Err(Error::already_exists("layer file", p.next.clone()));
        }
    }
    Ok(())
}

/// Test fault: when [`crate::quiesce::FAULT_ENV`] is `baseline-fail:<domain>`, layering that
/// domain fails (after the machines before it were moved), so the rollback can be tested with
/// real domains.
fn fail_point(domain: &str) -> Result<()> {
    match std::env::var(crate::quiesce::FAULT_ENV) {
        Ok(v) if v.strip_prefix("baseline-fail:") == Some(domain) => {
            Err(Error::backend_msg(NAME, format!("fault injected: layering {domain} fails")))
        }
        _ => Ok(()),
    }
}

/// Test fault inside the capture: when [`crate::quiesce::FAULT_ENV`] equals `name`, prints
/// `STAGECORE_LIBVIRT_FAULT <name> reached` and blocks this thread for good (the test kills the
/// process). Point: `suspended` (every running domain suspended, no layer made yet).
fn fault_stop(name: &str) {
    if std::env::var(crate::quiesce::FAULT_ENV).as_deref() == Ok(name) {
        use std::io::Write as _;
        println!("{} {name} reached", crate::quiesce::FAULT_ENV);
        let _ = std::io::stdout().flush();
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// Resumes every machine of `ms` that a suspend marker of a dead process names (it died
/// between suspend and resume) and removes the marker; a machine that runs or is shut off needs
/// only the marker removed. Failures are logged and the marker stays for the next open.
pub(crate) async fn resume_leftovers(env: &LibvirtEnvironment, ms: &[Machine]) {
    for m in ms {
        let path = markers::path(&env.shared.dir, Kind::Suspended, &m.instance);
        if !markers::orphaned(&path) {
            continue;
        }
        if m.power == PowerState::Paused {
            tracing::warn!(domain = %m.instance, "resuming a domain a dead process suspended for a freeze");
            if let Err(e) = env.resume_domain(&m.instance).await {
                tracing::warn!(domain = %m.instance, error = %e, "could not resume; the next open tries again");
                continue;
            }
        }
        markers::remove(&path);
    }
}

/// One machine moved onto new layers, as the rollback needs it.
struct Done {
    name: String,
    active: bool,
    /// The definition before (inactive XML, with our metadata).
    tree: Element,
    /// The disks moved so far (all of them for a running domain: its snapshot is atomic).
    plans: Vec<Plan>,
}

/// Puts a new layer on every disk of `ms` at one instant (crash-consistent on its own).
///
/// One freeze window, domains in parallel (at most [`MAX_PARALLEL`] at once): all running
/// domains are suspended, every machine is layered, all are resumed.
///
/// All or nothing: every machine is checked first ([`precheck`]); when a machine still
/// fails, the machines that were moved are put back (running ones: active block commit of the new
/// layer and pivot back onto the old file; stopped ones: the old definition), the new layer files
/// are removed and the original error is returned. Only if that rollback fails is the error a
/// `Backend` one that says exactly what was left and how to undo it.
async fn capture(shared: &Shared, env: &str, ms: &[Machine], tag: &str) -> Result<Frozen> {
    let all: Vec<Vec<Plan>> = ms.iter().map(|m| plans(shared, env, m, tag)).collect::<Result<_>>()?;
    let (storage, env_name) = (shared.storage.clone(), env.to_string());
    let work: Vec<(String, bool, Element, Vec<Plan>)> =
        ms.iter().zip(&all).map(|(m, p)| (m.instance.clone(), m.active(), m.tree.clone(), p.clone())).collect();
    let running: Vec<(String, String)> = ms
        .iter()
        .filter(|m| m.power == PowerState::Running)
        .map(|m| (m.instance.clone(), m.name().to_string()))
        .collect();
    let state = shared.dir.clone();
    let tag = tag.to_string();
    let checked = (ms.to_vec(), all.clone());
    shared
        .conn
        .run(move |c, uri| {
            for (m, p) in checked.0.iter().zip(&checked.1) {
                precheck(c, &storage, &env_name, m, p)?;
            }
            if let Some(p) = work.iter().flat_map(|w| w.3.first()).next() {
                storage.ensure_dir(c, uri, &env_name, &p.next)?;
            }
            // One freeze window: every running domain is suspended (all at once), every machine
            // is layered (all at once), then every suspended domain is resumed (all at once).
            let mut suspended = Vec::new();
            let mut done: Vec<Done> = Vec::new();
            let result = (|| {
                let mut first_err = None;
                for r in each(&running, |(name, machine)| {
                    let dom = lv(uri, "domain", name, c.lookup_domain_by_name(name))?;
                    markers::write(&state, Kind::Suspended, &env_name, machine, name)?;
                    if let Err(e) = lv(uri, "domain", name, dom.suspend()) {
                        markers::remove(&markers::path(&state, Kind::Suspended, name));
                        return Err(e);
                    }
                    Ok((name.clone(), dom))
                }) {
                    match r {
                        Ok(d) => suspended.push(d),
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
                if let Some(e) = first_err {
                    return Err(e);
                }
                fault_stop("suspended");
                for (moved, r) in each(&work, |(name, active, tree, plans)| {
                    layer_one(c, uri, &storage, &env_name, &tag, name, *active, tree, plans)
                }) {
                    done.extend(moved);
                    if let Err(e) = r {
                        first_err.get_or_insert(e);
                    }
                }
                first_err.map_or(Ok(()), Err)
            })();
            let result = match result {
                Ok(()) => Ok(()),
                Err(e) => Err(roll_back(c, uri, &storage, &env_name, done, e)),
            };
            for ((name, _), r) in suspended.iter().zip(each(&suspended, |(_, dom)| dom.resume())) {
                match r {
                    Ok(_) => markers::remove(&markers::path(&state, Kind::Suspended, name)),
                    Err(e) => tracing::error!(
                        domain = %name,
                        error = %e,
                        "could not resume a domain after freezing; the next open of the environment tries again"
                    ),
                }
            }
            // The overlays libvirt wrote for running domains become volumes of the pool.
            storage.refresh(c, &env_name);
            result
        })
        .await?;
    Ok(all.iter().map(|ps| ps.iter().map(|p| (p.disk.clone(), p.current.clone())).collect()).collect())
}

/// At most this many domains are suspended, layered or resumed at once (libvirtd serves calls
/// on one connection from several threads; its QEMU driver works on different domains in
/// parallel).
const MAX_PARALLEL: usize = 8;

/// `f` of every item, on at most [`MAX_PARALLEL`] threads; results in the items' order.
fn each<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if items.len() <= 1 {
        return items.iter().map(&f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out: Vec<std::sync::Mutex<Option<R>>> = items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let span = tracing::Span::current();
    std::thread::scope(|scope| {
        for _ in 0..MAX_PARALLEL.min(items.len()) {
            scope.spawn(|| {
                let _g = span.enter();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    *out[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(f(item));
                }
            });
        }
    });
    out.into_iter().map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()).expect("every item ran")).collect()
}

/// Layers one machine: a running one by an external disk-only atomic snapshot, a stopped one by
/// overlays and a redefinition. Returns what was moved (for the rollback) and the outcome.
#[allow(clippy::too_many_arguments)]
fn layer_one(
    c: &virt::connect::Connect,
    uri: &str,
    storage: &crate::storage::Storage,
    env: &str,
    tag: &str,
    name: &str,
    active: bool,
    tree: &Element,
    plans: &[Plan],
) -> (Option<Done>, Result<()>) {
    if let Err(e) = fail_point(name) {
        return (None, Err(e));
    }
    let dom = match lv(uri, "domain", name, c.lookup_domain_by_name(name)) {
        Ok(dom) => dom,
        Err(e) => return (None, Err(e)),
    };
    let mut done = Done { name: name.to_string(), active, tree: tree.clone(), plans: Vec::new() };
    if active {
        let flags = sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
            | sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA;
        return match lv(uri, "domain", name, dom.create_snapshot_xml(&snapshot_xml(tag, plans, tree), flags)) {
            Ok(_) => {
                done.plans = plans.to_vec();
                (Some(done), Ok(()))
            }
            Err(e) => (None, Err(e)),
        };
    }
    let mut new_tree = tree.clone();
    let mut paths = BTreeMap::new();
    for p in plans {
        if let Err(e) = storage.create_overlay(c, uri, env, &p.next, &p.current) {
            return (Some(done), Err(e));
        }
        done.plans.push(p.clone());
        paths.insert(p.disk.clone(), p.next.clone());
    }
    edit::set_disk_sources(&mut new_tree, &paths);
    let r = lv(uri, "domain", name, c.define_domain_xml(&new_tree.render())).map(drop);
    (Some(done), r)
}

/// Puts every machine of `done` back on its old files and removes the new layers; returns
/// `error` when that worked, else a `Backend` error naming what was left.
fn roll_back(
    c: &virt::connect::Connect,
    uri: &str,
    storage: &crate::storage::Storage,
    env: &str,
    done: Vec<Done>,
    error: Error,
) -> Error {
    let mut left = Vec::new();
    for d in done.iter().rev() {
        let dom = match lv(uri, "domain", &d.name, c.lookup_domain_by_name(&d.name)) {
            Ok(dom) => dom,
            Err(e) => {
                left.push(format!("{}: {e}", d.name));
                continue;
            }
        };
        let mut on_old = true;
        if d.active {
            for p in &d.plans {
                if let Err(e) = commit_back(&dom, &p.target) {
                    on_old = false;
                    left.push(format!(
                        "{}/{} still runs on {} over {} ({e}; undo: virsh blockcommit {} {} --active --pivot)",
                        d.name, p.target, p.next, p.current, d.name, p.target
                    ));
                }
            }
        }
        if let Err(e) = lv(uri, "domain", &d.name, c.define_domain_xml(&d.tree.render())) {
            on_old = false;
            left.push(format!("{}: its old definition could not be restored ({e})", d.name));
        }
        if on_old {
            for p in &d.plans {
                if let Err(e) = storage.remove_image(c, uri, &p.next) {
                    left.push(format!("{}: the unused layer {} could not be removed ({e})", d.name, p.next));
                }
            }
        }
    }
    storage.refresh(c, env);
    if left.is_empty() {
        let names: Vec<&str> = done.iter().map(|d| d.name.as_str()).collect();
        tracing::warn!(environment = env, rolled_back = ?names, error = %error, "baseline failed; production put back as it was");
        error
    } else {
        Error::backend_msg(
            NAME,
            format!("baseline of {env} failed ({error}) and its rollback did not finish; left: {}", left.join("; ")),
        )
    }
}

/// Active block commit of the top layer of `disk` into its backing file, then pivot back onto it
/// (the domain is paused: the layer holds nothing, the job is immediate).
fn commit_back(dom: &virt::domain::Domain, disk: &str) -> std::result::Result<(), String> {
    let target = std::ffi::CString::new(disk).map_err(|e| e.to_string())?;
    let last = || virt::error::Error::last_error().message().to_string();
    // SAFETY: `dom` is a live domain handle for the whole call; `target` outlives it; null base
    // and top mean "the backing file" and "the active layer".
    let r = unsafe {
        sys::virDomainBlockCommit(
            dom.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            0,
            sys::VIR_DOMAIN_BLOCK_COMMIT_ACTIVE,
        )
    };
    if r < 0 {
        return Err(format!("block commit: {}", last()));
    }
    for _ in 0..600 {
        let mut info = sys::virDomainBlockJobInfo { type_: 0, bandwidth: 0, cur: 0, end: 0 };
        // SAFETY: as above; `info` is a valid out pointer.
        let r = unsafe { sys::virDomainGetBlockJobInfo(dom.as_ptr(), target.as_ptr(), &mut info, 0) };
        if r < 0 {
            return Err(format!("block job info: {}", last()));
        }
        if r == 1 && info.cur == info.end {
            // SAFETY: as above.
            let r = unsafe {
                sys::virDomainBlockJobAbort(dom.as_ptr(), target.as_ptr(), sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
            };
            if r == 0 {
                return Ok(());
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err("the block commit did not become ready to pivot in 30 s".into())
}
