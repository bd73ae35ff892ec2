//! The stagecore conformance kit against the vCenter simulator: one test per kit case
//! (`stagecore_testkit::conformance_tests!`), each with its own simulator and registry. The
//! production factory attaches the simulator's seed VMs `web` and `db` (after turning on CBT for
//! `db`, as an administrator would, so disk drift is checked on every disk). Cases needing what
//! vSphere does not declare (`create`, `disk_io`, `swap`, NIC/disk changes) run the kit's
//! "declared false gives NotSupported" check instead. After every case the fixture checks that no
//! stage VM, registry entry or production snapshot is left and that nothing violated the OpenAPI
//! documents. (The vim_rs request-type conformance tests live in `sim/tests/vim_conformance.rs`.)

mod common;

use std::sync::Arc;

use common::*;
use stagecore::{Backend, Error, Selector, StageOptions};
use stagecore_testkit::{Kit, ProductionFactory};
use stagecore_vsphere::{Reconfig, VsphereBackend, VsphereOptions};
use stagecore_vsphere_sim::Simulator;

struct Fixture {
    sim: Simulator,
    backend: Arc<VsphereBackend>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn new(isolated_network: Option<&str>) -> Self {
        let sim = sim().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut opts = VsphereOptions::new(dir.path());
        opts.isolated_network = isolated_network.map(str::to_string);
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

impl Drop for Fixture {
    /// Runs [`Fixture::finish`] once the case (and the kit's cleanup) is over, unless the case
    /// already panicked.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(self.finish()));
        }
    }
}

async fn setup() -> (Fixture, Kit) {
    let f = Fixture::new(Some("isolated-pg")).await;
    let kit = f.kit();
    (f, kit)
}

stagecore_testkit::conformance_tests!(setup);

/// Without an isolated network fencing is not declared: the kit's check proves it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_undeclared_without_isolated_network() {
    let f = Fixture::new(None).await;
    assert!(!f.backend.capabilities().fencing);
    stagecore_testkit::suite::run_case(f.kit(), "fencing_flag").await;
}

/// The backend itself (not only the check layer) refuses what it does not declare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_refuses_undeclared_without_the_check_layer() {
    let f = Fixture::new(None).await;
    let b = &*f.backend;
    assert!(matches!(b.create(&stagecore::memory::sample_spec("p")).await, Err(Error::NotSupported { .. })));
    assert!(matches!(b.swap("a", "b").await, Err(Error::NotSupported { .. })));
    let prod = b
        .attach(&Selector::Machines { environment: "prod".into(), names: vec!["web".into(), "db".into()] })
        .await
        .expect("attach");
    let baseline = prod.take_baseline().await.expect("baseline");
    let fenced = StageOptions { fenced: true, ..StageOptions::linked("try-1") };
    assert!(matches!(b.stage(&baseline, &fenced).await, Err(Error::NotSupported { .. })));
    assert!(b.open("try-1").await.is_err(), "a refused stage left try-1 behind");
    drop(prod);
    b.destroy("prod").await.expect("destroy");
}
