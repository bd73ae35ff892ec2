//! `VsphereBackend` beyond the conformance kit: fencing without an isolated network, CBT disk drift
//! on both sides and NOT_CHECKED without CBT, config drift through `apply`, per-VM snapshots,
//! attach semantics, destroy semantics, clean-up after a failed stage, and persistence.

mod common;

use common::*;
use stagecore::drift::{RecordKind, Side, Status};
use stagecore::{
    Backend, BackendExt, Change, ChangeMap, Consistency, DynEnvironment, Error, PowerState, Selector, StageOptions,
    memory::sample_spec,
};
use stagecore_vsphere::{VsphereBackend, VsphereOptions};
use stagecore_vsphere_sim::Simulator;

struct Fixture {
    sim: Simulator,
    backend: VsphereBackend,
    dir: tempfile::TempDir,
}

async fn fixture(isolated: Option<&str>) -> Fixture {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = VsphereOptions::new(dir.path());
    opts.isolated_network = isolated.map(str::to_string);
    opts.folder = Some("group-v11".into());
    let backend = VsphereBackend::connect(config(sim.http_url()), opts).await.unwrap();
    Fixture { sim, backend, dir }
}

async fn attach(f: &Fixture, name: &str) -> DynEnvironment {
    let names = vec!["web".to_string(), "db".to_string()];
    f.backend.attach(&Selector::Machines { environment: name.into(), names }).await.unwrap()
}

async fn stage_vm(stage: &DynEnvironment, machine: &str) -> String {
    let info = stage.info().await.unwrap();
    info.machines.iter().find(|m| m.name == machine).unwrap().instance_name.clone()
}

#[tokio::test]
async fn fenced_without_isolated_network_is_not_supported_and_creates_nothing() {
    let f = fixture(None).await;
    assert!(!f.backend.capabilities().fencing);
    assert!(!f.backend.capabilities().atomic_snapshot);
    let prod = attach(&f, "prod").await;
    let baseline = prod.take_baseline().await.unwrap();
    let err = f.backend.stage(&baseline, &StageOptions::linked("s1")).await.unwrap_err();
    // Fencing is not declared without an isolated port group, so `check_stage` refuses it.
    assert!(matches!(err, Error::NotSupported { operation: "fencing", .. }), "{err}");
    assert!(f.backend.client().list_vms(&[], &["group-v11"]).await.unwrap().is_empty(), "a VM was cloned");
    assert_eq!(f.backend.list().await.unwrap().len(), 1);
    let open = StageOptions { fenced: false, ..StageOptions::linked("s1") };
    let stage = f.backend.stage(&baseline, &open).await.unwrap();
    let spec = stage.spec().await.unwrap();
    assert_eq!(spec.machines[0].nics[0].network, "VM-Network", "unfenced stage stays on production's network");
    assert_no_violations(&f.sim);
}

#[tokio::test]
async fn fenced_stage_nics_are_on_the_isolated_network_without_config_drift() {
    let f = fixture(Some("isolated-pg")).await;
    let prod = attach(&f, "prod").await;
    let baseline = prod.take_baseline().await.unwrap();
    let stage = f.backend.stage(&baseline, &StageOptions::linked("s1")).await.unwrap();
    let web = f.backend.client().list_vms(&[&stage_vm(&stage, "web").await], &[]).await.unwrap();
    let nic = &f.backend.client().get_vm(&web[0].vm).await.unwrap().nics[0];
    assert_eq!(nic.network_name.as_deref(), Some("isolated-pg"));
    let r = f.backend.drift(&*prod, &*stage).await.unwrap();
    assert!(r.config.records.is_empty(), "{r}");
    assert_no_violations(&f.sim);
}

#[tokio::test]
async fn disk_drift_from_cbt_and_not_checked_without_it() {
    let f = fixture(Some("isolated-pg")).await;
    let prod = attach(&f, "prod").await; // db keeps CBT off
    let baseline = prod.take_baseline().await.unwrap();
    let stage = f.backend.stage(&baseline, &StageOptions { start: true, ..StageOptions::linked("s1") }).await.unwrap();
    let r = f.backend.drift(&*prod, &*stage).await.unwrap();
    assert_eq!(r.status, Status::NotChecked, "{r}");
    let db = r.disk.records.iter().find(|x| x.machine == "db").unwrap();
    assert_eq!(db.status, Status::NotChecked);
    assert!(db.reason.as_deref().unwrap().contains("changed block tracking is disabled on VM db"), "{db:?}");
    let web = r.disk.records.iter().find(|x| x.machine == "web").unwrap();
    assert_eq!((web.status, web.side), (Status::InSync, None), "{web:?}");

    f.sim.guest_write("vm-101", 2000, 2 << 20, 4096).unwrap();
    let stage_web = f.sim.vm_by_name(&stage_vm(&stage, "web").await).unwrap();
    f.sim.guest_write(&stage_web.id, 2000, 8 << 20, 8192).unwrap();
    let r = f.backend.drift(&*prod, &*stage).await.unwrap();
    let web = r.disk.records.iter().find(|x| x.machine == "web").unwrap();
    assert_eq!(web.side, Some(Side::Both), "{r}");
    assert!(web.production.extents.iter().any(|e| e.offset <= 2 << 20 && e.end() >= (2 << 20) + 4096), "{web:?}");
    assert!(web.stage.extents.iter().any(|e| e.offset <= 8 << 20 && e.end() >= (8 << 20) + 8192), "{web:?}");
    assert_eq!(r.status, Status::Drifted);

    let changes = prod.disk_changes(&baseline).await.unwrap();
    assert_eq!(changes.len(), 3, "web has one disk, db two");
    let db0 = changes.iter().find(|c| c.machine == "db").unwrap();
    assert!(matches!(db0.changes, ChangeMap::NotChecked { .. }));
    // The probe snapshots of running VMs are gone again: only the baseline remains.
    for id in ["vm-101", stage_web.id.as_str()] {
        let tree = f.backend.client().snapshot_tree(id).await.unwrap();
        assert_eq!(tree.roots.len(), 1, "{id}: {tree:?}");
        assert!(tree.roots[0].children.is_empty(), "{id}: probe snapshot left behind: {tree:?}");
    }
    let other = prod.take_baseline().await.unwrap();
    let err = stage.disk_changes(&other).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert_no_violations(&f.sim);
}

#[tokio::test]
async fn config_changes_through_apply_are_drift() {
    let f = fixture(Some("isolated-pg")).await;
    let prod = attach(&f, "prod").await;
    let baseline = prod.take_baseline().await.unwrap();
    let stage = f.backend.stage(&baseline, &StageOptions::full("s1")).await.unwrap();
    stage.apply(&Change::SetMemory { machine: "db".into(), memory_mib: 8192 + 128 }).await.unwrap();
    prod.apply(&Change::SetVcpus { machine: "web".into(), vcpus: 3 }).await.unwrap();
    stage.apply(&Change::SetVcpus { machine: "web".into(), vcpus: 4 }).await.unwrap();
    let r = f.backend.drift(&*prod, &*stage).await.unwrap();
    let mem = r.config.records.iter().find(|x| x.path == "/machines/db/memory_mib").expect("memory record");
    assert_eq!((mem.kind, mem.side, mem.intended), (RecordKind::NotEqual, Side::Stage, false), "{r}");
    let cpu = r.config.records.iter().find(|x| x.path == "/machines/web/vcpus").expect("vcpus record");
    assert_eq!(cpu.side, Side::Both, "{r}");
    assert_eq!(r.status, Status::Drifted);

    let nic = sample_spec("x").machines[0].nics[0].clone();
    let err = stage.apply(&Change::AddNic { machine: "web".into(), nic }).await.unwrap_err();
    assert!(matches!(err, Error::NotSupported { .. }), "{err}");
    let err = stage.apply(&Change::SetMemory { machine: "nope".into(), memory_mib: 256 }).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { ref name, .. } if name.contains("nope")), "{err}");
    assert_no_violations(&f.sim);
}

#[tokio::test]
async fn full_clone_is_of_the_baseline_not_the_current_state() {
    let f = fixture(Some("isolated-pg")).await;
    let prod = attach(&f, "prod").await;
    let baseline = prod.take_baseline().await.unwrap();
    prod.apply(&Change::SetMemory { machine: "web".into(), memory_mib: 4096 }).await.unwrap();
    let stage = f.backend.stage(&baseline, &StageOptions::full("s1")).await.unwrap();
    let web = stage_vm(&stage, "web").await;
    assert_eq!(stage.spec().await.unwrap().machine("web").unwrap().memory_mib, 2048);
    let vm = f.sim.vm_by_name(&web).unwrap();
    assert!(vm.config.disks[0].parent_file.is_none(), "a full clone has independent disks");
    let r = f.backend.drift(&*prod, &*stage).await.unwrap();
    let rec = r.config.records.iter().find(|x| x.path == "/machines/web/memory_mib").unwrap();
    assert_eq!(rec.side, Side::Production, "{r}");
    assert_no_violations(&f.sim);
}

#[tokio::test]
async fn stage_snapshots_are_per_vm_and_revert_restores() {
    let f = fixture(Some("isolated-pg")).await;
    let prod = attach(&f, "prod").await;
    let baseline = prod.take_baseline().await.unwrap();
    let stage = f.backend.stage(&baseline, &StageOptions { start: true, ..StageOptions::linked("s1") }).await.unwrap();
    let web = f.sim.vm_by_name(&stage_vm(&stage, "web").await).unwrap().id;
    f.sim.guest_write(&web, 2000, 0, 4096).unwrap();
    let s1 = stage.create_snapshot("s1").await.unwrap();
    assert_eq!((s1.consistency, s1.memory), (Consistency::PerMachine, false));
    let err = stage.create_snapshot("s1").await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
    stage.apply(&Change::SetMemory { machine: "web".into(), memory_mib: 4096 }).await.unwrap();
    f.sim.guest_write(&web, 2000, 1 << 30, 4096).unwrap();
    stage.create_snapshot("s2").await.unwrap();
    stage.revert_snapshot("s1").await.unwrap();
    assert_eq!(stage.spec().await.unwrap(), s1.spec, "revert restores the configuration");
    assert!(stage.status().await.unwrap().iter().all(|s| s.power == PowerState::Running), "running again");
    let changes = stage.disk_changes(&baseline).await.unwrap();
    let c = changes.iter().find(|c| c.machine == "web").unwrap();
    match &c.changes {
        ChangeMap::Checked { extents } => assert_eq!(extents.len(), 1, "only the write before s1: {extents:?}"),
        other => panic!("{other:?}"),
    }
    let names: Vec<String> = stage.list_snapshots().await.unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["s1", "s2"]);
    stage.delete_snapshot("s2").await.unwrap();
    stage.delete_snapshot("s1").await.unwrap();
    assert!(stage.list_snapshots().await.unwrap().is_empty());
    let err = stage.revert_snapshot("s1").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    let err = stage.take_baseline().await.unwrap_err();
    assert!(matches!(err, Error::Precondition(_)), "{err}");
    assert_no_violations(&f.sim);
}

#[tokio::test]
async fn attach_selects_without_modifying() {
    let f = fixture(None).await;
    let before = (f.sim.vm("vm-101").unwrap(), f.sim.vm("vm-102").unwrap());
    let sel = Selector::Folder { environment: "prod".into(), folder: "prod".into() };
    let prod = f.backend.attach(&sel).await.unwrap();
    let spec = prod.spec().await.unwrap();
    spec.validate().unwrap();
    assert_eq!(spec.machines.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["db", "web"]);
    let db = spec.machine("db").unwrap();
    assert_eq!((db.vcpus, db.memory_mib, db.disks.len()), (4, 8192, 2));
    assert_eq!(db.disks[1].name, "hard-disk-2");
    assert_eq!(db.disks[1].size_bytes, Some(64 << 30));
    assert_eq!(db.disks[0].source, "[datastore1] db/db.vmdk");
    assert_eq!(db.nics[0].mac.as_deref(), Some("00:50:56:00:01:02"));
    assert_eq!(spec.networks.len(), 1);
    let after = (f.sim.vm("vm-101").unwrap(), f.sim.vm("vm-102").unwrap());
    assert_eq!(format!("{before:?}"), format!("{after:?}"), "attach modified a VM");

    let again = Selector::Machines { environment: "prod2".into(), names: vec!["web".into()] };
    let err = f.backend.attach(&again).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
    let missing = Selector::Machines { environment: "p3".into(), names: vec!["nope".into()] };
    assert!(matches!(f.backend.attach(&missing).await.unwrap_err(), Error::NotFound { .. }));
    let label = Selector::Label { environment: "p4".into(), key: "k".into(), value: "v".into() };
    assert!(matches!(f.backend.attach(&label).await.unwrap_err(), Error::NotSupported { .. }));
    assert!(matches!(f.backend.create(&sample_spec("x")).await.unwrap_err(), Error::NotSupported { .. }));
    assert!(matches!(f.backend.swap("prod", "x").await.unwrap_err(), Error::NotSupported { .. }));
    f.backend.client().full_clone("vm-101", "my web", Some("group-v11"), false).await.unwrap();
    let odd = Selector::Machines { environment: "p5".into(), names: vec!["my web".into()] };
    let err = f.backend.attach(&odd).await.unwrap_err();
    assert!(matches!(err, Error::InvalidSpec { ref path, .. } if path == "selector.names"), "{err}");
    assert_eq!(f.backend.list().await.unwrap().len(), 1);
    assert_no_violations(&f.sim);
}

#[tokio::test]
async fn destroy_deletes_stages_and_only_forgets_production() {
    let f = fixture(None).await;
    let prod = attach(&f, "prod").await;
    let baseline = prod.take_baseline().await.unwrap();
    let stage =
        f.backend.stage(&baseline, &StageOptions { fenced: false, ..StageOptions::linked("s1") }).await.unwrap();
    let web = stage_vm(&stage, "web").await;
    let err = f.backend.destroy("prod").await.unwrap_err();
    assert!(matches!(err, Error::Precondition(_)), "linked stage still stands on production: {err}");
    f.backend.destroy("s1").await.unwrap();
    assert!(f.sim.vm_by_name(&web).is_none(), "stage VM not deleted");
    f.backend.destroy("prod").await.unwrap();
    for id in ["vm-101", "vm-102"] {
        let vm = f.sim.vm(id).expect("production VM kept");
        assert!(vm.root_snapshots.is_empty(), "baseline snapshot of {id} left behind");
    }
    assert!(f.backend.list().await.unwrap().is_empty());
    assert!(matches!(f.backend.destroy("prod").await.unwrap_err(), Error::NotFound { .. }));
    assert_no_violations(&f.sim);
}

#[tokio::test]
async fn failed_stage_deletes_the_clones_already_made() {
    let f = fixture(None).await;
    let prod = attach(&f, "prod").await;
    let baseline = prod.take_baseline().await.unwrap();
    // A VM already called like the stage's second machine makes the second clone fail.
    let blocker = f.backend.client().full_clone("vm-102", "s1-db", Some("group-v11"), false).await.unwrap();
    let opts = StageOptions { fenced: false, ..StageOptions::linked("s1") };
    let err = f.backend.stage(&baseline, &opts).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
    assert!(f.sim.vm_by_name("s1-web").is_none(), "the first clone was left behind");
    assert_eq!(f.backend.list().await.unwrap().len(), 1);
    f.backend.client().delete_vm(&blocker).await.unwrap();
    f.backend.stage(&baseline, &opts).await.expect("succeeds once the name is free");
    assert_no_violations(&f.sim);
}

#[tokio::test]
async fn environments_persist_in_the_registry() {
    let f = fixture(None).await;
    let prod = attach(&f, "prod").await;
    let baseline = prod.take_baseline().await.unwrap();
    f.backend.stage(&baseline, &StageOptions { fenced: false, ..StageOptions::full("s1") }).await.unwrap();
    let opts = VsphereOptions::new(f.dir.path());
    let again = VsphereBackend::connect(config(f.sim.http_url()), opts).await.unwrap();
    let stage = again.open("s1").await.unwrap();
    let info = stage.info().await.unwrap();
    assert_eq!(info.stage().unwrap().baseline.id, baseline.id);
    assert_eq!(again.list().await.unwrap().len(), 2);
    assert_no_violations(&f.sim);
}

#[tokio::test]
async fn vms_deleted_behind_our_back() {
    let f = fixture(None).await;
    let prod = attach(&f, "prod").await;
    let baseline = prod.take_baseline().await.unwrap();
    let stage =
        f.backend.stage(&baseline, &StageOptions { fenced: false, ..StageOptions::linked("s1") }).await.unwrap();
    let web = f.sim.vm_by_name(&stage_vm(&stage, "web").await).unwrap().id;
    f.backend.client().delete_vm(&web).await.unwrap();
    assert!(matches!(stage.info().await.unwrap_err(), Error::NotFound { .. }));
    let listed = f.backend.list().await.expect("list survives a missing VM");
    assert_eq!(listed.len(), 2);
    f.backend.destroy("s1").await.expect("destroy tolerates a VM already gone");
    assert_eq!(f.backend.list().await.unwrap().len(), 1);
    assert_no_violations(&f.sim);
}
