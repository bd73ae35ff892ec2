//! Collapsing layers against real QEMU (TCG), with machines stopped (in-process merge) and
//! running (QMP `block-stream`): deleting a snapshot merges its layer away, `collapse_layers`
//! merges unused baseline and snapshot layers, guest-visible content never changes (digests),
//! every chain passes `qemu-img check`, and layers a stage stands on are kept.

mod support;

use stagecore::{Backend, ChangeMap, DynEnvironment, Error, StageOptions};
use stagecore_qemu::QemuEnvironment;
use stagecore_testkit::{Kit, unique};
use support::{Fixture, qemu_img_check};

const MACHINES: [&str; 3] = ["web", "app", "db"];

async fn chain_len(env: &QemuEnvironment, machine: &str) -> usize {
    stagecore_qcow2::chain(&env.disk_top(machine, "disk0").await.unwrap()).unwrap().len()
}

async fn digests(env: &DynEnvironment) -> Vec<[u8; 32]> {
    let io = env.disk_io().unwrap();
    let mut out = Vec::new();
    for m in MACHINES {
        out.push(io.digest(m, "disk0").await.unwrap());
    }
    out
}

async fn check_all(env: &QemuEnvironment) {
    for m in MACHINES {
        qemu_img_check(&env.disk_top(m, "disk0").await.unwrap());
    }
}

async fn write(env: &DynEnvironment, offset: u64, data: &[u8]) {
    let io = env.disk_io().unwrap();
    for m in MACHINES {
        io.write(m, "disk0", offset, data).await.unwrap();
    }
}

async fn collapse_keeps_content(running: bool) {
    let f = Fixture::new();
    let kit = Kit::new(f.backend.clone());
    let (pname, sname) = (unique("collapse-p"), unique("collapse-s"));
    let prod = kit.production(&pname).await.unwrap();
    if running {
        prod.start().await.unwrap();
    }
    let q = f.backend.open_qemu(&pname).await.unwrap();
    let b1 = prod.take_baseline().await.unwrap();
    write(&prod, 64 << 10, b"after b1").await;
    prod.create_snapshot("s1").await.unwrap();
    write(&prod, 3 << 20, b"after s1").await;
    let b2 = prod.take_baseline().await.unwrap();
    let stage = f.backend.stage(&b2, &StageOptions::linked(&sname)).await.unwrap();
    write(&prod, 5 << 20, b"after b2").await;
    prod.create_snapshot("s2").await.unwrap();
    write(&prod, 64 << 10, b"after s2, over b1's write").await;
    let (content, stage_content) = (digests(&prod).await, digests(&stage).await);
    assert_eq!(chain_len(&q, "web").await, 5, "source, b2's layer, s1's, s2's, top");

    prod.delete_snapshot("s2").await.unwrap();
    assert_eq!(chain_len(&q, "web").await, 4, "the deleted snapshot's layer is merged away");
    assert_eq!(digests(&prod).await, content, "deleting a snapshot changes no content");
    check_all(&q).await;

    let report = q.collapse_layers().await.unwrap();
    assert!(report.retired_baselines.is_empty(), "b2 is in use by the stage: {report:?}");
    assert!(report.disks.iter().all(|d| d.layers_after == d.layers_before), "{report:?}");
    assert_eq!(digests(&stage).await, stage_content, "the stage's chain is untouched");
    prod.delete_snapshot("s1").await.unwrap();
    assert_eq!(chain_len(&q, "web").await, 4, "s1's layer lies below b2's, which the stage needs");

    drop(stage);
    f.backend.destroy(&sname).await.unwrap();
    let report = q.collapse_layers().await.unwrap();
    assert_eq!(report.retired_baselines, vec![b2.id.clone()], "{report:?}");
    assert!(report.files_removed >= 6, "{report:?}");
    for d in &report.disks {
        assert_eq!((d.layers_before, d.layers_after), (4, 2), "{d:?}");
    }
    assert_eq!(chain_len(&q, "web").await, 2, "top on the source");
    assert_eq!(digests(&prod).await, content, "collapsing changes no content");
    check_all(&q).await;
    let err = f.backend.stage(&b2, &StageOptions::linked(unique("late"))).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "a retired baseline cannot be staged: {err}");
    let changes = prod.disk_changes(&b1).await.unwrap();
    assert!(changes.iter().all(|c| matches!(c.changes, ChangeMap::Checked { .. })), "b1 still measures: {changes:?}");
    if running {
        let top = q.disk_top("web", "disk0").await.unwrap();
        let source = stagecore_qcow2::chain(&top).unwrap()[1].path.clone();
        let info = q.human_monitor_command("web", "info block -v").await.unwrap();
        let images = info.lines().filter(|l| l.trim_start().starts_with("image:")).count();
        assert_eq!(images, 2, "QEMU itself runs on top + source: {info}");
        assert!(info.contains(source.to_str().unwrap()), "{info}");
        let status = prod.status().await.unwrap();
        assert!(status.iter().all(|m| m.power == stagecore::PowerState::Running), "{status:?}");
    }
    write(&prod, 7 << 20, b"still writable").await;
    assert_eq!(prod.disk_io().unwrap().read("db", "disk0", 7 << 20, 14).await.unwrap(), b"still writable");
    prod.stop().await.unwrap();
    check_all(&q).await;
    drop((prod, q));
    f.backend.destroy(&pname).await.unwrap();
}

#[tokio::test]
async fn collapse_with_machines_stopped_keeps_content_and_needed_layers() {
    collapse_keeps_content(false).await;
}

#[tokio::test]
async fn collapse_with_machines_running_keeps_content_and_needed_layers() {
    collapse_keeps_content(true).await;
}
