//! The stagecore conformance kit against the live libvirtd (`qemu:///system`, TCG domains): one
//! test per kit case (`stagecore_testkit::conformance_tests!`), gated by the backend's
//! capabilities, promotion included. Productions are `sample_spec` environments (3 machines,
//! 64 MiB qcow2 disks, two networks) made with `Backend::create` under a unique state directory
//! in /var/lib/libvirt/images; the guard removes every domain and network using that directory,
//! even when a test fails. The same cases run over a remote URI in `conformance_remote.rs`.

mod common;

use common::Guard;
use stagecore_testkit::Kit;

async fn setup() -> (Guard, Kit) {
    let g = Guard::new("k");
    let kit = common::kit(g.backend().await);
    (g, kit)
}

stagecore_testkit::conformance_tests!(setup);
