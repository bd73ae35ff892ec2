//! Drift engine behaviour through a real backend: which side moved, conflicts, intended changes.

use stagecore::drift::{RecordKind, Side, Status};
use stagecore::{BackendExt, Change, ChangeSet, DynEnvironment, EnvironmentExt, StageOptions};

use crate::{Kit, cleanup, unique};

async fn pair(kit: &Kit, tag: &str) -> (String, String, DynEnvironment, DynEnvironment) {
    let (pname, sname) = (unique("kit-prod"), unique(tag));
    let prod = kit.production(&pname).await.expect("production");
    let baseline = prod.take_baseline().await.expect("baseline");
    let stage = kit.backend.stage(&baseline, &StageOptions::linked(&sname)).await.expect("stage");
    (pname, sname, prod, stage)
}

/// An unrecorded config edit on the stage shows one NOT_EQUAL record on the stage side. Requires
/// `changes.set_memory` (or `set_vcpus`).
pub async fn stage_config_edit_is_drift(kit: &Kit) {
    kit.require_change("set_memory");
    let (pname, sname, prod, stage) = pair(kit, "kit-cfg").await;
    let app = prod.spec().await.unwrap().machines[1].clone();
    stage.apply(&Change::SetMemory { machine: app.name.clone(), memory_mib: app.memory_mib + 128 }).await.unwrap();
    let r = kit.backend.drift(&*prod, &*stage).await.expect("drift");
    assert_eq!(r.config.records.len(), 1, "{r}");
    let rec = &r.config.records[0];
    assert_eq!(rec.path, format!("/machines/{}/memory_mib", app.name));
    assert_eq!((rec.kind, rec.side, rec.intended), (RecordKind::NotEqual, Side::Stage, false), "{r}");
    assert_eq!(r.status, Status::Drifted);
    assert!(r.score < 100.0);
    let m = r.machines.iter().find(|m| m.machine == app.name).unwrap();
    assert_eq!(m.status, Status::Drifted);
    cleanup(&*kit.backend, &[&sname, &pname]).await;
}

/// A disk write on production after the baseline shows production-side disk drift. Requires
/// `disk_io` and `disk_drift`.
pub async fn production_disk_write_is_drift(kit: &Kit) {
    kit.require("disk_io", kit.caps().disk_io);
    kit.require("disk_drift", kit.caps().disk_drift);
    let (pname, sname, prod, stage) = pair(kit, "kit-pdisk").await;
    let spec = prod.spec().await.unwrap();
    let (m, d) = (&spec.machines[2].name, &spec.machines[2].disks[0].name);
    prod.disk_io().unwrap().write(m, d, 2 << 20, &[7u8; 4096]).await.unwrap();
    let r = kit.backend.drift(&*prod, &*stage).await.expect("drift");
    let rec = r.disk.records.iter().find(|x| &x.machine == m && &x.disk == d).expect("record");
    assert_eq!(rec.side, Some(Side::Production), "{r}");
    assert!(rec.production.bytes >= 4096 && rec.stage.bytes == 0, "{rec:?}");
    assert!(rec.production.extents.iter().any(|e| e.offset <= 2 << 20 && e.end() >= (2 << 20) + 4096), "{rec:?}");
    assert_eq!(r.status, Status::Drifted);
    let others = r.disk.records.iter().filter(|x| &x.machine != m);
    assert!(others.clone().all(|x| x.side.is_none()), "unrelated disks drifted: {r}");
    cleanup(&*kit.backend, &[&sname, &pname]).await;
}

/// The same field changed differently on both sides is a conflict (side Both).
pub async fn both_sides_is_conflict(kit: &Kit) {
    kit.require_change("set_vcpus");
    let (pname, sname, prod, stage) = pair(kit, "kit-both").await;
    let web = prod.spec().await.unwrap().machines[0].clone();
    prod.apply(&Change::SetVcpus { machine: web.name.clone(), vcpus: web.vcpus + 1 }).await.unwrap();
    stage.apply(&Change::SetVcpus { machine: web.name.clone(), vcpus: web.vcpus + 2 }).await.unwrap();
    let r = kit.backend.drift(&*prod, &*stage).await.expect("drift");
    let rec = r.config.records.iter().find(|x| x.path.ends_with("/vcpus")).expect("vcpus record");
    assert_eq!((rec.side, rec.intended), (Side::Both, false), "{r}");
    assert_eq!(rec.expected, serde_json::json!(web.vcpus + 1));
    assert_eq!(rec.actual, serde_json::json!(web.vcpus + 2));
    cleanup(&*kit.backend, &[&sname, &pname]).await;
}

/// Changes recorded in a ChangeSet are intended: the stage stays IN_SYNC at 100 %; an extra
/// unrecorded change is drift. Requires `changes.set_memory` (or `set_vcpus`) and `disk_io`.
pub async fn change_set_is_intended(kit: &Kit) {
    kit.require_change("set_memory");
    kit.require("disk_io", kit.caps().disk_io);
    let (pname, sname, prod, stage) = pair(kit, "kit-intent").await;
    let spec = prod.spec().await.unwrap();
    let (app, web) = (&spec.machines[1], &spec.machines[0]);
    let cs = ChangeSet {
        id: "cs-more-memory".into(),
        description: "app needs more memory; web gets a patched block".into(),
        changes: vec![
            Change::SetMemory { machine: app.name.clone(), memory_mib: app.memory_mib * 2 },
            Change::WriteDisk {
                machine: web.name.clone(),
                disk: web.disks[0].name.clone(),
                offset: 1 << 16,
                data: vec![1; 512],
            },
        ],
    };
    stage.apply_change_set(&cs).await.expect("apply change set");
    let r = kit.backend.drift(&*prod, &*stage).await.expect("drift");
    assert!(r.config.records.iter().all(|x| x.intended), "{r}");
    assert_eq!(r.config.records.len(), 1, "{r}");
    if kit.caps().disk_drift {
        let rec = r.disk.records.iter().find(|x| x.machine == web.name).unwrap();
        assert!(rec.intended && rec.drifted_bytes == 0, "{rec:?}");
        assert_eq!(r.status, Status::InSync, "{r}");
        assert_eq!(r.score, 100.0);
    }
    stage.apply(&Change::SetVcpus { machine: app.name.clone(), vcpus: app.vcpus + 3 }).await.unwrap();
    let r2 = kit.backend.drift(&*prod, &*stage).await.expect("drift");
    assert_eq!(r2.config_drift().count(), 1, "{r2}");
    assert_eq!(r2.status, Status::Drifted);
    assert!(r2.score < r.score, "more drift must lower the score");
    let json: serde_json::Value = serde_json::from_str(&r2.to_json()).unwrap();
    assert_eq!(json["schema"], "stagecore.drift/v3");
    assert_eq!(json["status"], "DRIFTED");
    cleanup(&*kit.backend, &[&sname, &pname]).await;
}
