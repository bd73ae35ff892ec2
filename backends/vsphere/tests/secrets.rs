//! Secrets never reach tracing output or `Debug` — in a test binary of its own.
//!
//! Why alone: the check captures events with a thread-local default subscriber
//! (`tracing::subscriber::set_default`). tracing caches each callsite's interest process-wide;
//! when another test thread registers the same callsite (the "retrying" warning, say) while
//! this thread's subscriber is being registered, the callsite can keep the interest "never"
//! computed without it, and the event is lost — the capture then misses "retrying" although the
//! client logged it. With no other test in the process there is no such race, under plain
//! `cargo test` as under nextest.

mod common;
use common::*;
use stagecore::{Backend, GuestExec, Secret, Selector};
use stagecore_vsphere::{GuestCredentials, VsphereBackend, VsphereClient, VsphereOptions};
use stagecore_vsphere_sim::{SIM_GUEST_PASSWORD, SIM_GUEST_USER, SIM_PASSWORD, SimOptions, Simulator};
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn secrets_never_in_tracing_or_debug() {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let sim = Simulator::start(SimOptions::default()).await.unwrap();
    let mut cfg = config(sim.http_url());
    cfg.insecure = true;
    let client = VsphereClient::connect(cfg.clone()).await.unwrap();
    client.list_vms(&[], &[]).await.unwrap();
    let snap = client.create_snapshot("vm-101", "s", "", false).await.unwrap();
    sim.expire_all_sessions();
    client.revert_snapshot(&snap, false).await.unwrap();
    sim.fail_next_requests_with_503(2);
    client.get_vm("vm-101").await.unwrap();
    let debug = format!("{client:?} {cfg:?}");
    client.close().await.unwrap();
    let mut wrong = cfg.clone();
    wrong.password = Secret::new("Wr0ng-Secret");
    let e = VsphereClient::connect(wrong).await.unwrap_err();

    // Guest operations: the guest password travels in request bodies only.
    let dir = tempfile::tempdir().unwrap();
    let mut opts = VsphereOptions::new(dir.path());
    opts.guest_credentials =
        Some(GuestCredentials { username: SIM_GUEST_USER.into(), password: Secret::new(SIM_GUEST_PASSWORD) });
    let backend = VsphereBackend::connect(cfg.clone(), opts.clone()).await.unwrap();
    let names = vec!["app".to_string()];
    let prod = backend.attach(&Selector::Machines { environment: "prod".into(), names }).await.unwrap();
    let guest = prod.guest().unwrap();
    let out = guest.exec("app", &GuestExec::new(["cat"]).stdin(b"x".to_vec())).await.unwrap();
    assert_eq!(out.stdout, b"x");
    guest.write_file("app", "/tmp/f", b"y", Some(0o600)).await.unwrap();
    guest.read_file("app", "/tmp/f").await.unwrap();
    let guest_debug = format!("{backend:?} {prod:?} {opts:?}");
    opts.guest_credentials =
        Some(GuestCredentials { username: SIM_GUEST_USER.into(), password: Secret::new("Wr0ng-Guest") });
    opts.state_dir = tempfile::tempdir().unwrap().keep();
    let wrong_guest = VsphereBackend::connect(cfg.clone(), opts).await.unwrap();
    let names = vec!["app".to_string()];
    let p2 = wrong_guest.attach(&Selector::Machines { environment: "p2".into(), names }).await.unwrap();
    let ge = p2.guest().unwrap().exec("app", &GuestExec::new(["true"])).await.unwrap_err();

    let logs = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("retrying") && logs.contains("session expired"), "tracing captured: {logs}");
    assert!(logs.contains("vsphere.guest_exec") && ge.to_string().contains("guest"), "{ge}");
    let tokens = sim.stats().issued_tokens;
    assert!(tokens.len() >= 4, "{tokens:?}");
    let haystack = format!("{logs}\n{debug}\n{e}\n{e:?}\n{guest_debug}\n{ge}\n{ge:?}");
    for secret in
        tokens.iter().map(String::as_str).chain([SIM_PASSWORD, "Wr0ng-Secret", SIM_GUEST_PASSWORD, "Wr0ng-Guest"])
    {
        assert!(!haystack.contains(secret), "secret `{secret}` leaked");
    }
    assert!(debug.contains("Secret(***)"));
    assert_no_violations(&sim);
}
