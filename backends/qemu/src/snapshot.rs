//! Whole-environment snapshots of QEMU environments.
//!
//! Contract: create freezes every disk at one instant ([`crate::freeze::freeze_all`]) and records
//! the frozen layers plus the spec (crash-consistent, no memory state). Revert stops machines that
//! run, puts a fresh overlay on each snapshot layer as the new top, restores the spec, removes the
//! layers nothing needs any more, and restarts the machines that ran (and still exist). Delete
//! removes the record, then only the layer files no chain needs ([`crate::gc`]), then merges the
//! deleted snapshot's layer away where the current state chains through it ([`crate::collapse`],
//! every baseline kept; best effort, logged) — every chain stays valid.

use std::path::PathBuf;

use async_trait::async_trait;
use stagecore::{Consistency, Result, Snapshot, SnapshotInfo};
use stagecore_qcow2::ImageFormat;
use time::OffsetDateTime;
use tracing::Instrument;

use crate::env::stop_all;
use crate::error::qcow2;
use crate::shared::{EnvShared, EnvState, QemuEnvironment, blocking};
use crate::store::{QemuRecord, SnapshotRecord};

async fn revert(shared: &EnvShared, st: &mut EnvState, name: &str) -> Result<()> {
    let rec = st.rec(&shared.name)?;
    let snap = rec.snapshot(name)?.clone();
    let running = stop_all(shared, st).await?;
    let rec = st.rec_mut(&shared.name)?;
    let disks_dir = shared.paths.disks();
    let mut jobs: Vec<(String, PathBuf, PathBuf)> = Vec::new();
    for (key, layer) in &snap.layers {
        let (m, d) = key.split_once('/').expect("keys are machine/disk");
        let (new, _) = rec.new_layer_path(&disks_dir, m, d);
        jobs.push((key.clone(), layer.clone(), new));
    }
    let work = jobs.clone();
    blocking(move || {
        for (i, (_, layer, new)) in work.iter().enumerate() {
            if let Err(e) = stagecore_qcow2::create_overlay(new, layer, ImageFormat::Qcow2, None) {
                for (_, _, made) in &work[..i] {
                    let _ = std::fs::remove_file(made);
                }
                return Err(qcow2(e));
            }
        }
        Ok(())
    })
    .await?;
    rec.disks = jobs.into_iter().map(|(k, _, new)| (k, new)).collect();
    rec.spec = snap.info.spec.clone();
    rec.save(&shared.paths)?;
    crate::gc::collect(shared, rec).await?;
    let again: Vec<String> = running.into_iter().filter(|m| rec.spec.machine(m).is_some()).collect();
    crate::env::start_some(shared, st, Some(&again)).await
}

#[async_trait]
impl Snapshot for QemuEnvironment {
    async fn create_snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        let shared = &self.shared;
        let mut st = shared.state.lock().await;
        st.rec(&shared.name)?.require_new_snapshot(name)?;
        let crate::freeze::Frozen { layers, consistency } =
            crate::freeze::freeze_all(shared, &mut st).instrument(self.span("create_snapshot")).await?;
        let rec = st.rec_mut(&shared.name)?;
        let info = SnapshotInfo {
            name: name.into(),
            environment: shared.name.clone(),
            created_at: OffsetDateTime::now_utc(),
            spec: rec.spec.clone(),
            consistency: Consistency::CrashConsistent,
            memory: false,
            machines: consistency,
        };
        rec.snapshots.push(SnapshotRecord { info: info.clone(), layers });
        rec.save(&shared.paths)?;
        Ok(info)
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let st = self.shared.state.lock().await;
        Ok(st.rec(&self.shared.name)?.snapshot_infos())
    }

    async fn revert_snapshot(&self, name: &str) -> Result<()> {
        let mut st = self.shared.state.lock().await;
        revert(&self.shared, &mut st, name).instrument(self.span("revert_snapshot")).await
    }

    async fn delete_snapshot(&self, name: &str) -> Result<()> {
        let shared = &self.shared;
        let mut st = shared.state.lock().await;
        let rec = st.rec_mut(&shared.name)?;
        rec.remove_snapshot(name)?;
        rec.save(&shared.paths)?;
        crate::gc::collect(shared, rec).await?;
        // Merge the deleted snapshot's layer away if the current state chains through it. Best
        // effort: the snapshot is gone either way, and a failed merge leaves every chain valid.
        if let Err(e) = crate::collapse::collapse(shared, &mut st, false).await {
            tracing::warn!(env = %shared.name, snapshot = name, %e, "layers of the deleted snapshot not merged");
        }
        Ok(())
    }
}
