//! The stagecore conformance kit against real QEMU (TCG): every kit case the backend's
//! capabilities allow, one test each (`conformance_tests!`, promotion cases included), plus the
//! invariants with production *running* (its baseline goes through a live QMP transaction).

mod support;

use std::time::Instant;

use stagecore::{BackendExt, EnvironmentExt, StageOptions};
use stagecore_testkit::{Kit, drift, invariants, unique};
use support::{Fixture, running_kit};

fn kit(f: &Fixture) -> Kit {
    Kit::new(f.backend.clone())
}

/// A fresh state root per case; the fixture kills what the case left running when dropped.
async fn setup() -> (Fixture, Kit) {
    let f = Fixture::new();
    let k = kit(&f);
    (f, k)
}

stagecore_testkit::conformance_tests!(setup);

/// Invariant 1 with production running: the baseline (a live transaction under every disk)
/// and every staging operation leave what production's guests read, and its spec, identical.
#[tokio::test]
async fn production_untouched_while_running() {
    let filter = tracing_subscriber::EnvFilter::new("stagecore_qemu::freeze=info");
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    let f = Fixture::new();
    let kit = kit(&f);
    let (pname, sname) = (unique("run-prod"), unique("run-stage"));
    let prod = kit.production(&pname).await.expect("production");
    let t = Instant::now();
    prod.start().await.expect("start production");
    eprintln!("timing: start 3 machines {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let before_baseline = prod.fingerprint().await.expect("fingerprint");
    let t = Instant::now();
    let baseline = prod.take_baseline().await.expect("baseline of running production");
    eprintln!("timing: live baseline of 3 running machines {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let before = prod.fingerprint().await.expect("fingerprint");
    assert_eq!(before, before_baseline, "taking a baseline changed what production's guests read");
    let t = Instant::now();
    let idle = kit.backend.stage(&baseline, &StageOptions::linked(unique("idle"))).await.expect("stage");
    eprintln!("timing: linked stage of 3 disks, not started {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    kit.backend.destroy(idle.name()).await.unwrap();
    let t = Instant::now();
    let stage = kit.backend.stage(&baseline, &StageOptions { start: true, ..StageOptions::linked(&sname) }).await;
    eprintln!("timing: linked stage, started {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let stage = stage.expect("started stage");
    let io = stage.disk_io().expect("disk_io");
    let spec = stage.spec().await.unwrap();
    for m in &spec.machines {
        for d in &m.disks {
            io.write(&m.name, &d.name, 0, b"stage writes here").await.expect("stage write while running");
        }
    }
    assert_eq!(prod.fingerprint().await.unwrap(), before, "writing to the stage changed production");
    let t = Instant::now();
    stage.create_snapshot("s1").await.expect("live snapshot");
    eprintln!("timing: live snapshot of 3 running machines {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    io.write(&spec.machines[0].name, &spec.machines[0].disks[0].name, 4096, b"more").await.unwrap();
    let t = Instant::now();
    stage.revert_snapshot("s1").await.expect("revert");
    eprintln!("timing: revert with restart of 3 machines {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let t = Instant::now();
    let report = kit.backend.drift(&*prod, &*stage).await.expect("drift");
    eprintln!("timing: drift report, stage running {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    assert!(report.disk.records.iter().any(|r| r.side.is_some()), "stage writes show as drift:\n{report}");
    assert_eq!(prod.fingerprint().await.unwrap(), before, "snapshot/revert/drift on the stage changed production");
    let status = stage.status().await.unwrap();
    assert!(status.iter().all(|s| s.power == stagecore::PowerState::Running), "{status:?}");
    kit.backend.destroy(&sname).await.expect("destroy stage");
    assert_eq!(prod.fingerprint().await.unwrap(), before, "destroying the stage changed production");
    kit.backend.destroy(&pname).await.expect("destroy production");
}

#[tokio::test]
async fn production_untouched_with_running_production() {
    let f = Fixture::new();
    invariants::production_untouched(&running_kit(&f)).await;
}

#[tokio::test]
async fn zero_drift_after_clone_of_running_production() {
    let f = Fixture::new();
    invariants::zero_drift_after_clone(&running_kit(&f)).await;
}

#[tokio::test]
async fn production_disk_write_is_drift_while_running() {
    let f = Fixture::new();
    drift::production_disk_write_is_drift(&running_kit(&f)).await;
}

#[tokio::test]
async fn both_sides_is_conflict_while_running() {
    let f = Fixture::new();
    drift::both_sides_is_conflict(&running_kit(&f)).await;
}
