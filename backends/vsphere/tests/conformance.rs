//! The stagecore conformance kit against the vCenter simulator, one test per applicable kit
//! function, each with its own simulator and registry. The production factory attaches the
//! simulator's seed VMs `web` and `db` (after turning on CBT for `db`, as an administrator would,
//! so disk drift is checked on every disk). Functions needing `create`, `disk_io` or
//! `config_changes` are not called (see docs/backends/vsphere.md); `backend.rs` covers the rest.

mod common;

use std::sync::Arc;

use common::*;
use stagecore::{Backend, Selector};
use stagecore_testkit::{Kit, ProductionFactory, bad_input, clone, invariants};
use stagecore_vsphere::{Reconfig, VsphereBackend, VsphereOptions};
use stagecore_vsphere_sim::Simulator;

struct Fixture {
    sim: Simulator,
    backend: Arc<VsphereBackend>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Self {
        let sim = sim().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut opts = VsphereOptions::new(dir.path());
        opts.isolated_network = Some("isolated-pg".into());
        opts.folder = Some("stage".into());
        let backend = Arc::new(VsphereBackend::connect(config(sim.http_url()), opts).await.expect("connect"));
        Fixture { sim, backend, _dir: dir }
    }

    fn kit(&self) -> Kit {
        let b = self.backend.clone();
        let factory: ProductionFactory = Arc::new(move |name: String| {
            let b = b.clone();
            Box::pin(async move {
                let cbt = Reconfig { change_tracking: Some(true), ..Default::default() };
                b.client().reconfigure("vm-102", &cbt).await?;
                let names = vec!["web".to_string(), "db".to_string()];
                b.attach(&Selector::Machines { environment: name, names }).await
            })
        });
        Kit::with_factory(self.backend.clone(), factory)
    }

    /// Every clone made during the test is gone again and nothing violated the OpenAPI documents.
    async fn finish(&self) {
        assert_no_violations(&self.sim);
        let left = self.backend.client().list_vms(&[], &["group-v11"]).await.unwrap();
        assert!(left.is_empty(), "stage VMs left behind: {left:?}");
        assert!(self.backend.list().await.unwrap().is_empty(), "environments left in the registry");
        assert!(self.sim.vm("vm-101").is_some() && self.sim.vm("vm-102").is_some(), "production VMs deleted");
        for id in ["vm-101", "vm-102"] {
            let vm = self.sim.vm(id).unwrap();
            assert!(vm.root_snapshots.is_empty(), "{id} kept snapshots after its environment was destroyed");
        }
    }
}

#[tokio::test]
async fn spec_round_trip() {
    let f = Fixture::new().await;
    clone::spec_round_trip(&f.kit()).await;
    f.finish().await;
}

#[tokio::test]
async fn linked_clone() {
    let f = Fixture::new().await;
    clone::linked_clone(&f.kit()).await;
    f.finish().await;
}

#[tokio::test]
async fn full_clone() {
    let f = Fixture::new().await;
    clone::full_clone(&f.kit()).await;
    f.finish().await;
}

#[tokio::test]
async fn identity_safety() {
    let f = Fixture::new().await;
    clone::identity_safety(&f.kit()).await;
    f.finish().await;
}

#[tokio::test]
async fn fencing_flag() {
    let f = Fixture::new().await;
    clone::fencing_flag(&f.kit()).await;
    f.finish().await;
}

#[tokio::test]
async fn zero_drift_after_clone() {
    let f = Fixture::new().await;
    invariants::zero_drift_after_clone(&f.kit()).await;
    f.finish().await;
}

#[tokio::test]
async fn bad_input_is_typed() {
    let f = Fixture::new().await;
    bad_input::bad_input_is_typed(&f.kit()).await;
    f.finish().await;
}
