//! Failure handling against the simulator: session expiry, 503 bursts, task failures and
//! timeouts, cancellation, wrong credentials, TLS trust, and the OpenAPI checker itself (secrets in
//! logs: `secrets.rs`).

mod common;
use common::*;
use serde_json::json;
use stagecore::{Error, Secret};
use stagecore_vsphere::{MoRef, VsphereClient};
use stagecore_vsphere_sim::SIM_PASSWORD;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn session_expiry_mid_operation_relogs_transparently() {
    let (sim, client) = setup().await;
    client.list_vms(&[], &[]).await.unwrap();
    sim.expire_all_sessions();
    client.list_vms(&[], &[]).await.unwrap();
    assert_eq!(sim.stats().rest_logins, 2);

    // Expire while a task is being polled: the poll gets 401, logs in again, and finishes.
    client.vm_config("vm-101").await.unwrap(); // the VI/JSON session exists before the expiry
    sim.set_task_delay(Duration::from_secs(2));
    let snap = {
        let fut = client.create_snapshot("vm-101", "during-expiry", "", false);
        let expire = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            sim.expire_all_sessions();
        };
        let (snap, ()) = tokio::join!(fut, expire);
        snap.unwrap()
    };
    assert!(sim.snapshot(&snap.value).is_some());
    assert_eq!(sim.stats().vim_logins, 2);
    assert_no_violations(&sim);
}

#[tokio::test]
async fn burst_of_503_is_retried_then_gives_up() {
    let (sim, client) = setup().await;
    sim.fail_next_requests_with_503(3);
    assert_eq!(client.list_vms(&["web"], &[]).await.unwrap().len(), 1);
    sim.fail_next_requests_with_503(3);
    client.vm_config("vm-101").await.unwrap(); // VI/JSON login + read, through the burst
    assert_eq!(sim.stats().injected_503, 6);
    sim.fail_next_requests_with_503(50);
    let e = client.list_vms(&[], &[]).await.unwrap_err();
    assert!(matches!(e, Error::Backend { backend: "vsphere", temporary: true, .. }), "{e:?}");
    assert_eq!(fault(&e).map(|f| f.fault_type).as_deref(), Some("SERVICE_UNAVAILABLE"));
    assert!(e.is_temporary());
    assert_no_violations(&sim);
}

#[tokio::test]
async fn a_lost_answer_to_a_post_that_acts_is_not_retried() {
    let (sim, client) = setup().await;
    client.vm_config("vm-101").await.unwrap(); // the VI/JSON session exists
    sim.lose_next_answer("CreateSnapshotEx_Task");
    let e = client.create_snapshot("vm-101", "once", "", false).await.unwrap_err();
    assert!(e.to_string().contains("not retried"), "the error says it was not repeated: {e}");
    // The server carried the task out: its snapshot appears once the task finishes.
    let mut vm = sim.vm("vm-101").unwrap();
    for _ in 0..200 {
        if !vm.root_snapshots.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        vm = sim.vm("vm-101").unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await; // room for a (wrong) second task to finish
    let vm = sim.vm("vm-101").unwrap();
    assert_eq!(vm.root_snapshots.len(), 1, "the snapshot was made once: {vm:?}");
    let first = sim.snapshot(&vm.root_snapshots[0]).unwrap();
    assert!(first.children.is_empty(), "a retry made a second snapshot under the first: {first:?}");

    // A read whose answer is lost is simply asked again.
    sim.lose_next_answer("/api/vcenter/vm");
    assert!(!client.list_vms(&[], &[]).await.unwrap().is_empty());
    assert_no_violations(&sim);
}

#[tokio::test]
async fn failed_task_keeps_fault_type_and_message() {
    let (sim, client) = setup().await;
    sim.fail_next_task("InsufficientResourcesFault", "not enough datastore space");
    let e = client.create_snapshot("vm-101", "s", "", false).await.unwrap_err();
    let f = fault(&e).expect("a VsphereFault source");
    assert_eq!(f.fault_type, "InsufficientResourcesFault");
    assert!(f.message.contains("not enough datastore space"), "{f}");
    assert!(sim.vm("vm-101").unwrap().root_snapshots.is_empty(), "a failed task changes nothing");
    sim.fail_next_task("InvalidPowerState", "VM is powered off");
    let e = client.create_snapshot("vm-101", "s", "", false).await.unwrap_err();
    assert!(matches!(e, Error::Precondition(_)), "{e:?}");
    assert_no_violations(&sim);
}

#[tokio::test]
async fn task_timeout_and_cancellation_cancel_on_the_server() {
    let sim = sim().await;
    let mut config = config(sim.http_url());
    config.task.timeout = Duration::from_millis(200);
    let client = VsphereClient::connect(config).await.unwrap();
    sim.set_task_delay(Duration::from_secs(5));
    let e = client.create_snapshot("vm-101", "slow", "", false).await.unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert_eq!(sim.stats().task_cancels, 1);

    let task = client
        .start_task(
            &MoRef::new("VirtualMachine", "vm-101"),
            "CreateSnapshotEx_Task",
            json!({"name": "c", "memory": false}),
        )
        .await
        .unwrap();
    let token = CancellationToken::new();
    let cancel = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        token.cancel();
    };
    let (r, ()) = tokio::join!(client.wait_task(&task, "CreateSnapshotEx_Task", &token), cancel);
    assert_eq!(fault(&r.unwrap_err()).map(|f| f.fault_type), Some("RequestCanceled".into()));
    assert_eq!(sim.stats().task_cancels, 2);
    assert_no_violations(&sim);
}

#[tokio::test]
async fn wrong_credentials_are_unauthenticated() {
    let sim = sim().await;
    let mut config = config(sim.http_url());
    config.password = Secret::new("wrong-password-123");
    let e = VsphereClient::connect(config).await.unwrap_err();
    assert!(matches!(e, Error::Unauthenticated { .. }), "{e:?}");
    assert!(!format!("{e} {e:?}").contains("wrong-password-123"));

    // VI/JSON login refused while REST works: also Unauthenticated.
    let client = VsphereClient::connect(common::config(sim.http_url())).await.unwrap();
    sim.reject_logins(true);
    let e = client.vm_config("vm-101").await.unwrap_err();
    assert!(matches!(e, Error::Unauthenticated { .. }), "{e:?}");
    assert!(!format!("{e} {e:?}").contains(SIM_PASSWORD));
    assert_no_violations(&sim);
}

#[tokio::test]
async fn self_signed_certificate_needs_its_ca() {
    let sim = sim().await;
    let e = VsphereClient::connect(config(sim.https_url())).await.unwrap_err();
    assert!(matches!(e, Error::Unreachable { ref reason, .. } if reason.contains("certificate")), "{e:?}");

    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, sim.ca_pem()).unwrap();
    let mut with_ca = config(sim.https_url());
    with_ca.ca_cert_pem = Some(ca);
    let client = VsphereClient::connect(with_ca).await.unwrap();
    assert_eq!(client.list_vms(&["db"], &[]).await.unwrap().len(), 1);

    let mut insecure = config(sim.https_url());
    insecure.insecure = true;
    VsphereClient::connect(insecure).await.unwrap();

    let mut missing = config(sim.https_url());
    missing.ca_cert_pem = Some(dir.path().join("absent.pem"));
    let e = VsphereClient::connect(missing).await.unwrap_err();
    assert!(matches!(e, Error::InvalidSpec { ref path, .. } if path == "vsphere.ca_cert_pem"), "{e:?}");
    assert_no_violations(&sim);
}

#[tokio::test]
async fn openapi_checker_catches_a_malformed_request() {
    let sim = sim().await;
    let http = reqwest::Client::new();
    let token: String = http
        .post(format!("{}/api/session", sim.http_url()))
        .basic_auth(stagecore_vsphere_sim::SIM_USER, Some(SIM_PASSWORD))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // `name` is required by vcenter.VM.clone_spec, and `sourse` is not a documented property.
    let resp = http
        .post(format!("{}/api/vcenter/vm?action=clone", sim.http_url()))
        .header("vmware-api-session-id", token)
        .json(&json!({"sourse": "vm-101"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 500);
    let v = sim.violations();
    assert_eq!(v.len(), 1, "{v:#?}");
    let details = v[0].details.join("\n");
    assert!(details.contains("required property `source` missing") && details.contains("/sourse"), "{details}");
    let stats = sim.stats();
    assert!(stats.checked_endpoints.contains(&"POST /rest/vcenter/vm?action=clone".to_string()), "{stats:?}");
}
