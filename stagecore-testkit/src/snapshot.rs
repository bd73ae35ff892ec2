//! Invariant 3: snapshot → change → revert gives back the same disks and spec.

use stagecore::{Change, EnvironmentExt, Error, StageOptions};

use crate::{Kit, cleanup, unique};

/// Snapshot a stage, change its disks and config, revert: disks and spec are back. Later snapshots
/// can be listed and deleted. Requires `disk_io` and `changes.set_memory`.
pub async fn snapshot_revert_restores(kit: &Kit) {
    kit.require("disk_io", kit.caps().disk_io);
    kit.require_change("set_memory");
    let (pname, sname) = (unique("kit-prod"), unique("kit-snap"));
    let prod = kit.production(&pname).await.expect("production");
    let baseline = prod.take_baseline().await.expect("baseline");
    let stage = kit.backend.stage(&baseline, &StageOptions::linked(&sname)).await.expect("stage");
    let io = stage.disk_io().expect("disk_io");
    let spec = stage.spec().await.unwrap();
    let (m, d) = (spec.machines[0].name.clone(), spec.machines[0].disks[0].name.clone());
    io.write(&m, &d, 8192, b"before the snapshot").await.unwrap();
    let before = stage.fingerprint().await.unwrap();
    let info = stage.create_snapshot("before-change").await.expect("snapshot");
    assert_eq!(info.name, "before-change");
    io.write(&m, &d, 0, b"CHANGED").await.unwrap();
    io.write(&m, &d, 3 << 20, &[0xab; 70_000]).await.unwrap();
    stage.apply(&Change::SetMemory { machine: m.clone(), memory_mib: spec.machines[0].memory_mib * 2 }).await.unwrap();
    assert_ne!(stage.fingerprint().await.unwrap(), before, "the change did not change anything");
    stage.create_snapshot("after-change").await.expect("second snapshot");
    stage.revert_snapshot("before-change").await.expect("revert");
    assert_eq!(stage.fingerprint().await.unwrap(), before, "revert did not restore disks and spec");
    let names: Vec<String> = stage.list_snapshots().await.unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["before-change", "after-change"]);
    stage.delete_snapshot("after-change").await.expect("delete");
    stage.delete_snapshot("before-change").await.expect("delete");
    assert!(stage.list_snapshots().await.unwrap().is_empty());
    assert_eq!(stage.fingerprint().await.unwrap(), before, "deleting snapshots changed the current state");
    let err = stage.revert_snapshot("before-change").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "revert to a deleted snapshot: {err}");
    cleanup(&*kit.backend, &[&sname, &pname]).await;
}
