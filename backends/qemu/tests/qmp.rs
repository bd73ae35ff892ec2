//! Real QEMU 7.2 (TCG, no guest OS: the VM sits in SeaBIOS) driven over QMP: negotiation, run
//! state and events, an atomic two-disk snapshot transaction checked with `qemu-img`, writes
//! through `qemu-io`, typed error replies, concurrent calls, a killed QEMU, stale state, and
//! startup failures. Every test owns a temp dir and kills its QEMU in a drop guard.

mod common;

use std::time::{Duration, Instant};

use common::{Vm, file, path_str, run, signal, start};
use serde_json::{Value, json};
use stagecore::Error;
use stagecore_qemu::cmdline::fmt_node;
use stagecore_qemu::process::{Launcher, ProcessState, QemuPaths, QemuProcess, inspect};
use stagecore_qemu::qmp::{
    BlockDirtyBitmapAdd, BlockdevSnapshotSync, ErrorClass, NewImageMode, QmpClient, RunState, TransactionAction,
    command_error,
};

const EVENT_WAIT: Duration = Duration::from_secs(10);

/// The active node name of each disk device, by qdev id.
async fn active_nodes(qmp: &QmpClient) -> Vec<(String, String)> {
    let mut nodes: Vec<_> = qmp
        .query_block()
        .await
        .unwrap()
        .into_iter()
        .filter_map(|b| Some((b.device_id()?.to_string(), b.inserted?.node_name?)))
        .collect();
    nodes.sort();
    nodes
}

/// Runs a qemu-io command on a disk device of the running VM through HMP. QEMU 7.2 prints
/// qemu-io's output to its stdout (our log), so success is checked there.
async fn qemu_io(vm: &Vm, qdev_id: &str, command: &str) {
    let qmp = &vm.launched.qmp;
    let blocks = qmp.query_block().await.unwrap();
    let block = blocks.iter().find(|b| b.device_id() == Some(qdev_id)).expect("device in query-block");
    let qdev = block.qdev.as_deref().unwrap();
    let out = qmp.human_monitor_command(&format!(r#"qemu-io -d {qdev} "{command}""#)).await.unwrap();
    assert!(!out.contains("rror"), "qemu-io {command}: {out}");
    let log = std::fs::read_to_string(&vm.config.log).unwrap();
    assert!(log.contains("wrote "), "qemu-io output missing from the log: {log}");
}

#[tokio::test]
async fn negotiates_and_reports_status_stop_cont_with_events() {
    let vm = start(1).await;
    let qmp = &vm.launched.qmp;
    assert_eq!(qmp.version().major, 7, "tests expect QEMU 7.x, got {}", qmp.version());
    let status = qmp.query_status().await.unwrap();
    assert!(status.running);
    assert_eq!(status.status, RunState::Running);

    let mut events = qmp.subscribe();
    qmp.stop().await.unwrap();
    let stop = qmp.wait_for_event(&mut events, "STOP", EVENT_WAIT).await.unwrap();
    assert!(stop.timestamp.is_some());
    assert_eq!(qmp.query_status().await.unwrap().status, RunState::Paused);
    qmp.cont().await.unwrap();
    qmp.wait_for_event(&mut events, "RESUME", EVENT_WAIT).await.unwrap();
    assert!(qmp.query_status().await.unwrap().running);

    vm.launched.process.shutdown(qmp, Duration::from_secs(10)).await.unwrap();
    assert!(!vm.launched.process.is_alive());
    assert!(!vm.config.pidfile.exists() && !vm.config.qmp_socket.exists());
    assert!(matches!(qmp.query_status().await, Err(Error::Unreachable { .. })));
}

#[tokio::test]
async fn qemu_runs_in_its_own_session() {
    let vm = start(0).await;
    // SAFETY: getsid(2) has no memory-safety preconditions.
    let (ours, theirs) = unsafe { (libc::getsid(0), libc::getsid(vm.launched.process.pid() as libc::pid_t)) };
    assert_eq!(theirs, vm.launched.process.pid() as libc::pid_t, "qemu is its own session leader");
    assert_ne!(ours, theirs);
}

#[tokio::test]
async fn transaction_snapshots_both_disks_atomically_and_qemu_io_writes_to_the_overlay() {
    let vm = start(2).await;
    let qmp = &vm.launched.qmp;
    let (base0, base1) = (vm.config.disks[0].path.clone(), vm.config.disks[1].path.clone());
    let (over0, over1) = (file(&vm, "disk0.snap1.qcow2"), file(&vm, "disk1.snap1.qcow2"));
    // disk0: an overlay created beforehand (mode existing); disk1: created by QEMU (absolute-paths).
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", path_str(&base0), path_str(&over0)]);
    let snaps = [
        BlockdevSnapshotSync::qcow2_on_node(
            &fmt_node("disk0"),
            path_str(&over0),
            "disk0-snap1",
            NewImageMode::Existing,
        ),
        BlockdevSnapshotSync::qcow2_on_node(
            &fmt_node("disk1"),
            path_str(&over1),
            "disk1-snap1",
            NewImageMode::AbsolutePaths,
        ),
    ];
    qmp.stop().await.unwrap();
    let t = Instant::now();
    qmp.snapshot_disks(&snaps).await.unwrap();
    eprintln!("transaction of 2 x blockdev-snapshot-sync: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    qmp.cont().await.unwrap();

    let nodes = active_nodes(qmp).await;
    assert_eq!(nodes, [("disk0".into(), "disk0-snap1".into()), ("disk1".into(), "disk1-snap1".into())]);
    for b in qmp.query_block().await.unwrap() {
        let inserted = b.inserted.unwrap();
        assert_eq!(inserted.backing_file_depth, 1, "{inserted:?}");
        let chain = inserted.image.unwrap();
        assert_eq!(chain.backing_image.unwrap().backing_image, None);
    }

    qemu_io(&vm, "disk0", "write -P 0xab 0 64k").await;

    vm.launched.process.shutdown(qmp, Duration::from_secs(10)).await.unwrap();
    for (over, base) in [(&over0, &base0), (&over1, &base1)] {
        let info = run("qemu-img", &["info", "--backing-chain", "--output=json", path_str(over)]);
        let chain: Vec<Value> = serde_json::from_str(&info).unwrap();
        let files: Vec<_> = chain.iter().map(|i| i["filename"].as_str().unwrap().to_string()).collect();
        assert_eq!(files, [path_str(over), path_str(base)], "chain of {}", over.display());
        assert_eq!(chain[0]["backing-filename-format"], "qcow2");
    }
    run("qemu-io", &["-r", "-c", "read -P 0xab 0 64k", path_str(&over0)]);
    run("qemu-io", &["-r", "-c", "read -P 0 0 64k", path_str(&base0)]);
}

#[tokio::test]
async fn error_replies_keep_class_and_desc_and_failed_transactions_change_nothing() {
    let vm = start(2).await;
    let qmp = &vm.launched.qmp;
    let err = qmp.execute("no-such-command", Value::Null).await.unwrap_err();
    let qerr = command_error(&err).unwrap_or_else(|| panic!("not a QMP error: {err:?}"));
    assert_eq!(qerr.class, ErrorClass::CommandNotFound);
    assert_eq!(qerr.command, "no-such-command");
    assert!(qerr.desc.contains("no-such-command"), "{qerr}");
    assert!(err.to_string().contains("CommandNotFound"), "{err}");

    let err = qmp.execute("query-named-block-nodes", json!({"flat": "yes"})).await.unwrap_err();
    assert_eq!(command_error(&err).unwrap().class, ErrorClass::GenericError);

    // One good and one bad action: the transaction is refused as a whole.
    let good = BlockdevSnapshotSync::qcow2_on_node(
        &fmt_node("disk0"),
        path_str(&file(&vm, "good.qcow2")),
        "good",
        NewImageMode::AbsolutePaths,
    );
    let bad = BlockdevSnapshotSync::qcow2_on_node(
        "nope-fmt",
        path_str(&file(&vm, "bad.qcow2")),
        "bad",
        NewImageMode::AbsolutePaths,
    );
    let err = qmp.snapshot_disks(&[good, bad]).await.unwrap_err();
    let qerr = command_error(&err).unwrap();
    assert!(matches!(qerr.class, ErrorClass::GenericError | ErrorClass::DeviceNotFound), "{qerr}");
    assert!(qerr.desc.contains("nope-fmt"), "{qerr}");
    assert_eq!(active_nodes(qmp).await, [("disk0".into(), "disk0-fmt".into()), ("disk1".into(), "disk1-fmt".into())]);

    let hmp = qmp.human_monitor_command("no-such-hmp-command").await.unwrap();
    assert!(hmp.contains("unknown command"), "{hmp}");
    assert!(qmp.query_status().await.unwrap().running, "the session survives errors");
}

#[tokio::test]
async fn concurrent_calls_each_get_their_own_reply() {
    let vm = start(1).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..48u32 {
        let qmp = vm.launched.qmp.clone();
        tasks.spawn(async move {
            match i % 3 {
                0 => assert!(qmp.query_status().await.unwrap().running),
                1 => assert_eq!(qmp.query_block().await.unwrap().len(), 1),
                _ => {
                    let name = format!("missing-{i}");
                    let err = qmp.execute(&name, Value::Null).await.unwrap_err();
                    let qerr = command_error(&err).unwrap();
                    assert!(qerr.desc.contains(&name), "call {i} got another call's reply: {qerr}");
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

#[tokio::test]
async fn persistent_dirty_bitmap_is_stored_in_the_image() {
    let vm = start(1).await;
    let qmp = &vm.launched.qmp;
    let bitmap =
        BlockDirtyBitmapAdd { node: fmt_node("disk0"), name: "since-base".into(), granularity: None, persistent: true };
    qmp.block_dirty_bitmap_add(&bitmap).await.unwrap();
    qemu_io(&vm, "disk0", "write -P 0xcd 1M 128k").await;
    let nodes = qmp.query_named_block_nodes(true).await.unwrap();
    let node = nodes.iter().find(|n| n.node_name.as_deref() == Some("disk0-fmt")).unwrap();
    let b = node.dirty_bitmaps.iter().find(|b| b.name.as_deref() == Some("since-base")).unwrap();
    assert!(b.persistent);
    assert_eq!(b.count, 128 * 1024);
    let action = TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd { name: "second".into(), ..bitmap });
    qmp.transaction(&[action]).await.unwrap();

    vm.launched.process.shutdown(qmp, Duration::from_secs(10)).await.unwrap();
    let info = run("qemu-img", &["info", "--output=json", path_str(&vm.config.disks[0].path)]);
    let info: Value = serde_json::from_str(&info).unwrap();
    let bitmaps = info["format-specific"]["data"]["bitmaps"].as_array().unwrap();
    let mut names: Vec<_> = bitmaps.iter().map(|b| b["name"].as_str().unwrap().to_string()).collect();
    names.sort();
    assert_eq!(names, ["second", "since-base"]);
}

/// Freezes QEMU (SIGSTOP) so a call stays pending, then SIGKILLs it.
#[tokio::test]
async fn sigkill_mid_call_fails_pending_and_later_calls_instead_of_hanging() {
    let vm = start(1).await;
    let qmp = vm.launched.qmp.clone();
    let mut events = qmp.subscribe();
    let pid = vm.launched.process.pid();
    signal(pid, libc::SIGSTOP);
    let pending = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute("query-status", Value::Null).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished(), "a frozen QEMU cannot answer");
    signal(pid, libc::SIGKILL);
    let result = tokio::time::timeout(Duration::from_secs(10), pending).await.expect("no hang").unwrap();
    let socket = vm.config.qmp_socket.display().to_string();
    match result {
        Err(Error::Unreachable { endpoint, reason }) => {
            assert_eq!(endpoint, socket);
            assert!(reason.contains("closed"), "{reason}");
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(qmp.is_closed());
    let t = Instant::now();
    assert!(matches!(qmp.query_status().await, Err(Error::Unreachable { endpoint, .. }) if endpoint == socket));
    assert!(t.elapsed() < Duration::from_secs(5), "later calls fail at once");
    assert!(matches!(events.recv().await, Err(tokio::sync::broadcast::error::RecvError::Closed)));
    let err = qmp.wait_for_event(&mut qmp.subscribe(), "STOP", EVENT_WAIT).await.unwrap_err();
    assert!(matches!(&err, Error::Unreachable { endpoint, .. } if *endpoint == socket), "{err:?}");
}

#[tokio::test]
async fn a_call_times_out_and_the_session_recovers() {
    let vm = start(1).await;
    let qmp = &vm.launched.qmp;
    let pid = vm.launched.process.pid();
    signal(pid, libc::SIGSTOP);
    let err = qmp.execute_with_timeout("query-block", Value::Null, Duration::from_millis(300)).await.unwrap_err();
    signal(pid, libc::SIGCONT);
    assert!(matches!(&err, Error::Timeout { operation, .. } if operation.contains("query-block")), "{err:?}");
    // The late reply to the timed-out call is discarded; this call gets its own.
    assert_eq!(qmp.query_status().await.unwrap().status, RunState::Running);
}

#[tokio::test]
async fn stale_and_foreign_state_is_detected_never_trusted() {
    let vm = start(1).await;
    let paths = QemuPaths::of(&vm.config);
    let pid = vm.launched.process.pid();
    assert_eq!(inspect(&paths).await.unwrap(), ProcessState::Running { pid });
    let again = Launcher::default().launch(&vm.config).await.unwrap_err();
    assert!(matches!(again, Error::AlreadyExists { kind: "qemu process", .. }), "{again:?}");

    // Ours and alive, but the socket is gone.
    let moved = file(&vm, "moved.sock");
    std::fs::rename(&paths.qmp_socket, &moved).unwrap();
    assert!(matches!(inspect(&paths).await.unwrap(), ProcessState::Unresponsive { pid: p, .. } if p == pid));
    std::fs::rename(&moved, &paths.qmp_socket).unwrap();

    signal(pid, libc::SIGKILL);
    vm.launched.process.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert!(paths.pidfile.exists(), "SIGKILL leaves the pid file behind");
    assert_eq!(inspect(&paths).await.unwrap(), ProcessState::StalePidfile { pid });
    assert!(matches!(QemuProcess::attach(&paths).await, Err(Error::Precondition(_))));

    std::fs::write(&paths.pidfile, format!("{}\n", std::process::id())).unwrap();
    let me = std::process::id();
    assert_eq!(inspect(&paths).await.unwrap(), ProcessState::ForeignProcess { pid: me });
    std::fs::write(&paths.pidfile, "garbage").unwrap();
    assert!(matches!(inspect(&paths).await.unwrap(), ProcessState::CorruptPidfile { .. }));
    std::fs::remove_file(&paths.pidfile).unwrap();
    assert_eq!(inspect(&paths).await.unwrap(), ProcessState::NotRunning);

    // A new launch over the stale socket file works.
    std::fs::write(&paths.pidfile, format!("{pid}\n")).unwrap();
    let launched = Launcher::default().launch(&vm.config).await.unwrap();
    let relaunched =
        Vm { launched, config: vm.config.clone(), spawn_to_ready: Duration::ZERO, dir: tempfile::tempdir().unwrap() };
    assert!(relaunched.launched.qmp.query_status().await.unwrap().running);
}

#[tokio::test]
async fn a_missing_binary_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::config_in(dir.path(), 1);
    let launcher = Launcher { binary: "/nonexistent/bin/qemu-system-x86_64".into(), ..Launcher::default() };
    match launcher.launch(&config).await {
        Err(Error::NotFound { kind: "qemu binary", name, .. }) => {
            assert_eq!(name, "/nonexistent/bin/qemu-system-x86_64")
        }
        other => panic!("expected NotFound naming the binary, got {other:?}"),
    }
    assert!(!config.pidfile.exists() && !config.qmp_socket.exists());
}

#[tokio::test]
async fn a_missing_disk_is_named_and_a_failing_start_quotes_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config_in(dir.path(), 1);
    let missing = dir.path().join("missing.qcow2");
    config.disks[0].path = missing.clone();
    match Launcher::default().launch(&config).await {
        Err(Error::NotFound { kind: "disk image", name, .. }) => assert_eq!(name, missing.display().to_string()),
        other => panic!("expected NotFound naming the disk, got {other:?}"),
    }
    // A disk that is not qcow2: QEMU itself refuses, and the error quotes QEMU's message.
    std::fs::write(&missing, b"not an image").unwrap();
    let err = Launcher::default().launch(&config).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("exited during startup") && text.contains("qcow2"), "{text}");
    assert!(!config.pidfile.exists() && !config.qmp_socket.exists(), "nothing left behind");
}

#[tokio::test]
async fn dropping_every_handle_leaves_qemu_running_and_it_can_be_reattached() {
    struct KillOnDrop(QemuProcess);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            self.0.start_kill();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let config = common::config_in(dir.path(), 1);
    let paths = QemuPaths::of(&config);
    let launched = Launcher::default().launch(&config).await.unwrap();
    let pid = launched.process.pid();
    drop(launched);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(inspect(&paths).await.unwrap(), ProcessState::Running { pid });
    let process = KillOnDrop(QemuProcess::attach(&paths).await.unwrap());
    assert_eq!(process.0.pid(), pid);
    let qmp = process.0.connect(Duration::from_secs(10)).await.unwrap();
    assert!(qmp.query_status().await.unwrap().running);
    process.0.kill(Duration::from_secs(10)).await.unwrap();
    assert_eq!(inspect(&paths).await.unwrap(), ProcessState::NotRunning);
}
