//! VI/JSON release negotiation: the client asks `POST /api/vcenter/system?action=hello` with the
//! releases it speaks, reads the anonymous `ServiceContent` at the chosen release and takes the
//! SessionManager id from it. Against a vCenter 7.0.x (no VI/JSON) `connect` still works for REST
//! and the VI/JSON capabilities are false with the reason.

mod common;
use common::*;
use stagecore::{Backend, Error, Selector};
use stagecore_vsphere::{VsphereBackend, VsphereClient, VsphereOptions};
use stagecore_vsphere_sim::{SimOptions, Simulator};

async fn snapshot_round_trip(sim: &Simulator, client: &VsphereClient, release: &str) {
    assert_eq!(client.vim_endpoint().map(|v| v.release.as_str()), Ok(release));
    let snap =
        client.create_snapshot("vm-101", "first", "", false).await.expect("a snapshot at the negotiated release");
    client.revert_snapshot(&snap, true).await.unwrap();
    client.remove_snapshot(&snap, false).await.unwrap();
    let paths: Vec<String> = sim.vim_answers().iter().map(|a| a.path.clone()).collect();
    assert!(
        paths.iter().all(|p| p.starts_with(&format!("/sdk/vim25/{release}/"))),
        "every VI/JSON call uses {release}: {paths:?}"
    );
    assert_no_violations(sim);
}

#[tokio::test]
async fn each_release_from_8_0_1_on_is_negotiated() {
    for (server, expected) in
        [("8.0.1.0", "8.0.1.0"), ("8.0.2.0", "8.0.2.0"), ("8.0.3.0", "8.0.3.0"), ("9.0.0.0", "9.0.0.0")]
    {
        let sim = Simulator::start(SimOptions::release(Some(server))).await.unwrap();
        let client = VsphereClient::connect(config(sim.http_url())).await.unwrap();
        let vim = client.vim_endpoint().unwrap().clone();
        assert_eq!(vim.api_version, server, "ServiceContent.about.apiVersion");
        snapshot_round_trip(&sim, &client, expected).await;
    }
}

#[tokio::test]
async fn a_newer_server_is_spoken_to_at_the_newest_common_release() {
    // A vCenter newer than anything this client knows still serves the older releases.
    let sim = Simulator::start(SimOptions::release(Some("9.1.0.0"))).await.unwrap();
    let client = VsphereClient::connect(config(sim.http_url())).await.unwrap();
    assert_eq!(client.vim_endpoint().unwrap().api_version, "9.1.0.0");
    snapshot_round_trip(&sim, &client, "9.0.0.0").await;
}

#[tokio::test]
async fn the_session_manager_id_comes_from_service_content() {
    let options = SimOptions { session_manager_id: "SessionManager-7".into(), ..SimOptions::release(Some("8.0.1.0")) };
    let sim = Simulator::start(options).await.unwrap();
    let client = VsphereClient::connect(config(sim.http_url())).await.unwrap();
    assert_eq!(client.vim_endpoint().unwrap().session_manager, "SessionManager-7");
    client.vm_config("vm-101").await.expect("login at the announced SessionManager");
    client.close().await.unwrap();
    let logins: Vec<String> = sim
        .vim_answers()
        .iter()
        .filter(|a| a.path.ends_with("/Login") || a.path.ends_with("/Logout"))
        .map(|a| format!("{} {}", a.path, a.status))
        .collect();
    assert_eq!(
        logins,
        [
            "/sdk/vim25/8.0.1.0/SessionManager/SessionManager-7/Login 200",
            "/sdk/vim25/8.0.1.0/SessionManager/SessionManager-7/Logout 204"
        ]
    );
    assert_eq!(sim.stats().vim_logouts, 1);
}

#[tokio::test]
async fn a_pinned_release_skips_hello_but_still_reads_service_content() {
    let sim = Simulator::start(SimOptions::release(Some("8.0.3.0"))).await.unwrap();
    let mut cfg = config(sim.http_url());
    cfg.release = Some("8.0.2.0".into());
    let client = VsphereClient::connect(cfg).await.unwrap();
    snapshot_round_trip(&sim, &client, "8.0.2.0").await;
    let mut cfg = config(sim.http_url());
    cfg.release = Some("7.0.3.0".into()); // not served: no VI/JSON, not a failed connect
    let client = VsphereClient::connect(cfg).await.unwrap();
    assert!(client.vim_endpoint().unwrap_err().contains("7.0.3.0"));
}

#[tokio::test]
async fn vcenter_7_without_vi_json_connects_with_the_reason() {
    let sim = Simulator::start(SimOptions::release(None)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let backend = VsphereBackend::connect(config(sim.http_url()), VsphereOptions::new(dir.path())).await.unwrap();
    let reason = backend.vim_unavailable().expect("a reason").to_string();
    assert!(reason.contains("no VI/JSON") && reason.contains("8.0U1"), "{reason}");
    let caps = backend.capabilities();
    assert!(
        !caps.linked_clone && !caps.full_clone && !caps.live_snapshot && !caps.disk_drift && !caps.fencing,
        "{caps:?}"
    );
    // REST still works: attach and read the spec.
    let names = vec!["web".to_string()];
    let prod = backend.attach(&Selector::Machines { environment: "prod".into(), names }).await.unwrap();
    assert_eq!(prod.spec().await.unwrap().machines[0].name, "web");
    // What needs VI/JSON is refused up front, typed; nothing was attempted on /sdk.
    let e = prod.take_baseline().await.unwrap_err();
    assert!(matches!(e, Error::NotSupported { .. }), "{e:?}");
    let e = backend.client().vm_config("vm-101").await.unwrap_err();
    assert!(matches!(e, Error::NotSupported { .. }), "{e:?}");
    assert!(sim.vim_answers().iter().all(|a| a.path.ends_with("/content") || a.status == 404));
    backend.destroy("prod").await.unwrap();
    assert_no_violations(&sim);
}
