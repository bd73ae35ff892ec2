//! VM-level mechanisms: snapshot every VM of an environment (rolling back on failure), read a
//! snapshot's disk point, delete VMs.
//!
//! Contract: vSphere has no cross-VM snapshot, so a set of VM snapshots is taken one VM after
//! another (no memory); each one taken is pushed onto the caller's [`stagecore::toolbox::Undo`],
//! so a failure (of a later VM, or of recording the set) removes the ones already taken, and the
//! error says exactly which could not be ([`stagecore::Error::LeftBehind`]).

use std::sync::Arc;

use stagecore::toolbox::Undo;
use stagecore::{Error, Result};

use crate::core::Shared;
use crate::inspect::disk_name;
use crate::record::{DiskPoint, MachineRecord, VmPoint};
use crate::{MoRef, VsphereClient};

/// The moref of snapshot `id`.
pub(crate) fn snap_ref(id: &str) -> MoRef {
    MoRef::new("VirtualMachineSnapshot", id)
}

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

/// Snapshots every machine (no memory) under `name`, pushing each snapshot's removal onto
/// `undo` (the caller commits once the snapshots are recorded, or fails to remove them).
pub(crate) async fn snapshot_all(
    shared: &Arc<Shared>,
    machines: &[MachineRecord],
    name: &str,
    description: &str,
    undo: &mut Undo,
) -> Result<Vec<VmPoint>> {
    let mut points = Vec::new();
    for m in machines {
        let snap = shared.client.create_snapshot(&m.vm, name, description, false).await?;
        let (s, r) = (shared.clone(), snap.clone());
        undo.push_async(format!("snapshot {} of VM {}", snap.value, m.vm), move || async move {
            s.client.remove_snapshot(&r, false).await
        });
        points.push(point(&shared.client, &m.name, &m.vm, &snap).await?);
    }
    Ok(points)
}

/// Powers off and deletes one VM; a VM already gone is fine.
pub(crate) async fn delete_vm(client: &VsphereClient, vm: &str) -> Result<()> {
    let r = match client.power_off(vm).await {
        Ok(()) => client.delete_vm(vm).await,
        Err(e) => Err(e),
    };
    match r {
        Ok(()) | Err(Error::NotFound { .. }) => {
            tracing::debug!(vm, "deleted");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Powers off and deletes VMs, trying all of them. Returns the first error.
pub(crate) async fn delete_vms(client: &VsphereClient, machines: &[MachineRecord]) -> Result<()> {
    let mut first = None;
    for m in machines {
        if let Err(e) = delete_vm(client, &m.vm).await {
            tracing::warn!(vm = %m.vm, error = %e, "could not delete a stage VM");
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// Removes VM snapshots, trying all of them; snapshots already gone are fine. Returns the first error.
pub(crate) async fn remove_snapshots<'a>(
    client: &VsphereClient,
    points: impl IntoIterator<Item = &'a VmPoint>,
) -> Result<()> {
    let mut first = None;
    for p in points {
        match client.remove_snapshot(&snap_ref(&p.snapshot), false).await {
            Ok(()) | Err(Error::NotFound { .. }) => {}
            Err(e) => {
                tracing::warn!(vm = %p.vm, snapshot = %p.snapshot, error = %e, "could not remove a VM snapshot");
                first.get_or_insert(e);
            }
        }
    }
    first.map_or(Ok(()), Err)
}
