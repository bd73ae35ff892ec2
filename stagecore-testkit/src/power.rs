//! Per-machine power: `start_machines` / `stop_machines` touch exactly the machines named, and
//! a name the environment does not have is `NotFound` before anything changes.

use std::collections::BTreeMap;

use stagecore::{DynEnvironment, Error, PowerState};

use crate::{Kit, cleanup, unique};

async fn powers(env: &DynEnvironment) -> BTreeMap<String, PowerState> {
    env.status().await.expect("status").into_iter().map(|s| (s.machine, s.power)).collect()
}

fn expect_not_found(err: Error, env: &str, name: &str) {
    match &err {
        Error::NotFound { kind, name: n, .. } => {
            assert_eq!(*kind, "machine", "{err}");
            assert_eq!(n, &format!("{env}/{name}"), "the unknown machine is named: {err}");
        }
        other => panic!("expected NotFound for machine {name}, got {other}"),
    }
}

/// On a stopped production of at least two machines: starting one starts only it (twice is
/// fine), a list with an unknown name is refused without stopping or starting anything, and
/// stopping the one leaves all stopped. Needs no capability.
pub async fn start_and_stop_named_machines(kit: &Kit) {
    let name = unique("kit-power");
    let prod = kit.production(&name).await.expect("production");
    prod.stop().await.expect("stop");
    let all = powers(&prod).await;
    assert!(all.len() >= 2, "the kit production needs two machines: {all:?}");
    assert!(all.values().all(|p| *p == PowerState::Stopped), "after stop: {all:?}");
    let first = all.keys().next().cloned().expect("a machine");
    let only_first = |p: &BTreeMap<String, PowerState>| {
        p.iter().all(|(m, s)| *s == if *m == first { PowerState::Running } else { PowerState::Stopped })
    };

    prod.start_machines(std::slice::from_ref(&first)).await.expect("start one machine");
    let now = powers(&prod).await;
    assert!(only_first(&now), "only {first} runs after start_machines([{first}]): {now:?}");
    prod.start_machines(std::slice::from_ref(&first)).await.expect("starting a running machine again");
    assert!(only_first(&powers(&prod).await), "starting it again changed something");

    let err = prod.stop_machines(&[first.clone(), "no-such-machine".into()]).await.unwrap_err();
    expect_not_found(err, &name, "no-such-machine");
    let now = powers(&prod).await;
    assert!(only_first(&now), "a refused stop_machines stopped something: {now:?}");
    let err = prod.start_machines(&["no-such-machine".into()]).await.unwrap_err();
    expect_not_found(err, &name, "no-such-machine");
    assert!(only_first(&powers(&prod).await), "a refused start_machines started something");

    prod.stop_machines(std::slice::from_ref(&first)).await.expect("stop one machine");
    let now = powers(&prod).await;
    assert!(now.values().all(|p| *p == PowerState::Stopped), "after stop_machines([{first}]): {now:?}");
    drop(prod);
    cleanup(&*kit.backend, &[&name]).await;
}
