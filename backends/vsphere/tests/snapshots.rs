//! Snapshots, linked clones, reconfiguration and changed block tracking (VI/JSON) against the sim.

mod common;
use common::*;
use stagecore::Error;
use stagecore_vsphere::{ChangedArea, LinkedCloneSpec, MoRef, Reconfig};

#[tokio::test]
async fn snapshot_create_list_revert_delete() {
    let (sim, client) = setup().await;
    assert!(client.snapshot_tree("vm-101").await.unwrap().roots.is_empty());
    let s1 = client.create_snapshot("vm-101", "before", "baseline", false).await.unwrap();
    client
        .reconfigure("vm-101", &Reconfig { memory_mib: Some(4096), cpus: Some(4), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(client.get_vm("vm-101").await.unwrap().memory.size_mib, 4096);
    let s2 = client.create_snapshot("vm-101", "after", "", false).await.unwrap();

    let tree = client.snapshot_tree("vm-101").await.unwrap();
    assert_eq!(tree.current.as_ref(), Some(&s2));
    assert_eq!(tree.roots.len(), 1);
    assert_eq!(tree.roots[0].snapshot, s1);
    assert_eq!(tree.roots[0].name, "before");
    assert_eq!(tree.roots[0].children[0].snapshot, s2);

    client.revert_snapshot(&s1, false).await.unwrap();
    let info = client.get_vm("vm-101").await.unwrap();
    assert_eq!((info.memory.size_mib, info.cpu.count), (2048, 2));
    assert_eq!(client.snapshot_tree("vm-101").await.unwrap().current, Some(s1.clone()));

    client.remove_snapshot(&s1, false).await.unwrap();
    let tree = client.snapshot_tree("vm-101").await.unwrap();
    assert_eq!(tree.roots.len(), 1);
    assert_eq!(tree.roots[0].snapshot, s2, "children of a removed snapshot are kept");
    client.remove_snapshot(&s2, false).await.unwrap();
    assert!(client.snapshot_tree("vm-101").await.unwrap().roots.is_empty());

    let gone = client.revert_snapshot(&s1, false).await.unwrap_err();
    assert!(matches!(gone, Error::NotFound { .. }), "{gone:?}");
    let empty = client.create_snapshot("vm-101", "", "", false).await.unwrap_err();
    assert!(matches!(empty, Error::InvalidSpec { .. }), "{empty:?}");
    assert_no_violations(&sim);
}

#[tokio::test]
async fn linked_clone_from_snapshot_onto_isolated_network() {
    let (sim, client) = setup().await;
    let snap = client.create_snapshot("vm-101", "baseline", "", false).await.unwrap();
    let spec = LinkedCloneSpec {
        snapshot: snap.clone(),
        name: "web-stage".into(),
        folder: "group-v11".into(),
        network_name: Some("isolated-pg".into()),
        power_on: true,
    };
    let id = client.linked_clone("vm-101", &spec).await.unwrap();
    let clone = client.vm_config(&id).await.unwrap();
    let source = client.vm_config("vm-101").await.unwrap();
    assert_eq!(clone.disks[0].parent_file_name, source.disks[0].file_name, "child disk over the source's disk");
    assert_ne!(clone.disks[0].file_name, source.disks[0].file_name);
    assert_eq!(clone.nics[0].network_name.as_deref(), Some("isolated-pg"));
    assert_ne!(clone.nics[0].mac_address, source.nics[0].mac_address);
    assert_eq!(source.nics[0].network_name.as_deref(), Some("VM Network"), "source untouched");
    assert_eq!(client.get_vm(&id).await.unwrap().power_state, "POWERED_ON");
    assert_eq!(sim.vm(&id).unwrap().folder, "group-v11");

    let dup = client.linked_clone("vm-101", &spec).await.unwrap_err();
    assert!(matches!(dup, Error::AlreadyExists { .. }), "{dup:?}");
    let no_net = LinkedCloneSpec { network_name: Some("nope".into()), name: "x".into(), ..spec.clone() };
    let e = client.linked_clone("vm-101", &no_net).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    let foreign = LinkedCloneSpec { name: "y".into(), ..spec };
    let e = client.linked_clone("vm-102", &foreign).await.unwrap_err();
    assert!(matches!(e, Error::InvalidSpec { .. }), "snapshot of another VM: {e:?}");
    assert_no_violations(&sim);
}

#[tokio::test]
async fn reconfigure_validates_and_maps_faults() {
    let (sim, client) = setup().await;
    let e = client.reconfigure("vm-101", &Reconfig { memory_mib: Some(1001), ..Default::default() }).await.unwrap_err();
    assert!(matches!(e, Error::InvalidSpec { ref path, .. } if path == "reconfig.memory_mib"), "{e:?}");
    let e = client.reconfigure("vm-101", &Reconfig { cpus: Some(1000), ..Default::default() }).await.unwrap_err();
    assert!(matches!(e, Error::InvalidSpec { .. }), "server-side InvalidArgument: {e:?}");
    let e = client.reconfigure("vm-404", &Reconfig { cpus: Some(2), ..Default::default() }).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    client.reconfigure("vm-102", &Reconfig { cpus: Some(8), ..Default::default() }).await.unwrap();
    assert_eq!(sim.vm("vm-102").unwrap().config.cpus, 8);
    assert_no_violations(&sim);
}

#[tokio::test]
async fn changed_block_tracking_between_snapshots() {
    let (sim, client) = setup().await;
    assert!(client.vm_config("vm-101").await.unwrap().change_tracking_enabled);
    let s0 = client.create_snapshot("vm-101", "base", "", false).await.unwrap();
    let cid = client.snapshot_config(&s0).await.unwrap().disks[0].change_id.clone().expect("change id");
    sim.guest_write("vm-101", 2000, 1 << 20, 64 << 10).unwrap();
    sim.guest_write("vm-101", 2000, (1 << 20) + (32 << 10), 64 << 10).unwrap();
    sim.guest_write("vm-101", 2000, 10 << 20, 4096).unwrap();
    let s1 = client.create_snapshot("vm-101", "now", "", false).await.unwrap();
    let areas = client.query_changed_areas("vm-101", Some(&s1), 2000, &cid).await.unwrap();
    assert_eq!(
        areas,
        vec![ChangedArea { start: 1 << 20, length: 96 << 10 }, ChangedArea { start: 10 << 20, length: 4096 }]
    );
    // Nothing changed between s0 and itself.
    assert!(client.query_changed_areas("vm-101", Some(&s0), 2000, &cid).await.unwrap().is_empty());
    // After reverting to s0 the later writes are gone from the disk's lineage.
    client.revert_snapshot(&s0, true).await.unwrap();
    let s2 = client.create_snapshot("vm-101", "reverted", "", false).await.unwrap();
    assert!(client.query_changed_areas("vm-101", Some(&s2), 2000, &cid).await.unwrap().is_empty());

    // db has CBT off: a typed error, then enabling it works.
    let e = client.query_changed_areas("vm-102", None, 2000, "*").await.unwrap_err();
    assert_eq!(fault(&e).map(|f| f.fault_type), Some("FileFault".to_string()), "{e:?}");
    client.reconfigure("vm-102", &Reconfig { change_tracking: Some(true), ..Default::default() }).await.unwrap();
    assert!(client.vm_config("vm-102").await.unwrap().change_tracking_enabled);
    let e = client.query_changed_areas("vm-101", Some(&s1), 2000, "bogus").await.unwrap_err();
    assert!(matches!(e, Error::InvalidSpec { .. }), "{e:?}");
    let _ = MoRef::new("VirtualMachine", "vm-101");
    assert_no_violations(&sim);
}
