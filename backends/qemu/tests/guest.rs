//! The guest channel, start order and application-consistent freezes against real QEMU (TCG):
//! machines without a guest OS (agentless: typed errors, never a hang, snapshots not held up),
//! and productions of real guests booted from the project's test image
//! (`stagecore_testkit::guest_image::GuestImage`; the tests fail loudly when it is missing).

mod support;

use std::time::{Duration, Instant};

use stagecore::{Backend, Change, ConsistencyLevel, Environment, Error, GuestExec, PowerState};
use stagecore_testkit::unique;
use support::Fixture;

/// Machines with empty disks have no agent: `wait_ready` gives a typed error naming the machine
/// within its bound, snapshots record `Crash` ("guest agent did not answer") and probe each
/// machine once, a stopped machine is `Precondition`, an unknown one `NotFound`.
#[tokio::test]
async fn guest_channel_of_agentless_and_stopped_machines_is_typed() {
    let f = Fixture::new();
    let name = unique("noagent");
    let prod = f.backend.create(&stagecore::memory::sample_spec(&name)).await.unwrap();
    assert!(f.backend.capabilities().guest_channel);
    let guest = prod.guest().expect("the QEMU backend has a guest channel");

    let err = guest.exec("web", &GuestExec::new(["/bin/true"])).await.unwrap_err();
    match &err {
        Error::Precondition(m) => assert_eq!(m, &format!("machine {name}/web is not running")),
        other => panic!("expected Precondition, got {other}"),
    }
    let change =
        Change::GuestFile { machine: "web".into(), path: "/root/x".into(), content: b"x".to_vec(), mode: None };
    assert!(matches!(prod.apply(&change).await, Err(Error::Precondition(_))), "guest change on a stopped machine");
    let err = guest.read_file("nope", "/etc/hostname").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");

    prod.start().await.expect("agentless machines without dependents start without waiting");
    let t = Instant::now();
    let err = guest.wait_ready("web", Duration::from_secs(2)).await.unwrap_err();
    eprintln!("wait_ready on an agentless machine after {:?}: {err}", t.elapsed());
    assert!(matches!(err, Error::Unreachable { .. } | Error::Timeout { .. }), "{err}");
    assert!(err.to_string().contains(&format!("{name}/web")), "the machine is named: {err}");

    let t = Instant::now();
    let snap = prod.create_snapshot("s1").await.expect("snapshot of agentless machines");
    eprintln!("first snapshot (probes every agent once): {:?}", t.elapsed());
    assert_eq!(snap.machines.len(), 3, "{:?}", snap.machines);
    for (m, c) in &snap.machines {
        assert_eq!(c.level, ConsistencyLevel::Crash, "{m}: {c:?}");
        assert_eq!(c.detail.as_deref(), Some("guest agent did not answer"), "{m}: {c:?}");
    }
    let (log, _guard) = support::EventLog::install();
    let snap = prod.create_snapshot("s2").await.unwrap();
    assert!(snap.machines.values().all(|c| c.level == ConsistencyLevel::Crash), "{:?}", snap.machines);
    let probed = log.events().iter().filter(|e| e.message.contains("no guest agent")).count();
    assert_eq!(probed, 0, "agentless machines are remembered, not probed again: {:?}", log.events());

    prod.stop().await.unwrap();
    let baseline = prod.take_baseline().await.unwrap();
    for (m, c) in &baseline.consistency {
        assert_eq!(c.level, ConsistencyLevel::Stopped, "{m}: {c:?}");
    }
    assert_eq!(baseline.consistency.len(), 3);
    drop(prod);
    f.backend.destroy(&name).await.unwrap();
}

/// A machine that others start after must have an answering agent: with an agentless `db` and
/// `app` after it, `start` fails within `agent_timeout` naming both machines, and `app` is not
/// started.
#[tokio::test]
async fn guest_start_waits_for_the_agent_of_a_dependency_and_names_it() {
    let f = Fixture::with(|c| c.with_agent_timeout(Duration::from_secs(3)));
    let name = unique("order");
    let mut spec = stagecore::memory::sample_spec(&name);
    spec.machines[1].after = vec!["db".into()];
    let prod = f.backend.create(&spec).await.unwrap();
    let err = prod.start().await.unwrap_err();
    eprintln!("start with an agentless dependency: {err}");
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&format!("{name}/db")) && text.contains(&format!("{name}/app")), "{text}");
    let status = prod.status().await.unwrap();
    let power = |m: &str| status.iter().find(|s| s.machine == m).unwrap().power;
    assert_eq!(power("db"), PowerState::Running, "{status:?}");
    assert_eq!(power("web"), PowerState::Running, "web is in the first wave: {status:?}");
    assert_eq!(power("app"), PowerState::Stopped, "app must wait for db's agent: {status:?}");
    drop(prod);
    f.backend.destroy(&name).await.unwrap();
}

/// How long a booting real guest's agent is waited for (TCG on a loaded 2-core machine).
const READY: Duration = Duration::from_secs(120);

async fn wait_all(env: &dyn Environment) {
    let guest = env.guest().expect("guest channel");
    for m in env.spec().await.unwrap().machines {
        guest.wait_ready(&m.name, READY).await.unwrap_or_else(|e| panic!("{}/{}: {e}", env.name(), m.name));
    }
}

async fn sh(env: &dyn Environment, machine: &str, script: &str) -> stagecore::GuestOutput {
    let guest = env.guest().expect("guest channel");
    guest.exec(machine, &GuestExec::new(["/bin/sh", "-c", script])).await.unwrap_or_else(|e| panic!("{script}: {e}"))
}

/// A started production of three real guests; its agents answer.
async fn guest_production(f: &Fixture, name: &str) -> stagecore::DynEnvironment {
    let spec = support::guest_spec(name, &f.root().join("guest-disks"));
    let prod = f.backend.create(&spec).await.expect("production of real guests");
    prod.start().await.expect("start in order");
    wait_all(&*prod).await;
    prod
}

/// Start order with real agents (db, then app once db's agent answered, then web once app's
/// did — from the backend's own events, order only), the channel's round trip, guest changes
/// through `apply` (a command exiting 3 is `Error::GuestCommand`), and `Application` consistency
/// for baselines and snapshots of running guests.
#[tokio::test]
async fn guest_production_starts_in_order_round_trips_and_freezes_application_consistent() {
    let f = Fixture::new();
    let name = unique("gprod");
    let spec = support::guest_spec(&name, &f.root().join("guest-disks"));
    let prod = f.backend.create(&spec).await.unwrap();
    let qenv = f.backend.open_qemu(&name).await.unwrap();
    let argv: Vec<String> =
        qenv.machine_argv("app").await.unwrap().iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let own_dir = f.root().join("envs").join(&name).join("machines").join("app");
    assert!(argv.iter().any(|a| a == "-kernel"), "{argv:?}");
    assert!(argv.contains(&format!("socket,id=qga0,server=on,wait=off,path={}", own_dir.join("qga.sock").display())));

    let (log, guard) = support::EventLog::install();
    prod.start().await.expect("start in order");
    drop(guard);
    let at = |message: &str, m: &str| {
        log.position(message, m).unwrap_or_else(|| panic!("no {message:?} event for {m}: {:#?}", log.events()))
    };
    assert!(at("machine started", "db") < at("guest agent answered", "db"));
    assert!(at("guest agent answered", "db") < at("machine started", "app"), "app started before db's agent answered");
    assert!(
        at("guest agent answered", "app") < at("machine started", "web"),
        "web started before app's agent answered"
    );
    assert!(log.position("guest agent answered", "web").is_none(), "nothing starts after web: it is not waited for");
    wait_all(&*prod).await;

    let guest = prod.guest().unwrap();
    let out = guest
        .exec("web", &GuestExec::new(["/bin/sh", "-c", "cat; echo err >&2; exit 4"]).stdin(b"in".to_vec()))
        .await
        .unwrap();
    assert_eq!((out.exit_code, out.stdout.as_slice(), out.stderr_text().trim()), (4, &b"in"[..], "err"), "{out:?}");
    guest.write_file("db", "/root/round.txt", b"round trip\n", Some(0o640)).await.unwrap();
    assert_eq!(guest.read_file("db", "/root/round.txt").await.unwrap(), b"round trip\n");
    assert_eq!(sh(&*prod, "db", "stat -c %a /root/round.txt").await.stdout_text().trim(), "640");
    let err = guest.read_file("app", "/root/round.txt").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "machines are separate guests: {err}");
    let os = qenv.guest_agent("app").await.unwrap().osinfo().await.unwrap();
    assert_eq!(os.id.as_deref(), Some("debian"), "{os:?}");

    let change = Change::GuestCommand {
        machine: "app".into(),
        command: vec!["/bin/sh".into(), "-c".into(), "echo broken >&2; exit 3".into()],
        timeout_secs: Some(30),
    };
    match prod.apply(&change).await.unwrap_err() {
        Error::GuestCommand { machine, exit_code, stderr, .. } => {
            assert_eq!((machine.as_str(), exit_code, stderr.trim()), (format!("{name}/app").as_str(), 3, "broken"));
        }
        other => panic!("expected GuestCommand, got {other}"),
    }
    let file = Change::GuestFile {
        machine: "app".into(),
        path: "/root/applied.txt".into(),
        content: b"applied".to_vec(),
        mode: Some(0o600),
    };
    prod.apply(&file).await.unwrap();
    assert_eq!(guest.read_file("app", "/root/applied.txt").await.unwrap(), b"applied");

    let (log, guard) = support::EventLog::install();
    let baseline = prod.take_baseline().await.expect("application-consistent baseline");
    drop(guard);
    assert_eq!(baseline.consistency.len(), 3);
    for (m, c) in &baseline.consistency {
        assert_eq!(c.level, ConsistencyLevel::Application, "{m}: {c:?}");
    }
    assert!(log.events().iter().any(|e| e.message == "guests quiesced and thawed"), "{:#?}", log.events());
    let snap = prod.create_snapshot("app-consistent").await.unwrap();
    assert!(snap.machines.values().all(|c| c.level == ConsistencyLevel::Application), "{:?}", snap.machines);
    for m in ["web", "app", "db"] {
        let status = qenv.guest_agent(m).await.unwrap().fsfreeze_status().await.unwrap();
        assert_eq!(status, stagecore_qga::FreezeStatus::Thawed, "{m}");
        assert!(sh(&*prod, m, "echo after > /root/after.txt && sync").await.success(), "{m} accepts writes");
        let dir = f.root().join("envs").join(&name).join("machines").join(m);
        assert!(!dir.join("freeze.marker").exists() && !dir.join("pause.marker").exists(), "{m}: markers left");
    }
    assert!(std::fs::metadata(qenv.console_log("db")).is_ok(), "the serial console is logged");
    drop((prod, qenv));
    f.backend.destroy(&name).await.unwrap();
}

fn sha256(path: &std::path::Path) -> Vec<u8> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::io::copy(&mut file, &mut h).unwrap();
    h.finalize().to_vec()
}

/// Every file below the writable top of each of production's disks, with its digest.
async fn frozen_chain(qenv: &stagecore_qemu::QemuEnvironment) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for m in ["web", "app", "db"] {
        let top = qenv.disk_top(m, "disk0").await.unwrap();
        for layer in stagecore_qcow2::chain(&top).unwrap().into_iter().skip(1) {
            let digest = sha256(&layer.path);
            out.push((layer.path, digest));
        }
    }
    out
}

/// A guest file written on a started linked stage is seen there and not in production (its
/// `read_file` is `NotFound`); production's spec and every frozen layer of its chains are
/// byte-identical afterwards, and its tops stay its own files. Then, on the stage: snapshot →
/// guest file change → revert gives the old file back once the machines run again.
#[tokio::test]
async fn guest_file_on_a_linked_stage_stays_out_of_production_and_revert_restores_it() {
    let f = Fixture::new();
    let (pname, sname) = (unique("gsrc"), unique("gstage"));
    let prod = guest_production(&f, &pname).await;
    let qprod = f.backend.open_qemu(&pname).await.unwrap();
    let pguest = prod.guest().unwrap();
    pguest.write_file("app", "/root/state.txt", b"production\n", None).await.unwrap();
    let baseline = prod.take_baseline().await.unwrap();
    let spec_before = prod.spec().await.unwrap();
    let chain_before = frozen_chain(&qprod).await;

    let opts = stagecore::StageOptions { start: true, ..stagecore::StageOptions::linked(&sname) };
    let stage = f.backend.stage(&baseline, &opts).await.expect("started stage of real guests");
    wait_all(&*stage).await;
    let sguest = stage.guest().unwrap();
    assert_eq!(sguest.read_file("app", "/root/state.txt").await.unwrap(), b"production\n", "the stage is a copy");
    let change = Change::GuestFile {
        machine: "app".into(),
        path: "/root/staged.txt".into(),
        content: b"only on the stage".to_vec(),
        mode: None,
    };
    stage.apply(&change).await.unwrap();
    assert!(sh(&*stage, "app", "sync").await.success());
    assert_eq!(sguest.read_file("app", "/root/staged.txt").await.unwrap(), b"only on the stage");
    let err = pguest.read_file("app", "/root/staged.txt").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "production sees the stage's file: {err}");
    assert_eq!(prod.spec().await.unwrap(), spec_before, "production's spec changed");
    assert_eq!(frozen_chain(&qprod).await, chain_before, "a frozen layer of production changed");
    let pdir = f.root().join("envs").join(&pname);
    for m in ["web", "app", "db"] {
        assert!(qprod.disk_top(m, "disk0").await.unwrap().starts_with(&pdir), "{m}: production's top moved");
    }

    let snap = stage.create_snapshot("before-edit").await.unwrap();
    assert!(snap.machines.values().all(|c| c.level == ConsistencyLevel::Application), "{:?}", snap.machines);
    sguest.write_file("app", "/root/staged.txt", b"edited after the snapshot", None).await.unwrap();
    sguest.write_file("app", "/root/later.txt", b"later", None).await.unwrap();
    assert!(sh(&*stage, "app", "sync").await.success());
    stage.revert_snapshot("before-edit").await.unwrap();
    wait_all(&*stage).await;
    assert_eq!(sguest.read_file("app", "/root/staged.txt").await.unwrap(), b"only on the stage");
    let err = sguest.read_file("app", "/root/later.txt").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "a file written after the snapshot survived the revert: {err}");
    drop((stage, prod, qprod));
    f.backend.destroy(&sname).await.unwrap();
    f.backend.destroy(&pname).await.unwrap();
}

const CHILD_ROOT: &str = "STAGECORE_QEMU_GUEST_CHILD_ROOT";
const CHILD_ENV: &str = "STAGECORE_QEMU_GUEST_CHILD_ENV";
const CHILD_POINT: &str = "STAGECORE_QEMU_GUEST_CHILD_POINT";

/// Not a test of its own: the child of the kill test below (it does nothing unless started with
/// its environment variables). It opens the environment and takes a snapshot, SIGKILLing itself
/// at the named freeze point.
#[tokio::test]
async fn guest_child_process_helper() {
    let (Ok(root), Ok(env), Ok(point)) =
        (std::env::var(CHILD_ROOT), std::env::var(CHILD_ENV), std::env::var(CHILD_POINT))
    else {
        return;
    };
    let hook: stagecore_qemu::PointHook = std::sync::Arc::new(move |p: &str| {
        if p == point {
            println!("KILLED AT {p}");
            use std::io::Write;
            std::io::stdout().flush().unwrap();
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        false
    });
    let hooks = stagecore_qemu::FaultHooks { crash_at: Some(hook), ..Default::default() };
    let config = stagecore_qemu::QemuConfig { hooks, ..stagecore_qemu::QemuConfig::new(root) };
    let backend = stagecore_qemu::QemuBackend::new(config.with_accel(stagecore_qemu::Accel::Tcg));
    let prod = backend.open(&env).await.expect("child opens the environment");
    println!("OPENED");
    let result = prod.create_snapshot("doomed").await;
    println!("SURVIVED: {result:?}");
}

/// A process SIGKILLed between `guest-fsfreeze-freeze` and thaw (and, second round, while the
/// guests are also paused) leaves frozen (paused) guests and its markers; the next open of the
/// environment resumes and thaws them: QMP says running, the agents say thawed, a guest write
/// plus `sync` succeeds, the markers are gone.
#[tokio::test]
async fn guest_process_killed_inside_the_freeze_window_is_settled_on_the_next_open() {
    use std::os::unix::process::ExitStatusExt;
    let f = Fixture::new();
    let name = unique("gkill");
    drop(guest_production(&f, &name).await);
    let mdir = |m: &str| f.root().join("envs").join(&name).join("machines").join(m);
    for point in ["freeze:frozen", "freeze:paused"] {
        // Async, so the runtime closes this process's dropped QMP sessions (QEMU serves one
        // client at a time) while the child runs.
        let out = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "guest_child_process_helper", "--nocapture"])
            .env(CHILD_ROOT, f.root())
            .env(CHILD_ENV, &name)
            .env(CHILD_POINT, point)
            .output()
            .await
            .expect("re-run the test binary");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{point}: child not killed: {text}");
        assert!(text.contains(&format!("KILLED AT {point}")) && !text.contains("SURVIVED"), "{point}: {text}");

        // What the dead process left, seen without the backend.
        for m in ["web", "app", "db"] {
            assert!(mdir(m).join("freeze.marker").exists(), "{point}: {m} has no freeze marker");
            assert_eq!(mdir(m).join("pause.marker").exists(), point == "freeze:paused", "{point}: {m} pause marker");
            let raw = stagecore_qga::Agent::new(
                std::sync::Arc::new(stagecore_qga::SocketTransport::new(mdir(m).join("qga.sock"), "raw")),
                "raw",
            );
            if point == "freeze:frozen" {
                let status = raw.fsfreeze_status().await.unwrap();
                assert_eq!(status, stagecore_qga::FreezeStatus::Frozen, "{point}: {m} is not frozen");
            }
            drop(raw);
            let qmp = stagecore_qemu::qmp::QmpClient::connect(&mdir(m).join("qmp.sock"), Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(qmp.query_status().await.unwrap().running, point != "freeze:paused", "{point}: {m}");
            drop(qmp);
        }

        let qenv = f.backend.open_qemu(&name).await.expect("reopen after the kill");
        let env: &dyn Environment = &qenv;
        let status = env.status().await.unwrap();
        assert!(status.iter().all(|s| s.power == PowerState::Running), "{point}: {status:?}");
        for m in ["web", "app", "db"] {
            let agent = qenv.guest_agent(m).await.unwrap();
            assert_eq!(agent.fsfreeze_status().await.unwrap(), stagecore_qga::FreezeStatus::Thawed, "{point}: {m}");
            let write = GuestExec::new(["/bin/sh", "-c", "echo alive > /root/after-kill.txt && sync"])
                .timeout(Duration::from_secs(30));
            let out = env.guest().unwrap().exec(m, &write).await.unwrap();
            assert!(out.success(), "{point}: {m}: {out:?}");
            assert!(!mdir(m).join("freeze.marker").exists() && !mdir(m).join("pause.marker").exists(), "{m}");
        }
        assert!(env.list_snapshots().await.unwrap().is_empty(), "the killed snapshot is not recorded");
        drop(qenv);
    }
    let prod = f.backend.open(&name).await.unwrap();
    let snap = prod.create_snapshot("after").await.expect("snapshots work after the settled kills");
    assert!(snap.machines.values().all(|c| c.level == ConsistencyLevel::Application), "{:?}", snap.machines);
    drop(prod);
    f.backend.destroy(&name).await.unwrap();
}

/// The testkit's guest functions, each on its own productions of real guests.
fn kit(f: &Fixture) -> stagecore_testkit::Kit {
    stagecore_testkit::guest::guest_kit(f.backend.clone(), f.root().join("kit-disks"))
}

#[tokio::test]
async fn guest_kit_exec_read_write_round_trip() {
    let f = Fixture::new();
    stagecore_testkit::guest::exec_read_write_round_trip(&kit(&f)).await;
}

#[tokio::test]
async fn guest_kit_guest_change_invisible_in_production() {
    let f = Fixture::new();
    stagecore_testkit::guest::guest_change_invisible_in_production(&kit(&f)).await;
}

#[tokio::test]
async fn guest_kit_snapshot_revert_restores_guest_file() {
    let f = Fixture::new();
    stagecore_testkit::guest::snapshot_revert_restores_guest_file(&kit(&f)).await;
}

#[tokio::test]
async fn guest_kit_replay_promotion_reaches_production() {
    let f = Fixture::new();
    stagecore_testkit::guest::replay_promotion_reaches_production(&kit(&f)).await;
}

#[tokio::test]
async fn guest_kit_failing_guest_command_rolls_back() {
    let f = Fixture::new();
    stagecore_testkit::guest::failing_guest_command_rolls_back(&kit(&f)).await;
}

/// A kit of one-machine (`app`) productions of real guests, for the guest-drift functions.
fn drift_kit(f: &Fixture) -> stagecore_testkit::Kit {
    stagecore_testkit::guest::guest_kit_of(f.backend.clone(), f.root().join("kit-disks"), &["app"])
}

/// The testkit's guest-drift functions on real guests: the demo app's package and config file.
fn drift_fixture() -> stagecore_testkit::guest_drift::GuestFixture {
    stagecore_testkit::guest_drift::GuestFixture::test_image(&stagecore_testkit::guest_image::GuestImage::locate())
}

/// A fresh clone of a running production: guest layer IN_SYNC, and the bytes the running guests
/// write after the baseline (the thaw, journal commits) INFORMATIONAL, so the report is IN_SYNC
/// and 100 %.
#[tokio::test]
async fn guest_drift_zero_after_clone() {
    let f = Fixture::new();
    stagecore_testkit::guest_drift::zero_guest_drift_after_clone(&drift_kit(&f), &drift_fixture()).await;
}

#[tokio::test]
async fn guest_drift_change_is_intended() {
    let f = Fixture::new();
    stagecore_testkit::guest_drift::guest_change_is_intended(&drift_kit(&f), &drift_fixture()).await;
}

#[tokio::test]
async fn guest_drift_footprint_verify() {
    let f = Fixture::new();
    stagecore_testkit::guest_drift::footprint_verify(&drift_kit(&f), &drift_fixture()).await;
}

#[tokio::test]
async fn guest_drift_rebase_without_conflict() {
    let f = Fixture::new();
    let kit = stagecore_testkit::guest::guest_kit_of(f.backend.clone(), f.root().join("kit-disks"), &["app", "db"]);
    stagecore_testkit::guest_drift::rebase_without_conflict(&kit, &drift_fixture()).await;
}

#[tokio::test]
async fn guest_drift_rebase_with_conflict() {
    let f = Fixture::new();
    stagecore_testkit::guest_drift::rebase_with_conflict(&drift_kit(&f), &drift_fixture()).await;
}
