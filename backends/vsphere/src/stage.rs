//! Creating and deleting stages, and per-VM snapshot points.
//!
//! Contract: a stage is one clone per production VM of the baseline's snapshot — linked
//! (`CloneVM_Task`, `createNewChildDiskBacking`) or full (`CloneVM_Task`,
//! `moveAllDiskBackingsAndDisallowSharing`, so the copy is the baseline's state and not the VM's
//! current one) — named `prefix + logical name`, with new MACs (`addressType: generated`) and, when
//! fenced, every NIC on the configured isolated port group. Right after cloning, each clone gets an
//! *origin* snapshot whose CBT change ids are what the stage's disk changes are measured from.
//! Fenced without an isolated network is `InvalidSpec("vsphere.isolated_network")` before anything
//! is created; a failure midway deletes the clones already made.

use stagecore::{Baseline, CloneKind, Error, Result, Role, StageInfo, StageOptions};

use crate::backend::{Shared, resolve_folder};
use crate::inspect::disk_name;
use crate::registry::{DiskPoint, EnvRecord, MachineRecord, VmPoint};
use crate::{LinkedCloneSpec, MoRef, VsphereClient};

/// The name of the snapshot taken of every stage VM right after cloning.
pub(crate) const ORIGIN_SNAPSHOT: &str = "stagecore-origin";

/// The longest VM name vCenter accepts.
const MAX_VM_NAME: usize = 80;

/// The snapshot point of `vm` at `snapshot`: its disks (logical names, keys, CBT change ids).
pub(crate) async fn point(client: &VsphereClient, machine: &str, vm: &str, snapshot: &MoRef) -> Result<VmPoint> {
    let config = client.snapshot_config(snapshot).await?;
    let disks = config
        .disks
        .iter()
        .map(|d| DiskPoint {
            disk: disk_name(&d.label, &d.key.to_string()),
            key: d.key,
            change_id: if config.change_tracking_enabled { d.change_id.clone() } else { None },
        })
        .collect();
    Ok(VmPoint { machine: machine.to_string(), vm: vm.to_string(), snapshot: snapshot.value.clone(), disks })
}

/// Snapshots every machine (no memory) under `name`; on failure removes the ones already taken.
pub(crate) async fn snapshot_all(
    client: &VsphereClient,
    machines: &[MachineRecord],
    name: &str,
    description: &str,
) -> Result<Vec<VmPoint>> {
    let mut points: Vec<VmPoint> = Vec::new();
    for m in machines {
        let taken = match client.create_snapshot(&m.vm, name, description, false).await {
            Ok(snap) => point(client, &m.name, &m.vm, &snap).await.map_err(|e| (Some(snap), e)),
            Err(e) => Err((None, e)),
        };
        match taken {
            Ok(p) => points.push(p),
            Err((snap, e)) => {
                let leftovers = points.iter().map(|p| MoRef::new("VirtualMachineSnapshot", &p.snapshot)).chain(snap);
                for s in leftovers {
                    if let Err(e2) = client.remove_snapshot(&s, false).await {
                        tracing::warn!(snapshot = %s.value, error = %e2, "could not remove a partial snapshot");
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(points)
}

/// Powers off and deletes VMs, trying all of them; VMs already gone are fine. Returns the first error.
pub(crate) async fn delete_vms(client: &VsphereClient, machines: &[MachineRecord]) -> Result<()> {
    let mut first = None;
    for m in machines {
        let r = match client.power_off(&m.vm).await {
            Ok(()) => client.delete_vm(&m.vm).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(()) | Err(Error::NotFound { .. }) => tracing::debug!(vm = %m.vm, "deleted"),
            Err(e) => {
                tracing::warn!(vm = %m.vm, error = %e, "could not delete a stage VM");
                first.get_or_insert(e);
            }
        }
    }
    first.map_or(Ok(()), Err)
}

/// The id of the folder holding `vm`.
async fn folder_of(client: &VsphereClient, vm: &str) -> Result<String> {
    for f in client.list_folders(&[]).await? {
        if client.list_vms(&[], &[&f.folder]).await?.iter().any(|v| v.vm == vm) {
            return Ok(f.folder);
        }
    }
    Err(Error::not_found("folder of vSphere VM", vm))
}

/// Creates the stage and records it.
pub(crate) async fn stage(shared: &Shared, baseline: &Baseline, options: &StageOptions) -> Result<()> {
    options.validate()?;
    let isolated = match (options.fenced, &shared.opts.isolated_network) {
        (false, _) => None,
        (true, Some(net)) => Some(net.clone()),
        (true, None) => {
            return Err(Error::invalid(
                "vsphere.isolated_network",
                "a fenced stage needs an isolated port group; configure one or stage with `fenced: false`",
            ));
        }
    };
    let prefix = options.prefix();
    if let Some(m) = baseline.spec.machines.iter().find(|m| prefix.len() + m.name.len() > MAX_VM_NAME) {
        return Err(Error::invalid(
            "stage.name_prefix",
            format!("`{prefix}{}` is longer than vSphere's {MAX_VM_NAME} characters", m.name),
        ));
    }
    let client = &shared.client;
    let _guard = shared.lock.lock().await;
    if shared.registry.exists(&options.name)? {
        return Err(Error::already_exists("environment", &options.name));
    }
    let source = shared.registry.load(&baseline.environment)?;
    if source.role != Role::Production {
        return Err(Error::Precondition(format!("{} is a stage; stages are cloned from production", source.name)));
    }
    let record = source
        .baselines
        .iter()
        .find(|b| b.baseline.id == baseline.id)
        .ok_or_else(|| Error::not_found("baseline", format!("{}/{}", baseline.environment, baseline.id)))?;
    let folder = match &shared.opts.folder {
        Some(f) => Some(resolve_folder(client, f).await?),
        None => None,
    };
    let mut created = Vec::new();
    let result = clone_all(client, &record.points, options, folder.as_deref(), isolated, &mut created).await;
    let origin = match result {
        Ok(origin) => origin,
        Err(e) => {
            if let Err(e2) = delete_vms(client, &created).await {
                tracing::warn!(error = %e2, "cleanup after a failed stage left VMs behind");
            }
            return Err(e);
        }
    };
    let info = StageInfo {
        source: source.name.clone(),
        baseline: record.baseline.clone(),
        clone: options.clone,
        fenced: options.fenced,
        change_sets: Vec::new(),
    };
    let stage = EnvRecord {
        name: options.name.clone(),
        role: Role::Stage(Box::new(info)),
        machines: created.clone(),
        baselines: Vec::new(),
        origin,
        snapshots: Vec::new(),
    };
    if let Err(e) = shared.registry.save(&stage) {
        let _ = delete_vms(client, &created).await;
        return Err(e);
    }
    tracing::info!(machines = created.len(), clone = ?options.clone, fenced = options.fenced, "staged");
    Ok(())
}

async fn clone_all(
    client: &VsphereClient,
    points: &[VmPoint],
    options: &StageOptions,
    folder: Option<&str>,
    isolated: Option<String>,
    created: &mut Vec<MachineRecord>,
) -> Result<Vec<VmPoint>> {
    let prefix = options.prefix();
    for p in points {
        let folder = match folder {
            Some(f) => f.to_string(),
            None => folder_of(client, &p.vm).await?,
        };
        let spec = LinkedCloneSpec {
            snapshot: MoRef::new("VirtualMachineSnapshot", &p.snapshot),
            name: format!("{prefix}{}", p.machine),
            folder,
            network_name: isolated.clone(),
            power_on: false,
        };
        let vm = match options.clone {
            CloneKind::Linked => client.linked_clone(&p.vm, &spec).await?,
            CloneKind::Full => client.full_clone_from_snapshot(&p.vm, &spec).await?,
        };
        created.push(MachineRecord { name: p.machine.clone(), vm, instance_name: spec.name });
    }
    let description = format!("stagecore: state of stage {} when cloned", options.name);
    let origin = snapshot_all(client, created, ORIGIN_SNAPSHOT, &description).await?;
    if options.start {
        for m in created.iter() {
            client.power_on(&m.vm).await?;
        }
    }
    Ok(origin)
}
