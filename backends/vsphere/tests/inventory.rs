//! Sessions, inventory, power, full clone against the simulator.

mod common;
use common::*;
use stagecore::Error;

#[tokio::test]
async fn login_list_and_get_vms() {
    let (sim, client) = setup().await;
    let web = client.list_vms(&["web"], &[]).await.unwrap();
    assert_eq!(web.len(), 1);
    assert_eq!(web[0].vm, "vm-101");
    assert_eq!(web[0].cpu_count, Some(2));
    let prod = client.list_vms(&[], &["group-v10"]).await.unwrap();
    assert_eq!(prod.len(), 2);
    assert!(client.list_vms(&[], &["group-v11"]).await.unwrap().is_empty());

    let info = client.get_vm("vm-102").await.unwrap();
    assert_eq!(info.name, "db");
    assert_eq!(info.cpu.count, 4);
    assert_eq!(info.memory.size_mib, 8192);
    assert_eq!(info.boot.kind, "BIOS");
    assert_eq!(info.disks.len(), 2);
    assert_eq!(info.disks[1].capacity, Some(64 << 30));
    assert_eq!(info.nics[0].network_name.as_deref(), Some("VM Network"));
    assert!(info.identity.is_some());

    let nets = client.list_networks(&["isolated-pg"]).await.unwrap();
    assert_eq!(nets[0].network, "network-2");
    let folders = client.list_folders(&["stage"]).await.unwrap();
    assert_eq!(folders[0].folder, "group-v11");

    let missing = client.get_vm("vm-999").await.unwrap_err();
    assert!(matches!(missing, Error::NotFound { .. }), "{missing:?}");
    let bad = client.get_vm("../etc").await.unwrap_err();
    assert!(matches!(bad, Error::InvalidSpec { .. }), "{bad:?}");
    client.close().await.unwrap();
    assert_eq!(sim.stats().rest_logouts, 1);
    assert_no_violations(&sim);
}

#[tokio::test]
async fn full_clone_power_and_delete() {
    let (sim, client) = setup().await;
    let id = client.full_clone("vm-101", "web-full", Some("group-v11"), false).await.unwrap();
    let info = client.get_vm(&id).await.unwrap();
    assert_eq!(info.name, "web-full");
    assert_eq!(info.power_state, "POWERED_OFF");
    let src = sim.vm("vm-101").unwrap();
    let copy = sim.vm(&id).unwrap();
    assert_eq!(copy.folder, "group-v11");
    assert!(copy.config.disks[0].parent_file.is_none(), "a full clone has independent disks");
    assert_ne!(copy.config.nics[0].mac, src.config.nics[0].mac);
    assert_ne!(copy.bios_uuid, src.bios_uuid);

    let dup = client.full_clone("vm-101", "web-full", Some("group-v11"), false).await.unwrap_err();
    assert!(matches!(dup, Error::AlreadyExists { .. }), "{dup:?}");
    let bad = client.full_clone("vm-101", "a/b", None, false).await.unwrap_err();
    assert!(matches!(bad, Error::InvalidSpec { .. }), "{bad:?}");

    client.power_on(&id).await.unwrap();
    client.power_on(&id).await.unwrap(); // already on: fine
    let busy = client.delete_vm(&id).await.unwrap_err();
    assert!(matches!(busy, Error::Precondition(_)), "{busy:?}");
    client.power_off(&id).await.unwrap();
    client.delete_vm(&id).await.unwrap();
    assert!(sim.vm(&id).is_none());
    assert_no_violations(&sim);
}

#[tokio::test]
async fn config_rejects_bad_urls() {
    let p = stagecore::Secret::new("x");
    for url in ["ftp://h", "https://user:pw@h", "not a url"] {
        let e = stagecore_vsphere::VsphereConfig::new(url, "u", p.clone()).unwrap_err();
        assert!(matches!(e, Error::InvalidSpec { .. }), "{url}: {e:?}");
        assert!(!e.to_string().contains("pw@"), "credentials echoed: {e}");
    }
}
