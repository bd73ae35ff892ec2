//! A remote URI: `qemu+tcp://127.0.0.1:<port>/system` against the live libvirtd, on an
//! environment made through the local URI (its files are in no storage pool): what works over the
//! wire without pools (inspect, power, config changes, attach, swap), and drift with disks
//! NOT_CHECKED and the reason. Remote images in pools: `conformance_remote.rs`, `cross_host.rs`.
//!
//! The daemon's own TCP listener cannot be switched on for one test: `listen_tcp` is read only when
//! libvirtd starts (no runtime way in libvirt 9.0, no systemd `libvirtd-tcp.socket` here), and
//! restarting the shared daemon — or running a second one on the same QEMU state — would break
//! every other client. So the test opens a loopback-only TCP port of its own that relays each
//! connection to the daemon's UNIX socket: the client speaks libvirt's RPC over TCP exactly as it
//! would to a remote host, the daemon is not reconfigured, and the port closes when the test ends
//! (asserted).

mod common;

use common::{Guard, virsh};
use stagecore::drift::Status;
use stagecore::{
    Backend, BackendExt, Change, ChangeMap, ChangeSet, EnvironmentExt, Error, Selector, StageOptions,
    memory::sample_spec,
};
use stagecore_libvirt::LibvirtBackend;
use tokio::net::{TcpListener, UnixStream};

const DAEMON_SOCKET: &str = "/run/libvirt/libvirt-sock";

/// Listens on 127.0.0.1 (a free port) and relays every connection to libvirtd's UNIX socket.
async fn relay() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1");
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut unix = UnixStream::connect(DAEMON_SOCKET)
                .await
                .unwrap_or_else(|e| panic!("libvirtd must be running ({DAEMON_SOCKET}): {e}"));
            conns.spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
            });
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_uri_works_without_local_files_and_says_not_checked() {
    let g = Guard::new("r");
    let local = g.backend().await;
    let (pname, sname) = (format!("p{}", g.tag), format!("s{}", g.tag));
    let mut spec = sample_spec(&pname);
    spec.machines.iter_mut().for_each(|m| m.memory_mib = 64);
    let prod = local.create(&spec).await.expect("create production locally");
    let baseline = prod.take_baseline().await.expect("baseline");
    local.stage(&baseline, &StageOptions::linked(&sname)).await.expect("stage locally");

    let (port, relay_task) = relay().await;
    let uri = format!("qemu+tcp://127.0.0.1:{port}/system");
    let remote = LibvirtBackend::connect(&uri, g.dir.join("remote-state")).await.expect("connect over TCP");
    assert_eq!(remote.uri(), uri);
    let caps = remote.capabilities();
    assert!(caps.changes.set_memory && caps.persistent && caps.fencing && caps.swap, "{caps:?}");
    assert!(caps.create && caps.linked_clone && caps.full_clone && caps.disk_io && caps.disk_drift, "{caps:?}");

    // What works over the wire: open, inspect, power, config changes, listing, attach.
    let rprod = remote.open(&pname).await.expect("open production remotely");
    let rstage = remote.open(&sname).await.expect("open stage remotely (from libvirt alone)");
    assert_eq!(rprod.spec().await.unwrap(), prod.spec().await.unwrap(), "same spec over TCP");
    assert_eq!(rstage.info().await.unwrap().stage().unwrap().baseline.id, baseline.id);
    rstage.start().await.expect("start remotely");
    assert!(rstage.status().await.unwrap().iter().all(|s| s.power == stagecore::PowerState::Running));
    let cs = ChangeSet {
        id: "cs-remote".into(),
        description: "more memory for app".into(),
        changes: vec![Change::SetMemory { machine: "app".into(), memory_mib: 96 }],
    };
    rstage.apply_change_set(&cs).await.expect("config change over TCP");
    rstage.stop().await.expect("stop remotely");
    let local_stage = local.open(&sname).await.unwrap();
    assert_eq!(local_stage.spec().await.unwrap().machine("app").unwrap().memory_mib, 96);
    let legacy = format!("h{}-legacy", g.tag);
    let xml = format!(
        "<domain type='qemu'><name>{legacy}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64'>hvm</type></os></domain>"
    );
    let xml_path = g.dir.join("legacy.xml");
    std::fs::write(&xml_path, xml).unwrap();
    assert_eq!(virsh(&["define", xml_path.to_str().unwrap()]).len(), 1, "define a domain nobody staged");
    let names = vec![legacy.clone()];
    let attached = remote
        .attach(&Selector::Machines { environment: format!("a{}", g.tag), names })
        .await
        .expect("attach by name over TCP");
    assert_eq!(attached.spec().await.unwrap().machines.len(), 1);

    // Disk drift: these files are in no storage pool of the daemon, so they cannot be read over
    // the wire: NOT_CHECKED with the reason (never a local read).
    let changes = rstage.disk_changes(&baseline).await.unwrap();
    assert_eq!(changes.len(), 3);
    for c in &changes {
        match &c.changes {
            ChangeMap::NotChecked { reason } => assert!(reason.contains("not a storage volume"), "{reason}"),
            other => panic!("{}/{}: expected NotChecked, got {other:?}", c.machine, c.disk),
        }
    }
    let report = remote.drift(&*rprod, &*rstage).await.expect("drift over TCP");
    assert_eq!(report.disk.status, Status::NotChecked, "{report:?}");
    assert!(report.disk.records.iter().all(|r| r.status == Status::NotChecked && r.reason.is_some()), "{report:?}");
    assert!(report.config.records.iter().all(|r| r.intended), "config drift still works: {report:?}");
    assert_ne!(report.status, Status::InSync, "never a silent zero: {report:?}");

    // Swap only exchanges definitions, so it works over the wire too.
    remote.swap(&pname, &sname).await.expect("swap over TCP");
    assert_eq!(rprod.spec().await.unwrap().machine("app").unwrap().memory_mib, 96, "production runs the stage");
    remote.swap(&pname, &sname).await.expect("swap back over TCP");
    assert_eq!(rprod.spec().await.unwrap(), prod.spec().await.unwrap());

    // Reading a disk outside every storage pool over the wire is a typed NotFound naming it.
    let io = rstage.disk_io().expect("disk io over streams");
    assert!(matches!(io.digest("app", "disk0").await, Err(Error::NotFound { .. })));

    remote.destroy(&format!("a{}", g.tag)).await.expect("forget the attached production");
    drop((rprod, rstage, attached, remote));
    relay_task.abort();
    let _ = relay_task.await;
    let gone = std::net::TcpStream::connect(("127.0.0.1", port));
    assert!(gone.is_err(), "the test's TCP port must be closed when it ends");

    local.destroy(&sname).await.unwrap();
    local.destroy(&pname).await.unwrap();
    assert_eq!(g.domains(), [legacy], "only the domain the test defined itself is left (the guard removes it)");
}
