//! Creating a production from a spec: image files under the state directory, isolated libvirt
//! networks for networks libvirt does not have, and one domain per machine carrying our record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use stagecore::{DiskFormat, EnvironmentSpec, Error, Result, Role, random_mac};

use crate::layers;
use crate::shared::{Shared, make_dir};
use crate::undo::Undo;
use crate::xml::{edit, meta};

/// Creates `spec` as a production; on failure everything made so far is removed.
pub(crate) async fn create(shared: &Shared, spec: &EnvironmentSpec) -> Result<()> {
    spec.validate()?;
    // Image files are made by this process: on a remote host they would not be where the domains look.
    crate::freeze::require_local(shared, "create")?;
    if shared.exists(&spec.name).await? {
        return Err(Error::already_exists("environment", &spec.name));
    }
    let instances: Vec<String> = spec.machines.iter().map(|m| format!("{}-{}", spec.name, m.name)).collect();
    check_free_domains(shared, &instances).await?;
    let mut undo = Undo::default();
    match build(shared, spec, &instances, &mut undo).await {
        Ok(()) => Ok(()),
        Err(e) => {
            undo.rollback(&shared.conn).await;
            Err(e)
        }
    }
}

/// `AlreadyExists` if any of `names` is a defined domain.
pub(crate) async fn check_free_domains(shared: &Shared, names: &[String]) -> Result<()> {
    let names = names.to_vec();
    shared
        .conn
        .run(move |c, _| {
            for n in &names {
                if c.lookup_domain_by_name(n).is_ok() {
                    return Err(Error::already_exists("domain", n.clone()));
                }
            }
            Ok(())
        })
        .await
}

async fn build(shared: &Shared, spec: &EnvironmentSpec, instances: &[String], undo: &mut Undo) -> Result<()> {
    let dir = shared.env_dir(&spec.name);
    if !dir.exists() {
        make_dir(&dir)?;
        undo.dirs.push(dir.clone());
    }
    let mut files: BTreeMap<(String, String), String> = BTreeMap::new();
    for (i, m) in spec.machines.iter().enumerate() {
        for (j, d) in m.disks.iter().enumerate() {
            let path = disk_path(&dir, &d.source);
            if !path.exists() {
                let size = d.size_bytes.ok_or_else(|| {
                    Error::invalid(format!("machines[{i}].disks[{j}].size_bytes"), "a new disk needs a size")
                })?;
                if let Some(parent) = path.parent() {
                    make_dir(parent)?;
                }
                let format = if d.format == DiskFormat::Raw { "raw" } else { "qcow2" };
                let p = path.clone();
                tokio::task::spawn_blocking(move || layers::create_image(&p, format, size))
                    .await
                    .map_err(|e| Error::backend_msg(crate::error::NAME, e))??;
                undo.files.push(path.clone());
            }
            files.insert((m.name.clone(), d.name.clone()), path.display().to_string());
        }
    }
    let (networks, owned) = networks(shared, spec, undo).await?;
    let mut xmls = Vec::new();
    for (m, instance) in spec.machines.iter().zip(instances) {
        let mut machine = m.clone();
        machine.uuid.get_or_insert_with(|| uuid::Uuid::new_v4().to_string());
        for n in &mut machine.nics {
            n.mac.get_or_insert_with(random_mac);
        }
        let disks: BTreeMap<String, String> =
            m.disks.iter().map(|d| (d.name.clone(), files[&(m.name.clone(), d.name.clone())].clone())).collect();
        let serial_log = dir.join(format!("{}.serial.log", m.name)).display().to_string();
        let mut tree = edit::new_domain(&machine, instance, &shared.domain_type, &disks, &networks, &serial_log);
        let record = meta::MachineRecord {
            environment: spec.name.clone(),
            machine: m.name.clone(),
            role: Role::Production,
            networks: networks.clone(),
            cidrs: spec.networks.iter().filter_map(|n| Some((n.name.clone(), n.cidr.clone()?))).collect(),
            env_labels: spec.labels.clone(),
            owned_networks: owned.clone(),
            origins: BTreeMap::new(),
            snapshots: Vec::new(),
            sources: disks.clone(),
            after: m.after.clone(),
            host_paths: BTreeMap::new(),
        };
        meta::set(&mut tree, &m.labels, &record)?;
        xmls.push((instance.clone(), tree.render()));
    }
    define_all(shared, xmls, undo).await
}

/// Defines domains from XML, recording each in `undo`.
pub(crate) async fn define_all(shared: &Shared, xmls: Vec<(String, String)>, undo: &mut Undo) -> Result<()> {
    for (name, xml) in xmls {
        let n = name.clone();
        shared.conn.call("domain", &name, move |c| c.define_domain_xml(&xml).map(drop)).await?;
        undo.domains.push(n);
    }
    Ok(())
}

/// Where a spec disk source lives: absolute paths as given, relative ones under the env dir
/// (a leading `<env>/` component is not repeated).
fn disk_path(dir: &Path, source: &str) -> PathBuf {
    let p = Path::new(source);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    let env = dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    dir.join(p.strip_prefix(&env).unwrap_or(p))
}

/// Maps each spec network to a libvirt network: one of that name if it exists, else a new
/// isolated `<env>-<net>` network owned by the environment.
async fn networks(
    shared: &Shared,
    spec: &EnvironmentSpec,
    undo: &mut Undo,
) -> Result<(BTreeMap<String, String>, Vec<String>)> {
    let mut map = BTreeMap::new();
    let mut owned = Vec::new();
    for net in &spec.networks {
        let name = net.name.clone();
        let exists = shared.conn.run(move |c, _| Ok(c.lookup_network_by_name(&name).is_ok())).await?;
        if exists {
            map.insert(net.name.clone(), net.name.clone());
            continue;
        }
        let libvirt_name = format!("{}-{}", spec.name, net.name);
        create_isolated(shared, &libvirt_name, undo).await?;
        map.insert(net.name.clone(), libvirt_name.clone());
        owned.push(libvirt_name);
    }
    Ok((map, owned))
}

/// Defines and starts an isolated network (no `<forward>`); `AlreadyExists` on a clash.
pub(crate) async fn create_isolated(shared: &Shared, name: &str, undo: &mut Undo) -> Result<()> {
    let xml = edit::isolated_network(name);
    let n = name.to_string();
    shared
        .conn
        .run(move |c, uri| {
            if c.lookup_network_by_name(&n).is_ok() {
                return Err(Error::already_exists("network", n));
            }
            crate::conn::lv(uri, "network", &n, c.define_network_xml(&xml)).map(drop)
        })
        .await?;
    undo.networks.push(name.to_string());
    let n = name.to_string();
    shared.conn.call("network", name, move |c| c.lookup_network_by_name(&n)?.create().map(drop)).await
}
