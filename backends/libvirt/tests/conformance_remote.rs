//! The stagecore conformance kit over a remote URI: `qemu+tcp://` to libvirtd test host A
//! (`cargo xtask hosts`; its own network and mount namespaces), with the state directory on the
//! client (a temp directory) and every image a storage volume on the host under a unique root
//! that does not exist on the client — so any code path touching the client's filesystem for
//! images would fail. [`common::RemoteGuard`] removes domains, networks and pools afterwards.
//! Same cases as `conformance.rs` (both from `stagecore_testkit::conformance_tests!`).

mod common;

use common::RemoteGuard;
use stagecore_testkit::Kit;

async fn setup() -> (RemoteGuard, Kit) {
    let g = RemoteGuard::new("STAGECORE_LIBVIRT_HOST_A", "rk");
    let kit = common::kit(g.backend().await);
    (g, kit)
}

stagecore_testkit::conformance_tests!(setup);
