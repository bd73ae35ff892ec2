//! The in-memory reference backend runs every conformance case (one test each, from
//! `conformance_tests!`), plus the guest-drift functions against its simulated guest.

use std::sync::Arc;

use stagecore::memory::MemoryBackend;
use stagecore_testkit::Kit;

fn kit() -> Kit {
    Kit::new(Arc::new(MemoryBackend::new()))
}

async fn setup() -> ((), Kit) {
    ((), kit())
}

stagecore_testkit::conformance_tests!(setup);

/// A backend that declares nothing but `create` (the memory backend with its other capabilities
/// hidden): the check layer refuses every undeclared call with NotSupported.
mod declared_false {
    use std::sync::Arc;

    use async_trait::async_trait;
    use stagecore::{
        Backend, Baseline, Capabilities, DynEnvironment, EnvironmentInfo, EnvironmentSpec, Result, Selector,
        StageOptions, memory::MemoryBackend,
    };

    #[derive(Debug)]
    struct Narrow(MemoryBackend);

    #[async_trait]
    impl Backend for Narrow {
        fn name(&self) -> &'static str {
            "narrow"
        }
        fn capabilities(&self) -> Capabilities {
            let mut c = Capabilities::default();
            c.create = true;
            c.linked_clone = true;
            c.disk_io = true;
            c.guest_channel = true;
            c
        }
        async fn create(&self, spec: &EnvironmentSpec) -> Result<DynEnvironment> {
            self.0.create(spec).await
        }
        async fn attach(&self, selector: &Selector) -> Result<DynEnvironment> {
            self.0.attach(selector).await
        }
        async fn stage(&self, baseline: &Baseline, options: &StageOptions) -> Result<DynEnvironment> {
            self.0.stage(baseline, options).await
        }
        async fn open(&self, name: &str) -> Result<DynEnvironment> {
            self.0.open(name).await
        }
        async fn list(&self) -> Result<Vec<EnvironmentInfo>> {
            self.0.list().await
        }
        async fn destroy(&self, name: &str) -> Result<()> {
            self.0.destroy(name).await
        }
        async fn swap(&self, production: &str, stage: &str) -> Result<()> {
            self.0.swap(production, stage).await
        }
    }

    #[tokio::test]
    async fn undeclared_capabilities_are_refused() {
        let kit = stagecore_testkit::Kit::new(Arc::new(Narrow(MemoryBackend::new())));
        stagecore_testkit::capability::declared_false_gives_not_supported(&kit).await;
    }

    #[tokio::test]
    async fn undeclared_cases_run_the_refusal_check_instead() {
        let kit = stagecore_testkit::Kit::new(Arc::new(Narrow(MemoryBackend::new())));
        stagecore_testkit::suite::run_case(kit, "promotion_swap_commits").await;
    }
}

#[tokio::test]
async fn a_panicking_case_still_cleans_up() {
    let backend = Arc::new(MemoryBackend::new());
    let kit = Kit::new(backend.clone());
    let k = kit.clone();
    let outcome = tokio::spawn(async move {
        let prod = k.production("kit-panics").await.expect("production");
        let baseline = prod.take_baseline().await.expect("baseline");
        k.backend.stage(&baseline, &stagecore::StageOptions::linked("kit-panics-stage")).await.expect("stage");
        panic!("a kit function failed half-way");
    })
    .await;
    assert!(outcome.is_err());
    kit.cleanup_tracked().await;
    use stagecore::Backend;
    assert!(backend.list().await.unwrap().is_empty(), "cleanup left environments behind");
}

mod guest_drift {
    use super::kit;
    use stagecore_testkit::guest_drift::{self, GuestFixture};

    #[tokio::test]
    async fn zero_guest_drift_after_clone() {
        guest_drift::zero_guest_drift_after_clone(&kit(), &GuestFixture::simulated()).await;
    }

    #[tokio::test]
    async fn guest_change_is_intended() {
        guest_drift::guest_change_is_intended(&kit(), &GuestFixture::simulated()).await;
    }

    #[tokio::test]
    async fn footprint_verify() {
        guest_drift::footprint_verify(&kit(), &GuestFixture::simulated()).await;
    }

    #[tokio::test]
    async fn gates_on_stage() {
        guest_drift::gates_on_stage(&kit(), &GuestFixture::simulated()).await;
    }

    #[tokio::test]
    async fn rebase_without_conflict() {
        guest_drift::rebase_without_conflict(&kit(), &GuestFixture::simulated()).await;
    }

    #[tokio::test]
    async fn rebase_with_conflict() {
        guest_drift::rebase_with_conflict(&kit(), &GuestFixture::simulated()).await;
    }

    #[tokio::test]
    async fn production_untouched_by_inventory() {
        guest_drift::production_untouched_by_inventory(&kit(), &GuestFixture::simulated()).await;
    }
}
