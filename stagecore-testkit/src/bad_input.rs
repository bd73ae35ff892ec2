//! Invariant 6: bad input gets a typed error naming what and where, and leaves nothing behind.

use stagecore::{Change, Error, StageOptions, memory::sample_spec};

use crate::{Kit, cleanup, unique};

fn names(list: &[stagecore::EnvironmentInfo]) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|i| i.name.clone()).collect();
    v.sort();
    v
}

/// Bad stage names, unknown environments, machines and snapshots, and name clashes.
pub async fn bad_input_is_typed(kit: &Kit) {
    let pname = unique("kit-prod");
    let prod = kit.production(&pname).await.expect("production");
    let baseline = prod.take_baseline().await.expect("baseline");
    let before = names(&kit.backend.list().await.unwrap());

    for bad in ["../x", "a/b", "", "tab\tname", ".hidden"] {
        let err = kit.backend.stage(&baseline, &StageOptions::linked(bad)).await.unwrap_err();
        assert!(matches!(err, Error::InvalidSpec { .. }), "stage name {bad:?}: {err}");
    }
    let opts = StageOptions { name_prefix: Some("../".into()), ..StageOptions::linked(unique("kit-bad")) };
    let err = kit.backend.stage(&baseline, &opts).await.unwrap_err();
    assert!(matches!(err, Error::InvalidSpec { ref path, .. } if path == "stage.name_prefix"), "{err}");

    let err = kit.backend.stage(&baseline, &StageOptions::linked(&pname)).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "a stage named like production: {err}");
    assert_eq!(names(&kit.backend.list().await.unwrap()), before, "a failed stage left something behind");

    let err = kit.backend.open(&unique("kit-missing")).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    let err = kit.backend.open("../etc").await.unwrap_err();
    assert!(matches!(err, Error::InvalidSpec { .. }), "{err}");

    let err = prod.apply(&Change::SetMemory { machine: "no-such-machine".into(), memory_mib: 256 }).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { ref name, .. } if name.contains("no-such-machine")), "{err}");
    let err = prod.revert_snapshot("no-such-snapshot").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");

    if kit.caps().create {
        let mut spec = sample_spec(&unique("kit-bad"));
        spec.machines[1].disks[0].source.clear();
        let err = kit.backend.create(&spec).await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidSpec { ref path, .. } if path == "machines[1].disks[0].source"),
            "disk without source: {err}"
        );
        let mut spec = sample_spec("../x");
        spec.machines.clear();
        let err = kit.backend.create(&spec).await.unwrap_err();
        assert!(matches!(err, Error::InvalidSpec { ref path, .. } if path == "name"), "{err}");
    }
    assert_eq!(names(&kit.backend.list().await.unwrap()), before, "bad input left something behind");
    cleanup(&*kit.backend, &[&pname]).await;
}
