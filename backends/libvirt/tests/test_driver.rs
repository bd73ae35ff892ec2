//! Fast tests on libvirt's `test:///default` driver (no daemon): create from a spec, inspect it
//! back, attach existing domains, bad input, and an unreachable daemon.

use stagecore::{Backend, Error, Selector, memory::sample_spec};
use stagecore_libvirt::LibvirtBackend;

async fn backend(dir: &tempfile::TempDir) -> LibvirtBackend {
    LibvirtBackend::connect("test:///default", dir.path()).await.expect("the test driver needs no daemon")
}

#[tokio::test]
async fn create_then_inspect_gives_the_spec_back() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(&dir).await;
    let spec = sample_spec("prod");
    let env = b.create(&spec).await.expect("create");
    let back = env.spec().await.unwrap();
    assert_eq!(back.machines.len(), 3);
    for (want, got) in spec.machines.iter().zip(["web", "app", "db"].iter().map(|n| back.machine(n).unwrap())) {
        assert_eq!((got.vcpus, got.memory_mib), (want.vcpus, want.memory_mib), "{}", want.name);
        assert_eq!(got.disks.iter().map(|d| &d.name).collect::<Vec<_>>(), vec!["disk0"]);
        let nets: Vec<_> = got.nics.iter().map(|n| (&n.name, &n.network)).collect();
        let wanted: Vec<_> = want.nics.iter().map(|n| (&n.name, &n.network)).collect();
        assert_eq!(nets, wanted, "logical NIC and network names survive");
        assert!(got.nics.iter().all(|n| n.mac.is_some()) && got.uuid.is_some());
        assert_eq!(got.labels, want.labels);
    }
    let mut want = spec.networks.clone();
    want.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(back.networks, want, "networks and their CIDRs (sorted by name)");
    let info = env.info().await.unwrap();
    assert!(info.machines.iter().any(|m| m.name == "web" && m.instance_name == "prod-web"));
    assert!(b.list().await.unwrap().iter().any(|i| i.name == "prod"));
    assert!(matches!(b.create(&spec).await, Err(Error::AlreadyExists { kind: "environment", .. })));
    b.destroy("prod").await.expect("destroy");
    assert!(matches!(b.open("prod").await, Err(Error::NotFound { .. })));
    assert!(!dir.path().join("prod").exists(), "the environment's files are removed");
}

#[tokio::test]
async fn attach_existing_domains_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(&dir).await;
    let sel = Selector::Machines { environment: "legacy".into(), names: vec!["test".into()] };
    let env = b.attach(&sel).await.expect("attach the test driver's own domain");
    let spec = env.spec().await.unwrap();
    assert_eq!(spec.machines[0].name, "test");
    assert!(matches!(b.attach(&sel).await, Err(Error::AlreadyExists { .. })));
    let missing = Selector::Machines { environment: "x".into(), names: vec!["missing".into()] };
    assert!(matches!(b.attach(&missing).await, Err(Error::NotFound { kind: "domain", .. })));
    let bad = Selector::Machines { environment: "../x".into(), names: vec!["test".into()] };
    assert!(matches!(b.attach(&bad).await, Err(Error::InvalidSpec { .. })));
    b.destroy("legacy").await.expect("forget");
    assert!(matches!(b.open("legacy").await, Err(Error::NotFound { .. })));
}

#[tokio::test]
async fn bad_specs_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(&dir).await;
    let mut spec = sample_spec("p2");
    spec.machines[2].disks[0].size_bytes = None;
    spec.machines[2].disks[0].source = "db-new.qcow2".into();
    let err = b.create(&spec).await.unwrap_err();
    assert!(matches!(&err, Error::InvalidSpec { path, .. } if path == "machines[2].disks[0].size_bytes"), "{err}");
    assert!(matches!(b.open("p2").await, Err(Error::NotFound { .. })));
    assert!(!dir.path().join("p2").exists(), "no files left");
    assert!(b.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_daemon_that_is_not_there_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let err = LibvirtBackend::connect("qemu:///system?socket=/nonexistent/libvirt.sock", dir.path()).await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
}
