//! Creating a production from a spec: image files under the state directory, isolated libvirt
//! networks for networks libvirt does not have, and one domain per machine carrying our record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use stagecore::toolbox::Undo;
use stagecore::{DiskFormat, EnvironmentSpec, Error, Result, Role};

use crate::conn::Conn;
use crate::layers::make_dir;
use crate::shared::Shared;
use crate::xml::{edit, meta};

/// Creates `spec` as a production; on failure everything made so far is removed (or the error
/// says what could not be: `Error::LeftBehind`).
pub(crate) async fn create(shared: &Shared, spec: &EnvironmentSpec) -> Result<()> {
    spec.validate()?;
    if shared.exists(&spec.name).await? {
        return Err(Error::already_exists("environment", &spec.name));
    }
    let mut spec = spec.clone();
    stagecore::toolbox::fill_identities(&mut spec);
    let instances: Vec<String> = spec.machines.iter().map(|m| format!("{}-{}", spec.name, m.name)).collect();
    check_free_domains(shared, &instances).await?;
    let mut undo = Undo::new(format!("create {}", spec.name));
    let r = build(shared, &spec, &instances, &mut undo).await;
    undo.finish(r).await
}

/// Undo step: destroy (if running) and undefine domain `name`, keeping its NVRAM (a domain this
/// operation defined has its NVRAM in the operation's directory, removed by its own step).
pub(crate) fn undo_domain(undo: &mut Undo, conn: &Conn, name: &str) {
    let (conn, n) = (conn.clone(), name.to_string());
    undo.push_async(format!("domain {name}"), move || async move {
        conn.run(move |c, uri| {
            let Ok(dom) = c.lookup_domain_by_name(&n) else { return Ok(()) };
            let _ = dom.destroy();
            let flags = virt::sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM;
            dom.undefine_flags(flags)
                .or_else(|_| dom.undefine())
                .map_err(|e| crate::error::map(&e, ctx(uri, "domain", &n)))
        })
        .await
    });
}

/// Undo step: destroy and undefine network `name`.
pub(crate) fn undo_network(undo: &mut Undo, conn: &Conn, name: &str) {
    let (conn, n) = (conn.clone(), name.to_string());
    undo.push_async(format!("network {name}"), move || async move {
        conn.run(move |c, uri| {
            let Ok(net) = c.lookup_network_by_name(&n) else { return Ok(()) };
            let _ = net.destroy();
            net.undefine().map_err(|e| crate::error::map(&e, ctx(uri, "network", &n)))
        })
        .await
    });
}

/// Undo step: remove environment `env`'s storage pool and every volume in it (remote URIs).
pub(crate) fn undo_pool(undo: &mut Undo, shared: &Shared, env: &str) {
    let (conn, st, e) = (shared.conn.clone(), shared.storage.clone(), env.to_string());
    undo.push_async(format!("storage pool of {env} on {}", shared.conn.uri()), move || async move {
        conn.run(move |c, uri| st.remove_env(c, uri, &e)).await
    });
}

/// Undo step: remove a directory this operation made, with everything in it.
pub(crate) fn undo_dir(undo: &mut Undo, dir: &Path) {
    let d = dir.to_path_buf();
    undo.push(format!("directory {}", dir.display()), move || {
        std::fs::remove_dir_all(&d)
            .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
            .map_err(|e| Error::io("removing", &d, e))
    });
}

fn ctx<'a>(uri: &'a str, kind: &'static str, name: &'a str) -> crate::error::Ctx<'a> {
    crate::error::Ctx { uri, kind, name }
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
        undo_dir(undo, &dir);
    }
    let storage = shared.storage.clone();
    let images = storage.env_dir(&spec.name);
    if storage.is_remote() {
        let (st, env, probe) = (storage.clone(), spec.name.clone(), format!("{images}/.pool"));
        shared.conn.run(move |c, uri| st.ensure_dir(c, uri, &env, &probe)).await?;
        undo_pool(undo, shared, &spec.name);
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
                let p = PathBuf::from(&path);
                undo.push(format!("image {path}"), move || {
                    std::fs::remove_file(&p).map_err(|e| Error::io("removing", &p, e))
                });
            }
            files.insert((m.name.clone(), d.name.clone()), path);
        }
    }
    let (networks, owned) = networks(shared, spec, undo).await?;
    let mut xmls = Vec::new();
    for (m, instance) in spec.machines.iter().zip(instances) {
        let machine = m.clone();
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
        undo_domain(undo, &shared.conn, &n);
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
    undo_network(undo, &shared.conn, name);
    let n = name.to_string();
    shared.conn.call("network", name, move |c| c.lookup_network_by_name(&n)?.create().map(drop)).await
}
