//! Bad input and faults against real QEMU (TCG): a missing binary or image, a corrupt qcow2
//! source, a QEMU killed while a snapshot has the environment paused, a full filesystem during a
//! full clone, two processes on one environment, a write through `qemu-io` that drift must not
//! miss, a live baseline that guests cannot notice, and fencing at the configuration level.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use stagecore::{Backend, Change, ChangeMap, Environment, Error, PowerState, StageOptions};
use stagecore_qemu::{FaultHooks, QemuBackend, QemuConfig};
use stagecore_testkit::{Kit, unique};
use support::{Fixture, files_under, qemu_img_check};

fn names(list: &[stagecore::EnvironmentInfo]) -> Vec<String> {
    list.iter().map(|i| i.name.clone()).collect()
}

#[tokio::test]
async fn a_missing_qemu_binary_is_named_and_a_missing_image_too() {
    let missing = "/nonexistent/bin/qemu-system-x86_64";
    let f = Fixture::with(|c| QemuConfig { binary: Some(missing.into()), ..c });
    let kit = Kit::new(f.backend.clone());
    let pname = unique("nobin");
    let prod = kit.production(&pname).await.expect("production (created stopped)");
    let err = prod.start().await.unwrap_err();
    assert!(err.to_string().contains(missing), "{err}");
    assert!(matches!(err, Error::NotFound { .. }), "{err}");

    let baseline = prod.take_baseline().await.unwrap();
    let sname = unique("nobin-stage");
    let opts = StageOptions { start: true, ..StageOptions::linked(&sname) };
    let err = f.backend.stage(&baseline, &opts).await.unwrap_err();
    assert!(err.to_string().contains(missing), "{err}");
    assert!(!names(&f.backend.list().await.unwrap()).contains(&sname), "a stage that failed to start is listed");
    assert!(!f.root().join("envs").join(&sname).exists(), "a stage that failed to start left files");

    let web = prod.spec().await.unwrap().machines[0].clone();
    let image = f.root().join("no-such-image.qcow2");
    let change = Change::ReplaceDiskImage {
        machine: web.name.clone(),
        disk: web.disks[0].name.clone(),
        image: image.display().to_string(),
    };
    let err = prod.apply(&change).await.unwrap_err();
    assert!(err.to_string().contains("no-such-image.qcow2"), "{err}");
}

#[tokio::test]
async fn a_corrupt_qcow2_source_is_typed_and_leaves_nothing() {
    let f = Fixture::new();
    let name = unique("corrupt");
    let mut spec = stagecore::memory::sample_spec(&name);
    let bad = f.root().join("images").join(&spec.machines[1].disks[0].source);
    std::fs::create_dir_all(bad.parent().unwrap()).unwrap();
    let mut garbage = b"QFI\xfb".to_vec();
    garbage.extend_from_slice(&[0xff; 200]);
    std::fs::write(&bad, &garbage).unwrap();
    let before = names(&f.backend.list().await.unwrap());
    let err = f.backend.create(&spec).await.unwrap_err();
    match &err {
        Error::InvalidSpec { path, reason } => {
            assert_eq!(path, "machines[1].disks[0].source", "{err}");
            assert!(reason.contains(&bad.display().to_string()), "the file is named: {err}");
        }
        other => panic!("expected InvalidSpec, got {other}"),
    }
    assert_eq!(names(&f.backend.list().await.unwrap()), before);
    assert!(!f.root().join("envs").join(&name).exists(), "the environment directory is gone");
    assert!(!f.root().join("images").join(&spec.machines[0].disks[0].source).exists(), "no image was created");
    assert_eq!(std::fs::read(&bad).unwrap(), garbage, "the caller's file is untouched");

    spec.machines[1].disks[0].source = "../escape.qcow2".into();
    let err = f.backend.create(&spec).await.unwrap_err();
    assert!(matches!(err, Error::InvalidSpec { ref path, .. } if path == "machines[1].disks[0].source"), "{err}");
}

#[tokio::test]
async fn qemu_killed_mid_snapshot_fails_keeps_chains_valid_and_reopens() {
    let victim: Arc<Mutex<Option<u32>>> = Arc::default();
    let v = victim.clone();
    let hooks = FaultHooks {
        after_pause: Some(Arc::new(move || {
            if let Some(pid) = v.lock().unwrap().take() {
                support::signal(pid, libc::SIGKILL);
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        })),
        ..FaultHooks::default()
    };
    let f = Fixture::with(|c| QemuConfig { hooks, ..c });
    let kit = Kit::new(f.backend.clone());
    let pname = unique("killed");
    let prod = kit.production(&pname).await.unwrap();
    prod.start().await.unwrap();
    let qenv = f.backend.open_qemu(&pname).await.unwrap();
    *victim.lock().unwrap() = Some(qenv.machine_pid("db").await.unwrap().expect("db runs"));

    let err = prod.create_snapshot("doomed").await.unwrap_err();
    eprintln!("snapshot with a killed QEMU: {err}");
    assert!(prod.list_snapshots().await.unwrap().is_empty(), "a failed snapshot is not listed");
    for m in ["web", "app", "db"] {
        qemu_img_check(&qenv.disk_top(m, "disk0").await.unwrap());
    }
    drop((prod, qenv, kit));
    let root = f.root().to_path_buf();
    let again = QemuBackend::new(QemuConfig::new(&root).with_accel(stagecore_qemu::Accel::Tcg));
    let prod = again.open(&pname).await.expect("environment reopens");
    let status = prod.status().await.unwrap();
    let db = status.iter().find(|s| s.machine == "db").unwrap();
    assert_eq!(db.power, PowerState::Unknown, "a killed QEMU is reported, not trusted: {status:?}");
    assert!(db.detail.as_deref().unwrap_or("").contains("stale"), "{status:?}");
    assert!(status.iter().filter(|s| s.machine != "db").all(|s| s.power == PowerState::Running), "{status:?}");
    prod.start().await.expect("the killed machine starts again");
    prod.create_snapshot("after").await.expect("snapshots work again");
    prod.stop().await.unwrap();
    let qenv = again.open_qemu(&pname).await.unwrap();
    for m in ["web", "app", "db"] {
        qemu_img_check(&qenv.disk_top(m, "disk0").await.unwrap());
    }
    drop((prod, qenv));
    again.destroy(&pname).await.unwrap();
}

/// Unmounts a tmpfs on drop.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_full_clone_onto_a_full_filesystem_fails_and_removes_partial_files() {
    let f = Fixture::new();
    let kit = Kit::new(f.backend.clone());
    let pname = unique("bigprod");
    let prod = kit.production(&pname).await.unwrap();
    let io = prod.disk_io().unwrap();
    io.write("web", "disk0", 4 << 20, &vec![0x5a; 3 << 20]).await.unwrap();
    let baseline = prod.take_baseline().await.unwrap();

    let small = tempfile::tempdir().unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(small.path())
        .status()
        .expect("mount could not run");
    assert!(ok.success(), "mounting a 2 MiB tmpfs needs root; this test requires it");
    let _mount = Mount(small.path().to_path_buf());
    let full = QemuBackend::new(QemuConfig::new(small.path()).with_accel(stagecore_qemu::Accel::Tcg));
    let sname = unique("nospace");
    let err = full.stage(&baseline, &StageOptions::full(&sname)).await.unwrap_err();
    eprintln!("full clone onto a full filesystem: {err}");
    assert!(full.list().await.unwrap().is_empty(), "a failed stage is listed");
    let left = files_under(small.path());
    assert!(left.is_empty(), "partial files left behind: {left:?}");
    let linked = full.stage(&baseline, &StageOptions::linked(&sname)).await.expect("a linked clone still fits");
    drop(linked);
    full.destroy(&sname).await.unwrap();
    drop(prod);
    f.backend.destroy(&pname).await.unwrap();
}

const CHILD_ROOT: &str = "STAGECORE_QEMU_CHILD_ROOT";
const CHILD_ENV: &str = "STAGECORE_QEMU_CHILD_ENV";
const CHILD_ACTION: &str = "STAGECORE_QEMU_CHILD_ACTION";

/// Not a test of its own: the child process of the multi-process tests below (it does nothing
/// unless one of them starts it with its environment variables). `hold`: open the environment
/// and hold it until stdin closes. `start`: create a production, start it, and exit.
#[tokio::test]
async fn child_process_helper() {
    let (Ok(root), Ok(env), Ok(action)) =
        (std::env::var(CHILD_ROOT), std::env::var(CHILD_ENV), std::env::var(CHILD_ACTION))
    else {
        return;
    };
    let backend = Arc::new(QemuBackend::new(QemuConfig::new(root).with_accel(stagecore_qemu::Accel::Tcg)));
    if action == "start" {
        let prod = Kit::new(backend.clone()).production(&env).await.expect("child creates production");
        prod.start().await.expect("child starts production");
        println!("STARTED");
        return;
    }
    let held = backend.open(&env).await.expect("child opens the environment");
    println!("HOLDING {}", std::process::id());
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(held);
}

fn child(root: &std::path::Path, env: &str, action: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_process_helper", "--nocapture"])
        .env(CHILD_ROOT, root)
        .env(CHILD_ENV, env)
        .env(CHILD_ACTION, action)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("re-run the test binary")
}

#[tokio::test]
async fn machines_outlive_the_process_that_started_them_and_are_reattached() {
    let f = Fixture::new();
    let name = unique("outlive");
    let out = child(f.root(), &name, "start").wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("STARTED"), "child failed: {text}");
    let prod = f.backend.open(&name).await.expect("reopen after the creating process exited");
    let status = prod.status().await.unwrap();
    assert_eq!(status.len(), 3);
    assert!(status.iter().all(|s| s.power == PowerState::Running), "{status:?}");
    let baseline = prod.take_baseline().await.expect("a live baseline over reattached QMP sessions");
    assert_eq!(baseline.layers.len(), 3);
    prod.stop().await.unwrap();
    assert!(prod.status().await.unwrap().iter().all(|s| s.power == PowerState::Stopped));
    drop(prod);
    f.backend.destroy(&name).await.unwrap();
}

#[tokio::test]
async fn two_processes_on_one_environment_one_is_locked() {
    let f = Fixture::new();
    let name = unique("locked");
    drop(Kit::new(f.backend.clone()).production(&name).await.unwrap());
    let mut child = child(f.root(), &name, "hold");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let pid = loop {
        let line = lines.next().expect("child holds the lock").unwrap();
        if let Some(pid) = line.strip_prefix("HOLDING ") {
            break pid.trim().to_string();
        }
    };
    let err = f.backend.open(&name).await.unwrap_err();
    match &err {
        Error::Locked { resource, holder } => {
            assert!(resource.contains(&name) && holder.contains(&pid), "{err}");
        }
        other => panic!("expected Locked, got {other}"),
    }
    assert!(matches!(f.backend.destroy(&name).await, Err(Error::Locked { .. })), "destroy is refused too");
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    f.backend.open(&name).await.expect("the lock is free once the holder exits");
    f.backend.destroy(&name).await.unwrap();
}

#[tokio::test]
async fn a_write_through_qemu_io_while_running_shows_in_disk_changes() {
    let f = Fixture::new();
    let kit = Kit::new(f.backend.clone());
    let pname = unique("qemuio");
    let prod = kit.production(&pname).await.unwrap();
    prod.start().await.unwrap();
    let baseline = prod.take_baseline().await.unwrap();
    let qenv = f.backend.open_qemu(&pname).await.unwrap();
    // Straight into QEMU, not through the backend's write path (which flushes by itself).
    let out = qenv
        .human_monitor_command(
            "app",
            r#"qemu-io -d /machine/peripheral/d0/virtio-backend "write -P 0x5a 3145728 4096""#,
        )
        .await
        .unwrap();
    assert!(!out.contains("rror"), "{out}");
    let changes = prod.disk_changes(&baseline).await.unwrap();
    let app = changes.iter().find(|c| c.machine == "app").unwrap();
    match &app.changes {
        ChangeMap::Checked { extents } => {
            assert!(extents.iter().any(|e| e.offset <= 3 << 20 && e.end() >= (3 << 20) + 4096), "{extents:?}");
        }
        other => panic!("{other:?}"),
    }
    for c in changes.iter().filter(|c| c.machine != "app") {
        assert_eq!(c.changes, ChangeMap::Checked { extents: vec![] }, "{c:?}");
    }
    assert_eq!(prod.disk_io().unwrap().read("app", "disk0", 3 << 20, 4).await.unwrap(), [0x5a; 4]);
    drop((prod, qenv));
    f.backend.destroy(&pname).await.unwrap();
}

#[tokio::test]
async fn a_baseline_of_running_production_leaves_guest_content_unchanged() {
    let f = Fixture::new();
    let kit = Kit::new(f.backend.clone());
    let pname = unique("live-bl");
    let prod = kit.production(&pname).await.unwrap();
    prod.start().await.unwrap();
    let io = prod.disk_io().unwrap();
    io.write("db", "disk0", (5 << 20) + 3, b"written while running").await.unwrap();
    assert_eq!(io.read("db", "disk0", (5 << 20) + 3, 21).await.unwrap(), b"written while running");
    let err = io.write("db", "disk0", (64 << 20) - 2, b"beyond").await.unwrap_err();
    assert!(matches!(err, Error::InvalidSpec { .. }), "{err}");
    let qenv = f.backend.open_qemu(&pname).await.unwrap();
    let mut before = Vec::new();
    for m in ["web", "app", "db"] {
        before.push((io.digest(m, "disk0").await.unwrap(), qenv.disk_top(m, "disk0").await.unwrap()));
    }
    let baseline = prod.take_baseline().await.unwrap();
    for (m, (digest, old_top)) in ["web", "app", "db"].iter().zip(&before) {
        let top = qenv.disk_top(m, "disk0").await.unwrap();
        assert_ne!(&top, old_top, "{m}: the baseline put a new layer on top");
        assert_eq!(baseline.layer(m, "disk0").unwrap().layer, old_top.display().to_string());
        let chain = stagecore_qcow2::chain(&top).unwrap();
        assert_eq!(chain[1].path, *old_top, "{m}: the old top is the layer right below");
        assert_eq!(&io.digest(m, "disk0").await.unwrap(), digest, "{m}: guest-visible content changed");
    }
    let status = prod.status().await.unwrap();
    assert!(status.iter().all(|s| s.power == PowerState::Running), "machines resumed: {status:?}");
    drop((prod, qenv));
    f.backend.destroy(&pname).await.unwrap();
}

fn netdevs(argv: &[std::ffi::OsString]) -> Vec<String> {
    argv.windows(2).filter(|w| w[0] == "-netdev").map(|w| w[1].to_string_lossy().into_owned()).collect()
}

#[tokio::test]
async fn fenced_nics_have_no_host_path_and_a_segment_of_their_own() {
    let f = Fixture::new();
    let kit = Kit::new(f.backend.clone());
    let (pname, fenced, open) = (unique("fence-p"), unique("fence-s"), unique("fence-o"));
    let prod = kit.production(&pname).await.unwrap();
    let baseline = prod.take_baseline().await.unwrap();
    f.backend.stage(&baseline, &StageOptions::linked(&fenced)).await.unwrap();
    f.backend.stage(&baseline, &StageOptions { fenced: false, ..StageOptions::linked(&open) }).await.unwrap();
    let argv = |env: String| {
        let b = f.backend.clone();
        async move { netdevs(&b.open_qemu(&env).await.unwrap().machine_argv("web").await.unwrap()) }
    };
    let (p, s, o) = (argv(pname.clone()).await, argv(fenced.clone()).await, argv(open.clone()).await);
    assert_eq!(p.len(), 2, "web has two NICs: {p:?}");
    for nd in p.iter().chain(&s).chain(&o) {
        assert!(nd.starts_with("socket,") && nd.contains("localaddr=127.0.0.1"), "{nd}");
        assert!(!nd.contains("user") && !nd.contains("tap") && !nd.contains("bridge"), "{nd}");
    }
    for (pn, sn) in p.iter().zip(&s) {
        assert_ne!(pn, sn, "a fenced stage's segment differs from production's");
    }
    assert_eq!(p, o, "an unfenced stage joins production's segments");
    assert_ne!(s[0], s[1], "two networks are two segments");
    for name in [&fenced, &open, &pname] {
        f.backend.destroy(name).await.unwrap();
    }
}

#[tokio::test]
async fn a_half_built_environment_left_by_a_crash_is_replaced_but_a_real_one_is_not() {
    let f = Fixture::new();
    let name = unique("crashed");
    let dir = f.root().join("envs").join(&name);
    std::fs::create_dir_all(dir.join("disks")).unwrap();
    std::fs::write(dir.join("disks").join("web.disk0.1.qcow2"), b"partial").unwrap();
    assert!(matches!(f.backend.open(&name).await, Err(Error::NotFound { .. })), "no record, no environment");
    let prod = Kit::new(f.backend.clone()).production(&name).await.expect("the leftover is replaced");
    assert!(!dir.join("disks").join("web.disk0.1.qcow2").exists());
    let err = f.backend.create(&stagecore::memory::sample_spec(&name)).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
    assert!(dir.join("env.json").exists(), "a failed create never removes an existing environment");
    drop(prod);
    f.backend.destroy(&name).await.unwrap();
}

/// A stage whose process dies after its overlays were made durable (in one batch) but before
/// its record was saved: the files are there, no environment is (open, list), and the next
/// stage of that name replaces them.
#[tokio::test]
async fn a_stage_killed_before_its_record_leaves_files_no_open_shows_and_a_restage_removes() {
    let f = Fixture::with(|mut c| {
        c.hooks = FaultHooks { crash_at: Some(Arc::new(|p: &str| p == "stage:synced")), ..FaultHooks::default() };
        c
    });
    let (pname, sname) = (unique("batchprod"), unique("batchstage"));
    let prod = Kit::new(f.backend.clone()).production(&pname).await.unwrap();
    let baseline = prod.take_baseline().await.unwrap();
    let err = f.backend.stage(&baseline, &StageOptions::linked(&sname)).await.unwrap_err();
    assert!(err.to_string().contains("stage:synced"), "{err}");
    let dir = f.root().join("envs").join(&sname);
    assert!(!dir.join("env.json").exists(), "no record was published");
    let left: Vec<_> = files_under(&dir.join("disks"));
    assert_eq!(left.len(), baseline.layers.len(), "one durable overlay per disk was left: {left:?}");
    for file in &left {
        qemu_img_check(file);
    }
    // Inode numbers are reused at once on ext4: a marker tells the leftover directory apart.
    let marker = dir.join("disks").join("leftover.marker");
    std::fs::write(&marker, b"from the dead process").unwrap();

    let again = Arc::new(QemuBackend::new(QemuConfig::new(f.root()).with_accel(stagecore_qemu::Accel::Tcg)));
    assert!(matches!(again.open(&sname).await, Err(Error::NotFound { .. })), "no record, no environment");
    assert!(!names(&again.list().await.unwrap()).contains(&sname), "list shows no half-built stage");
    let stage = again.stage(&baseline, &StageOptions::linked(&sname)).await.expect("the leftover is replaced");
    assert!(!marker.exists(), "the leftover directory was removed, not reused");
    let now = files_under(&dir.join("disks"));
    assert_eq!(now.len(), baseline.layers.len(), "{now:?}");
    assert!(dir.join("env.json").exists());
    drop(stage);
    drop(prod);
    again.destroy(&sname).await.unwrap();
    again.destroy(&pname).await.unwrap();
}

/// Drift reads every disk in one pass: a disk whose top cannot be read is NOT_CHECKED alone,
/// with a reason naming it, and the others are still checked.
#[tokio::test]
async fn an_unreadable_top_is_not_checked_alone_in_disk_changes() {
    let f = Fixture::new();
    let (pname, sname) = (unique("unreadprod"), unique("unreadstage"));
    let prod = Kit::new(f.backend.clone()).production(&pname).await.unwrap();
    let baseline = prod.take_baseline().await.unwrap();
    f.backend.stage(&baseline, &StageOptions::linked(&sname)).await.unwrap();
    let stage = f.backend.open_qemu(&sname).await.unwrap();
    let bad = &baseline.layers[0];
    let top = stage.disk_top(&bad.machine, &bad.disk).await.unwrap();
    std::fs::write(&top, b"no longer a qcow2 image").unwrap();
    let changes = stage.disk_changes(&baseline).await.unwrap();
    assert_eq!(changes.len(), baseline.layers.len());
    for c in &changes {
        if (c.machine.as_str(), c.disk.as_str()) == (bad.machine.as_str(), bad.disk.as_str()) {
            let ChangeMap::NotChecked { reason } = &c.changes else { panic!("{c:?}") };
            assert!(reason.contains(&format!("{}/{}", bad.machine, bad.disk)), "{reason}");
        } else {
            assert!(matches!(&c.changes, ChangeMap::Checked { extents } if extents.is_empty()), "{c:?}");
            assert!(c.virtual_size > 0 && c.granularity == 65536, "{c:?}");
        }
    }
    drop(stage);
    drop(prod);
    f.backend.destroy(&sname).await.unwrap();
    f.backend.destroy(&pname).await.unwrap();
}

#[tokio::test]
async fn a_production_on_existing_images_uses_them_and_destroy_keeps_them() {
    let f = Fixture::new();
    let name = unique("existing");
    let mut spec = stagecore::memory::sample_spec(&name);
    spec.machines.truncate(1);
    let image = f.root().join("caller").join("web.qcow2");
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    let path = image.to_str().unwrap();
    let (ok, out) = support::run("qemu-img", &["create", "-q", "-f", "qcow2", path, "32M"]);
    assert!(ok, "{out}");
    let (ok, out) = support::run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x42 1M 64k", path]);
    assert!(ok, "{out}");
    spec.machines[0].disks[0].source = path.to_string();
    spec.machines[0].disks[0].size_bytes = None;
    let prod = f.backend.create(&spec).await.expect("production on an existing image");
    let io = prod.disk_io().unwrap();
    assert_eq!(io.read("web", "disk0", 1 << 20, 4).await.unwrap(), [0x42; 4]);
    let baseline = prod.take_baseline().await.unwrap();
    assert_eq!(baseline.layers[0].layer, path, "the caller's image becomes the baseline layer");
    io.write("web", "disk0", 0, b"after the baseline").await.unwrap();
    drop(prod);
    f.backend.destroy(&name).await.unwrap();
    assert!(image.exists(), "destroy keeps an image the backend did not create");
    support::qemu_img_check(&image);
    let (_, map) = support::run("qemu-io", &["-f", "qcow2", "-r", "-c", "read -P 0 0 64k", path]);
    assert!(!map.contains("Pattern verification failed"), "production wrote into the frozen layer: {map}");
}

#[tokio::test]
async fn deleting_snapshots_removes_only_layers_no_chain_needs() {
    let f = Fixture::new();
    let kit = Kit::new(f.backend.clone());
    let (pname, sname) = (unique("gc-prod"), unique("gc-stage"));
    let prod = kit.production(&pname).await.unwrap();
    let baseline = prod.take_baseline().await.unwrap();
    let stage = f.backend.stage(&baseline, &StageOptions::linked(&sname)).await.unwrap();
    let io = stage.disk_io().unwrap();
    let disks = f.root().join("envs").join(&sname).join("disks");
    let count = || std::fs::read_dir(&disks).unwrap().count();
    io.write("web", "disk0", 0, b"one").await.unwrap();
    stage.create_snapshot("s1").await.unwrap();
    let at_s1 = io.digest("web", "disk0").await.unwrap();
    io.write("web", "disk0", 0, b"two").await.unwrap();
    stage.create_snapshot("s2").await.unwrap();
    io.write("web", "disk0", 0, b"three").await.unwrap();
    let before = count();
    stage.revert_snapshot("s1").await.unwrap();
    assert_eq!(count(), before, "the abandoned tops went, one fresh overlay per disk came");
    stage.delete_snapshot("s2").await.unwrap();
    assert!(count() < before, "s2's layers are in no chain any more and are removed");
    assert_eq!(io.digest("web", "disk0").await.unwrap(), at_s1);
    stage.delete_snapshot("s1").await.unwrap();
    assert_eq!(io.digest("web", "disk0").await.unwrap(), at_s1, "s1's layers are still in the chain");
    let qenv = f.backend.open_qemu(&sname).await.unwrap();
    for m in ["web", "app", "db"] {
        qemu_img_check(&qenv.disk_top(m, "disk0").await.unwrap());
    }
    let changes = stage.disk_changes(&baseline).await.unwrap();
    assert!(changes.iter().all(|c| matches!(c.changes, ChangeMap::Checked { .. })), "{changes:?}");
    drop((stage, qenv, prod));
    f.backend.destroy(&sname).await.unwrap();
    f.backend.destroy(&pname).await.unwrap();
}
