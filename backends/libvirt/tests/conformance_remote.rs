//! The stagecore conformance kit over a remote URI: `qemu+tcp://` to libvirtd test host A
//! (`cargo xtask hosts`; its own network and mount namespaces), with the state directory on the
//! client (a temp directory) and every image a storage volume on the host under a unique root
//! that does not exist on the client — so any code path touching the client's filesystem for
//! images would fail. [`common::RemoteGuard`] removes domains, networks and pools afterwards.
//! Same cases as `conformance.rs` (both from `stagecore_testkit::conformance_tests!`), except
//! that the crash-at-every-step cases crash at every third journal line here
//! ([`Kit::with_crash_stride`]): recovery is the same code as in the local suite, which crashes
//! at every line; lines 1, 4, 7, … of both the commit and the rollback path still put a crash
//! and a recovery over remote storage from the first step to the last, at a third of the cost
//! (each line is a full promotion and recovery, seconds each against the remote host).

mod common;

use common::RemoteGuard;
use stagecore_testkit::Kit;

async fn setup() -> (RemoteGuard, Kit) {
    let g = RemoteGuard::new("STAGECORE_LIBVIRT_HOST_A", "rk");
    let kit = common::kit(g.backend().await).with_crash_stride(3);
    (g, kit)
}

stagecore_testkit::conformance_tests!(setup);
