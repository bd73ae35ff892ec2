//! What a backend does not declare it refuses: every capability declared `false` gives
//! [`Error::NotSupported`], before anything changes (the spec and the environment list are as
//! before), and the `disk_io` / `guest_channel` accessors agree with the declaration.

use stagecore::{Change, CloneKind, DiskFormat, DiskSpec, Error, NicSpec, StageOptions, memory::sample_spec};

use crate::{Kit, cleanup, unique};

fn expect_not_supported<T: std::fmt::Debug>(what: &str, r: stagecore::Result<T>) {
    match r {
        Err(Error::NotSupported { .. }) => {}
        other => panic!("{what} is declared false but gave {other:?} instead of NotSupported"),
    }
}

/// One change of every kind, against the first machine of `spec`.
fn one_of_each(spec: &stagecore::EnvironmentSpec) -> Vec<Change> {
    let m = &spec.machines[0];
    let machine = m.name.clone();
    let network = m.nics.first().map(|n| n.network.clone()).unwrap_or_else(|| "default".into());
    let disk = m.disks.first().map(|d| d.name.clone()).unwrap_or_else(|| "root".into());
    vec![
        Change::SetMemory { machine: machine.clone(), memory_mib: m.memory_mib + 128 },
        Change::SetVcpus { machine: machine.clone(), vcpus: m.vcpus + 1 },
        Change::AddNic {
            machine: machine.clone(),
            nic: NicSpec { name: "kitnic".into(), network, mac: None, model: "virtio".into() },
        },
        Change::RemoveNic { machine: machine.clone(), nic: m.nics.first().map(|n| n.name.clone()).unwrap_or_default() },
        Change::AddDisk {
            machine: machine.clone(),
            disk: DiskSpec {
                name: "kitdisk".into(),
                source: String::new(),
                format: DiskFormat::default(),
                size_bytes: Some(1 << 20),
                read_only: false,
            },
        },
        Change::RemoveDisk { machine: machine.clone(), disk: disk.clone() },
        Change::WriteDisk { machine: machine.clone(), disk: disk.clone(), offset: 0, data: b"kit".to_vec() },
        Change::ReplaceDiskImage { machine: machine.clone(), disk, image: "kit-image".into() },
        Change::GuestCommand { machine: machine.clone(), command: vec!["/bin/true".into()], timeout_secs: None },
        Change::GuestFile { machine, path: "/tmp/kit".into(), content: b"kit".to_vec(), mode: None },
    ]
}

/// Every capability the backend declares `false` is refused with `NotSupported` and changes
/// nothing; the accessors agree with `disk_io` and `guest_channel`. (Live snapshots are not
/// exercised here: that would need running machines.)
pub async fn declared_false_gives_not_supported(kit: &Kit) {
    let caps = kit.caps();
    if !caps.create {
        let name = unique("kit-nocreate");
        expect_not_supported("create", kit.backend.create(&sample_spec(&name)).await);
        assert!(kit.backend.open(&name).await.is_err(), "a refused create left {name} behind");
    }
    let pname = unique("kit-caps");
    let prod = kit.production(&pname).await.expect("production");
    assert_eq!(prod.disk_io().is_some(), caps.disk_io, "disk_io accessor disagrees with the declaration");
    assert_eq!(prod.guest().is_some(), caps.guest_channel, "guest accessor disagrees with the declaration");
    let spec = prod.spec().await.expect("spec");
    let baseline = prod.take_baseline().await.expect("baseline");
    let before: Vec<String> = kit.backend.list().await.expect("list").into_iter().map(|e| e.name).collect();
    let allowed_kind = if caps.linked_clone { CloneKind::Linked } else { CloneKind::Full };
    for (has, kind, what) in
        [(caps.linked_clone, CloneKind::Linked, "linked_clone"), (caps.full_clone, CloneKind::Full, "full_clone")]
    {
        if !has {
            let opts =
                StageOptions { clone: kind, fenced: caps.fencing, ..StageOptions::linked(unique("kit-nostage")) };
            expect_not_supported(what, kit.backend.stage(&baseline, &opts).await);
        }
    }
    if !caps.fencing && (caps.linked_clone || caps.full_clone) {
        let opts = StageOptions { clone: allowed_kind, fenced: true, ..StageOptions::linked(unique("kit-nofence")) };
        expect_not_supported("fencing", kit.backend.stage(&baseline, &opts).await);
    }
    if !caps.swap {
        expect_not_supported("swap", kit.backend.swap(&pname, &unique("kit-noswap")).await);
    }
    if !caps.disk_drift {
        expect_not_supported("disk_drift", prod.disk_changes(&baseline).await);
    }
    for change in one_of_each(&spec) {
        if !caps.allows(&change) {
            expect_not_supported(change.kind(), prod.apply(&change).await);
        }
    }
    let after: Vec<String> = kit.backend.list().await.expect("list").into_iter().map(|e| e.name).collect();
    assert_eq!(before, after, "refused calls changed the environment list");
    assert_eq!(prod.spec().await.expect("spec"), spec, "refused calls changed production's spec");
    drop(prod);
    cleanup(&*kit.backend, &[&pname]).await;
}
