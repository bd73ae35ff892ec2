//! Shared test helpers: start a simulator, build a client, assert zero OpenAPI violations.

#![allow(dead_code)]

use stagecore::Secret;
use stagecore_vsphere::{RetryPolicy, TaskPolicy, VsphereClient, VsphereConfig};
use stagecore_vsphere_sim::{SIM_PASSWORD, SIM_USER, SimOptions, Simulator};
use std::time::Duration;

/// Starts a simulator with the default inventory.
pub(crate) async fn sim() -> Simulator {
    Simulator::start(SimOptions::default()).await.expect("simulator starts (OpenAPI documents present)")
}

/// A client configuration with short backoffs for tests.
pub(crate) fn config(url: &str) -> VsphereConfig {
    let mut c = VsphereConfig::new(url, SIM_USER, Secret::new(SIM_PASSWORD)).expect("valid config");
    c.retry = RetryPolicy {
        max_attempts: 5,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(40),
    };
    c.task = TaskPolicy {
        initial_interval: Duration::from_millis(5),
        max_interval: Duration::from_millis(40),
        timeout: Duration::from_secs(30),
    };
    c.deadline = Duration::from_secs(30);
    c
}

/// A simulator and a client connected to it over plain HTTP.
pub(crate) async fn setup() -> (Simulator, VsphereClient) {
    let sim = sim().await;
    let client = VsphereClient::connect(config(sim.http_url())).await.expect("connect");
    (sim, client)
}

/// Every test ends here: the whole run must produce zero OpenAPI violations.
pub(crate) fn assert_no_violations(sim: &Simulator) {
    let v = sim.violations();
    assert!(v.is_empty(), "OpenAPI violations: {v:#?}");
}

/// The `VsphereFault` kept inside an `Error::Backend`.
pub(crate) fn fault(e: &stagecore::Error) -> Option<stagecore_vsphere::VsphereFault> {
    match e {
        stagecore::Error::Backend { source, .. } => source.downcast_ref::<stagecore_vsphere::VsphereFault>().cloned(),
        _ => None,
    }
}
