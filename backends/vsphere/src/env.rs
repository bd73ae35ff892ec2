//! [`VsphereEnvironment`]: the [`Environment`] of one attached production or stage.
//!
//! Contract: the registry record says which VMs form the environment; everything else is read
//! live from vCenter (spec, power, identities). Baselines are `CreateSnapshotEx_Task` snapshots
//! (no memory) of every production VM, recorded with the disks' CBT change ids. `apply` supports
//! `SetMemory`/`SetVcpus` (`ReconfigVM_Task`) and, with guest credentials, guest commands and
//! files (`guest.rs`); other changes are `NotSupported`. There is no raw disk access.

use std::sync::Arc;

use async_trait::async_trait;
use stagecore::{
    Baseline, BaselineLayer, Change, ChangeSet, DiskChanges, DiskIo, Environment, EnvironmentInfo, EnvironmentSpec,
    Error, GuestChannel, MachineInstance, MachineStatus, PowerState, Result, toolbox,
};
use time::OffsetDateTime;
use tracing::Instrument;

use crate::core::{Shared, live_spec, vm_infos};
use crate::record::{self, Record, baseline_set};
use crate::vms::snapshot_all;
use crate::{BACKEND, Reconfig, VmInfo};

/// One environment of a [`crate::VsphereBackend`]. Handles are cheap; state lives in vCenter and
/// the registry.
#[derive(Clone)]
pub struct VsphereEnvironment {
    pub(crate) name: String,
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for VsphereEnvironment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsphereEnvironment").field("name", &self.name).finish_non_exhaustive()
    }
}

impl VsphereEnvironment {
    /// The VM ids of the named machines (in the order named); `NotFound` for a name this
    /// environment does not have, before anything is done.
    fn vms_of(&self, machines: &[String]) -> Result<Vec<String>> {
        let record = self.record()?;
        machines
            .iter()
            .map(|name| {
                record
                    .backend
                    .machines
                    .iter()
                    .find(|m| &m.name == name)
                    .map(|m| m.vm.clone())
                    .ok_or_else(|| stagecore::Error::not_found("machine", format!("{}/{name}", self.name)))
            })
            .collect()
    }

    pub(crate) fn new(name: &str, shared: Arc<Shared>) -> Self {
        VsphereEnvironment { name: name.to_string(), shared }
    }

    pub(crate) fn record(&self) -> Result<Record> {
        self.shared.registry.load(&self.name)
    }

    /// Loads, changes and saves the record under the registry lock.
    pub(crate) async fn update<T>(&self, f: impl FnOnce(&mut Record) -> Result<T>) -> Result<T> {
        let _guard = self.shared.lock.lock().await;
        let mut record = self.record()?;
        let out = f(&mut record)?;
        self.shared.registry.save(&record)?;
        Ok(out)
    }

    async fn infos(&self, record: &Record) -> Result<Vec<VmInfo>> {
        vm_infos(&self.shared.client, &record.backend.machines).await
    }

    fn spec_of(&self, record: &Record, infos: &[VmInfo]) -> EnvironmentSpec {
        live_spec(&self.shared, &self.name, &record.role, &record.backend.machines, infos)
    }

    async fn reconfigure(&self, machine: &str, change: Reconfig) -> Result<()> {
        let record = self.record()?;
        let vm = record::machine(&record, machine)?.vm.clone();
        self.shared.client.reconfigure(&vm, &change).await
    }
}

fn power(state: &str) -> (PowerState, Option<String>) {
    match state {
        "POWERED_ON" => (PowerState::Running, None),
        "POWERED_OFF" => (PowerState::Stopped, None),
        "SUSPENDED" => (PowerState::Stopped, Some("suspended".into())),
        other => (PowerState::Unknown, Some(format!("vCenter reports power state {other}"))),
    }
}

#[async_trait]
impl Environment for VsphereEnvironment {
    fn name(&self) -> &str {
        &self.name
    }

    async fn info(&self) -> Result<EnvironmentInfo> {
        let record = self.record()?;
        let infos = self.infos(&record).await?;
        let machines = record
            .backend
            .machines
            .iter()
            .zip(&infos)
            .map(|(m, i)| MachineInstance {
                name: m.name.clone(),
                instance_name: i.name.clone(),
                uuid: i.identity.as_ref().map(|id| id.bios_uuid.clone()).unwrap_or_else(|| m.vm.clone()),
            })
            .collect();
        Ok(EnvironmentInfo { name: self.name.clone(), backend: BACKEND.into(), role: record.role, machines })
    }

    async fn spec(&self) -> Result<EnvironmentSpec> {
        let record = self.record()?;
        let infos = self.infos(&record).await?;
        Ok(self.spec_of(&record, &infos))
    }

    async fn status(&self) -> Result<Vec<MachineStatus>> {
        let record = self.record()?;
        let infos = self.infos(&record).await?;
        Ok(record
            .backend
            .machines
            .iter()
            .zip(&infos)
            .map(|(m, i)| {
                let (power, detail) = power(&i.power_state);
                MachineStatus { machine: m.name.clone(), power, detail }
            })
            .collect())
    }

    async fn start(&self) -> Result<()> {
        for m in &self.record()?.backend.machines {
            self.shared.client.power_on(&m.vm).await?;
        }
        Ok(())
    }

    async fn stop(&self) -> Result<()> {
        for m in &self.record()?.backend.machines {
            self.shared.client.power_off(&m.vm).await?;
        }
        Ok(())
    }

    async fn start_machines(&self, machines: &[String]) -> Result<()> {
        for vm in self.vms_of(machines)? {
            self.shared.client.power_on(&vm).await?;
        }
        Ok(())
    }

    async fn stop_machines(&self, machines: &[String]) -> Result<()> {
        for vm in self.vms_of(machines)? {
            self.shared.client.power_off(&vm).await?;
        }
        Ok(())
    }

    async fn take_baseline(&self) -> Result<Baseline> {
        let span = tracing::info_span!("vsphere.take_baseline", environment = %self.name);
        async {
            let record = self.record()?;
            record.require_production()?;
            let spec = self.spec().await?;
            let id = toolbox::new_baseline_id();
            let name = format!("stagecore-baseline-{id}");
            let description = format!("stagecore baseline {id} of environment {}", self.name);
            let mut undo = toolbox::Undo::new(format!("baseline {id} of {}", self.name));
            let result = async {
                let points =
                    snapshot_all(&self.shared, &record.backend.machines, &name, &description, &mut undo).await?;
                let origin = record::layers(&points);
                let layers = points
                    .iter()
                    .flat_map(|p| {
                        p.disks.iter().map(|d| BaselineLayer {
                            machine: p.machine.clone(),
                            disk: d.disk.clone(),
                            layer: p.snapshot.clone(),
                        })
                    })
                    .collect();
                let baseline = Baseline {
                    id: id.clone(),
                    environment: self.name.clone(),
                    taken_at: OffsetDateTime::now_utc(),
                    spec,
                    layers,
                    consistency: Default::default(),
                };
                self.update(|r| {
                    r.backend.points.insert(baseline_set(&baseline.id), points);
                    r.push_baseline(baseline.clone(), origin);
                    Ok(())
                })
                .await?;
                Ok(baseline)
            }
            .await;
            let baseline = undo.finish(result).await?;
            tracing::info!(baseline = %baseline.id, "baseline taken");
            Ok(baseline)
        }
        .instrument(span)
        .await
    }

    async fn disk_changes(&self, baseline: &Baseline) -> Result<Vec<DiskChanges>> {
        let record = self.record()?;
        crate::drift::disk_changes(&self.shared.client, &record, baseline)
            .instrument(tracing::info_span!("vsphere.disk_changes", environment = %self.name))
            .await
    }

    async fn apply(&self, change: &Change) -> Result<()> {
        let span = tracing::info_span!("vsphere.apply", environment = %self.name, machine = change.machine());
        async {
            match change {
                Change::SetMemory { machine, memory_mib } => {
                    self.reconfigure(machine, Reconfig { memory_mib: Some(*memory_mib), ..Default::default() }).await
                }
                Change::SetVcpus { machine, vcpus } => {
                    self.reconfigure(machine, Reconfig { cpus: Some(*vcpus), ..Default::default() }).await
                }
                Change::GuestCommand { .. } | Change::GuestFile { .. } => match self.guest() {
                    Some(g) => stagecore::guest::apply_guest_change(&self.name, g, change).await,
                    None => Err(Error::not_supported("guest changes without guest credentials", BACKEND)),
                },
                Change::WriteDisk { .. } => Err(Error::not_supported("raw disk writes", BACKEND)),
                _ => Err(Error::not_supported("NIC and disk changes", BACKEND)),
            }
        }
        .instrument(span)
        .await
    }

    async fn record_change_set(&self, change_set: &ChangeSet) -> Result<()> {
        self.update(|r| r.record_change_set(change_set)).await
    }

    fn disk_io(&self) -> Option<&dyn DiskIo> {
        None
    }

    fn guest(&self) -> Option<&dyn GuestChannel> {
        self.shared.opts.guest_credentials.as_ref().map(|_| self as &dyn GuestChannel)
    }
}
