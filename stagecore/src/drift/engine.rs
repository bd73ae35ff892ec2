//! [`DriftEngine`]: gathers specs and disk changes from both environments and builds the report.

use std::collections::BTreeMap;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::report::{DriftReport, Layer, MachineDrift, SCHEMA, Status};
use super::{Drift, config, disk, guest, score};
use crate::inventory::InventoryConfig;
use crate::{Environment, EnvironmentInfo, Error, Progress, Result};

/// The drift engine. Holds only settings; one instance serves any number of reports.
#[derive(Debug, Clone, Default)]
pub struct DriftEngine {
    inventory: InventoryConfig,
    progress: Option<Progress>,
}

impl DriftEngine {
    /// A new engine with the default [`InventoryConfig`] for the guest layer.
    pub fn new() -> Self {
        DriftEngine::default()
    }

    /// Uses `config` to collect guest inventories (spec labels still override watched paths).
    pub fn with_inventory(mut self, config: InventoryConfig) -> Self {
        self.inventory = config;
        self
    }

    /// Reports inventory progress (one event per machine and side) to `progress`.
    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.progress = Some(progress);
        self
    }

    /// The inventory settings.
    pub fn inventory(&self) -> &InventoryConfig {
        &self.inventory
    }
}

/// `stage`'s info, checked to be a stage cloned from `production` (`Precondition` otherwise).
pub(crate) async fn stage_info_of(production: &dyn Environment, stage: &dyn Environment) -> Result<EnvironmentInfo> {
    let info = stage.info().await?;
    let staged = info.stage().ok_or_else(|| Error::Precondition(format!("{} is not a stage", stage.name())))?;
    if staged.source != production.name() {
        return Err(Error::Precondition(format!(
            "stage {} was cloned from {}, not from {}",
            stage.name(),
            staged.source,
            production.name()
        )));
    }
    Ok(info)
}

#[async_trait]
impl Drift for DriftEngine {
    #[tracing::instrument(skip_all, fields(production = production.name(), stage = stage.name()))]
    async fn drift(&self, production: &dyn Environment, stage: &dyn Environment) -> Result<DriftReport> {
        let info = stage_info_of(production, stage).await?;
        let staged = info.stage().expect("checked by stage_info_of");
        let baseline = &staged.baseline;
        let (p_spec, s_spec) = (production.spec().await?, stage.spec().await?);
        let intended_paths: Vec<String> =
            staged.change_sets.iter().flat_map(|cs| &cs.changes).flat_map(|c| c.config_paths()).collect();
        let intended = |path: &str| {
            intended_paths
                .iter()
                .any(|p| path == p || path.starts_with(&format!("{p}/")) || p.starts_with(&format!("{path}/")))
        };
        let (config_records, compared) = config::records(&baseline.spec, &p_spec, &s_spec, intended);

        let side = |r: Result<Vec<crate::DiskChanges>>| r.map_err(|e| e.to_string());
        let p_disks = side(production.disk_changes(baseline).await);
        let s_disks = side(stage.disk_changes(baseline).await);
        let disk_records = disk::records(baseline, p_disks, s_disks, &staged.change_sets);
        let guest_layer =
            guest::layer(production, stage, staged, (&p_spec, &s_spec), &self.inventory, self.progress.as_ref()).await;

        let mut machines: BTreeMap<String, MachineDrift> = BTreeMap::new();
        for name in p_spec.machines.iter().chain(&s_spec.machines).map(|m| &m.name) {
            machines.entry(name.clone()).or_insert_with(|| MachineDrift {
                machine: name.clone(),
                status: Status::InSync,
                config_drift: 0,
                disk_drift_bytes: 0,
                guest: Status::NotChecked,
                guest_drift: 0,
                guest_reason: None,
            });
        }
        for (name, (status, drift, reason)) in &guest_layer.machines {
            if let Some(m) = machines.get_mut(name) {
                (m.guest, m.guest_drift, m.guest_reason) = (*status, *drift, reason.clone());
            }
        }
        for r in config_records.iter().filter(|r| !r.intended) {
            if let Some(m) = r.machine.as_ref().and_then(|m| machines.get_mut(m)) {
                m.config_drift += 1;
            }
        }
        let mut disk_unchecked = Vec::new();
        let (mut drift_bytes, mut checked_bytes) = (0u64, 0u64);
        for r in &disk_records {
            let Some(m) = machines.get_mut(&r.machine) else { continue };
            match r.status {
                Status::NotChecked => {
                    disk_unchecked.push(format!("{}/{}: {}", r.machine, r.disk, r.reason.clone().unwrap_or_default()));
                    if m.status == Status::InSync {
                        m.status = Status::NotChecked;
                    }
                }
                _ => {
                    m.disk_drift_bytes += r.drifted_bytes;
                    drift_bytes += r.drifted_bytes;
                    checked_bytes += r.virtual_size;
                }
            }
        }
        for m in machines.values_mut() {
            if m.config_drift > 0 || m.disk_drift_bytes > 0 || m.guest_drift > 0 {
                m.status = Status::Drifted;
            }
        }

        let config_drift = config_records.iter().filter(|r| !r.intended).count();
        let config_status = if config_drift > 0 { Status::Drifted } else { Status::InSync };
        let disk_status = if disk_records.iter().any(|r| r.status == Status::Drifted) {
            Status::Drifted
        } else if !disk_unchecked.is_empty() {
            Status::NotChecked
        } else {
            Status::InSync
        };
        let guest_status = guest_layer.status.unwrap_or(Status::NotChecked);
        let status =
            if config_status == Status::Drifted || disk_status == Status::Drifted || guest_status == Status::Drifted {
                Status::Drifted
            } else if disk_status == Status::NotChecked {
                Status::NotChecked
            } else {
                Status::InSync
            };
        let disk_score = (checked_bytes > 0).then_some((drift_bytes, checked_bytes));
        Ok(DriftReport {
            schema: SCHEMA.into(),
            production: production.name().into(),
            stage: stage.name().into(),
            baseline: baseline.id.clone(),
            generated_at: OffsetDateTime::now_utc(),
            status,
            score: score::score_layers(config_drift, compared, disk_score, guest_layer.score),
            machines: machines.into_values().collect(),
            config: Layer { status: config_status, reason: None, records: config_records },
            disk: Layer {
                status: disk_status,
                reason: (!disk_unchecked.is_empty()).then(|| disk_unchecked.join("; ")),
                records: disk_records,
            },
            guest: Layer { status: guest_status, reason: guest_layer.reason, records: guest_layer.records },
        })
    }
}
