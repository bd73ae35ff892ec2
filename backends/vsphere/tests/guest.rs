//! The vSphere guest channel (Automation API guest operations) against the simulator's simulated
//! guests: processes (create, list, get), file transfers both ways, exec with captured output,
//! guest credentials kept secret, wrong credentials → `Unauthenticated`, and the testkit's
//! guest-drift functions (with `dpkg -i` of demo packages) and the generic guest kit functions on
//! the simulator's simulated guests (`stagecore::sim_guest`).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use stagecore::sim_guest::demo_deb;
use stagecore::{Backend, Change, Error, GuestExec, Secret, Selector, StageOptions};
use stagecore_testkit::guest;
use stagecore_testkit::guest_drift::{self, GuestFixture};
use stagecore_testkit::{Kit, ProductionFactory};
use stagecore_vsphere::{GuestCredentials, VsphereBackend, VsphereOptions};
use stagecore_vsphere_sim::{SIM_GUEST_PASSWORD, SIM_GUEST_USER, SimGuest, Simulator};

struct Fixture {
    sim: Arc<Simulator>,
    backend: Arc<VsphereBackend>,
    _dir: tempfile::TempDir,
}

async fn fixture(password: &str) -> Fixture {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = VsphereOptions::new(dir.path());
    opts.isolated_network = Some("isolated-pg".into());
    opts.folder = Some("stage".into());
    opts.guest_credentials =
        Some(GuestCredentials { username: SIM_GUEST_USER.into(), password: Secret::new(password) });
    let backend = Arc::new(VsphereBackend::connect(config(sim.http_url()), opts).await.unwrap());
    Fixture { sim: Arc::new(sim), backend, _dir: dir }
}

async fn attach_app(f: &Fixture, env: &str) -> stagecore::DynEnvironment {
    let names = vec!["app".to_string()];
    f.backend.attach(&Selector::Machines { environment: env.into(), names }).await.unwrap()
}

fn no_temp_files_left(sim: &Simulator, vm: &str) {
    let g = sim.guest(vm).unwrap();
    let left: Vec<&String> = g.files.keys().filter(|p| p.starts_with("/tmp/.stagecore-")).collect();
    assert!(left.is_empty(), "temporary files left in the guest: {left:?}");
}

#[tokio::test]
async fn exec_captures_output_exit_code_stdin_and_environment() {
    let f = fixture(SIM_GUEST_PASSWORD).await;
    assert!(f.backend.capabilities().guest_channel);
    let prod = attach_app(&f, "prod").await;
    let guest = prod.guest().expect("a guest channel with credentials");
    guest.wait_ready("app", Duration::from_secs(5)).await.unwrap();
    let out = guest.exec("app", &GuestExec::new(["echo", "hello it's me"])).await.unwrap();
    assert_eq!((out.exit_code, out.stdout_text()), (0, "hello it's me\n".to_string()));
    let out = guest.exec("app", &GuestExec::new(["cat"]).stdin(b"from stdin".to_vec())).await.unwrap();
    assert_eq!(out.stdout, b"from stdin");
    let out = guest.exec("app", &GuestExec::new(["env"]).env("GREETING", "hi there")).await.unwrap();
    assert!(out.stdout_text().contains("GREETING=hi there"), "{out:?}");
    let out = guest.exec("app", &GuestExec::new(["no-such-program"])).await.unwrap();
    assert_eq!(out.exit_code, 127);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"), "{out:?}");
    let out = guest.exec("app", &GuestExec::new(["cat", "/etc/app/app.conf"])).await.unwrap();
    assert_eq!(out.stdout, b"port=8080\ngreeting=hello\n");
    let e = guest.exec("app", &GuestExec::new(Vec::<String>::new())).await.unwrap_err();
    assert!(matches!(e, Error::InvalidSpec { .. }), "{e:?}");
    no_temp_files_left(&f.sim, "vm-103");
    f.backend.destroy("prod").await.unwrap();
    assert_no_violations(&f.sim);
}

#[tokio::test]
async fn processes_create_list_get() {
    let f = fixture(SIM_GUEST_PASSWORD).await;
    let client = f.backend.client();
    let pw = Secret::new(SIM_GUEST_PASSWORD);
    let env = Default::default();
    let long = client.guest_process_create("vm-103", SIM_GUEST_USER, &pw, "/bin/sleep", "30", &env).await.unwrap();
    let short =
        client.guest_process_create("vm-103", SIM_GUEST_USER, &pw, "/bin/sh", "-c 'exit 3'", &env).await.unwrap();
    let list = client.guest_process_list("vm-103", SIM_GUEST_USER, &pw).await.unwrap();
    assert!(list.iter().any(|p| p.pid == long && p.name == "sleep"), "{list:?}");
    assert!(!list.iter().any(|p| p.pid == short), "a finished process is not listed: {list:?}");
    let p = client.guest_process_get("vm-103", SIM_GUEST_USER, &pw, long).await.unwrap();
    assert_eq!(p.exit_code, None, "still running: {p:?}");
    let p = client.guest_process_get("vm-103", SIM_GUEST_USER, &pw, short).await.unwrap();
    assert_eq!(p.exit_code, Some(3));
    let e = client.guest_process_get("vm-103", SIM_GUEST_USER, &pw, 999_999).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    // A powered-off VM has no running VMware Tools: typed, temporary.
    client.power_off("vm-102").await.unwrap();
    let e = client.guest_process_list("vm-102", SIM_GUEST_USER, &pw).await.unwrap_err();
    assert!(e.is_temporary(), "{e:?}");
    assert_no_violations(&f.sim);
}

#[tokio::test]
async fn file_transfers_both_ways_with_mode() {
    let f = fixture(SIM_GUEST_PASSWORD).await;
    let prod = attach_app(&f, "prod").await;
    let guest = prod.guest().unwrap();
    let data: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    guest.write_file("app", "/srv/blob.bin", &data, Some(0o640)).await.unwrap();
    assert_eq!(f.sim.guest("vm-103").unwrap().files["/srv/blob.bin"], (data.clone(), 0o640));
    assert_eq!(guest.read_file("app", "/srv/blob.bin").await.unwrap(), data);
    guest.write_file("app", "/srv/blob.bin", b"v2", None).await.unwrap();
    assert_eq!(f.sim.guest("vm-103").unwrap().files["/srv/blob.bin"], (b"v2".to_vec(), 0o640), "mode kept");
    let e = guest.read_file("app", "/srv/absent").await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    let e = guest.write_file("app", "relative/path", b"x", None).await.unwrap_err();
    assert!(matches!(e, Error::InvalidSpec { .. }), "{e:?}");
    f.backend.destroy("prod").await.unwrap();
    assert_no_violations(&f.sim);
}

#[tokio::test]
async fn wrong_guest_credentials_are_unauthenticated_and_never_shown() {
    let f = fixture("Wr0ng-Guest-Pw").await;
    let prod = attach_app(&f, "prod").await;
    let guest = prod.guest().unwrap();
    let e = guest.exec("app", &GuestExec::new(["true"])).await.unwrap_err();
    assert!(matches!(e, Error::Unauthenticated { .. }), "{e:?}");
    let e2 = guest.read_file("app", "/etc/hostname").await.unwrap_err();
    assert!(matches!(e2, Error::Unauthenticated { .. }), "{e2:?}");
    let shown = format!("{e} {e:?} {e2} {e2:?} {:?} {prod:?}", f.backend);
    assert!(!shown.contains("Wr0ng-Guest-Pw"), "{shown}");
    assert!(format!("{:?}", f.backend).contains("Secret(***)"));
    f.backend.destroy("prod").await.unwrap();
    assert_no_violations(&f.sim);
}

#[tokio::test]
async fn guest_change_on_a_stage_stays_there_and_revert_restores_it() {
    let f = fixture(SIM_GUEST_PASSWORD).await;
    let prod = attach_app(&f, "prod").await;
    let baseline = prod.take_baseline().await.unwrap();
    let stage = f.backend.stage(&baseline, &StageOptions::linked("s1")).await.unwrap();
    let stage_vm = f.sim.vm_by_name(&stage.info().await.unwrap().machines[0].instance_name).unwrap().id;
    f.backend.client().power_on(&stage_vm).await.unwrap();
    stage.create_snapshot("before").await.unwrap();
    let change = Change::GuestFile {
        machine: "app".into(),
        path: "/etc/app/app.conf".into(),
        content: b"port=9090\n".to_vec(),
        mode: None,
    };
    stage.apply(&change).await.unwrap();
    let guest = stage.guest().unwrap();
    assert_eq!(guest.read_file("app", "/etc/app/app.conf").await.unwrap(), b"port=9090\n");
    assert_eq!(
        f.sim.guest("vm-103").unwrap().files["/etc/app/app.conf"].0,
        b"port=8080\ngreeting=hello\n",
        "production untouched"
    );
    let cmd = Change::GuestCommand { machine: "app".into(), command: vec!["false".into()], timeout_secs: None };
    let e = stage.apply(&cmd).await.unwrap_err();
    assert!(matches!(e, Error::GuestCommand { exit_code: 1, .. }), "{e:?}");
    stage.revert_snapshot("before").await.unwrap();
    assert_eq!(guest.read_file("app", "/etc/app/app.conf").await.unwrap(), b"port=8080\ngreeting=hello\n");
    f.backend.destroy("s1").await.unwrap();
    f.backend.destroy("prod").await.unwrap();
    assert_no_violations(&f.sim);
}

/// Productions attach the `app` VM; its guest starts fresh each time (attached VMs outlive their
/// environments, unlike the memory backend's machines).
fn kit(f: &Fixture) -> Kit {
    let b = f.backend.clone();
    let sim = f.sim.clone();
    let factory: ProductionFactory = Arc::new(move |name: String| {
        let b = b.clone();
        sim.with_guest("vm-103", |g| *g = SimGuest::new("app"));
        Box::pin(async move {
            let names = vec!["app".to_string()];
            b.attach(&Selector::Machines { environment: name, names }).await
        })
    });
    Kit::with_factory(f.backend.clone(), factory)
}

async fn finish(f: &Fixture) {
    assert_no_violations(&f.sim);
    let left = f.backend.client().list_vms(&[], &["group-v11"]).await.unwrap();
    assert!(left.is_empty(), "stage VMs left behind: {left:?}");
    assert!(f.sim.vm("vm-103").unwrap().root_snapshots.is_empty(), "snapshots left on app");
}

/// The fixture of the project's test image (`GuestFixture::test_image`), with demo packages the
/// simulated guest's `dpkg` reads (uncompressed members; the image's own are xz-compressed): the
/// demo app's 1.1 build at `/root/upgrade.deb` and its 1.0 build at `/root/other.deb`, written by
/// `printf` with octal escapes, `dpkg -i` upgrades, `cp` swaps in the other build.
fn deb_fixture() -> GuestFixture {
    let put = |version: &str, path: &str| {
        let escaped: String = demo_deb(version).iter().map(|b| format!("\\{b:03o}")).collect();
        vec!["/bin/sh".to_string(), "-c".into(), format!("printf '{escaped}' > {path}")]
    };
    let argv = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    GuestFixture {
        prepare: vec![put("1.1", "/root/upgrade.deb"), put("1.0", "/root/other.deb")],
        upgrade: argv(&["dpkg", "-i", "/root/upgrade.deb"]),
        skew: argv(&["cp", "/root/other.deb", "/root/upgrade.deb"]),
        ..GuestFixture::simulated()
    }
}

#[tokio::test]
async fn kit_zero_guest_drift_after_clone() {
    let f = fixture(SIM_GUEST_PASSWORD).await;
    guest_drift::zero_guest_drift_after_clone(&kit(&f), &deb_fixture()).await;
    finish(&f).await;
}

#[tokio::test]
async fn kit_guest_change_is_intended() {
    let f = fixture(SIM_GUEST_PASSWORD).await;
    guest_drift::guest_change_is_intended(&kit(&f), &deb_fixture()).await;
    finish(&f).await;
}

#[tokio::test]
async fn kit_guest_change_is_intended_with_stagecore_sim_commands() {
    let f = fixture(SIM_GUEST_PASSWORD).await;
    guest_drift::guest_change_is_intended(&kit(&f), &GuestFixture::simulated()).await;
    finish(&f).await;
}

#[tokio::test]
async fn kit_footprint_verify() {
    let f = fixture(SIM_GUEST_PASSWORD).await;
    guest_drift::footprint_verify(&kit(&f), &deb_fixture()).await;
    finish(&f).await;
}

#[tokio::test]
async fn kit_gates_on_stage() {
    let f = fixture(SIM_GUEST_PASSWORD).await;
    guest_drift::gates_on_stage(&kit(&f), &deb_fixture()).await;
    finish(&f).await;
}

// Not run: `production_untouched_by_inventory` needs `disk_io`, `rebase_without_conflict` and
// `rebase_with_conflict` need `config_changes`; vSphere declares neither capability.

/// The generic guest kit (`stagecore_testkit::guest`, written for the Debian test image) on
/// productions of `app` and `db`, each guest fresh.
fn guest_kit(f: &Fixture) -> Kit {
    let b = f.backend.clone();
    let sim = f.sim.clone();
    let factory: ProductionFactory = Arc::new(move |name: String| {
        let b = b.clone();
        sim.with_guest("vm-103", |g| *g = SimGuest::new("app"));
        sim.with_guest("vm-102", |g| *g = SimGuest::new("db"));
        Box::pin(async move {
            let names = vec!["app".to_string(), "db".to_string()];
            b.attach(&Selector::Machines { environment: name, names }).await
        })
    });
    Kit::with_factory(f.backend.clone(), factory)
}

async fn guest_finish(f: &Fixture) {
    finish(f).await;
    assert!(f.sim.vm("vm-102").unwrap().root_snapshots.is_empty(), "snapshots left on db");
    assert!(f.backend.list().await.unwrap().is_empty(), "environments left in the registry");
}

#[tokio::test]
async fn guest_kit_exec_read_write_round_trip() {
    let f = fixture(SIM_GUEST_PASSWORD).await;
    guest::exec_read_write_round_trip(&guest_kit(&f)).await;
    no_temp_files_left(&f.sim, "vm-103");
    guest_finish(&f).await;
}

#[tokio::test]
async fn guest_kit_guest_change_invisible_in_production() {
    let f = fixture(SIM_GUEST_PASSWORD).await;
    guest::guest_change_invisible_in_production(&guest_kit(&f)).await;
    guest_finish(&f).await;
}

#[tokio::test]
async fn guest_kit_snapshot_revert_restores_guest_file() {
    let f = fixture(SIM_GUEST_PASSWORD).await;
    guest::snapshot_revert_restores_guest_file(&guest_kit(&f)).await;
    guest_finish(&f).await;
}

#[tokio::test]
async fn guest_kit_replay_promotion_reaches_production() {
    let f = fixture(SIM_GUEST_PASSWORD).await;
    guest::replay_promotion_reaches_production(&guest_kit(&f)).await;
    guest_finish(&f).await;
}

#[tokio::test]
async fn guest_kit_failing_guest_command_rolls_back() {
    let f = fixture(SIM_GUEST_PASSWORD).await;
    guest::failing_guest_command_rolls_back(&guest_kit(&f)).await;
    guest_finish(&f).await;
}
