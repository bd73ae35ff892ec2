//! Disk changes from Changed Block Tracking (`QueryChangedDiskAreas`).
//!
//! Contract: a production's disks are compared with the change ids recorded when the baseline
//! snapshot was taken; a stage's with the change ids of its *origin* snapshot, taken right after
//! cloning (a clone's disks start a fresh CBT history, so the production's change ids mean
//! nothing to them, and at the origin the clone's content is exactly the baseline's). The current
//! state is read through a short-lived probe snapshot when the VM is powered on (the API computes
//! changes of a running VM only for a snapshot) and removed afterwards; a powered-off VM is read
//! directly. A disk is `NotChecked`, with the reason, when CBT is disabled on the VM now or was at
//! the baseline, when the disk is not part of the baseline, or when vCenter rejects the change id
//! (CBT was reset). Transport, session and timeout failures are errors, never a silent zero.

use stagecore::{Baseline, ChangeMap, DiskChanges, Error, Extent, Result, Role};

use crate::inspect::disk_name;
use crate::record::{MachineRecord, Record, VmPoint, baseline_set};
use crate::{MoRef, VsphereClient};

/// CBT reports sector-aligned extents.
pub(crate) const GRANULARITY: u64 = 512;

const PROBE_SNAPSHOT: &str = "stagecore-drift-probe";

/// The points changes are measured from, and how to name them in reasons.
fn points<'a>(record: &'a Record, baseline: &Baseline) -> Result<(&'a [VmPoint], String)> {
    let from = match &record.role {
        Role::Production => format!("baseline {}", baseline.id),
        Role::Stage(s) if s.baseline.id == baseline.id => format!("the origin snapshot of stage {}", record.name),
        Role::Stage(s) => {
            return Err(Error::not_found(
                "baseline",
                format!("{}: stage {} was cloned from {}", baseline.id, record.name, s.baseline.id),
            ));
        }
    };
    record
        .backend
        .points
        .get(&baseline_set(&baseline.id))
        .map(|p| (p.as_slice(), from))
        .ok_or_else(|| Error::not_found("baseline", format!("{}/{}", record.name, baseline.id)))
}

/// Changes of every disk of every machine (see module docs).
pub(crate) async fn disk_changes(
    client: &VsphereClient,
    record: &Record,
    baseline: &Baseline,
) -> Result<Vec<DiskChanges>> {
    let (points, from) = points(record, baseline)?;
    let mut out = Vec::new();
    for m in &record.backend.machines {
        let point = points.iter().find(|p| p.machine == m.name);
        out.extend(machine_changes(client, m, point, &from).await?);
    }
    Ok(out)
}

async fn machine_changes(
    client: &VsphereClient,
    m: &MachineRecord,
    point: Option<&VmPoint>,
    from: &str,
) -> Result<Vec<DiskChanges>> {
    let config = client.vm_config(&m.vm).await?;
    let tracked =
        config.change_tracking_enabled && point.is_some_and(|p| p.disks.iter().any(|d| d.change_id.is_some()));
    let probe = if tracked && client.get_vm(&m.vm).await?.power_state != "POWERED_OFF" {
        Some(client.create_snapshot(&m.vm, PROBE_SNAPSHOT, "stagecore: reading changed blocks", false).await?)
    } else {
        None
    };
    let result = disks(client, m, &config, point, from, probe.as_ref()).await;
    if let Some(p) = &probe
        && let Err(e) = client.remove_snapshot(p, false).await
    {
        tracing::warn!(vm = %m.vm, snapshot = %p.value, error = %e, "could not remove the probe snapshot");
        return Err(e);
    }
    result
}

async fn disks(
    client: &VsphereClient,
    m: &MachineRecord,
    config: &crate::VimConfig,
    point: Option<&VmPoint>,
    from: &str,
    probe: Option<&MoRef>,
) -> Result<Vec<DiskChanges>> {
    let mut out = Vec::new();
    for d in &config.disks {
        let name = disk_name(&d.label, &d.key.to_string());
        let not_checked = |reason: String| ChangeMap::NotChecked { reason };
        let changes = if !config.change_tracking_enabled {
            not_checked(format!("changed block tracking is disabled on VM {}", m.instance_name))
        } else {
            match point.and_then(|p| p.disks.iter().find(|x| x.key == d.key)) {
                None => not_checked(format!("{}/{name} is not part of {from}", m.name)),
                Some(p) => match &p.change_id {
                    None => {
                        not_checked(format!("changed block tracking was disabled on VM {} at {from}", m.instance_name))
                    }
                    Some(cid) => query(client, &m.vm, probe, d.key, cid).await?,
                },
            }
        };
        out.push(DiskChanges {
            machine: m.name.clone(),
            disk: name,
            virtual_size: d.capacity_bytes,
            granularity: GRANULARITY,
            changes,
        });
    }
    Ok(out)
}

async fn query(client: &VsphereClient, vm: &str, probe: Option<&MoRef>, key: i32, cid: &str) -> Result<ChangeMap> {
    match client.query_changed_areas(vm, probe, key, cid).await {
        Ok(areas) => Ok(ChangeMap::Checked {
            extents: stagecore::extent::normalize(
                areas.into_iter().map(|a| Extent { offset: a.start, length: a.length }).collect(),
            ),
        }),
        // vCenter rejected the change id or the query (CBT reset, FileFault): unknown, not zero.
        Err(e @ (Error::InvalidSpec { .. } | Error::Backend { .. })) => {
            Ok(ChangeMap::NotChecked { reason: format!("vCenter could not report changed blocks: {e}") })
        }
        Err(e) => Err(e),
    }
}
