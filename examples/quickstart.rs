//! Quickstart: a real 3-machine service (web, app, db — Debian 12 guests running the demo app) on
//! the embedded default backend (QEMU): take a baseline with the guests' inventory, clone a linked
//! stage, try a software change there (the app upgraded from a local `.deb` and restarted, more
//! memory for app), report drift down to packages and files, test the stage with health probes,
//! snapshot and revert a stray edit, rebase the stage onto a newer production (and see a
//! conflicting production change reported), and promote the tested change by replay behind an
//! approval and a health gate — then show the change inside production's guest.
//!
//! ```text
//! cargo xtask demo                       # QEMU (TCG), real guests from the cached test image
//! cargo xtask demo -- --backend memory   # the in-memory backend: config and disk changes only
//! ```
//!
//! The guest image is built and cached by `cargo xtask guest-image` (`cargo xtask demo` does it
//! when it is missing) and found through `STAGECORE_GUEST_IMAGE`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use stagekit::stagecore::inventory::{self, InventoryConfig};
use stagekit::stagecore::promotion::{
    self, Gate, PreconditionPolicy, ProbeGate, Promotion, PromotionEngine, PromotionRequest, RebaseOptions,
    RebaseOutcome, Strategy,
};
use stagekit::stagecore::{
    self, Backend, BackendExt, Change, ChangeSet, DynEnvironment, GuestExec, Progress, Result, StageOptions,
};

mod common;

/// The demo app's page, fetched from inside a machine.
const FETCH_APP: &[&str] = &["/bin/busybox", "wget", "-qO-", "http://127.0.0.1:8080/"];

/// Where the new build of the app is copied in the guest before it is installed.
const DEB_IN_GUEST: &str = "/tmp/stagecore-demo-app_1.1_all.deb";

/// Prints a line with the time since the demo started.
struct Clock(Instant);

impl Clock {
    fn step(&self, what: &str) {
        println!("[{:>6.2}s] {what}", self.0.elapsed().as_secs_f64());
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.iter().position(|a| a == "--backend").and_then(|i| args.get(i + 1)).map(String::as_str);
    let work =
        tempfile::tempdir().map_err(|e| stagecore::Error::io("creating a directory in", std::env::temp_dir(), e))?;
    let demo = common::backend(which.unwrap_or(common::DEFAULT_BACKEND), work.path()).await?;
    let backend = demo.backend.clone();
    let clock = Clock(Instant::now());
    // Real guests run the demo app; the in-memory backend's simulated guest does not.
    let guests = demo.new_app_deb.is_some();
    let config = InventoryConfig::default();

    clock.step(&format!("backend: {} — capabilities: {:?}", backend.name(), backend.capabilities()));
    let prod = backend.create(&demo.production).await?;
    let waves = demo.production.start_waves()?;
    prod.start().await?;
    if guests {
        common::wait_all(&*prod).await?;
        clock.step(&format!("production web + app + db booted in start order {waves:?}; every guest agent answers"));
        clock.step(&format!("production's app serves: {}", app_page(&prod, "app").await?));
    } else {
        common::seed(&prod).await?;
        clock.step("production web + app + db created with data on their disks, and started");
    }

    let (baseline, at_baseline) = inventory::take_baseline(&*prod, &config, None).await?;
    let levels: Vec<String> = baseline.consistency.iter().map(|(m, c)| format!("{m}: {:?}", c.level)).collect();
    clock.step(&format!(
        "baseline {} with the guests' inventory, under the running disks [{}]",
        baseline.id,
        levels.join(", ")
    ));
    let options = StageOptions { start: true, ..StageOptions::linked("try-1") };
    let stage = inventory::stage(&*backend, &baseline, &at_baseline, &options).await?;
    if guests {
        common::wait_all(&*stage).await?;
    }
    let info = stage.info().await?;
    let names: Vec<_> = info.machines.iter().map(|m| m.instance_name.as_str()).collect();
    clock.step(&format!("linked, fenced stage `try-1` cloned and started: {names:?}"));
    let report = backend.drift(&*prod, &*stage).await?;
    clock.step(&format!(
        "fresh clone: config {:?}, guest {:?}, disk {:?} ({} B written by the running guests), match {:.1} %",
        report.config.status,
        report.guest.status,
        report.disk.status,
        report.disk.records.iter().map(|d| d.production.bytes + d.stage.bytes).sum::<u64>(),
        report.score
    ));

    let change = software_change(&demo, guests)?;
    inventory::apply_change_set(&*stage, &change, &config).await?;
    clock.step(&format!("ChangeSet `{}` applied to the stage, footprint recorded: {}", change.id, change.description));
    if guests {
        clock.step(&format!("the stage's app serves: {}", app_page(&stage, "app").await?));
        clock.step(&format!("production's app still serves: {}", app_page(&prod, "app").await?));
        let report = promotion::test_environment(&*stage, &health_gates(), None).await;
        for r in &report.results {
            clock.step(&format!("stage test `{}` in {}: passed {} ({})", r.gate, r.machine, r.passed, r.detail));
        }
    }

    stage.create_snapshot("tested").await?;
    stage.apply(&Change::SetVcpus { machine: "db".into(), vcpus: 2 }).await?;
    if let Some(guest) = stage.guest().filter(|_| guests) {
        guest.write_file("web", "/etc/motd", b"hand-edited on the stage\n", None).await?;
        guest.write_file("app", "/opt/app/www/index.html", b"<h1>oops, a stray edit</h1>\n", None).await?;
        common::wait_all(&*stage).await?; // db restarted for its new vCPU count
        clock.step("snapshot `tested` taken; then unrecorded edits: db's vCPUs, /etc/motd on web, the app's page");
    } else {
        stage.disk_io().expect("disk io").write("app", "disk0", 0, b"oops").await?;
        clock.step("snapshot `tested` taken; then unrecorded edits: db's vCPUs and a stray write on app's disk");
    }
    println!("{}", backend.drift(&*prod, &*stage).await?);
    stage.revert_snapshot("tested").await?;
    if guests {
        common::wait_all(&*stage).await?;
        clock.step(&format!("reverted to `tested`: the stage's app serves {}", app_page(&stage, "app").await?));
    }
    let report = backend.drift(&*prod, &*stage).await?;
    clock.step(&format!(
        "after the revert: config {:?}, guest {:?}, match {:.1} %",
        report.config.status, report.guest.status, report.score
    ));

    let stage = if guests { rebase_demo(&clock, &backend, &prod, stage).await? } else { stage };

    let progress = Progress::new(|e| println!("           progress: {} {} {}", e.operation, e.subject, e.step));
    let (engine, _) = PromotionEngine::open(work.path().join("promotions"), backend.clone()).await?;
    let engine = engine.with_progress(progress);
    let mut gates: Vec<Arc<dyn Gate>> = vec![Arc::new(common::Approve("ops-lead"))];
    if guests {
        gates.extend(health_gates().into_iter().map(|g| Arc::new(g) as Arc<dyn Gate>));
    }
    let request = PromotionRequest {
        production: prod.clone(),
        stage: stage.clone(),
        strategy: Strategy::Replay,
        policy: PreconditionPolicy::Touched,
        requested_by: "quickstart".into(),
        gates,
    };
    let receipt = engine.promote(request).await?;
    clock.step(&format!("promotion {} by replay: {:?}", receipt.id, receipt.outcome));
    for s in &receipt.steps {
        println!("           {:<22} {:>6} ms  {}", s.step, s.millis, s.outcome);
    }
    let app = prod.spec().await?.machine("app").map(|m| m.memory_mib);
    clock.step(&format!("production app memory is now {} MiB", app.unwrap_or(0)));
    if guests {
        common::wait_all(&*prod).await?;
        let query = GuestExec::new(["dpkg-query", "-W", "stagecore-demo-app"]);
        let version = prod.guest().expect("guest").exec("app", &query).await?;
        clock.step(&format!("production's app package: {}", version.stdout_text().trim()));
        clock.step(&format!("production's app serves: {}", app_page(&prod, "app").await?));
    }

    let info = stage.info().await?;
    backend.destroy(&info.name).await?;
    backend.destroy(prod.name()).await?;
    clock.step("stage and production destroyed; done");
    Ok(())
}

/// Rebase, twice: first after an unrelated production change (rebased: a new stage on a newer
/// baseline with the ChangeSet re-applied), then after a production change on what the ChangeSet
/// touches (a conflict report; nothing is created). Returns the stage to promote.
async fn rebase_demo(
    clock: &Clock,
    backend: &Arc<dyn Backend>,
    prod: &DynEnvironment,
    stage: DynEnvironment,
) -> Result<DynEnvironment> {
    let pguest = prod.guest().expect("guest");
    pguest.write_file("db", "/etc/motd", b"maintenance window: sunday\n", None).await?;
    clock.step("production moved meanwhile: an operator edited /etc/motd on db (unrelated to the change)");
    let progress = Progress::new(|e| {
        println!("           progress: {} {} {} ({}/{})", e.operation, e.subject, e.step, e.done, e.total)
    });
    let outcome =
        promotion::rebase(&**backend, &**prod, &*stage, &RebaseOptions::new("try-2"), Some(&progress)).await?;
    let RebaseOutcome::Rebased { stage: rebased, baseline, applied } = outcome else {
        return Err(stagecore::Error::Precondition(format!("rebase onto an unrelated change conflicted: {outcome:?}")));
    };
    common::wait_all(&*rebased).await?;
    clock.step(&format!("rebased `try-1` as `try-2` on baseline {}: re-applied {applied:?}", baseline.id));
    backend.destroy(stage.name()).await?;

    let page = "/opt/app/www/index.html";
    let original = pguest.read_file("app", page).await?;
    pguest.write_file("app", page, b"<h1>hotfix typed in production</h1>\n", None).await?;
    let outcome = promotion::rebase(&**backend, &**prod, &*rebased, &RebaseOptions::new("try-3"), None).await?;
    match outcome {
        RebaseOutcome::Conflict(report) => {
            for c in &report.conflicts {
                clock.step(&format!(
                    "rebase after a production hotfix: CONFLICT in {} at {}: {}",
                    c.change_set, c.path, c.reason
                ));
            }
        }
        RebaseOutcome::Rebased { .. } => {
            return Err(stagecore::Error::Precondition("a conflicting production change was not reported".into()));
        }
    }
    pguest.write_file("app", page, &original, None).await?;
    clock.step("the production hotfix is withdrawn (the page is as at the baseline again)");
    Ok(rebased)
}

/// Health probes run from inside the machines: the app answers HTTP, and web reaches it.
fn health_gates() -> Vec<ProbeGate> {
    vec![
        ProbeGate::http("app-http", "app", "127.0.0.1", 8080, "/").retries(10, Duration::from_secs(2)),
        ProbeGate::command("app-service", "app", ["/usr/local/sbin/svc", "status", "app"])
            .retries(10, Duration::from_secs(2)),
    ]
}

/// The ChangeSet under test: with guests, a new build of the app from a local `.deb`, installed
/// and restarted, plus more memory for app; without, a config change and a raw disk patch.
fn software_change(demo: &common::Demo, guests: bool) -> Result<ChangeSet> {
    if !guests {
        return Ok(ChangeSet {
            id: "cs-app-memory".into(),
            description: "app gets more memory; web gets a patched config block".into(),
            changes: vec![
                Change::SetMemory { machine: "app".into(), memory_mib: 256 },
                Change::WriteDisk {
                    machine: "web".into(),
                    disk: "disk0".into(),
                    offset: 1 << 20,
                    data: b"listen 8443".to_vec(),
                },
            ],
        });
    }
    let deb = demo.new_app_deb.as_ref().ok_or_else(|| stagecore::Error::not_found("file", "demo app 1.1 .deb"))?;
    let content = std::fs::read(deb).map_err(|e| stagecore::Error::backend("quickstart", e))?;
    let sh = |script: &str| vec!["/bin/sh".to_string(), "-c".into(), script.into()];
    Ok(ChangeSet {
        id: "cs-app-1.1".into(),
        description: "stagecore-demo-app 1.1 from a local .deb, service restarted; app gets 384 MiB".into(),
        changes: vec![
            Change::SetMemory { machine: "app".into(), memory_mib: 384 },
            Change::GuestFile { machine: "app".into(), path: DEB_IN_GUEST.into(), content, mode: Some(0o644) },
            Change::GuestCommand {
                machine: "app".into(),
                command: sh(&format!("dpkg -i {DEB_IN_GUEST} && rm {DEB_IN_GUEST}")),
                timeout_secs: Some(120),
            },
            Change::GuestCommand {
                machine: "app".into(),
                command: sh("/usr/local/sbin/svc restart app"),
                timeout_secs: Some(30),
            },
        ],
    })
}

/// The heading of the demo app's page (its name and version), as served inside `machine`.
async fn app_page(env: &DynEnvironment, machine: &str) -> Result<String> {
    let guest = env.guest().ok_or(stagecore::Error::not_supported("guest channel", "quickstart"))?;
    let out = guest.exec(machine, &GuestExec::new(FETCH_APP.iter().copied())).await?;
    if !out.success() {
        return Err(stagecore::Error::guest_command(machine, FETCH_APP.join(" "), &out));
    }
    let page = out.stdout_text();
    // The page's heading (`<h1>stagecore-demo-app 1.0</h1>`), or its first line.
    let heading = page.split_once("<h1>").and_then(|(_, rest)| rest.split_once("</h1>")).map(|(h, _)| h);
    Ok(heading.unwrap_or_else(|| page.lines().next().unwrap_or_default()).trim().to_string())
}

#[allow(dead_code)]
fn _assert_backend_object_safe(_: Arc<dyn Backend>) {}
