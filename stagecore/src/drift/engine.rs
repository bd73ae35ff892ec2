//! [`DriftEngine`]: gathers specs and disk changes from both environments and builds the report.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use time::OffsetDateTime;

use super::report::{DriftReport, Layer, MachineDrift, SCHEMA, Status};
use super::{Drift, config, disk, guest, score};
use crate::inventory::{self, InventoryConfig};
use crate::{ConsistencyLevel, Environment, EnvironmentInfo, Error, Progress, Result, StageInfo};

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

/// The machines whose disk bytes are judged by their guest layer rather than counted as drift:
/// running at the baseline — production's inventory at the baseline, which is only collected
/// from running machines, is recorded on the stage (see [`inventory::stage`]) and the baseline
/// does not record the machine as `Stopped` — and a guest layer checked on both
/// sides now (`guest` is each machine's guest status; anything but NOT_CHECKED means both sides
/// were inventoried, so both run). A running OS writes its disks all the time — journal commits,
/// the superblock ext4 rewrites when thawed after the baseline, logs — so a fresh clone of a
/// running production has changed bytes on both sides; the guest layer says whether anything
/// moved inside the guest. The drift engine reports those machines' disk records as
/// INFORMATIONAL; promotion's precondition does not refuse on their production bytes. One
/// function for both, so they never disagree.
pub fn guest_judged<'a>(staged: &StageInfo, guest: impl IntoIterator<Item = (&'a str, Status)>) -> BTreeSet<String> {
    let checked: Vec<&str> = guest.into_iter().filter(|(_, s)| *s != Status::NotChecked).map(|(m, _)| m).collect();
    if checked.is_empty() {
        return BTreeSet::new();
    }
    let Some(at_baseline) = inventory::baseline_inventory(staged) else { return BTreeSet::new() };
    checked
        .into_iter()
        .filter(|m| at_baseline.machines.get(*m).is_some_and(|i| i.inventory().is_some()))
        .filter(|m| staged.baseline.consistency.get(*m).is_none_or(|c| c.level != ConsistencyLevel::Stopped))
        .map(String::from)
        .collect()
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

        let (p_disks, s_disks) = (production.disk_changes(baseline).await, stage.disk_changes(baseline).await);
        // A side that refuses with `Precondition` (a baseline layer no longer matches its seal:
        // the baseline is not what the stage was cloned from) fails the report: nothing can be
        // measured against it. Any other failure is that side's disks NOT_CHECKED.
        for r in [&p_disks, &s_disks] {
            if let Err(Error::Precondition(why)) = r {
                return Err(Error::Precondition(why.clone()));
            }
        }
        let side = |r: Result<Vec<crate::DiskChanges>>| r.map_err(|e| e.to_string());
        let (p_disks, s_disks) = (side(p_disks), side(s_disks));
        let mut disk_records = disk::records(baseline, p_disks, s_disks, &staged.change_sets);
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
        // Machines with changed bytes whose guest layer judges them (the baseline inventory is
        // only decoded when there are such bytes).
        let moved: BTreeSet<&str> =
            disk_records.iter().filter(|r| r.drifted_bytes > 0).map(|r| r.machine.as_str()).collect();
        let judged = if moved.is_empty() {
            BTreeSet::new()
        } else {
            guest_judged(
                staged,
                machines.values().filter(|m| moved.contains(m.machine.as_str())).map(|m| (m.machine.as_str(), m.guest)),
            )
        };
        for r in disk_records.iter_mut() {
            if r.status == Status::Drifted && judged.contains(&r.machine) {
                r.status = Status::Informational;
            }
        }
        let mut disk_unchecked = Vec::new();
        let mut term = score::DiskTerm::default();
        for r in &disk_records {
            let Some(m) = machines.get_mut(&r.machine) else { continue };
            match r.status {
                Status::NotChecked => {
                    disk_unchecked.push(format!("{}/{}: {}", r.machine, r.disk, r.reason.clone().unwrap_or_default()));
                    term.unchecked_disks += 1;
                    term.unchecked_bytes += r.virtual_size;
                    if m.status == Status::InSync {
                        m.status = Status::NotChecked;
                    }
                }
                // Reported, judged by the guest layer: in no term of the score.
                Status::Informational => {}
                Status::InSync | Status::Drifted => {
                    m.disk_drift_bytes += r.drifted_bytes;
                    term.drifted_bytes += r.drifted_bytes;
                    term.checked_bytes += r.virtual_size;
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
        } else if disk_records.iter().any(|r| r.status == Status::Informational) {
            Status::Informational
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
        Ok(DriftReport {
            schema: SCHEMA.into(),
            production: production.name().into(),
            stage: stage.name().into(),
            baseline: baseline.id.clone(),
            generated_at: OffsetDateTime::now_utc(),
            status,
            score: score::score_report((config_drift, compared), term, guest_layer.score),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemoryBackend, sample_spec};
    use crate::{Backend, BackendExt, Change, StageOptions};

    /// What a running guest writes after the baseline (the thaw, a journal commit) is reported
    /// but judged by the guest layer: INFORMATIONAL, the report IN_SYNC, clean, 100 %.
    #[tokio::test]
    async fn running_guests_disk_bytes_are_informational_with_a_baseline_inventory() {
        let (backend, prod, stage) = crate::drift::test_support::running_pair(true).await;
        let spec = prod.spec().await.unwrap();
        let (m, d) = (spec.machines[0].name.clone(), spec.machines[0].disks[0].name.clone());
        prod.disk_io().unwrap().write(&m, &d, 1 << 20, &[9; 4096]).await.unwrap();
        stage.disk_io().unwrap().write(&m, &d, 3 << 20, &[8; 4096]).await.unwrap();
        let r = backend.drift(&*prod, &*stage).await.unwrap();
        let rec = r.disk.records.iter().find(|x| x.machine == m && x.disk == d).unwrap();
        assert_eq!(rec.status, Status::Informational, "{r}");
        assert!(rec.production.bytes >= 4096 && rec.stage.bytes >= 4096 && rec.drifted_bytes > 0, "{rec:?}");
        assert_eq!((r.status, r.disk.status, r.guest.status), (Status::InSync, Status::Informational, Status::InSync));
        assert!(r.is_clean(), "{r}");
        assert_eq!(r.score, 100.0, "{r}");
        let md = r.machines.iter().find(|x| x.machine == m).unwrap();
        assert_eq!((md.status, md.disk_drift_bytes), (Status::InSync, 0), "{r}");
        assert!(r.to_string().contains("INFORMATIONAL"), "{r}");
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["disk"]["status"], "INFORMATIONAL");

        // Once the guest layer cannot judge it (the stage stopped), the bytes are drift again.
        stage.stop().await.unwrap();
        let r = backend.drift(&*prod, &*stage).await.unwrap();
        let rec = r.disk.records.iter().find(|x| x.machine == m && x.disk == d).unwrap();
        assert_eq!((rec.status, r.status), (Status::Drifted, Status::Drifted), "{r}");
        assert!(!r.is_clean() && r.score < 100.0, "{r}");
    }

    /// Without production's inventory at the baseline the guest layer cannot say which side
    /// moved, so the same bytes are DRIFTED.
    #[tokio::test]
    async fn without_a_baseline_inventory_running_guests_disk_bytes_are_drift() {
        let (backend, prod, stage) = crate::drift::test_support::running_pair(false).await;
        let spec = prod.spec().await.unwrap();
        let (m, d) = (spec.machines[1].name.clone(), spec.machines[1].disks[0].name.clone());
        prod.disk_io().unwrap().write(&m, &d, 0, &[1; 512]).await.unwrap();
        let r = backend.drift(&*prod, &*stage).await.unwrap();
        let rec = r.disk.records.iter().find(|x| x.machine == m && x.disk == d).unwrap();
        assert_eq!((rec.status, r.status, r.disk.status), (Status::Drifted, Status::Drifted, Status::Drifted), "{r}");
        assert!(!r.is_clean());
    }

    /// One disk that cannot be checked is NOT_CHECKED alone; the report is never clean and its
    /// score is below 100 (the case: an unreadable disk plus a real change on it).
    #[tokio::test]
    async fn one_unreadable_disk_is_not_checked_alone_never_clean_and_scored() {
        let backend = MemoryBackend::new();
        let prod = backend.create(&sample_spec("prod")).await.unwrap();
        let baseline = prod.take_baseline().await.unwrap();
        let stage = backend.stage(&baseline, &StageOptions::linked("try")).await.unwrap();
        let spec = stage.spec().await.unwrap();
        let (m, d) = (spec.machines[0].name.clone(), spec.machines[0].disks[0].name.clone());
        stage.disk_io().unwrap().write(&m, &d, 0, &[5; 4096]).await.unwrap();
        let clean = backend.drift(&*prod, &*stage).await.unwrap();
        // The stage's disk gets an image whose chain no longer holds the baseline layer.
        stage
            .apply(&Change::ReplaceDiskImage { machine: m.clone(), disk: d.clone(), image: "layer:0".into() })
            .await
            .unwrap();
        let r = backend.drift(&*prod, &*stage).await.unwrap();
        let unchecked: Vec<_> = r.not_checked_disks().map(|x| (x.machine.as_str(), x.disk.as_str())).collect();
        assert_eq!(unchecked, vec![(m.as_str(), d.as_str())], "{r}");
        assert!(r.not_checked_disks().all(|x| x.reason.is_some()), "{r}");
        assert!(r.disk.records.iter().filter(|x| x.machine != m).all(|x| x.status == Status::InSync), "{r}");
        assert_eq!((r.status, r.disk.status), (Status::NotChecked, Status::NotChecked), "{r}");
        assert!(r.disk.reason.as_deref().unwrap().contains(&format!("{m}/{d}")), "{r}");
        assert!(!r.is_clean(), "a NOT_CHECKED disk must not read clean:\n{r}");
        assert!(r.score <= score::NOT_CHECKED_CAP, "{r}");
        assert!(r.score <= clean.score, "not checking must not score better than the drift it hides:\n{r}");
        let md = r.machines.iter().find(|x| x.machine == m).unwrap();
        assert_eq!(md.status, Status::NotChecked);
    }

    /// A side whose `disk_changes` fails with anything but `Precondition` (here an injected
    /// backend fault) makes that side's disks NOT_CHECKED; the report itself does not fail. (A
    /// `Precondition` — a sealed baseline layer that changed — fails the report: proven against
    /// real layers in the QEMU and libvirt backends' `tests/seals.rs`.)
    #[tokio::test]
    async fn a_failing_side_is_not_checked_but_the_report_is_made() {
        let backend = MemoryBackend::new();
        let prod = backend.create(&sample_spec("prod")).await.unwrap();
        let baseline = prod.take_baseline().await.unwrap();
        let stage = backend.stage(&baseline, &StageOptions::linked("try")).await.unwrap();
        backend.faults().fail_nth("disk_changes", 1);
        let r = backend.drift(&*prod, &*stage).await.expect("a backend failure does not fail the report");
        assert!(r.not_checked_disks().count() > 0 && !r.is_clean(), "{r}");
    }
}
