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
    Error, GuestChannel, MachineInstance, MachineStatus, PowerState, Result, Role,
};
use time::OffsetDateTime;
use tracing::Instrument;

use crate::backend::Shared;
use crate::inspect::{Fencing, environment_spec, machine_spec};
use crate::registry::{BaselineRecord, EnvRecord};
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
    pub(crate) fn new(name: &str, shared: Arc<Shared>) -> Self {
        VsphereEnvironment { name: name.to_string(), shared }
    }

    pub(crate) fn record(&self) -> Result<EnvRecord> {
        self.shared.registry.load(&self.name)
    }

    /// Loads, changes and saves the record under the registry lock.
    pub(crate) async fn update<T>(&self, f: impl FnOnce(&mut EnvRecord) -> Result<T>) -> Result<T> {
        let _guard = self.shared.lock.lock().await;
        let mut record = self.record()?;
        let out = f(&mut record)?;
        self.shared.registry.save(&record)?;
        Ok(out)
    }

    async fn infos(&self, record: &EnvRecord) -> Result<Vec<VmInfo>> {
        let mut out = Vec::new();
        for m in &record.machines {
            out.push(self.shared.client.get_vm(&m.vm).await?);
        }
        Ok(out)
    }

    fn spec_of(&self, record: &EnvRecord, infos: &[VmInfo]) -> EnvironmentSpec {
        let stage = match &record.role {
            Role::Stage(s) if s.fenced => Some(s),
            _ => None,
        };
        let isolated = self.shared.opts.isolated_network.as_deref();
        let fencing = match (stage, isolated) {
            (Some(s), Some(isolated)) => Some(Fencing { isolated, baseline: &s.baseline.spec }),
            _ => None,
        };
        let machines =
            record.machines.iter().zip(infos).map(|(m, info)| machine_spec(&m.name, info, fencing.as_ref())).collect();
        environment_spec(&self.name, machines)
    }

    async fn reconfigure(&self, machine: &str, change: Reconfig) -> Result<()> {
        let record = self.record()?;
        let vm = record.machine(machine)?.vm.clone();
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
        for m in &self.record()?.machines {
            self.shared.client.power_on(&m.vm).await?;
        }
        Ok(())
    }

    async fn stop(&self) -> Result<()> {
        for m in &self.record()?.machines {
            self.shared.client.power_off(&m.vm).await?;
        }
        Ok(())
    }

    async fn take_baseline(&self) -> Result<Baseline> {
        let span = tracing::info_span!("vsphere.take_baseline", environment = %self.name);
        async {
            let record = self.record()?;
            if record.role != Role::Production {
                return Err(Error::Precondition(format!(
                    "{} is a stage; baselines are taken of production",
                    self.name
                )));
            }
            let spec = self.spec().await?;
            let id = format!("bl-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            let name = format!("stagecore-baseline-{id}");
            let description = format!("stagecore baseline {id} of environment {}", self.name);
            let points = crate::stage::snapshot_all(&self.shared.client, &record.machines, &name, &description).await?;
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
                id,
                environment: self.name.clone(),
                taken_at: OffsetDateTime::now_utc(),
                spec,
                layers,
                consistency: Default::default(),
            };
            let rec = BaselineRecord { baseline: baseline.clone(), points };
            self.update(|r| {
                r.baselines.push(rec);
                Ok(())
            })
            .await?;
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
        self.update(|r| match &mut r.role {
            Role::Stage(s) => {
                s.change_sets.push(change_set.clone());
                Ok(())
            }
            Role::Production => Err(Error::Precondition(format!("{} is not a stage", r.name))),
        })
        .await
    }

    fn disk_io(&self) -> Option<&dyn DiskIo> {
        None
    }

    fn guest(&self) -> Option<&dyn GuestChannel> {
        self.shared.opts.guest_credentials.as_ref().map(|_| self as &dyn GuestChannel)
    }
}
