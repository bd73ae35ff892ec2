//! Creating a production from a spec: image files under the state directory, isolated libvirt
//! networks for networks libvirt does not have, and one domain per machine carrying our record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use stagecore::{DiskFormat, EnvironmentSpec, Error, Result, Role, random_mac};

use crate::shared::{Shared, make_dir};
use crate::undo::Undo;
use crate::xml::{edit, meta};

/// Creates `spec` as a production; on failure everything made so far is removed.
pub(crate) async fn create(shared: &Shared, spec: &EnvironmentSpec) -> Result<()> {
    spec.validate()?;
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
    // The state directory keeps the environment's directory (baselines' XML) for every URI;
    // the images go where `storage` says (here, or a storage pool on the remote host).
    let dir = shared.env_dir(&spec.name);
    if !dir.exists() {
        make_dir(&dir)?;
        undo.dirs.push(dir.clone());
    }
    let storage = shared.storage.clone();
    let images = storage.env_dir(&spec.name);
    if storage.is_remote() {
        let (st, env, probe) = (storage.clone(), spec.name.clone(), format!("{images}/.pool"));
        shared.conn.run(move |c, uri| st.ensure_dir(c, uri, &env, &probe)).await?;
        undo.images = Some((storage.clone(), spec.name.clone()));
    }
    let mut files: BTreeMap<(String, String), String> = BTreeMap::new();
    for (i, m) in spec.machines.iter().enumerate() {
        for (j, d) in m.disks.iter().enumerate() {
            let path = disk_path(Path::new(&images), &d.source).display().to_string();
            let format = if d.format == DiskFormat::Raw { "raw" } else { "qcow2" };
            let (st, p, env, size, images) =
                (storage.clone(), path.clone(), spec.name.clone(), d.size_bytes, images.clone());
            let created = shared
                .conn
                .run(move |c, uri| {
                    if st.exists(c, &p) {
                        return Ok(false);
                    }
                    let size = size.ok_or_else(|| {
                        Error::invalid(format!("machines[{i}].disks[{j}].size_bytes"), "a new disk needs a size")
                    })?;
                    if st.is_remote() && Path::new(&p).parent() != Some(Path::new(&images)) {
                        return Err(Error::invalid(
                            format!("machines[{i}].disks[{j}].source"),
                            format!("{p} is not a volume on the host; new remote disks are made in {images}"),
                        ));
                    }
                    st.create_image(c, uri, &env, &p, format, size)?;
                    Ok(true)
                })
                .await?;
            if created && !storage.is_remote() {
                undo.files.push(PathBuf::from(&path));
            }
            files.insert((m.name.clone(), d.name.clone()), path);
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
        let serial_log = format!("{images}/{}.serial.log", m.name);
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
            host_notes: Vec::new(),
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
