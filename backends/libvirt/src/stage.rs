//! Creating a stage from a production baseline: new names, UUIDs and MACs; disks as qcow2
//! overlays on the baseline layers (linked) or on allocated-only copies (full); NICs on isolated
//! per-stage networks when fenced; our record (source, baseline, ChangeSets) in each domain's
//! metadata. Production's definitions and files are only read. On failure everything made so far
//! is removed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use stagecore::{Baseline, CloneKind, DiskFormat, Error, Result, Role, StageInfo, StageOptions, random_mac};

use crate::create::{check_free_domains, create_isolated, define_all};
use crate::env::{LibvirtEnvironment, blocking};
use crate::layers;
use crate::machines::Machine;
use crate::shared::{Shared, make_dir};
use crate::undo::Undo;
use crate::xml::tree::Element;
use crate::xml::{edit, meta};

/// Creates the stage; see the module docs.
#[tracing::instrument(skip_all, fields(stage = %options.name, baseline = %baseline.id))]
pub(crate) async fn stage(shared: &Arc<Shared>, baseline: &Baseline, options: &StageOptions) -> Result<()> {
    options.validate()?;
    crate::freeze::require_local(shared, "stage")?;
    if shared.exists(&options.name).await? {
        return Err(Error::already_exists("environment", &options.name));
    }
    let prod = shared.machines(&baseline.environment).await?;
    let prefix = options.prefix();
    check_inputs(baseline, options, &prod)?;
    let instances: Vec<String> = baseline.spec.machines.iter().map(|m| format!("{prefix}{}", m.name)).collect();
    check_free_domains(shared, &instances).await?;
    let mut undo = Undo::default();
    match build(shared, baseline, options, &prod, &mut undo).await {
        Ok(()) => Ok(()),
        Err(e) => {
            undo.rollback(&shared.conn).await;
            Err(e)
        }
    }
}

fn check_inputs(baseline: &Baseline, options: &StageOptions, prod: &[Machine]) -> Result<()> {
    for (i, m) in baseline.spec.machines.iter().enumerate() {
        if !prod.iter().any(|p| p.name() == m.name) {
            return Err(Error::not_found("machine", format!("{}/{}", baseline.environment, m.name)));
        }
        for (j, d) in m.disks.iter().enumerate() {
            if baseline.layer(&m.name, &d.name).is_none() {
                return Err(Error::not_found("baseline layer", format!("{}/{}/{}", baseline.id, m.name, d.name)));
            }
            if options.clone == CloneKind::Linked && d.format != DiskFormat::Qcow2 {
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

async fn build(
    shared: &Arc<Shared>,
    baseline: &Baseline,
    options: &StageOptions,
    prod: &[Machine],
    undo: &mut Undo,
) -> Result<()> {
    let prefix = options.prefix();
    let dir = shared.env_dir(&options.name);
    if dir.exists() {
        return Err(Error::already_exists("stage directory", dir.display().to_string()));
    }
    make_dir(&dir)?;
    undo.dirs.push(dir.clone());
    let mut networks = BTreeMap::new();
    let mut owned = Vec::new();
    if options.fenced {
        for net in &baseline.spec.networks {
            let name = format!("{prefix}{}", net.name);
            create_isolated(shared, &name, undo).await?;
            networks.insert(net.name.clone(), name.clone());
            owned.push(name);
        }
    }
    let info = StageInfo::new(baseline, options);
    let mut xmls = Vec::new();
    for m in &baseline.spec.machines {
        let p = prod.iter().find(|p| p.name() == m.name).expect("checked");
        let prod_nets = p.record.networks.clone();
        let nets = if options.fenced { networks.clone() } else { prod_nets.clone() };
        let mut paths = BTreeMap::new();
        let mut origins = BTreeMap::new();
        for d in &m.disks {
            let layer = baseline.layer(&m.name, &d.name).expect("checked").layer.clone();
            let top = dir.join(format!("{}.{}.qcow2", m.name, d.name));
            let origin = match options.clone {
                CloneKind::Linked => layer,
                CloneKind::Full => {
                    let copy = dir.join(format!("{}.{}.base.qcow2", m.name, d.name));
                    let (src, dst) = (layer.clone(), copy.clone());
                    blocking(move || layers::copy_allocated(Path::new(&src), &dst)).await?;
                    copy.display().to_string()
                }
            };
            let (o, t) = (origin.clone(), top.clone());
            blocking(move || layers::create_overlay(&t, Path::new(&o))).await?;
            paths.insert(d.name.clone(), top.display().to_string());
            origins.insert(d.name.clone(), origin);
        }
        let mut tree = source_tree(shared, baseline, p)?;
        let instance = format!("{prefix}{}", m.name);
        edit::set_identity(&mut tree, &instance, &uuid::Uuid::new_v4().to_string());
        edit::set_disk_sources(&mut tree, &paths);
        let macs = m.nics.iter().map(|n| (n.name.clone(), random_mac())).collect();
        edit::set_macs(&mut tree, &macs);
        // Never keep production's sockets and log files: libvirt assigns new agent sockets, the
        // rest moves into the stage's own directory (removed with the stage).
        let host_paths = edit::own_host_paths(&mut tree, &dir, &m.name);
        if !host_paths.is_empty() {
            tracing::info!(machine = %m.name, changed = ?host_paths, "stage got its own chardev paths");
        }
        if options.fenced {
            let reverse: BTreeMap<String, String> = prod_nets.iter().map(|(l, n)| (n.clone(), l.clone())).collect();
            edit::set_networks(&mut tree, &networks, |n| reverse.get(n).cloned().unwrap_or_else(|| n.to_string()));
        }
        let record = meta::MachineRecord {
            environment: options.name.clone(),
            machine: m.name.clone(),
            role: Role::Stage(Box::new(info.clone())),
            networks: nets,
            cidrs: p.record.cidrs.clone(),
            env_labels: p.record.env_labels.clone(),
            owned_networks: owned.clone(),
            origins,
            snapshots: Vec::new(),
            sources: paths,
            after: m.after.clone(),
            host_paths,
        };
        meta::set(&mut tree, &meta::labels(&p.tree), &record)?;
        xmls.push((instance, tree.render()));
    }
    define_all(shared, xmls, undo).await?;
    if options.start {
        // In start order, like any start (waves wait for the agents later machines start after).
        let env = LibvirtEnvironment { name: options.name.clone(), shared: shared.clone() };
        stagecore::Environment::start(&env).await?;
    }
    Ok(())
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
