//! Live tests with REAL guests on libvirtd (`qemu:///system`, TCG): the project's test image
//! (Debian 12 + qemu-guest-agent, direct kernel boot) on every machine. They FAIL when libvirtd or
//! the image is missing. Every domain and file a test makes is removed by [`common::Guard`].

mod common;

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Guard, URI, virsh};
use stagecore::{
    Backend, Change, ConsistencyLevel, DynEnvironment, EnvironmentExt, Error, GuestExec, PowerState, StageOptions,
    memory::sample_spec,
};
use stagecore_libvirt::LibvirtBackend;
use stagecore_testkit::guest_image::GuestImage;

const READY: Duration = Duration::from_secs(180);

async fn wait_all(env: &DynEnvironment) {
    let guest = env.guest().expect("guest channel");
    for m in env.spec().await.unwrap().machines {
        guest.wait_ready(&m.name, READY).await.unwrap_or_else(|e| panic!("{} agent: {e}", m.name));
    }
}

async fn sh(env: &DynEnvironment, machine: &str, script: &str) -> stagecore::GuestOutput {
    let out = env.guest().unwrap().exec(machine, &GuestExec::new(["/bin/sh", "-c", script])).await;
    out.unwrap_or_else(|e| panic!("{machine}: {script}: {e}"))
}

/// A host path from a domain's XML: the `attr='…'` inside the first `<open …>` element that
/// contains `marker`, e.g. the agent channel's socket or the file serial's log.
fn xml_path(dom: &str, live: bool, open: &str, marker: &str, attr: &str) -> Option<String> {
    let mut args = vec!["dumpxml", dom];
    if !live {
        args.push("--inactive");
    }
    let xml = virsh(&args).join("\n");
    let close = format!("</{}>", open.trim_start_matches('<').split(' ').next().unwrap_or_default());
    xml.split(open)
        .skip(1)
        .map(|rest| rest.split(&close).next().unwrap_or_default())
        .find(|el| el.contains(marker))
        .and_then(|el| {
            let start = el.find(&format!("{attr}='"))? + attr.len() + 2;
            Some(el[start..].split('\'').next()?.to_string())
        })
}

fn agent_socket(dom: &str) -> String {
    xml_path(dom, true, "<channel type='unix'>", "org.qemu.guest_agent.0", "path")
        .unwrap_or_else(|| panic!("{dom} has no agent socket in its live XML"))
}

fn serial_log(dom: &str) -> PathBuf {
    xml_path(dom, false, "<serial type='file'>", "source", "path")
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{dom} has no file serial"))
}

/// `guest-fsfreeze-status` of a domain, asked through libvirt by another client (virsh).
fn freeze_status(dom: &str) -> String {
    let out = Command::new("virsh")
        .args(["-c", URI, "qemu-agent-command", dom, r#"{"execute":"guest-fsfreeze-status"}"#])
        .output()
        .expect("virsh runs");
    assert!(out.status.success(), "fsfreeze-status of {dom}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Three real guests started in start order; guest exec/read/write; application-consistent
/// baseline; a linked stage of real guests: its own agent sockets and serial logs, its guest
/// changes invisible in production (whose disks, spec and serial logs stay as they were);
/// snapshot → guest change → revert; a failing guest command is `Error::GuestCommand`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_three_real_guests_production_and_linked_stage() {
    let g = Guard::new("g1");
    let backend = g.backend().await;
    let image = GuestImage::locate();
    let pname = format!("p{}", g.tag);
    let spec = image.production_spec(&pname, &g.dir.join("disks")).expect("production spec");
    let waves = spec.start_waves().unwrap();
    assert_eq!(waves.len(), 3, "db, then app, then web: {waves:?}");
    let prod = backend.create(&spec).await.expect("create production of real guests");
    let got = prod.spec().await.unwrap();
    for want in &spec.machines {
        let m = got.machine(&want.name).expect("machine");
        assert_eq!((&m.boot, &m.after), (&want.boot, &want.after), "boot and start order round trip for {}", m.name);
    }

    // Start order: a wave waits for the agents of the machines the next wave starts after. With a
    // 1 ms wait the first wave's agent cannot have answered (its kernel is still loading), so the
    // start stops there, with a Timeout, and the later waves were not started.
    let impatient = LibvirtBackend::connect(URI, &g.dir).await.unwrap().with_start_wait(Duration::from_millis(1));
    let err = impatient.open(&pname).await.unwrap().start().await.unwrap_err();
    assert!(matches!(&err, Error::Timeout { operation, .. } if operation.contains("wave 1")), "{err}");
    let power = |s: &[stagecore::MachineStatus], m: &str| s.iter().find(|x| x.machine == m).unwrap().power;
    let status = prod.status().await.unwrap();
    assert_eq!(power(&status, waves[0][0].as_str()), PowerState::Running, "{status:?}");
    for later in waves[1..].iter().flatten() {
        assert_eq!(power(&status, later), PowerState::Stopped, "{later} started before its wave: {status:?}");
    }
    let t = std::time::Instant::now();
    prod.start().await.expect("start in order");
    eprintln!("measured: start of 3 waves (rest of wave 1 + waves 2, 3) {:.1} s", t.elapsed().as_secs_f64());
    assert!(prod.status().await.unwrap().iter().all(|s| s.power == PowerState::Running));
    let guest = prod.guest().expect("guest channel");
    for awaited in waves[..2].iter().flatten() {
        guest.wait_ready(awaited, Duration::from_secs(2)).await.expect("start returned after earlier waves answered");
    }
    wait_all(&prod).await;

    // exec / write / read round trip.
    let out = guest
        .exec("app", &GuestExec::new(["/bin/sh", "-c", "cat; echo err >&2; exit 5"]).stdin(b"in".to_vec()))
        .await
        .unwrap();
    assert_eq!((out.exit_code, out.stdout.as_slice(), out.stderr_text().trim()), (5, &b"in"[..], "err"));
    let blob: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8).collect();
    guest.write_file("db", "/root/blob", &blob, Some(0o640)).await.unwrap();
    assert_eq!(guest.read_file("db", "/root/blob").await.unwrap(), blob);
    assert_eq!(sh(&prod, "db", "stat -c %a /root/blob").await.stdout_text().trim(), "640");
    let missing = guest.read_file("db", "/root/nope").await.unwrap_err();
    assert!(matches!(missing, Error::NotFound { .. }), "{missing}");
    guest.write_file("app", "/root/where", b"production", None).await.unwrap();

    let t = std::time::Instant::now();
    let baseline = prod.take_baseline().await.expect("baseline of running real guests");
    eprintln!("measured: application-consistent baseline of 3 guests {:.2} s", t.elapsed().as_secs_f64());
    for m in ["web", "app", "db"] {
        assert_eq!(baseline.consistency[m].level, ConsistencyLevel::Application, "{m}: {:?}", baseline.consistency);
    }
    for m in ["web", "app", "db"] {
        assert_eq!(freeze_status(&format!("{pname}-{m}")), r#"{"return":"thawed"}"#, "{m} thawed after the baseline");
    }
    assert!(std::fs::read_dir(g.dir.join("frozen")).map(|d| d.count()).unwrap_or(0) == 0, "no freeze marker left");

    // Production at rest while the stage works: its disks, spec and serial logs must not move.
    prod.stop().await.unwrap();
    let stopped = guest.exec("app", &GuestExec::new(["/bin/true"])).await.unwrap_err();
    assert!(matches!(stopped, Error::Precondition(_)), "a stopped machine: {stopped}");
    let p_print = prod.fingerprint().await.unwrap();
    let p_logs: Vec<(PathBuf, Vec<u8>)> = ["web", "app", "db"]
        .iter()
        .map(|m| {
            let log = serial_log(&format!("{pname}-{m}"));
            assert!(log.starts_with(g.dir.join(&pname)), "production's log is in its own directory: {log:?}");
            let bytes = std::fs::read(&log).unwrap();
            assert!(!bytes.is_empty(), "the serial console of {m} logged its boot");
            (log, bytes)
        })
        .collect();

    let sname = format!("s{}", g.tag);
    let stage = backend
        .stage(&baseline, &StageOptions { start: true, ..StageOptions::linked(&sname) })
        .await
        .expect("started linked stage");
    wait_all(&stage).await;
    let sguest = stage.guest().unwrap();
    assert_eq!(sguest.read_file("app", "/root/where").await.unwrap(), b"production", "the stage boots the baseline");
    sguest.write_file("app", "/root/where", b"stage", None).await.unwrap();
    stage
        .apply(&Change::GuestFile {
            machine: "web".into(),
            path: "/root/stage-only".into(),
            content: b"s".to_vec(),
            mode: Some(0o600),
        })
        .await
        .expect("guest file change");
    assert!(sh(&stage, "web", "echo stage-console-marker > /dev/ttyS0; sync").await.success());
    for m in ["web", "app", "db"] {
        let log = serial_log(&format!("{sname}-{m}"));
        assert!(log.starts_with(g.dir.join(&sname)), "the stage's serial log is in the stage's directory: {log:?}");
        assert!(!p_logs.iter().any(|(p, _)| *p == log));
    }
    let s_log = std::fs::read(serial_log(&format!("{sname}-web"))).unwrap();
    assert!(String::from_utf8_lossy(&s_log).contains("stage-console-marker"), "the stage's console goes to its log");
    for (log, bytes) in &p_logs {
        assert_eq!(&std::fs::read(log).unwrap(), bytes, "production's serial log {log:?} changed");
    }
    assert_eq!(prod.fingerprint().await.unwrap(), p_print, "production's disks and spec did not change");

    // Failing guest command.
    let err = stage
        .apply(&Change::GuestCommand {
            machine: "db".into(),
            command: vec!["/bin/sh".into(), "-c".into(), "echo nope >&2; exit 3".into()],
            timeout_secs: Some(30),
        })
        .await
        .unwrap_err();
    match &err {
        Error::GuestCommand { machine, exit_code, stderr, .. } => {
            assert_eq!((machine.as_str(), *exit_code, stderr.as_str()), (format!("{sname}/db").as_str(), 3, "nope"));
        }
        other => panic!("expected GuestCommand, got {other}"),
    }

    // Production again, beside its running stage: other sockets, not the stage's file.
    prod.start().await.unwrap();
    wait_all(&prod).await;
    for m in ["web", "app", "db"] {
        let (p, s) = (agent_socket(&format!("{pname}-{m}")), agent_socket(&format!("{sname}-{m}")));
        assert_ne!(p, s, "{m}: the stage has its own agent socket");
    }
    assert_eq!(guest.read_file("app", "/root/where").await.unwrap(), b"production");
    let err = guest.read_file("web", "/root/stage-only").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "the stage's file reached production: {err}");

    // Snapshot (application-consistent: the unsynced write is in it) → change → revert.
    sguest.write_file("db", "/root/state", b"v1", None).await.unwrap();
    let t = std::time::Instant::now();
    let snap = stage.create_snapshot("before").await.expect("snapshot of running real guests");
    eprintln!("measured: application-consistent snapshot of 3 guests {:.2} s", t.elapsed().as_secs_f64());
    assert!(snap.machines.values().all(|c| c.level == ConsistencyLevel::Application), "{:?}", snap.machines);
    stage
        .apply(&Change::GuestFile {
            machine: "db".into(),
            path: "/root/state".into(),
            content: b"v2".to_vec(),
            mode: None,
        })
        .await
        .unwrap();
    assert!(sh(&stage, "db", "echo new > /root/new; sync").await.success());
    stage.revert_snapshot("before").await.expect("revert");
    wait_all(&stage).await;
    assert_eq!(sguest.read_file("db", "/root/state").await.unwrap(), b"v1", "revert gives the old file back");
    assert!(matches!(sguest.read_file("db", "/root/new").await, Err(Error::NotFound { .. })));

    // A snapshot with one machine shut off records it as Stopped.
    let stop_web = format!("{sname}-web");
    virsh(&["destroy", &stop_web]);
    let snap = stage.create_snapshot("partial").await.unwrap();
    assert_eq!(snap.machines["web"].level, ConsistencyLevel::Stopped, "{:?}", snap.machines);
    assert_eq!(snap.machines["db"].level, ConsistencyLevel::Application, "{:?}", snap.machines);

    backend.destroy(&sname).await.unwrap();
    for (log, _) in &p_logs {
        assert!(log.exists(), "destroying the stage left production's log {log:?}");
    }
    assert!(!g.dir.join(&sname).exists(), "the stage's files are gone");
    backend.destroy(&pname).await.unwrap();
}

/// Domains without a guest OS (empty disks) get crash consistency with the reason, within the
/// probe's bound, and their guest channel is Unreachable naming the domain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_domains_without_an_agent_are_crash_consistent_and_unreachable() {
    let g = Guard::new("g2");
    let backend = g.backend().await;
    let name = format!("p{}", g.tag);
    let mut spec = sample_spec(&name);
    for m in &mut spec.machines {
        m.memory_mib = 64;
        m.disks[0].size_bytes = Some(8 << 20);
    }
    let prod = backend.create(&spec).await.unwrap();
    prod.start().await.expect("no start order: nothing waits");
    virsh(&["destroy", &format!("{name}-db")]);
    let t = std::time::Instant::now();
    let baseline = prod.take_baseline().await.unwrap();
    eprintln!("measured: baseline of 3 domains without a guest OS {:.2} s", t.elapsed().as_secs_f64());
    let c = &baseline.consistency;
    assert_eq!(c["db"].level, ConsistencyLevel::Stopped, "{c:?}");
    for m in ["web", "app"] {
        assert_eq!(c[m].level, ConsistencyLevel::Crash, "{c:?}");
        assert!(c[m].detail.as_deref().unwrap_or_default().contains("did not answer"), "{c:?}");
    }
    let err = prod.guest().unwrap().exec("web", &GuestExec::new(["/bin/true"])).await.unwrap_err();
    match &err {
        Error::Unreachable { endpoint, .. } => assert!(endpoint.contains(&format!("{name}-web")), "{err}"),
        other => panic!("expected Unreachable, got {other}"),
    }
    let err = prod.guest().unwrap().wait_ready("app", Duration::from_secs(1)).await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. } | Error::Timeout { .. }), "{err}");
    backend.destroy(&name).await.unwrap();
}

const CHILD_DIR: &str = "STAGECORE_LIBVIRT_CHILD_DIR";
const CHILD_ENV: &str = "STAGECORE_LIBVIRT_CHILD_ENV";

/// Not a test of its own: the child of the kill test (does nothing unless started by it). It
/// takes a baseline with the fault point `frozen` armed, so it stops with the guests frozen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_process_helper() {
    let (Ok(dir), Ok(env)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_ENV)) else { return };
    let backend = LibvirtBackend::connect(URI, dir).await.expect("child connects");
    let prod = backend.open(&env).await.expect("child opens");
    let _ = prod.take_baseline().await;
    unreachable!("the fault point stops the child before the baseline returns");
}

/// A running one-machine (`db`) production of a real guest whose agent answers: its name, its
/// handle and its domain's name.
async fn running_db(g: &Guard, backend: &LibvirtBackend) -> (String, DynEnvironment, String) {
    let name = format!("p{}", g.tag);
    let spec = GuestImage::locate().production_spec_of(&name, &g.dir.join("disks"), &["db"]).expect("production spec");
    let prod = backend.create(&spec).await.unwrap();
    prod.start().await.unwrap();
    wait_all(&prod).await;
    let dom = format!("{name}-db");
    (name, prod, dom)
}

/// Starts [`child_process_helper`] on environment `env` of `g` with the fault point `fault`
/// armed and returns once it reached the point (panics if it does not within [`READY`]).
fn child_at(fault: &str, g: &Guard, env: &str) -> std::process::Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_process_helper", "--nocapture"])
        .env(CHILD_DIR, &g.dir)
        .env(CHILD_ENV, env)
        .env("STAGECORE_LIBVIRT_FAULT", fault)
        .stdout(Stdio::piped())
        .spawn()
        .expect("re-run the test binary");
    let stdout = child.stdout.take().unwrap();
    let line = format!("STAGECORE_LIBVIRT_FAULT {fault} reached");
    let reached = std::thread::spawn(move || {
        std::io::BufReader::new(stdout).lines().map_while(Result::ok).any(|l| l.contains(&line))
    });
    let deadline = std::time::Instant::now() + READY;
    while !reached.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if !(reached.is_finished() && reached.join().unwrap()) {
        let _ = child.kill();
        panic!("the child never reached the fault point {fault}");
    }
    child
}

/// A process killed between freeze and thaw leaves its guest frozen; the next open thaws it and
/// removes the marker; the guest then takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_killed_between_freeze_and_thaw_is_thawed_on_next_open() {
    let g = Guard::new("g3");
    let backend = g.backend().await;
    let (name, _prod, dom) = running_db(&g, &backend).await;

    let mut child = child_at("frozen", &g, &name);
    assert_eq!(freeze_status(&dom), r#"{"return":"frozen"}"#, "the child froze the guest");
    let marker = g.dir.join("frozen").join(format!("{dom}.json"));
    assert!(marker.exists(), "a durable marker names the frozen domain");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(freeze_status(&dom), r#"{"return":"frozen"}"#, "killing the process left the guest frozen");

    let again = g.backend().await.open(&name).await.expect("reopen");
    assert_eq!(freeze_status(&dom), r#"{"return":"thawed"}"#, "the next open thawed the guest");
    assert!(!marker.exists(), "the marker is gone once thawed");
    let out = again
        .guest()
        .unwrap()
        .exec(
            "db",
            &GuestExec::new(["/bin/sh", "-c", "echo ok > /root/after && sync && cat /root/after"])
                .timeout(Duration::from_secs(30)),
        )
        .await
        .expect("a write + sync works");
    assert_eq!(out.stdout_text().trim(), "ok");
    let info = virsh(&["domfsinfo", &dom]).join("\n");
    assert!(info.contains("vda") || info.contains('/'), "domfsinfo answers on a thawed guest: {info}");
    backend.destroy(&name).await.unwrap();
}

/// A process killed while it holds the domains suspended for the one-instant capture (guests
/// frozen, no layer made yet) leaves the domain paused; the next open resumes it (and thaws the
/// guest), removes both markers, the guest takes writes, and a new baseline works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_suspended_for_a_baseline_is_resumed_on_next_open() {
    let g = Guard::new("g4");
    let backend = g.backend().await;
    let (name, _prod, dom) = running_db(&g, &backend).await;

    let mut child = child_at("suspended", &g, &name);
    let suspended = g.dir.join("suspended").join(format!("{dom}.json"));
    assert!(suspended.exists(), "a durable marker names the suspended domain");
    assert!(g.dir.join("frozen").join(format!("{dom}.json")).exists(), "and the frozen guest");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(virsh(&["domstate", &dom]), ["paused"], "killing the process left the domain paused");

    let again = g.backend().await.open(&name).await.expect("reopen");
    assert_eq!(virsh(&["domstate", &dom]), ["running"], "the next open resumed the domain");
    assert_eq!(freeze_status(&dom), r#"{"return":"thawed"}"#, "and thawed the guest");
    assert!(!suspended.exists(), "the suspend marker is gone");
    assert!(std::fs::read_dir(g.dir.join("frozen")).map(|d| d.count()).unwrap_or(0) == 0, "no freeze marker left");
    let status = again.status().await.unwrap();
    assert!(status.iter().all(|s| s.power == PowerState::Running), "{status:?}");
    let out = sh(&again, "db", "echo after > /root/after && sync && cat /root/after").await;
    assert_eq!(out.stdout_text().trim(), "after");
    let baseline = again.take_baseline().await.expect("a baseline after the recovery");
    assert_eq!(baseline.consistency["db"].level, ConsistencyLevel::Application, "{:?}", baseline.consistency);
    backend.destroy(&name).await.unwrap();
}

/// The testkit's guest functions, one live test each, on productions of real guests made by
/// `stagecore_testkit::guest::guest_kit` in the guard's state directory.
macro_rules! guest_kit_tests {
    ($($name:ident => $f:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let g = Guard::new("gk");
            let backend: std::sync::Arc<dyn Backend> = std::sync::Arc::new(g.backend().await);
            let kit = stagecore_testkit::guest::guest_kit(backend, g.dir.join("disks"));
            stagecore_testkit::guest::$f(&kit).await;
        }
    )*};
}

guest_kit_tests! {
    guest_kit_exec_read_write_round_trip => exec_read_write_round_trip;
    guest_kit_guest_change_invisible_in_production => guest_change_invisible_in_production;
    guest_kit_snapshot_revert_restores_guest_file => snapshot_revert_restores_guest_file;
    guest_kit_replay_promotion_reaches_production => replay_promotion_reaches_production;
    guest_kit_failing_guest_command_rolls_back => failing_guest_command_rolls_back;
}

/// The testkit's guest-drift functions (all of `stagecore_testkit::guest_drift`), one live test
/// each, on productions of the real guests named (one, or two where the function needs them),
/// with the demo app's package and config file of the test image
/// ([`stagecore_testkit::guest_drift::GuestFixture::test_image`]).
macro_rules! guest_drift_tests {
    ($($name:ident => $f:ident on $machines:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let g = Guard::new("gd");
            let backend: std::sync::Arc<dyn Backend> = std::sync::Arc::new(g.backend().await);
            let kit = stagecore_testkit::guest::guest_kit_of(backend, g.dir.join("disks"), $machines);
            let fixture = stagecore_testkit::guest_drift::GuestFixture::test_image(&GuestImage::locate());
            stagecore_testkit::guest_drift::$f(&kit, &fixture).await;
        }
    )*};
}

guest_drift_tests! {
    guest_drift_zero_after_clone => zero_guest_drift_after_clone on &["app"];
    guest_drift_change_is_intended => guest_change_is_intended on &["app"];
    guest_drift_footprint_verify => footprint_verify on &["app"];
    guest_drift_gates_on_stage => gates_on_stage on &["app"];
    guest_drift_rebase_without_conflict => rebase_without_conflict on &["app", "db"];
    guest_drift_rebase_with_conflict => rebase_with_conflict on &["app"];
    guest_drift_production_untouched_by_inventory => production_untouched_by_inventory on &["app"];
}
