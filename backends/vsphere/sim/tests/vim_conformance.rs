//! The simulator's VI/JSON answers against VMware's own specification, through `vim_rs`
//! (types generated from the VI/JSON OpenAPI specification; a dev-dependency of these tests only,
//! see docs/decisions.md). Deserialising with miniserde fails on any missing required property,
//! any unknown `_typeName` of a polymorphic field and any mistyped value, so a pass means the
//! answer has the shape the specification gives it.
//!
//! Two tests: `vim_rs`'s own client drives the simulator (release negotiation, anonymous
//! `ServiceContent`, login through the announced SessionManager, typed property reads and method
//! calls), and every answer the simulator gave while `stagecore_vsphere::VsphereClient` ran each
//! VI/JSON method the backend uses (faults included) is deserialised into its declared type.

use serde_json::Value;
use stagecore::Secret;
use stagecore_vsphere::{LinkedCloneSpec, MoRef, Reconfig, RetryPolicy, TaskPolicy, VsphereClient, VsphereConfig};
use stagecore_vsphere_sim::{SIM_PASSWORD, SIM_USER, SimOptions, Simulator, VimAnswer};
use std::time::Duration;
use vim_rs::types::structs;

fn https_client(sim: &Simulator) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(sim.ca_pem().as_bytes()).expect("CA PEM");
    reqwest::Client::builder().tls_certs_merge([ca]).build().expect("reqwest client")
}

fn config(sim: &Simulator) -> VsphereConfig {
    let mut c = VsphereConfig::new(sim.http_url(), SIM_USER, Secret::new(SIM_PASSWORD)).unwrap();
    c.retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
    };
    c.task = TaskPolicy {
        initial_interval: Duration::from_millis(5),
        max_interval: Duration::from_millis(40),
        timeout: Duration::from_secs(30),
    };
    c
}

#[tokio::test]
async fn vim_rs_client_negotiates_logs_in_and_reads_typed_objects() {
    let sim = Simulator::start(SimOptions::release(Some("8.0.3.0"))).await.unwrap();
    let host = sim.https_url().trim_start_matches("https://").to_string();
    let client = vim_rs::core::client::ClientBuilder::new(&host, https_client(&sim))
        .basic_authn(SIM_USER, SIM_PASSWORD)
        .app_details("stagecore-vsphere-sim-tests", "0")
        .build()
        .await
        .expect("vim_rs negotiates, reads ServiceContent anonymously and logs in");
    assert_eq!(client.api_release(), "8.0.3.0", "the newest release both sides speak");
    let content = client.service_content();
    assert_eq!(content.about.api_version, "8.0.3.0");
    assert_eq!(content.session_manager.as_ref().map(|m| m.value.as_str()), Some("SessionManager"));

    let vm = vim_rs::mo::VirtualMachine::new(client.clone(), "vm-103");
    let cfg = vm.config().await.expect("VirtualMachineConfigInfo parses").expect("config is set");
    assert_eq!(cfg.name, "app");
    assert!(cfg.hardware.device.as_ref().is_some_and(|d| d.len() >= 10), "full device list");
    assert!(vm.snapshot().await.expect("unset snapshot property").is_none());
    let task = vm.create_snapshot_ex_task("vim-rs", Some("from vim_rs"), false, None).await.expect("task reference");
    let task = vim_rs::mo::Task::new(client.clone(), &task.value);
    let mut info = task.info().await.expect("TaskInfo parses");
    for _ in 0..200 {
        if !matches!(
            info.state,
            vim_rs::types::enums::TaskInfoStateEnum::Queued | vim_rs::types::enums::TaskInfoStateEnum::Running
        ) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        info = task.info().await.expect("TaskInfo parses");
    }
    assert_eq!(info.state, vim_rs::types::enums::TaskInfoStateEnum::Success, "{info:?}");
    let tree = vm.snapshot().await.unwrap().expect("snapshot info after a snapshot");
    assert_eq!(tree.root_snapshot_list[0].id, 1);
    let areas = vm.query_changed_disk_areas(None, 2000, 0, "*").await.expect("DiskChangeInfo parses");
    assert_eq!(areas.start_offset, 0);
    // A fault parses as vim_rs's MethodFault with a known type.
    let missing = vim_rs::mo::VirtualMachine::new(client.clone(), "vm-999");
    match missing.config().await {
        Err(vim_rs::core::client::Error::MethodFault(f)) => assert!(f.type_.is_some(), "{f:?}"),
        other => panic!("expected a ManagedObjectNotFound fault, got {other:?}"),
    }
    task.cancel_task().await.expect("CancelTask is void: 204");
    client.close().await.expect("logout through the announced SessionManager");
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
}

/// The type the specification declares for an answer of `member` on `kind`.
fn check(answer: &VimAnswer) -> Result<&'static str, String> {
    let segs: Vec<&str> = answer.path.trim_start_matches("/sdk/vim25/").split('/').collect();
    let (kind, member) = (segs.get(1).copied().unwrap_or(""), segs.get(3).copied().unwrap_or(""));
    let body = answer.body.as_ref().map(Value::to_string);
    fn de<T: miniserde::Deserialize>(name: &'static str, body: &Option<String>) -> Result<&'static str, String> {
        let text = body.as_deref().ok_or_else(|| format!("{name}: empty body"))?;
        miniserde::json::from_str::<T>(text).map(|_| name).map_err(|e| format!("not a {name}: {e:?}: {text}"))
    }
    if !(200..300).contains(&answer.status) {
        let text = body.clone().ok_or("a fault answer without a body")?;
        let f: structs::MethodFault =
            miniserde::json::from_str(&text).map_err(|e| format!("not a MethodFault: {e:?}: {text}"))?;
        if f.type_.is_none() {
            return Err(format!("fault of a type the specification does not know: {text}"));
        }
        return Ok("MethodFault");
    }
    match (answer.method.as_str(), kind, member) {
        ("GET", "ServiceInstance", "content") => de::<structs::ServiceContent>("ServiceContent", &body),
        ("POST", "SessionManager", "Login") => de::<structs::UserSession>("UserSession", &body),
        ("POST", "SessionManager", "Logout") | ("POST", "Task", "CancelTask") => match (answer.status, &body) {
            (204, None) => Ok("void"),
            _ => Err(format!("a void method must answer 204 without a body, got {} {body:?}", answer.status)),
        },
        ("GET", "Task", "info") => de::<structs::TaskInfo>("TaskInfo", &body),
        ("GET", "VirtualMachine" | "VirtualMachineSnapshot", "config") => {
            de::<structs::VirtualMachineConfigInfo>("VirtualMachineConfigInfo", &body)
        }
        ("GET", "VirtualMachine", "snapshot") => match answer.status {
            204 if body.is_none() => Ok("unset"),
            _ => de::<structs::VirtualMachineSnapshotInfo>("VirtualMachineSnapshotInfo", &body),
        },
        ("POST", "VirtualMachine", "QueryChangedDiskAreas") => de::<structs::DiskChangeInfo>("DiskChangeInfo", &body),
        ("POST", _, m) if m.ends_with("_Task") => {
            de::<structs::ManagedObjectReference>("ManagedObjectReference", &body)
        }
        (method, kind, member) => Err(format!("no declared type known for {method} {kind}.{member}")),
    }
}

#[tokio::test]
async fn every_answer_the_simulator_gives_is_shaped_as_the_specification_says() {
    let sim = Simulator::start(SimOptions::default()).await.unwrap();
    let client = VsphereClient::connect(config(&sim)).await.unwrap();
    let vm = MoRef::new("VirtualMachine", "vm-103");
    for id in ["vm-101", "vm-102", "vm-103"] {
        client.vm_config(id).await.unwrap();
        client.snapshot_tree(id).await.unwrap(); // unset: 204
    }
    // A three-level snapshot tree, the snapshot's config, linked and full clones with NIC moves.
    let s1 = client.create_snapshot("vm-103", "one", "first", false).await.unwrap();
    let s2 = client.create_snapshot("vm-103", "two", "", false).await.unwrap();
    let s3 = client.create_snapshot("vm-103", "three", "", false).await.unwrap();
    let tree = client.snapshot_tree("vm-103").await.unwrap();
    assert_eq!(tree.roots[0].children[0].children[0].snapshot, s3);
    client.snapshot_config(&s2).await.unwrap();
    let web = client.create_snapshot("vm-101", "web", "", false).await.unwrap();
    let spec = |name: &str| LinkedCloneSpec {
        snapshot: web.clone(),
        name: name.into(),
        folder: "group-v11".into(),
        network_name: Some("isolated-pg".into()),
        power_on: false,
    };
    let linked = client.linked_clone("vm-101", &spec("linked")).await.unwrap();
    let linked_cfg = client.vm_config(&linked).await.unwrap();
    assert!(linked_cfg.disks[0].parent_file_name.is_some(), "a linked clone's disks have parents");
    client.full_clone_from_snapshot("vm-101", &spec("full")).await.unwrap();
    client
        .linked_clone("vm-103", &LinkedCloneSpec { snapshot: s1.clone(), network_name: None, ..spec("app-linked") })
        .await
        .unwrap();
    client
        .reconfigure("vm-103", &Reconfig { cpus: Some(4), memory_mib: Some(8192), change_tracking: Some(true) })
        .await
        .unwrap();
    sim.guest_write("vm-103", 2000, 4096, 8192).unwrap();
    let change = client.vm_config("vm-103").await.unwrap().disks[0].change_id.clone().unwrap();
    client.query_changed_areas("vm-103", None, 2000, &change).await.unwrap();
    client.query_changed_areas("vm-103", Some(&s3), 2000, "*").await.unwrap();
    client.revert_snapshot(&s2, true).await.unwrap();
    client.remove_snapshot(&s2, false).await.unwrap();
    // A task that runs for a while (progress), then is cancelled; a failing task; faults.
    sim.set_task_delay(Duration::from_millis(400));
    let task = client
        .start_task(&vm, "CreateSnapshotEx_Task", serde_json::json!({"name": "slow", "memory": false}))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let token = tokio_util::sync::CancellationToken::new();
    token.cancel();
    let _ = client.wait_task(&task, "CreateSnapshotEx_Task", &token).await.unwrap_err();
    sim.set_task_delay(Duration::ZERO);
    sim.fail_next_task("InsufficientResourcesFault", "not enough space");
    client.create_snapshot("vm-103", "fails", "", false).await.unwrap_err();
    client.vm_config("vm-999").await.unwrap_err(); // ManagedObjectNotFound
    client.invoke(&vm, "NoSuchMethod", serde_json::json!({})).await.unwrap_err(); // MethodNotFound
    client.reconfigure("vm-103", &Reconfig { cpus: Some(1000), ..Default::default() }).await.unwrap_err();
    client.query_changed_areas("vm-102", None, 2000, "*").await.unwrap_err(); // FileFault: no CBT
    sim.expire_all_sessions();
    client.vm_config("vm-101").await.unwrap(); // NotAuthenticated, then a fresh Login
    client.close().await.unwrap();

    let answers = sim.vim_answers();
    let mut failures = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for a in &answers {
        match check(a) {
            Ok(t) => {
                seen.insert(format!("{} {}", a.path.split('/').nth(4).unwrap_or(""), t));
            }
            Err(e) => failures.push(format!("{} {} -> {}: {e}", a.method, a.path, a.status)),
        }
    }
    assert!(failures.is_empty(), "{} answers do not conform:\n{}", failures.len(), failures.join("\n"));
    for expected in [
        "ServiceInstance ServiceContent",
        "SessionManager UserSession",
        "SessionManager void",
        "Task TaskInfo",
        "Task void",
        "VirtualMachine VirtualMachineConfigInfo",
        "VirtualMachineSnapshot VirtualMachineConfigInfo",
        "VirtualMachine VirtualMachineSnapshotInfo",
        "VirtualMachine unset",
        "VirtualMachine DiskChangeInfo",
        "VirtualMachine ManagedObjectReference",
        "VirtualMachineSnapshot ManagedObjectReference",
        "VirtualMachine MethodFault",
    ] {
        assert!(seen.contains(expected), "no `{expected}` answer was checked: {seen:?}");
    }
    let progress =
        answers.iter().any(|a| a.body.as_ref().is_some_and(|b| b["state"] == "running" && b["progress"].is_i64()));
    assert!(progress, "a running task reports progress");
    eprintln!("checked {} VI/JSON answers against vim_rs types: {seen:?}", answers.len());
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
}
