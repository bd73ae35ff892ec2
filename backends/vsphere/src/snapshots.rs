//! Whole-environment snapshots of a [`VsphereEnvironment`]: one vSphere snapshot per VM.
//!
//! Contract: vSphere has no cross-VM atomic snapshot, so `create_snapshot` snapshots the VMs one
//! after another (each crash-consistent, no memory): [`Consistency::PerMachine`]. A failure
//! midway removes the VM snapshots already taken ([`Undo`]). `revert_snapshot` reverts every VM
//! (`RevertToSnapshot_Task`, power-on suppressed) and powers on again the VMs that were running;
//! the VM configuration reverts with the disks. `delete_snapshot` removes every VM's snapshot
//! (children kept, disks consolidated). Names, uniqueness and the list (oldest first) are the
//! toolbox record's bookkeeping.

use async_trait::async_trait;
use stagecore::toolbox::{SnapshotRecord, Undo};
use stagecore::{Consistency, Environment, Result, Snapshot, SnapshotInfo};
use time::OffsetDateTime;
use tracing::Instrument;

use crate::env::VsphereEnvironment;
use crate::record::{Record, VmPoint, layers, snapshot_set};
use crate::vms::{remove_snapshots, snap_ref, snapshot_all};

/// The VM snapshots of environment snapshot `name` (checked to exist first).
fn points(record: &Record, name: &str) -> Result<Vec<VmPoint>> {
    record.snapshot(name)?;
    Ok(record.backend.points.get(&snapshot_set(name)).cloned().unwrap_or_default())
}

#[async_trait]
impl Snapshot for VsphereEnvironment {
    async fn create_snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        let span = tracing::info_span!("vsphere.create_snapshot", environment = %self.name(), snapshot = name);
        async {
            let record = self.record()?;
            record.require_new_snapshot(name)?;
            let spec = self.spec().await?;
            let description = format!("stagecore snapshot {name} of environment {}", self.name());
            let mut undo = Undo::new(format!("snapshot {name} of {}", self.name()));
            let result = async {
                let points =
                    snapshot_all(&self.shared, &record.backend.machines, name, &description, &mut undo).await?;
                let info = SnapshotInfo {
                    name: name.to_string(),
                    environment: self.name().to_string(),
                    created_at: OffsetDateTime::now_utc(),
                    spec,
                    consistency: Consistency::PerMachine,
                    memory: false,
                    machines: Default::default(),
                };
                let rec = SnapshotRecord { info: info.clone(), layers: layers(&points) };
                self.update(|r| {
                    r.require_new_snapshot(name)?;
                    r.backend.points.insert(snapshot_set(name), points);
                    r.snapshots.push(rec);
                    Ok(())
                })
                .await?;
                Ok(info)
            }
            .await;
            undo.finish(result).await
        }
        .instrument(span)
        .await
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(self.record()?.snapshot_infos())
    }

    async fn revert_snapshot(&self, name: &str) -> Result<()> {
        let span = tracing::info_span!("vsphere.revert_snapshot", environment = %self.name(), snapshot = name);
        async {
            let record = self.record()?;
            let points = points(&record, name)?;
            let client = &self.shared.client;
            let mut running = Vec::new();
            for m in &record.backend.machines {
                if client.get_vm(&m.vm).await?.power_state == "POWERED_ON" {
                    running.push(m.vm.clone());
                }
            }
            for p in &points {
                client.revert_snapshot(&snap_ref(&p.snapshot), true).await?;
            }
            for vm in &running {
                client.power_on(vm).await?;
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    async fn delete_snapshot(&self, name: &str) -> Result<()> {
        let span = tracing::info_span!("vsphere.delete_snapshot", environment = %self.name(), snapshot = name);
        async {
            let points = points(&self.record()?, name)?;
            remove_snapshots(&self.shared.client, &points).await?;
            self.update(|r| {
                r.remove_snapshot(name)?;
                r.backend.points.remove(&snapshot_set(name));
                Ok(())
            })
            .await
        }
        .instrument(span)
        .await
    }
}
