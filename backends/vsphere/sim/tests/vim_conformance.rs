//! The simulator's VI/JSON answers against VMware's own specification, through `vim_rs`
//! (types generated from the VI/JSON OpenAPI specification; a dev-dependency of these tests only,
//! see docs/decisions.md). Deserialising with miniserde fails on any missing required property,
//! any unknown `_typeName` of a polymorphic field and any mistyped value, so a pass means the
//! answer has the shape the specification gives it.
//!
//! Three tests: `vim_rs`'s own client drives the simulator (release negotiation, anonymous
//! `ServiceContent`, login through the announced SessionManager, typed property reads and method
//! calls); every answer the simulator gave while `stagecore_vsphere::VsphereClient` ran each
//! VI/JSON method the backend uses (faults included) is deserialised into its declared type; and
//! every VI/JSON **request** body the client and the backend (`VsphereBackend`: baseline, linked
//! and full fenced stages, drift, snapshots, revert, destroy) sent is checked against the method's
//! request type (see [`check_request`]).

use serde_json::Value;
use stagecore::Secret;
use stagecore_vsphere::{LinkedCloneSpec, MoRef, Reconfig, RetryPolicy, TaskPolicy, VsphereClient, VsphereConfig};
use stagecore_vsphere_sim::{SIM_PASSWORD, SIM_USER, SimOptions, Simulator, VimAnswer};
use std::time::Duration;
use vim_rs::types::structs;

/// Deserialises `v` as `T` and serialises it back (what `vim_rs` understood of it).
fn round_trip<T: miniserde::Deserialize + miniserde::Serialize>(v: &Value) -> Result<Value, String> {
    let t: T = miniserde::json::from_str(&v.to_string())
        .map_err(|e| format!("not a {}: {e:?}", std::any::type_name::<T>()))?;
    serde_json::from_str(&miniserde::json::to_string(&t)).map_err(|e| e.to_string())
}

/// Every member of `sent` survives the round trip unchanged: a member the type does not declare
/// (`vim_rs` ignores unknown members when reading) or a changed value is a finding.
fn covered(sent: &Value, back: &Value, at: &str, findings: &mut Vec<String>) {
    match (sent, back) {
        (Value::Object(s), Value::Object(b)) => {
            for (k, v) in s {
                match b.get(k) {
                    Some(bv) => covered(v, bv, &format!("{at}/{k}"), findings),
                    None => findings.push(format!("{at}/{k}: not a property of the declared type")),
                }
            }
        }
        (Value::Array(s), Value::Array(b)) if s.len() == b.len() => {
            for (i, (v, bv)) in s.iter().zip(b).enumerate() {
                covered(v, bv, &format!("{at}/{i}"), findings);
            }
        }
        (Value::Number(s), Value::Number(b)) if s.as_f64() == b.as_f64() => {}
        (s, b) if s == b => {}
        (s, b) => findings.push(format!("{at}: sent {s}, read as {b}")),
    }
}

type Param = (&'static str, bool, fn(&Value) -> Result<Value, String>);

/// The parameters of each VI/JSON method the backend calls, as `vim_rs` declares them in its
/// (private, serialise-only) `*RequestType` structs (`src/mo/*.rs` of vim_rs 0.7.0): name,
/// required, and the specification type of the value.
fn request_type(method: &str) -> Option<(&'static str, Vec<Param>)> {
    use structs::{ManagedObjectReference as MoRef, VirtualMachineCloneSpec, VirtualMachineConfigSpec};
    let s = round_trip::<String>;
    let b = round_trip::<bool>;
    Some(match method {
        "Login" => ("LoginRequestType", vec![("userName", true, s), ("password", true, s), ("locale", false, s)]),
        "Logout" => ("LogoutRequestType", vec![]),
        "CancelTask" => ("CancelTaskRequestType", vec![]),
        "CreateSnapshotEx_Task" => (
            "CreateSnapshotExRequestType",
            vec![
                ("name", true, s),
                ("description", false, s),
                ("memory", true, b),
                ("quiesceSpec", false, round_trip::<structs::VirtualMachineGuestQuiesceSpec>),
            ],
        ),
        "RevertToSnapshot_Task" => {
            ("RevertToSnapshotRequestType", vec![("host", false, round_trip::<MoRef>), ("suppressPowerOn", false, b)])
        }
        "RemoveSnapshot_Task" => {
            ("RemoveSnapshotRequestType", vec![("removeChildren", true, b), ("consolidate", false, b)])
        }
        "CloneVM_Task" => (
            "CloneVMRequestType",
            vec![
                ("folder", true, round_trip::<MoRef>),
                ("name", true, s),
                ("spec", true, round_trip::<VirtualMachineCloneSpec>),
            ],
        ),
        "ReconfigVM_Task" => ("ReconfigVMRequestType", vec![("spec", true, round_trip::<VirtualMachineConfigSpec>)]),
        "QueryChangedDiskAreas" => (
            "QueryChangedDiskAreasRequestType",
            vec![
                ("snapshot", false, round_trip::<MoRef>),
                ("deviceKey", true, round_trip::<i32>),
                ("startOffset", true, round_trip::<i64>),
                ("changeId", true, s),
            ],
        ),
        _ => return None,
    })
}

/// A request body against its method's request type: no member the type lacks (at any depth),
/// every required parameter present, every value of its declared type. `Ok(None)`: a read
/// (GET, no body) or the test's deliberate call of an unknown method.
fn check_request(a: &VimAnswer) -> Result<Option<&'static str>, String> {
    if a.method == "GET" {
        return match &a.request {
            None => Ok(None),
            Some(b) => Err(format!("a GET with a body: {b}")),
        };
    }
    let method = a.path.trim_start_matches("/sdk/vim25/").split('/').nth(3).unwrap_or("");
    let Some((type_name, params)) = request_type(method) else {
        let fault = a.body.as_ref().and_then(|b| b["_typeName"].as_str());
        return match fault {
            Some("MethodNotFound") => Ok(None),
            _ => Err(format!("no request type known for {method}")),
        };
    };
    let empty = serde_json::Map::new();
    let body = match &a.request {
        None => &empty,
        Some(Value::Object(m)) => m,
        Some(other) => return Err(format!("{type_name}: the body is not an object: {other}")),
    };
    let mut findings = Vec::new();
    for (k, v) in body {
        if k == "_typeName" {
            if v != type_name {
                findings.push(format!("_typeName {v} is not {type_name}"));
            }
            continue;
        }
        match params.iter().find(|p| p.0 == k) {
            None => findings.push(format!("{k}: not a parameter of {type_name}")),
            Some((_, _, read)) => match read(v) {
                Ok(back) => covered(v, &back, &format!("/{k}"), &mut findings),
                Err(e) => findings.push(format!("{k}: {e}")),
            },
        }
    }
    for (name, required, _) in &params {
        if *required && !body.contains_key(*name) {
            findings.push(format!("required parameter {name} is missing"));
        }
    }
    if findings.is_empty() { Ok(Some(type_name)) } else { Err(format!("{type_name}: {}", findings.join("; "))) }
}

/// Checks every request of `answers`; returns the request types seen.
fn assert_requests_conform(answers: &[VimAnswer]) -> std::collections::BTreeSet<&'static str> {
    let mut failures = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for a in answers {
        match check_request(a) {
            Ok(Some(t)) => {
                seen.insert(t);
            }
            Ok(None) => {}
            Err(e) => failures.push(format!("{} {}: {e}\n  body: {:?}", a.method, a.path, a.request)),
        }
    }
    assert!(failures.is_empty(), "{} requests do not conform:\n{}", failures.len(), failures.join("\n"));
    seen
}

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
    let requests = assert_requests_conform(&answers);
    for t in [
        "LoginRequestType",
        "LogoutRequestType",
        "CancelTaskRequestType",
        "CreateSnapshotExRequestType",
        "RevertToSnapshotRequestType",
        "RemoveSnapshotRequestType",
        "CloneVMRequestType",
        "ReconfigVMRequestType",
        "QueryChangedDiskAreasRequestType",
    ] {
        assert!(requests.contains(t), "no {t} request was checked: {requests:?}");
    }
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

/// The backend's own calls (not only the client's methods one by one): every VI/JSON request body
/// `VsphereBackend` sends while it takes a baseline, makes fenced linked and full stages, reports
/// drift (CBT, probe snapshots), snapshots, reverts and destroys, against the request types.
#[tokio::test]
async fn every_request_the_backend_sends_is_a_request_type_of_the_specification() {
    use stagecore::{Backend, BackendExt, Selector, StageOptions};
    let sim = Simulator::start(SimOptions::default()).await.unwrap();
    let dir = std::env::temp_dir().join(format!("stagecore-vim-requests-{}", std::process::id()));
    let mut opts = stagecore_vsphere::VsphereOptions::new(&dir);
    opts.isolated_network = Some("isolated-pg".into());
    opts.folder = Some("stage".into());
    let backend = stagecore_vsphere::VsphereBackend::connect(config(&sim), opts).await.unwrap();
    backend
        .client()
        .reconfigure("vm-102", &Reconfig { change_tracking: Some(true), ..Default::default() })
        .await
        .unwrap();
    let names = vec!["web".to_string(), "db".to_string()];
    let prod = backend.attach(&Selector::Machines { environment: "prod".into(), names }).await.unwrap();
    let baseline = prod.take_baseline().await.unwrap();
    let linked = backend.stage(&baseline, &StageOptions::linked("s-linked")).await.unwrap();
    let full = backend.stage(&baseline, &StageOptions::full("s-full")).await.unwrap();
    sim.guest_write("vm-101", 2000, 0, 4096).unwrap();
    backend.drift(&*prod, &*linked).await.unwrap();
    backend.drift(&*prod, &*full).await.unwrap();
    linked.create_snapshot("one").await.unwrap();
    linked.apply(&stagecore::Change::SetMemory { machine: "web".into(), memory_mib: 4096 }).await.unwrap();
    linked.revert_snapshot("one").await.unwrap();
    linked.delete_snapshot("one").await.unwrap();
    for name in ["s-linked", "s-full", "prod"] {
        backend.destroy(name).await.unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
    let seen = assert_requests_conform(&sim.vim_answers());
    for t in [
        "LoginRequestType",
        "CreateSnapshotExRequestType",
        "RevertToSnapshotRequestType",
        "RemoveSnapshotRequestType",
        "CloneVMRequestType",
        "ReconfigVMRequestType",
        "QueryChangedDiskAreasRequestType",
    ] {
        assert!(seen.contains(t), "the backend sent no {t}: {seen:?}");
    }
    eprintln!("checked the backend's VI/JSON requests against vim_rs types: {seen:?}");
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
}

/// The request check can fail: an unknown member deep in a clone spec, a missing required
/// parameter, a mistyped value and an unknown parameter are each found.
#[test]
fn the_request_check_finds_unknown_missing_and_mistyped_members() {
    let answer = |method: &str, body: Value| VimAnswer {
        method: "POST".into(),
        path: format!("/sdk/vim25/8.0.2.0/VirtualMachine/vm-101/{method}"),
        status: 200,
        body: None,
        request: Some(body),
    };
    let folder = serde_json::json!({"_typeName": "ManagedObjectReference", "type": "Folder", "value": "group-v11"});
    let good = serde_json::json!({"folder": folder, "name": "x", "spec": {"_typeName": "VirtualMachineCloneSpec",
        "location": {"_typeName": "VirtualMachineRelocateSpec", "diskMoveType": "createNewChildDiskBacking"},
        "powerOn": false, "template": false}});
    assert_eq!(check_request(&answer("CloneVM_Task", good.clone())), Ok(Some("CloneVMRequestType")));
    let mut unknown = good.clone();
    unknown["spec"]["location"]["diskMoveTypo"] = serde_json::json!("x");
    let e = check_request(&answer("CloneVM_Task", unknown)).unwrap_err();
    assert!(e.contains("/spec/location/diskMoveTypo: not a property"), "{e}");
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("name");
    assert!(check_request(&answer("CloneVM_Task", missing)).unwrap_err().contains("name is missing"));
    let e = check_request(&answer("RemoveSnapshot_Task", serde_json::json!({"removeChildren": "yes"}))).unwrap_err();
    assert!(e.contains("removeChildren"), "{e}");
    let e = check_request(&answer(
        "QueryChangedDiskAreas",
        serde_json::json!({"deviceKey": 2000, "startOffset": 0,
        "changeId": "*", "sector": 1}),
    ))
    .unwrap_err();
    assert!(e.contains("sector: not a parameter"), "{e}");
}
