//! Whole-environment snapshots of a [`VsphereEnvironment`]: one vSphere snapshot per VM.
//!
//! Contract: vSphere has no cross-VM atomic snapshot, so `create_snapshot` snapshots the VMs one
//! after another (each crash-consistent, no memory): [`Consistency::PerMachine`]. A failure
//! midway removes the VM snapshots already taken. `revert_snapshot` reverts every VM
//! (`RevertToSnapshot_Task`, power-on suppressed) and powers on again the VMs that were running;
//! the VM configuration reverts with the disks. `delete_snapshot` removes every VM's snapshot
//! (children kept, disks consolidated). Snapshots are listed oldest first from the registry.

use async_trait::async_trait;
use stagecore::{Consistency, Environment, Error, Result, Snapshot, SnapshotInfo};
use time::OffsetDateTime;
use tracing::Instrument;

use crate::MoRef;
use crate::env::VsphereEnvironment;
use crate::registry::{EnvRecord, SnapshotRecord};

fn snap_ref(id: &str) -> MoRef {
    MoRef::new("VirtualMachineSnapshot", id)
}

impl VsphereEnvironment {
    /// The recorded snapshot called `name`, or `NotFound` naming `environment/name`.
    fn find_snapshot<'a>(&self, record: &'a EnvRecord, name: &str) -> Result<&'a SnapshotRecord> {
        record
            .snapshots
            .iter()
            .find(|s| s.info.name == name)
            .ok_or_else(|| Error::not_found("snapshot", format!("{}/{name}", self.name())))
    }
}

#[async_trait]
impl Snapshot for VsphereEnvironment {
    async fn create_snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        stagecore::name::validate("snapshot", name)?;
        let span = tracing::info_span!("vsphere.create_snapshot", environment = %self.name(), snapshot = name);
        async {
            let record = self.record()?;
            if record.snapshots.iter().any(|s| s.info.name == name) {
                return Err(Error::already_exists("snapshot", format!("{}/{name}", self.name())));
            }
            let spec = self.spec().await?;
            let description = format!("stagecore snapshot {name} of environment {}", self.name());
            let points = crate::stage::snapshot_all(&self.shared.client, &record.machines, name, &description).await?;
            let info = SnapshotInfo {
                name: name.to_string(),
                environment: self.name().to_string(),
                created_at: OffsetDateTime::now_utc(),
                spec,
                consistency: Consistency::PerMachine,
                memory: false,
                machines: Default::default(),
            };
            let rec = SnapshotRecord { info: info.clone(), points };
            self.update(|r| {
                r.snapshots.push(rec);
                Ok(())
            })
            .await?;
            Ok(info)
        }
        .instrument(span)
        .await
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(self.record()?.snapshots.into_iter().map(|s| s.info).collect())
    }

    async fn revert_snapshot(&self, name: &str) -> Result<()> {
        stagecore::name::validate("snapshot", name)?;
        let span = tracing::info_span!("vsphere.revert_snapshot", environment = %self.name(), snapshot = name);
        async {
            let record = self.record()?;
            let snap = self.find_snapshot(&record, name)?;
            let client = &self.shared.client;
            let mut running = Vec::new();
            for m in &record.machines {
                if client.get_vm(&m.vm).await?.power_state == "POWERED_ON" {
                    running.push(m.vm.clone());
                }
            }
            for p in &snap.points {
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
        stagecore::name::validate("snapshot", name)?;
        let span = tracing::info_span!("vsphere.delete_snapshot", environment = %self.name(), snapshot = name);
        async {
            let record = self.record()?;
            let snap = self.find_snapshot(&record, name)?;
            for p in &snap.points {
                match self.shared.client.remove_snapshot(&snap_ref(&p.snapshot), false).await {
                    Ok(()) | Err(Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            self.update(|r| {
                r.snapshots.retain(|s| s.info.name != name);
                Ok(())
            })
            .await
        }
        .instrument(span)
        .await
    }
}
