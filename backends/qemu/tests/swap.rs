//! Swap promotion against real QEMU (TCG): after `Backend::swap` production runs the stage's
//! disks under its own identity (instance names, UUIDs, MACs, unfenced segments), the stage holds
//! old production stopped and fenced, a second swap restores both exactly, and the stage can be
//! destroyed after a swap without touching production's chains.

mod support;

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;

use stagecore::{Backend, ChangeMap, EnvironmentExt, PowerState, StageOptions};
use stagecore_qemu::QemuEnvironment;
use stagecore_testkit::{Kit, unique};
use support::{Fixture, qemu_img_check};

fn values(argv: &[OsString], flag: &str) -> Vec<String> {
    argv.windows(2).filter(|w| w[0] == flag).map(|w| w[1].to_string_lossy().into_owned()).collect()
}

/// `-name`, `-uuid`, the NIC devices (MACs) and netdevs (segments): the identity part of argv.
async fn identity(env: &QemuEnvironment, machine: &str) -> Vec<String> {
    let argv = env.machine_argv(machine).await.unwrap();
    let mut out = values(&argv, "-name");
    out.extend(values(&argv, "-uuid"));
    out.extend(values(&argv, "-netdev"));
    out.extend(values(&argv, "-device").into_iter().filter(|d| d.starts_with("virtio-net")));
    out
}

/// The inodes of every disk top of `env`.
async fn top_inodes(env: &QemuEnvironment) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for m in ["web", "app", "db"] {
        let top = env.disk_top(m, "disk0").await.unwrap();
        out.push((m.to_string(), std::fs::metadata(&top).unwrap().ino()));
    }
    out
}

#[tokio::test]
async fn swap_moves_a_linked_stage_under_production_identity_and_back() {
    swap_and_back(StageOptions::linked).await;
}

#[tokio::test]
async fn swap_moves_a_full_stage_under_production_identity_and_back() {
    swap_and_back(StageOptions::full).await;
}

async fn swap_and_back(options: fn(String) -> StageOptions) {
    let f = Fixture::new();
    let kit = Kit::new(f.backend.clone());
    let (pname, sname) = (unique("swap-p"), unique("swap-s"));
    let prod = kit.production(&pname).await.unwrap();
    prod.start().await.unwrap();
    let baseline = prod.take_baseline().await.unwrap();
    let stage = f.backend.stage(&baseline, &options(sname.clone())).await.unwrap();
    stage.disk_io().unwrap().write("db", "disk0", 4096, b"staged change").await.unwrap();
    let (qp, qs) = (f.backend.open_qemu(&pname).await.unwrap(), f.backend.open_qemu(&sname).await.unwrap());
    let (p_ids, s_ids) = (identity(&qp, "web").await, identity(&qs, "web").await);
    let (p_tops, s_tops) = (top_inodes(&qp).await, top_inodes(&qs).await);
    let (p_before, s_before) = (prod.fingerprint().await.unwrap(), stage.fingerprint().await.unwrap());

    f.backend.swap(&pname, &sname).await.expect("swap");
    assert_eq!(identity(&qp, "web").await, p_ids, "production keeps its names, UUID, MACs and segments");
    assert_eq!(identity(&qs, "web").await, s_ids, "the stage keeps its own (fenced) identity");
    let netdevs = |ids: &[String]| ids.iter().filter(|i| i.starts_with("socket,")).cloned().collect::<Vec<_>>();
    assert!(netdevs(&p_ids).iter().all(|n| !netdevs(&s_ids).contains(n)), "old production stays fenced");
    assert_eq!(top_inodes(&qp).await, s_tops, "production now runs the stage's disk tops");
    assert_eq!(top_inodes(&qs).await, p_tops, "the stage holds production's old tops");
    let argv = qp.machine_argv("web").await.unwrap();
    let top = qp.disk_top("web", "disk0").await.unwrap();
    assert!(values(&argv, "-blockdev").iter().any(|b| b.contains(top.to_str().unwrap())), "{argv:?}");
    assert!(top.starts_with(f.root().join("envs").join(&pname)), "production's layers live in its own directory");
    let p_status = prod.status().await.unwrap();
    assert!(p_status.iter().all(|m| m.power == PowerState::Running), "production runs again: {p_status:?}");
    let s_status = stage.status().await.unwrap();
    assert!(s_status.iter().all(|m| m.power == PowerState::Stopped), "old production is stopped: {s_status:?}");
    assert_eq!(prod.fingerprint().await.unwrap().disks, s_before.disks, "production reads the stage's data");
    assert_eq!(stage.fingerprint().await.unwrap().disks, p_before.disks, "the stage reads old production's data");
    for m in ["web", "app", "db"] {
        qemu_img_check(&qp.disk_top(m, "disk0").await.unwrap());
        qemu_img_check(&qs.disk_top(m, "disk0").await.unwrap());
    }
    let drift = prod.disk_changes(&baseline).await.unwrap();
    let db = drift.iter().find(|d| d.machine == "db").unwrap();
    assert!(matches!(&db.changes, ChangeMap::Checked { extents } if !extents.is_empty()), "{db:?}");

    qp.collapse_layers().await.expect("collapse production after a swap");
    qs.collapse_layers().await.expect("collapse the stage after a swap");
    assert_eq!(prod.fingerprint().await.unwrap().disks, s_before.disks, "collapsing changed production");
    assert_eq!(stage.fingerprint().await.unwrap().disks, p_before.disks, "collapsing changed the stage");

    f.backend.swap(&pname, &sname).await.expect("swap back");
    assert_eq!(prod.fingerprint().await.unwrap(), p_before, "swap is its own inverse (production)");
    assert_eq!(stage.fingerprint().await.unwrap(), s_before, "swap is its own inverse (stage)");
    assert_eq!(top_inodes(&qp).await, p_tops);
    assert!(prod.status().await.unwrap().iter().all(|m| m.power == PowerState::Running));

    f.backend.swap(&pname, &sname).await.expect("swap again");
    drop((stage, qs));
    f.backend.destroy(&sname).await.expect("the old production can be destroyed after a swap");
    assert_eq!(prod.fingerprint().await.unwrap().disks, s_before.disks, "production's chains survive it");
    for m in ["web", "app", "db"] {
        qemu_img_check(&qp.disk_top(m, "disk0").await.unwrap());
    }
    drop((prod, qp));
    f.backend.destroy(&pname).await.unwrap();
}

#[tokio::test]
async fn swap_refuses_environments_that_are_not_production_and_its_stage() {
    let f = Fixture::new();
    let kit = Kit::new(f.backend.clone());
    let (a, b) = (unique("swap-a"), unique("swap-b"));
    kit.production(&a).await.unwrap();
    kit.production(&b).await.unwrap();
    let err = f.backend.swap(&a, &b).await.unwrap_err();
    assert!(matches!(err, stagecore::Error::Precondition(_)), "{err}");
    let err = f.backend.swap(&a, &a).await.unwrap_err();
    assert!(matches!(err, stagecore::Error::InvalidSpec { .. }), "{err}");
    let err = f.backend.swap(&a, "missing-stage").await.unwrap_err();
    assert!(matches!(err, stagecore::Error::NotFound { .. }), "{err}");
}

/// A swap "crashing" at `point` leaves an intent; opening production settles it.
async fn crash_then_settle(point: &'static str) -> (bool, bool) {
    let f = Fixture::with(|c| stagecore_qemu::QemuConfig {
        hooks: stagecore_qemu::FaultHooks {
            crash_at: Some(std::sync::Arc::new(move |p: &str| p == point)),
            ..Default::default()
        },
        ..c
    });
    let kit = Kit::new(f.backend.clone());
    let (pname, sname) = (unique("swapcrash-p"), unique("swapcrash-s"));
    let prod = kit.production(&pname).await.unwrap();
    let baseline = prod.take_baseline().await.unwrap();
    prod.create_snapshot("keep").await.unwrap();
    let stage = f.backend.stage(&baseline, &StageOptions::linked(&sname)).await.unwrap();
    stage.disk_io().unwrap().write("app", "disk0", 0, b"stage data").await.unwrap();
    let (p_before, s_before) = (prod.fingerprint().await.unwrap(), stage.fingerprint().await.unwrap());
    let err = f.backend.swap(&pname, &sname).await.unwrap_err();
    assert!(err.to_string().contains("crash injected"), "{err}");
    let intent = f.root().join("envs").join(&pname).join("swap-intent.json");
    assert!(intent.exists(), "the crash leaves the intent behind");
    let prod = f.backend.open(&pname).await.expect("opening production settles the swap");
    assert!(!intent.exists());
    let stage = f.backend.open(&sname).await.unwrap();
    let (p_now, s_now) = (prod.fingerprint().await.unwrap(), stage.fingerprint().await.unwrap());
    let swapped = p_now.disks == s_before.disks && s_now.disks == p_before.disks;
    let unswapped = p_now == p_before && s_now == s_before;
    let (qp, qs) = (f.backend.open_qemu(&pname).await.unwrap(), f.backend.open_qemu(&sname).await.unwrap());
    for m in ["web", "app", "db"] {
        qemu_img_check(&qp.disk_top(m, "disk0").await.unwrap());
        qemu_img_check(&qs.disk_top(m, "disk0").await.unwrap());
    }
    let layers = support::files_under(&f.root().join("envs"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "qcow2"));
    for layer in layers {
        qemu_img_check(&layer);
    }
    prod.revert_snapshot("keep").await.expect("production's snapshot still reverts");
    drop((stage, qs));
    f.backend.destroy(&sname).await.unwrap();
    drop((prod, qp));
    f.backend.destroy(&pname).await.unwrap();
    (swapped, unswapped)
}

#[tokio::test]
async fn a_swap_interrupted_before_production_is_saved_is_undone() {
    assert_eq!(crash_then_settle("swap:linked").await, (false, true));
}

#[tokio::test]
async fn a_swap_interrupted_after_production_is_saved_is_finished() {
    assert_eq!(crash_then_settle("swap:decided").await, (true, false));
}
