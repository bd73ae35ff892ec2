//! Live tests against libvirtd on `qemu:///system` with TCG domains. They FAIL when the daemon is
//! not running. Every domain, network and file a test makes carries a unique tag and is removed by
//! [`common::Guard`] even when the test fails.

mod common;

use stagecore::drift::Status;
use stagecore::{
    Backend, BackendExt, ChangeMap, DiskFormat, DiskSpec, EnvironmentExt, EnvironmentSpec, Error, MachineSpec, Role,
    Selector, StageOptions, memory::sample_spec,
};

use common::{Guard, small, virsh};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_stage_snapshot_revert_drift() {
    let g = Guard::new("t1");
    let backend = g.backend().await;
    let prod_name = format!("p{}", g.tag);
    let prod = backend.create(&small(sample_spec(&prod_name))).await.expect("create production");
    assert_eq!(g.domains().len(), 3, "three production domains");

    let io = prod.disk_io().expect("disk io");
    io.write("db", "disk0", 4096, b"production data").await.expect("write production disk");
    let before = prod.fingerprint().await.expect("fingerprint");
    prod.start().await.expect("start production");

    let baseline = prod.take_baseline().await.expect("baseline of a running production");
    assert_eq!(baseline.layers.len(), 3);
    let after = prod.fingerprint().await.expect("fingerprint");
    assert_eq!(before.disks, after.disks, "a baseline does not change what production's guests read");
    assert!(prod.status().await.unwrap().iter().all(|s| s.power == stagecore::PowerState::Running));

    let stage_name = format!("s{}", g.tag);
    let stage = backend.stage(&baseline, &StageOptions::linked(&stage_name)).await.expect("linked stage");
    let info = stage.info().await.unwrap();
    assert!(matches!(info.role, Role::Stage(_)));
    assert!(info.machines.iter().all(|m| m.instance_name.starts_with(&format!("{stage_name}-"))));
    let (p_spec, s_spec) = (prod.spec().await.unwrap(), stage.spec().await.unwrap());
    for (p, s) in p_spec.machines.iter().zip(&s_spec.machines) {
        assert_ne!(p.uuid, s.uuid, "new UUID for {}", p.name);
        for (pn, sn) in p.nics.iter().zip(&s.nics) {
            assert_ne!(pn.mac, sn.mac, "new MAC for {}/{}", p.name, pn.name);
            assert_eq!(pn.network, sn.network, "logical network names are kept");
        }
    }
    let fenced: Vec<String> = g.networks().into_iter().filter(|n| n.starts_with(&stage_name)).collect();
    assert_eq!(fenced.len(), 2, "one isolated network per production network: {fenced:?}");
    let net_xml = virsh(&["net-dumpxml", &fenced[0]]).join("\n");
    assert!(!net_xml.contains("<forward"), "stage networks are isolated: {net_xml}");

    let report = backend.drift(&*prod, &*stage).await.expect("drift");
    assert_eq!(report.status, Status::InSync, "a fresh clone has no drift: {report:?}");

    let sio = stage.disk_io().unwrap();
    assert_eq!(sio.read("db", "disk0", 4096, 15).await.unwrap(), b"production data");
    sio.write("app", "disk0", 1 << 20, b"stage change").await.expect("write stage disk");
    let changes = stage.disk_changes(&baseline).await.unwrap();
    let app = changes.iter().find(|c| c.machine == "app").unwrap();
    assert!(matches!(&app.changes, ChangeMap::Checked { extents } if !extents.is_empty()), "{app:?}");
    let report = backend.drift(&*prod, &*stage).await.expect("drift");
    assert_eq!(report.status, Status::Drifted);

    // Snapshot a running stage, change, revert.
    stage.start().await.expect("start stage");
    let snap = stage.create_snapshot("s1").await.expect("live snapshot");
    assert_eq!(snap.name, "s1");
    let at_snapshot = sio.digest("app", "disk0").await.unwrap();
    stage.stop().await.unwrap();
    sio.write("app", "disk0", 2 << 20, b"after the snapshot").await.unwrap();
    assert_ne!(sio.digest("app", "disk0").await.unwrap(), at_snapshot);
    stage.revert_snapshot("s1").await.expect("revert");
    assert_eq!(sio.digest("app", "disk0").await.unwrap(), at_snapshot, "revert gives back the disk");
    assert_eq!(stage.list_snapshots().await.unwrap().len(), 1);
    stage.delete_snapshot("s1").await.expect("delete snapshot");
    assert_eq!(sio.digest("app", "disk0").await.unwrap(), at_snapshot, "delete keeps the chain valid");

    assert_eq!(prod.fingerprint().await.unwrap().disks, before.disks, "staging never changes production's disks");
    assert_eq!(prod.spec().await.unwrap(), p_spec, "staging never changes production's definitions");

    // Reopen from libvirt alone.
    let again = g.backend().await.open(&stage_name).await.expect("reopen stage");
    assert_eq!(again.info().await.unwrap().stage().unwrap().baseline.id, baseline.id);

    assert!(matches!(backend.destroy(&prod_name).await, Err(Error::Precondition(_))), "linked stage first");
    backend.destroy(&stage_name).await.expect("destroy stage");
    backend.destroy(&prod_name).await.expect("destroy production");
    assert!(g.domains().is_empty(), "left: {:?}", g.domains());
    assert!(g.networks().is_empty(), "left: {:?}", g.networks());
}

fn raw_spec(name: &str) -> EnvironmentSpec {
    EnvironmentSpec {
        name: name.into(),
        machines: vec![MachineSpec {
            name: "app".into(),
            uuid: None,
            vcpus: 1,
            memory_mib: 64,
            firmware: Default::default(),
            disks: vec![DiskSpec {
                name: "disk0".into(),
                source: "app.raw".into(),
                format: DiskFormat::Raw,
                size_bytes: Some(4 << 20),
                read_only: false,
            }],
            nics: Vec::new(),
            labels: Default::default(),
            boot: None,
            after: Vec::new(),
        }],
        networks: Vec::new(),
        labels: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_leaves_nothing_behind() {
    let g = Guard::new("t2");
    let backend = g.backend().await;

    let unknown = Selector::Machines { environment: format!("u{}", g.tag), names: vec![format!("nope-{}", g.tag)] };
    assert!(matches!(backend.attach(&unknown).await, Err(Error::NotFound { kind: "domain", .. })));
    assert!(matches!(backend.open(&format!("none{}", g.tag)).await, Err(Error::NotFound { .. })));

    let prod_name = format!("r{}", g.tag);
    let prod = backend.create(&raw_spec(&prod_name)).await.expect("raw production");
    prod.disk_io().unwrap().write("app", "disk0", 0, b"raw data").await.unwrap();
    let baseline = prod.take_baseline().await.expect("baseline of a stopped raw production");
    let err = backend.stage(&baseline, &StageOptions::linked(format!("l{}", g.tag))).await.unwrap_err();
    match &err {
        Error::InvalidSpec { path, reason } => {
            assert!(path.contains("format"), "{err}");
            assert!(reason.contains("full clone"), "{err}");
        }
        other => panic!("expected InvalidSpec, got {other}"),
    }
    let full_name = format!("f{}", g.tag);
    let full = backend.stage(&baseline, &StageOptions::full(&full_name)).await.expect("full clone of raw");
    assert_eq!(full.disk_io().unwrap().read("app", "disk0", 0, 8).await.unwrap(), b"raw data");
    let report = backend.drift(&*prod, &*full).await.unwrap();
    assert_eq!(report.status, Status::InSync, "{report:?}");

    // Name clash: a domain already holds the stage's name for `app`.
    let clash = format!("c{}", g.tag);
    let xml = format!(
        "<domain type='qemu'><name>{clash}-app</name><memory unit='MiB'>32</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>"
    );
    let xml_path = g.dir.join("clash.xml");
    std::fs::write(&xml_path, xml).unwrap();
    assert_eq!(virsh(&["define", xml_path.to_str().unwrap()]).len(), 1);
    let err = backend.stage(&baseline, &StageOptions::full(&clash)).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { kind: "domain", .. }), "{err}");
    assert_eq!(g.domains().iter().filter(|d| d.starts_with(&clash)).count(), 1, "only the clashing domain");
    assert!(!g.dir.join(&clash).exists(), "no stage files left");
    assert!(matches!(backend.open(&clash).await, Err(Error::NotFound { .. })));

    assert!(matches!(
        backend.stage(&baseline, &StageOptions::full(&full_name)).await,
        Err(Error::AlreadyExists { kind: "environment", .. })
    ));
    backend.destroy(&full_name).await.unwrap();
    backend.destroy(&prod_name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_by_name_and_label_does_not_edit_definitions() {
    let g = Guard::new("t3");
    std::fs::create_dir_all(&g.dir).unwrap();
    let mut names = Vec::new();
    for (i, tier) in ["web", "db"].iter().enumerate() {
        let name = format!("h{}-{tier}", g.tag);
        let disk = g.dir.join(format!("{tier}.qcow2"));
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "4M"])
            .status()
            .unwrap();
        assert!(out.success());
        let label = if i == 0 {
            format!(
                "<metadata><s:env xmlns:s='https://stagecore.dev/xmlns/stage/1'><s:label key='svc'>{}</s:label></s:env></metadata>",
                g.tag
            )
        } else {
            String::new()
        };
        let xml = format!(
            "<domain type='qemu'><name>{name}</name>{label}<memory unit='MiB'>32</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>\
             <driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>\
             <serial type='pty'/></devices></domain>",
            disk.display()
        );
        let path = g.dir.join(format!("{tier}.xml"));
        std::fs::write(&path, xml).unwrap();
        virsh(&["define", path.to_str().unwrap()]);
        names.push(name);
    }
    let dumps = |names: &[String]| names.iter().map(|n| virsh(&["dumpxml", "--inactive", n])).collect::<Vec<_>>();
    let before = dumps(&names);
    let backend = g.backend().await;
    let env_name = format!("a{}", g.tag);
    let env = backend
        .attach(&Selector::Machines { environment: env_name.clone(), names: names.clone() })
        .await
        .expect("attach by names");
    assert_eq!(dumps(&names), before, "attaching writes nothing into production's definitions");
    let spec = env.spec().await.unwrap();
    assert_eq!(spec.machines.len(), 2);
    assert_eq!(spec.machines[0].disks[0].size_bytes, Some(4 << 20));
    assert!(backend.list().await.unwrap().iter().any(|i| i.name == env_name));

    let by_label = backend
        .attach(&Selector::Label { environment: format!("b{}", g.tag), key: "svc".into(), value: g.tag.clone() })
        .await
        .expect("attach by label");
    assert_eq!(by_label.spec().await.unwrap().machines.len(), 1);
    assert_eq!(by_label.spec().await.unwrap().machines[0].labels.get("svc"), Some(&g.tag));

    backend.destroy(&env_name).await.expect("forget the attached production");
    assert_eq!(dumps(&names), before, "destroying an attached production never touches its domains");
    assert_eq!(g.domains().len(), 2);

    // A domain that vanishes behind our back is named in a NotFound, not silently dropped.
    let again = backend
        .attach(&Selector::Machines { environment: env_name.clone(), names: names.clone() })
        .await
        .expect("attach again");
    virsh(&["undefine", &names[1]]);
    let err = again.spec().await.unwrap_err();
    assert!(matches!(&err, Error::NotFound { kind: "domain", name, .. } if *name == names[1]), "{err}");
    assert!(matches!(again.take_baseline().await, Err(Error::NotFound { kind: "domain", .. })));
    backend.destroy(&env_name).await.expect("an attached production can be forgotten even when its domains are gone");
    assert!(matches!(backend.open(&env_name).await, Err(Error::NotFound { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_config_changes_through_libvirt() {
    use stagecore::{Change, ChangeSet, NicSpec};
    let g = Guard::new("t4");
    let backend = g.backend().await;
    let prod_name = format!("p{}", g.tag);
    let prod = backend.create(&small(sample_spec(&prod_name))).await.expect("create");
    let baseline = prod.take_baseline().await.unwrap();
    let stage_name = format!("s{}", g.tag);
    let stage = backend.stage(&baseline, &StageOptions::linked(&stage_name)).await.unwrap();
    let cs = ChangeSet {
        id: "cs-1".into(),
        description: "bigger app, extra NIC and disk".into(),
        changes: vec![
            Change::SetMemory { machine: "app".into(), memory_mib: 96 },
            Change::SetVcpus { machine: "app".into(), vcpus: 2 },
            Change::AddNic {
                machine: "app".into(),
                nic: NicSpec { name: "eth9".into(), network: "frontend".into(), mac: None, model: "virtio".into() },
            },
            Change::AddDisk {
                machine: "db".into(),
                disk: DiskSpec {
                    name: "data".into(),
                    source: String::new(),
                    format: DiskFormat::Qcow2,
                    size_bytes: Some(2 << 20),
                    read_only: false,
                },
            },
            Change::RemoveNic { machine: "web".into(), nic: "eth1".into() },
        ],
    };
    stage.apply_change_set(&cs).await.expect("apply");
    let spec = stage.spec().await.unwrap();
    let app = spec.machine("app").unwrap();
    assert_eq!((app.memory_mib, app.vcpus), (96, 2));
    assert_eq!(app.nic("eth9").unwrap().network, "frontend");
    assert_eq!(spec.machine("db").unwrap().disk("data").unwrap().size_bytes, Some(2 << 20));
    assert!(spec.machine("web").unwrap().nic("eth1").is_none());
    let report = backend.drift(&*prod, &*stage).await.unwrap();
    assert!(report.config.records.iter().all(|r| r.intended), "every config change is intended: {report:?}");
    assert_eq!(stage.info().await.unwrap().stage().unwrap().change_sets, vec![cs]);
    backend.destroy(&stage_name).await.unwrap();
    backend.destroy(&prod_name).await.unwrap();
    assert!(g.domains().is_empty() && g.networks().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_a_running_production_and_back() {
    use stagecore::{Change, PowerState};
    let g = Guard::new("t5");
    let backend = g.backend().await;
    let (prod_name, stage_name) = (format!("p{}", g.tag), format!("s{}", g.tag));
    let prod = backend.create(&small(sample_spec(&prod_name))).await.expect("create");
    prod.start().await.unwrap();
    let baseline = prod.take_baseline().await.unwrap();
    let stage = backend.stage(&baseline, &StageOptions::linked(&stage_name)).await.unwrap();
    stage.disk_io().unwrap().write("db", "disk0", 4096, b"stage data").await.unwrap();
    stage.apply(&Change::SetMemory { machine: "app".into(), memory_mib: 96 }).await.unwrap();
    let (p_info, s_info) = (prod.info().await.unwrap(), stage.info().await.unwrap());
    let (p_spec, s_spec) = (prod.spec().await.unwrap(), stage.spec().await.unwrap());

    backend.swap(&prod_name, &stage_name).await.expect("swap");
    assert_eq!(prod.info().await.unwrap(), p_info, "production keeps its domain names and UUIDs");
    assert_eq!(stage.info().await.unwrap(), s_info);
    assert!(prod.status().await.unwrap().iter().all(|s| s.power == PowerState::Stopped), "left shut off");
    let now = prod.spec().await.unwrap();
    assert_eq!(now.machine("app").unwrap().memory_mib, 96, "production runs the stage's config");
    assert_eq!(now.machine("web").unwrap().nics, p_spec.machine("web").unwrap().nics, "production's MACs/networks");
    assert_eq!(prod.disk_io().unwrap().read("db", "disk0", 4096, 10).await.unwrap(), b"stage data");
    let fenced = virsh(&["domiflist", &format!("{stage_name}-web")]).join("\n");
    assert!(fenced.contains(&format!("{stage_name}-frontend")), "the stage stays fenced: {fenced}");
    prod.start().await.expect("production starts on the stage's disks");
    // Production runs the stage's definition and disks, but keeps its own serial log file.
    let xml = virsh(&["dumpxml", "--inactive", &format!("{prod_name}-web")]).join("\n");
    let serial = xml.split("<serial").nth(1).and_then(|s| s.split("</serial>").next()).unwrap_or_default();
    let own_log = g.dir.join(&prod_name).join("web.serial.log");
    assert!(serial.contains(own_log.to_str().unwrap()), "production keeps its own serial log: {xml}");

    backend.swap(&prod_name, &stage_name).await.expect("swap back");
    assert_eq!((prod.spec().await.unwrap(), stage.spec().await.unwrap()), (p_spec, s_spec), "all back");
    backend.destroy(&stage_name).await.unwrap();
    backend.destroy(&prod_name).await.unwrap();
}
