//! Executing a [`StagePlan`] on libvirt: the plan (names, UUIDs, MACs, clone kind per disk,
//! fencing, StageInfo) comes from the toolbox; this module makes the disks (qcow2 overlays on the
//! baseline layers for linked disks, on allocated-only copies for full ones, streamed copies
//! across hosts), the fenced networks and the domains (production's XML edited, our record in
//! each domain's metadata). Production's definitions and files are only read. Every step pushes
//! its undo ([`stagecore::toolbox::Undo`]): a failed stage removes what it made, or says exactly
//! what is left (`Error::LeftBehind`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use stagecore::toolbox::{StagePlan, Undo};
use stagecore::{Baseline, CloneKind, DiskFormat, Error, Progress, Result, Role, StageOptions};

use crate::create::{check_free_domains, create_isolated, define_all, undo_dir, undo_pool};
use crate::handle::LibvirtEnvironment;
use crate::hostfiles;
use crate::layers::make_dir;
use crate::machines::Machine;
use crate::shared::Shared;
use crate::xml::tree::Element;
use crate::xml::{edit, meta};

/// Creates the stage; see the module docs.
#[tracing::instrument(skip_all, fields(stage = %options.name, baseline = %baseline.id))]
pub(crate) async fn stage(
    shared: &Arc<Shared>,
    source: &Arc<Shared>,
    baseline: &Baseline,
    options: &StageOptions,
    progress: Option<&Progress>,
) -> Result<()> {
    let plan = StagePlan::new(baseline, options)?;
    plan.require_name_free(shared.exists(&plan.name).await?)?;
    let prod = source.machines(&baseline.environment).await?;
    // Production's record keeps no list of baselines: the layers (and the baseline's saved XML)
    // are the proof, checked below and when the overlays are made.
    plan.require_known_baseline(None)?;
    check_inputs(&plan, &prod)?;
    let seals = crate::seals::for_stage(source, &plan).await?;
    let names: Vec<String> = plan.instances().into_iter().map(|i| i.instance_name).collect();
    check_free_domains(shared, &names).await?;
    let mut undo = Undo::new(format!("stage {}", plan.name));
    let from = Source { shared: source.clone(), progress: progress.cloned() };
    let r = build(shared, &from, &plan, &prod, seals, &mut undo).await;
    undo.finish(r).await
}

/// libvirt's own checks of a plan: every machine is one of production's, and a linked disk is
/// qcow2 (a raw file cannot be an overlay's base).
fn check_inputs(plan: &StagePlan, prod: &[Machine]) -> Result<()> {
    let baseline = plan.baseline();
    for m in &baseline.spec.machines {
        if !prod.iter().any(|p| p.name() == m.name) {
            return Err(Error::not_found("machine", format!("{}/{}", baseline.environment, m.name)));
        }
    }
    for (i, m) in baseline.spec.machines.iter().enumerate() {
        for (j, d) in m.disks.iter().enumerate() {
            let linked =
                plan.disks.iter().any(|p| p.machine == m.name && p.disk == d.name && p.clone == CloneKind::Linked);
            if linked && d.format != DiskFormat::Qcow2 {
                return Err(Error::invalid(
                    format!("machines[{i}].disks[{j}].format"),
                    format!(
                        "{}/{} is a {:?} disk, which cannot be a linked clone's base; use a full clone \
                         (StageOptions::full)",
                        m.name, d.name, d.format
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Where production lives: the same connection as the stage, or another host's backend.
struct Source {
    shared: Arc<Shared>,
    progress: Option<Progress>,
}

impl Source {
    fn same_host(&self, shared: &Shared) -> bool {
        self.shared.conn.uri() == shared.conn.uri()
    }
}

async fn build(
    shared: &Arc<Shared>,
    from: &Source,
    plan: &StagePlan,
    prod: &[Machine],
    seals: stagecore_qcow2::Seals,
    undo: &mut Undo,
) -> Result<()> {
    let baseline = plan.baseline();
    let dir = shared.env_dir(&plan.name);
    if dir.exists() {
        return Err(Error::already_exists("stage directory", dir.display().to_string()));
    }
    make_dir(&dir)?;
    undo_dir(undo, &dir);
    let storage = shared.storage.clone();
    let images = storage.env_dir(&plan.name);
    if storage.is_remote() {
        let (st, env, probe) = (storage.clone(), plan.name.clone(), format!("{images}/.pool"));
        shared.conn.run(move |c, uri| st.ensure_dir(c, uri, &env, &probe)).await?;
        undo_pool(undo, shared, &plan.name);
    }
    let mut networks = BTreeMap::new();
    let mut owned = Vec::new();
    if plan.fencing.fenced {
        for net in &baseline.spec.networks {
            let name = format!("{}{}", plan.prefix, net.name);
            create_isolated(shared, &name, undo).await?;
            networks.insert(net.name.clone(), name.clone());
            owned.push(name);
        }
    }
    let mut xmls = Vec::new();
    let mut all_origins = Vec::new();
    for (m, instance) in plan.spec.machines.iter().zip(plan.instances()) {
        let p = prod.iter().find(|p| p.name() == m.name).expect("checked");
        let prod_nets = p.record.networks.clone();
        let nets = if plan.fencing.fenced { networks.clone() } else { prod_nets.clone() };
        let mut paths = BTreeMap::new();
        let mut origins = BTreeMap::new();
        for d in plan.disks.iter().filter(|d| d.machine == m.name) {
            let top = format!("{images}/{}.{}.qcow2", m.name, d.disk);
            let origin = make_disk(shared, from, plan, d, &images).await?;
            let (st, o, t, env) = (storage.clone(), origin.clone(), top.clone(), plan.name.clone());
            shared.conn.run(move |c, uri| st.create_overlay(c, uri, &env, &t, &o)).await?;
            paths.insert(d.disk.clone(), top);
            origins.insert(d.disk.clone(), origin);
        }
        let mut tree = source_tree(&from.shared, baseline, p)?;
        edit::set_identity(&mut tree, &instance.instance_name, &instance.uuid);
        edit::set_disk_sources(&mut tree, &paths);
        let macs =
            m.nics.iter().map(|n| (n.name.clone(), n.mac.clone().unwrap_or_else(stagecore::random_mac))).collect();
        edit::set_macs(&mut tree, &macs);
        // Never keep production's host-side files (NVRAM, sockets, logs, TPM state, devices
        // naming host paths): copies or new files in the stage's own directory (removed with
        // the stage), or the device is dropped with a note.
        let files = hostfiles::StageFiles {
            machine: &m.name,
            dir: Path::new(&images),
            baseline_nvram: from.same_host(shared).then(|| {
                let dir = from.shared.env_dir(&baseline.environment).join("baselines").join(&baseline.id);
                hostfiles::baseline_nvram(&dir, &m.name)
            }),
            local: !storage.is_remote(),
        };
        let hostfiles::Owned { changed: host_paths, notes: host_notes } = hostfiles::own_for_stage(&mut tree, &files)?;
        if !host_paths.is_empty() {
            tracing::info!(machine = %m.name, changed = ?host_paths, "stage got its own host-side files");
        }
        if plan.fencing.fenced {
            let reverse: BTreeMap<String, String> = prod_nets.iter().map(|(l, n)| (n.clone(), l.clone())).collect();
            edit::set_networks(&mut tree, &networks, |n| reverse.get(n).cloned().unwrap_or_else(|| n.to_string()));
        }
        let record = meta::MachineRecord {
            environment: plan.name.clone(),
            machine: m.name.clone(),
            role: Role::Stage(Box::new(plan.info.clone())),
            networks: nets,
            cidrs: p.record.cidrs.clone(),
            env_labels: p.record.env_labels.clone(),
            owned_networks: owned.clone(),
            origins,
            snapshots: Vec::new(),
            sources: paths,
            after: m.after.clone(),
            host_paths,
            host_notes,
        };
        all_origins.extend(record.origins.values().cloned());
        meta::set(&mut tree, &meta::labels(&p.tree), &record)?;
        xmls.push((instance.instance_name, tree.render()));
    }
    crate::seals::record_stage(shared, &plan.name, seals, all_origins).await?;
    define_all(shared, xmls, undo).await?;
    if plan.start {
        // In start order, like any start (waves wait for the agents later machines start after).
        let env = LibvirtEnvironment { name: plan.name.clone(), shared: shared.clone() };
        stagecore::Environment::start(&env).await?;
    }
    Ok(())
}

/// Makes the layer holding the baseline's content for one disk of the stage and returns it: the
/// baseline layer itself (linked, same host), an allocated-only copy in the stage's pool (full),
/// or a copy streamed from production's host (another host: linked into production's pool here,
/// once per baseline and shared by its stages; full into the stage's pool).
async fn make_disk(
    shared: &Shared,
    from: &Source,
    plan: &StagePlan,
    d: &stagecore::toolbox::DiskPlan,
    images: &str,
) -> Result<String> {
    let baseline = plan.baseline();
    let storage = &shared.storage;
    let copy = format!("{images}/{}.{}.base.qcow2", d.machine, d.disk);
    if !from.same_host(shared) {
        let file = format!("{}.{}.{}.qcow2", d.machine, d.disk, baseline.id);
        let (env, replica) = match d.clone {
            CloneKind::Linked => {
                let env = baseline.environment.clone();
                (env.clone(), format!("{}/{file}", storage.env_dir(&env)))
            }
            CloneKind::Full => (plan.name.clone(), copy),
        };
        let subject = format!("{}/{}", plan.name, d.key);
        stream_copy(from, shared, &d.layer, &env, &replica, &subject).await?;
        return Ok(replica);
    }
    match d.clone {
        CloneKind::Linked => Ok(d.layer.clone()),
        CloneKind::Full => {
            let (st, src, dst, e) = (storage.clone(), d.layer.clone(), copy.clone(), plan.name.clone());
            shared.conn.run(move |c, uri| st.copy_full(c, uri, &e, &src, &dst)).await?;
            Ok(copy)
        }
    }
}

/// Production's XML at baseline time (saved by `take_baseline`), or its current XML.
fn source_tree(shared: &Shared, baseline: &Baseline, p: &Machine) -> Result<Element> {
    let saved =
        shared.env_dir(&baseline.environment).join("baselines").join(&baseline.id).join(format!("{}.xml", p.name()));
    match std::fs::read_to_string(&saved) {
        Ok(xml) => Element::parse(&xml, &format!("baseline XML {}", saved.display())),
        Err(_) => {
            let mut t = p.tree.clone();
            meta::strip(&mut t);
            Ok(t)
        }
    }
}

/// Copies what the chain of `layer` (on `from`'s host) allocates into a new qcow2 image `dst`
/// (in `env`'s directory on `to`'s host), through libvirt streams: reads with
/// `virStorageVolDownload` on the source, writes with `virStorageVolUpload` on the target. All-zero
/// chunks are skipped (the new image reads zeros there anyway). A `dst` that already exists is an
/// earlier copy of the same baseline layer and is reused. Progress: `stage`, `<subject>`,
/// `streamed`, bytes done of bytes allocated.
async fn stream_copy(from: &Source, to: &Shared, layer: &str, env: &str, dst: &str, subject: &str) -> Result<()> {
    const CHUNK: u64 = 4 << 20;
    let (src_store, dst_store) = (from.shared.storage.clone(), to.storage.clone());
    let (d, e) = (dst.to_string(), env.to_string());
    let st = dst_store.clone();
    if to.conn.run(move |c, uri| st.ensure_dir(c, uri, &e, &d).map(|_| st.exists(c, &d))).await? {
        tracing::info!(layer, replica = dst, "baseline layer already on this host");
        return Ok(());
    }
    let (l, st) = (layer.to_string(), src_store.clone());
    let (info, extents) =
        from.shared.conn.run(move |c, uri| Ok((st.info(c, uri, &l)?, st.allocated(c, uri, &l)?))).await?;
    let total = stagecore::extent::total(&extents);
    let tmp = format!("{dst}.partial");
    let (st, t, e) = (dst_store.clone(), tmp.clone(), env.to_string());
    to.conn
        .run(move |c, uri| {
            if st.exists(c, &t) {
                st.remove_image(c, uri, &t)?;
            }
            st.create_image(c, uri, &e, &t, "qcow2", info.virtual_size)
        })
        .await?;
    let emit = |done: u64| {
        if let Some(p) = &from.progress {
            p.emit("stage", subject, "streamed", done, total);
        } else {
            tracing::info!(target: "stagecore::progress", subject, done, total, "streamed");
        }
    };
    let copy = async {
        let mut done = 0;
        emit(0);
        for ext in &extents {
            let mut at = ext.offset;
            while at < ext.end() {
                let n = (ext.end() - at).min(CHUNK);
                let (st, l) = (src_store.clone(), layer.to_string());
                let data = from.shared.conn.run(move |c, uri| st.read_at(c, uri, &l, at, n)).await?;
                if data.iter().any(|b| *b != 0) {
                    let (st, t) = (dst_store.clone(), tmp.clone());
                    to.conn.run(move |c, uri| st.write_at(c, uri, &t, at, &data)).await?;
                }
                at += n;
                done += n;
                emit(done);
            }
        }
        Ok::<(), Error>(())
    };
    let result = copy.await;
    let (st, t, d, e) = (dst_store.clone(), tmp.clone(), dst.to_string(), env.to_string());
    match result {
        Ok(()) => to.conn.run(move |c, uri| st.rename(c, uri, &e, &t, &d)).await,
        Err(err) => {
            let _ = to.conn.run(move |c, uri| st.remove_image(c, uri, &t)).await;
            Err(err)
        }
    }
}
