//! Invariant 1 (staging never changes production) and invariant 2 (a fresh clone has zero drift).

use stagecore::drift::Status;
use stagecore::{BackendExt, EnvironmentExt, StageOptions};

use crate::{Kit, cleanup, unique};

/// A fresh clone reports IN_SYNC, 100 % and no records (invariant 2), linked and full.
pub async fn zero_drift_after_clone(kit: &Kit) {
    let pname = unique("kit-prod");
    let prod = kit.production(&pname).await.expect("production");
    let baseline = prod.take_baseline().await.expect("baseline");
    let mut stages = Vec::new();
    let mut kinds = vec![StageOptions::linked(unique("kit-zero"))];
    if kit.caps().full_clone {
        kinds.push(StageOptions::full(unique("kit-zero")));
    }
    for opts in kinds {
        let stage = kit.backend.stage(&baseline, &opts).await.expect("stage");
        let report = kit.backend.drift(&*prod, &*stage).await.expect("drift");
        assert!(report.config.records.is_empty(), "false config drift after a {:?} clone:\n{report}", opts.clone);
        if kit.caps().disk_drift {
            assert_eq!(report.status, Status::InSync, "{report}");
            assert_eq!(report.score, 100.0, "{report}");
            assert!(report.disk.records.iter().all(|r| r.side.is_none()), "false disk drift:\n{report}");
        } else {
            assert_ne!(report.status, Status::Drifted, "{report}");
        }
        stages.push(opts.name);
    }
    let mut names: Vec<&str> = stages.iter().map(String::as_str).collect();
    names.push(&pname);
    cleanup(&*kit.backend, &names).await;
}

/// Cloning, writing to the stage, snapshotting, reverting, drift and destroying the stage leave
/// production's spec and guest-visible disk content identical (invariant 1). Requires `disk_io`.
pub async fn production_untouched(kit: &Kit) {
    kit.require("disk_io", kit.caps().disk_io);
    let (pname, sname) = (unique("kit-prod"), unique("kit-untouched"));
    let prod = kit.production(&pname).await.expect("production");
    let baseline = prod.take_baseline().await.expect("baseline");
    let before = prod.fingerprint().await.expect("fingerprint");
    let stage = kit.backend.stage(&baseline, &StageOptions::linked(&sname)).await.expect("stage");
    let io = stage.disk_io().expect("stage disk_io");
    let spec = stage.spec().await.unwrap();
    for m in &spec.machines {
        for d in &m.disks {
            io.write(&m.name, &d.name, 0, b"stage writes here").await.expect("stage write");
        }
    }
    assert_eq!(prod.fingerprint().await.unwrap(), before, "writing to the stage changed production");
    stage.create_snapshot("s1").await.expect("snapshot");
    io.write(&spec.machines[0].name, &spec.machines[0].disks[0].name, 4096, b"more").await.unwrap();
    stage.revert_snapshot("s1").await.expect("revert");
    kit.backend.drift(&*prod, &*stage).await.expect("drift");
    assert_eq!(prod.fingerprint().await.unwrap(), before, "snapshot/revert/drift on the stage changed production");
    kit.backend.destroy(&sname).await.expect("destroy stage");
    assert_eq!(prod.fingerprint().await.unwrap(), before, "destroying the stage changed production");
    cleanup(&*kit.backend, &[&pname]).await;
}
