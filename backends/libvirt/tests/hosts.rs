//! Smoke test of the libvirtd test hosts (`cargo xtask hosts`): host A and host B answer over
//! `qemu+tcp://` on their loopback relays, are two daemons distinct from each other and from the
//! system libvirtd, and the backend connects to both.

mod common;

use common::{host_uri, virsh, virsh_at};
use stagecore::Backend;
use stagecore_libvirt::LibvirtBackend;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_a_and_b_are_separate_tcp_daemons() {
    let (a, b) = (host_uri("STAGECORE_LIBVIRT_HOST_A"), host_uri("STAGECORE_LIBVIRT_HOST_B"));
    assert_ne!(a, b);
    let dir = tempfile::tempdir().unwrap();
    for uri in [&a, &b] {
        assert!(uri.starts_with("qemu+tcp://127."), "the tests reach the hosts through loopback: {uri}");
        let backend = LibvirtBackend::connect(uri, dir.path().join("state")).await.expect("connect over TCP");
        assert_eq!(backend.uri(), uri.as_str());
        assert!(backend.capabilities().guest_channel);
        assert!(virsh_at(uri, &["version"]).iter().any(|l| l.contains("QEMU")), "{uri} runs the QEMU driver");
    }
    let name = format!("smoke-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let xml = dir.path().join("d.xml");
    std::fs::write(
        &xml,
        format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64'>hvm</type></os></domain>"
        ),
    )
    .unwrap();
    assert!(!virsh_at(&a, &["define", xml.to_str().unwrap()]).is_empty(), "define on host A");
    let on = |uri: &str| virsh_at(uri, &["list", "--all", "--name"]).contains(&name);
    let (in_a, in_b, in_system) = (on(&a), on(&b), virsh(&["list", "--all", "--name"]).contains(&name));
    virsh_at(&a, &["undefine", &name]);
    assert!(in_a, "host A has the domain it defined");
    assert!(!in_b, "host B is another daemon");
    assert!(!in_system, "the system libvirtd is another daemon");
    assert!(!on(&a), "undefined again");
}
