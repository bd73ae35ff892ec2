//! Inspecting production and cloning it: spec round-trip, linked and full clones, identity
//! safety, fencing.

use std::collections::BTreeSet;

use stagecore::drift::config_differences;
use stagecore::{CloneKind, EnvironmentSpec, Selector, SpecFormat, StageOptions, memory::sample_spec};

use crate::{Kit, cleanup, unique};

/// Inspecting a production gives a spec that matches what it was made from and survives a
/// TOML/JSON/YAML round trip.
pub async fn spec_round_trip(kit: &Kit) {
    let name = unique("kit-inspect");
    let prod = kit.production(&name).await.expect("production");
    let inspected = kit.backend.attach(&Selector::Environment { name: name.clone() }).await.expect("attach");
    let spec = inspected.spec().await.expect("spec");
    assert_eq!(spec.name, name);
    if kit.caps().create {
        let diffs = config_differences(&sample_spec(&name), &spec);
        assert!(diffs.is_empty(), "inspected spec differs from the one created: {diffs:?}");
    }
    for format in [SpecFormat::Toml, SpecFormat::Json, SpecFormat::Yaml] {
        let text = spec.render(format).expect("render");
        let back = EnvironmentSpec::parse(&text, format).expect("parse");
        assert_eq!(back, spec, "{format:?} round trip changed the spec");
    }
    drop(prod);
    cleanup(&*kit.backend, &[&name]).await;
}

async fn clone_with(kit: &Kit, kind: CloneKind) {
    let (pname, sname) = (unique("kit-prod"), unique("kit-stage"));
    let prod = kit.production(&pname).await.expect("production");
    let baseline = prod.take_baseline().await.expect("baseline");
    let opts = StageOptions { clone: kind, ..StageOptions::linked(&sname) };
    let stage = kit.backend.stage(&baseline, &opts).await.expect("stage");
    let info = stage.info().await.expect("info");
    let staged = info.stage().expect("a stage reports its stage info");
    assert_eq!(staged.source, pname);
    assert_eq!(staged.clone, kind);
    assert_eq!(staged.baseline.id, baseline.id);
    let (ps, ss) = (prod.spec().await.expect("spec"), stage.spec().await.expect("spec"));
    let diffs = config_differences(&ps, &ss);
    assert!(diffs.is_empty(), "a fresh clone's spec differs from production: {diffs:?}");
    if let (Some(pio), Some(sio)) = (prod.disk_io(), stage.disk_io()) {
        for m in &ps.machines {
            for d in &m.disks {
                let (a, b) = (pio.digest(&m.name, &d.name).await.unwrap(), sio.digest(&m.name, &d.name).await.unwrap());
                assert_eq!(a, b, "{}/{} content differs after a {kind:?} clone", m.name, d.name);
            }
        }
    }
    let listed: Vec<String> = kit.backend.list().await.expect("list").into_iter().map(|i| i.name).collect();
    assert!(listed.contains(&sname), "list() does not show the new stage");
    let reopened = kit.backend.open(&sname).await.expect("open the stage by name");
    assert_eq!(reopened.info().await.unwrap().stage().map(|s| s.source.clone()), Some(pname.clone()));
    cleanup(&*kit.backend, &[&sname, &pname]).await;
}

/// A linked clone has production's spec and disk content. Requires `linked_clone`.
pub async fn linked_clone(kit: &Kit) {
    kit.require("linked_clone", kit.caps().linked_clone);
    clone_with(kit, CloneKind::Linked).await;
}

/// A full clone has production's spec and disk content. Requires `full_clone`.
pub async fn full_clone(kit: &Kit) {
    kit.require("full_clone", kit.caps().full_clone);
    clone_with(kit, CloneKind::Full).await;
}

/// A stage never reuses production's instance names, UUIDs or MACs.
pub async fn identity_safety(kit: &Kit) {
    let (pname, sname) = (unique("kit-prod"), unique("kit-ident"));
    let prod = kit.production(&pname).await.expect("production");
    let baseline = prod.take_baseline().await.expect("baseline");
    let stage = kit.backend.stage(&baseline, &StageOptions::linked(&sname)).await.expect("stage");
    let (pi, si) = (prod.info().await.unwrap(), stage.info().await.unwrap());
    let (ps, ss) = (prod.spec().await.unwrap(), stage.spec().await.unwrap());
    let names: BTreeSet<_> = pi.machines.iter().map(|m| &m.instance_name).collect();
    let uuids: BTreeSet<_> = pi.machines.iter().map(|m| &m.uuid).collect();
    for m in &si.machines {
        assert!(!names.contains(&m.instance_name), "stage reuses instance name {}", m.instance_name);
        assert!(!uuids.contains(&m.uuid), "stage reuses UUID {}", m.uuid);
    }
    let macs = |s: &stagecore::EnvironmentSpec| -> Vec<String> {
        s.machines.iter().flat_map(|m| m.nics.iter().filter_map(|n| n.mac.clone())).collect()
    };
    let (pm, sm) = (macs(&ps), macs(&ss));
    assert_eq!(sm.len(), ss.machines.iter().map(|m| m.nics.len()).sum::<usize>(), "every stage NIC has a MAC");
    for mac in &sm {
        assert!(!pm.contains(mac), "stage reuses production MAC {mac}");
    }
    for m in &ss.machines {
        let uuid = m.uuid.as_ref().expect("stage machines report a UUID");
        assert!(!ps.machines.iter().any(|p| p.uuid.as_ref() == Some(uuid)), "spec UUID reused");
    }
    cleanup(&*kit.backend, &[&sname, &pname]).await;
}

/// Stages are fenced by default and unfenced only when asked. Requires `fencing`.
pub async fn fencing_flag(kit: &Kit) {
    kit.require("fencing", kit.caps().fencing);
    let (pname, fenced, open) = (unique("kit-prod"), unique("kit-fenced"), unique("kit-open"));
    let prod = kit.production(&pname).await.expect("production");
    let baseline = prod.take_baseline().await.expect("baseline");
    let a = kit.backend.stage(&baseline, &StageOptions::linked(&fenced)).await.expect("stage");
    assert!(a.info().await.unwrap().stage().unwrap().fenced, "stages are fenced by default");
    let opts = StageOptions { fenced: false, ..StageOptions::linked(&open) };
    let b = kit.backend.stage(&baseline, &opts).await.expect("stage");
    assert!(!b.info().await.unwrap().stage().unwrap().fenced, "fenced: false was not honoured");
    cleanup(&*kit.backend, &[&fenced, &open, &pname]).await;
}

/// `AddNic` on a stage gets a new MAC, never the one it was given (which could be production's):
/// the stage's new NIC's MAC differs from every MAC of production, and production is unchanged.
pub async fn add_nic_gets_new_mac(kit: &Kit) {
    kit.require_change("add_nic");
    let (pname, sname) = (unique("kit-prod"), unique("kit-stage"));
    let prod = kit.production(&pname).await.expect("production");
    let prod_spec = prod.spec().await.expect("spec");
    let baseline = prod.take_baseline().await.expect("baseline");
    let stage = kit.backend.stage(&baseline, &StageOptions::linked(&sname)).await.expect("stage");
    let m = &prod_spec.machines[0];
    let given = m.nics.first().and_then(|n| n.mac.clone()).expect("production's NIC has a MAC");
    let network = m.nics[0].network.clone();
    let nic = stagecore::NicSpec { name: "kitextra".into(), network, mac: Some(given.clone()), model: "virtio".into() };
    stage.apply(&stagecore::Change::AddNic { machine: m.name.clone(), nic }).await.expect("add nic");
    let staged = stage.spec().await.expect("stage spec");
    let added = staged.machine(&m.name).and_then(|x| x.nic("kitextra")).expect("the NIC was added");
    let mac = added.mac.clone().expect("the added NIC has a MAC");
    let prod_macs: BTreeSet<String> =
        prod_spec.machines.iter().flat_map(|x| x.nics.iter().filter_map(|n| n.mac.clone())).collect();
    assert!(!prod_macs.contains(&mac), "the stage's new NIC got production's MAC {mac}");
    assert_ne!(mac, given);
    assert_eq!(prod.spec().await.expect("spec"), prod_spec, "adding a NIC to the stage changed production");
    drop((stage, prod));
    cleanup(&*kit.backend, &[&sname, &pname]).await;
}
