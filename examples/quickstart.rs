//! Quickstart: a real 3-machine service (web, app, db — Debian 12 guests running the demo app) on
//! the embedded default backend (QEMU): take a baseline, clone a linked stage, try a software
//! change there (the app upgraded from a local `.deb`, its service restarted, more memory for app),
//! report drift, snapshot and revert, and promote the tested change into production by replay —
//! then show the change inside production's guest.
//!
//! ```text
//! cargo xtask demo                    # QEMU (TCG), real guests from the cached test image
//! cargo xtask demo -- --backend memory   # the in-memory backend: config and disk changes only
//! ```
//!
//! The guest image is built and cached by `cargo xtask guest-image` (`cargo xtask demo` does it
//! when it is missing) and found through `STAGECORE_GUEST_IMAGE`.

use std::sync::Arc;
use std::time::Instant;

use stagekit::stagecore::promotion::{PreconditionPolicy, Promotion, PromotionEngine, PromotionRequest, Strategy};
use stagekit::stagecore::{
    self, Backend, BackendExt, Change, ChangeSet, DynEnvironment, EnvironmentExt, GuestExec, Result, StageOptions,
};

mod common;

/// The demo app's page, fetched from inside a machine.
const FETCH_APP: &[&str] = &["/bin/busybox", "wget", "-qO-", "http://127.0.0.1:8080/"];

/// Where the new build of the app is copied in the guest before it is installed.
const DEB_IN_GUEST: &str = "/tmp/stagecore-demo-app_1.1_all.deb";

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.iter().position(|a| a == "--backend").and_then(|i| args.get(i + 1)).map(String::as_str);
    let work = tempfile::tempdir()?;
    let demo = common::backend(which.unwrap_or(common::DEFAULT_BACKEND), work.path()).await?;
    let backend = demo.backend.clone();
    let t0 = Instant::now();
    let step = |what: &str| println!("[{:>6.2}s] {what}", t0.elapsed().as_secs_f64());

    step(&format!("backend: {} — capabilities: {:?}", backend.name(), backend.capabilities()));
    let prod = backend.create(&demo.production).await?;
    let waves = demo.production.start_waves()?;
    prod.start().await?;
    let guests = prod.guest().is_some();
    if guests {
        common::wait_all(&*prod).await?;
        step(&format!("production web + app + db booted in start order {waves:?}; every guest agent answers"));
        step(&format!("production's app serves: {}", app_page(&prod, "web").await?));
    } else {
        common::seed(&prod).await?;
        step("production web + app + db created with data on their disks, and started");
    }

    let baseline = prod.take_baseline().await?;
    let levels: Vec<String> = baseline.consistency.iter().map(|(m, c)| format!("{m}: {:?}", c.level)).collect();
    step(&format!("baseline {} taken under the running disks [{}]", baseline.id, levels.join(", ")));

    let stage = backend.stage(&baseline, &StageOptions { start: true, ..StageOptions::linked("try-1") }).await?;
    if guests {
        common::wait_all(&*stage).await?;
    }
    let info = stage.info().await?;
    let names: Vec<_> = info.machines.iter().map(|m| m.instance_name.as_str()).collect();
    step(&format!("linked, fenced stage `try-1` cloned and started: {names:?}"));
    let report = backend.drift(&*prod, &*stage).await?;
    step(&format!("fresh clone: {:?}, match {:.1} %", report.status, report.score));

    let change = software_change(&demo, guests)?;
    stage.apply_change_set(&change).await?;
    stage.apply(&Change::SetVcpus { machine: "db".into(), vcpus: 2 }).await?;
    step(&format!("ChangeSet `{}` applied to the stage: {}", change.id, change.description));
    step("(plus an unrecorded vCPU edit on db, which is drift)");
    if guests {
        step(&format!("the stage's app serves: {}", app_page(&stage, "app").await?));
        step(&format!("production's app still serves: {}", app_page(&prod, "app").await?));
    }
    println!("{}", backend.drift(&*prod, &*stage).await?);

    stage.create_snapshot("tested").await?;
    stage.apply(&Change::SetVcpus { machine: "db".into(), vcpus: 1 }).await?;
    if let Some(guest) = stage.guest() {
        guest.write_file("app", "/opt/app/www/index.html", b"oops, a stray edit\n", None).await?;
        step(&format!("snapshot `tested` taken; then a stray edit in app's guest: {}", app_page(&stage, "app").await?));
    } else {
        stage.disk_io().expect("disk io").write("app", "disk0", 0, b"oops").await?;
        step("snapshot `tested` taken; then db's edit undone and a stray write on app");
    }
    stage.revert_snapshot("tested").await?;
    if guests {
        common::wait_all(&*stage).await?;
        step(&format!("reverted to `tested`: the stage's app serves {}", app_page(&stage, "app").await?));
    } else {
        step("reverted to `tested`");
    }
    stage.apply(&Change::SetVcpus { machine: "db".into(), vcpus: 1 }).await?;
    let report = backend.drift(&*prod, &*stage).await?;
    step(&format!("after removing the unrecorded edit: {:?}, match {:.1} %", report.status, report.score));

    let (engine, _) = PromotionEngine::open(work.path().join("promotions"), backend.clone()).await?;
    let request = PromotionRequest {
        production: prod.clone(),
        stage: stage.clone(),
        strategy: Strategy::Replay,
        policy: PreconditionPolicy::Touched,
        requested_by: "quickstart".into(),
        gates: vec![Arc::new(common::Approve("ops-lead"))],
    };
    let receipt = engine.promote(request).await?;
    step(&format!("promotion {} by replay: {:?}", receipt.id, receipt.outcome));
    for s in &receipt.steps {
        println!("           {:<22} {:>6} ms  {}", s.step, s.millis, s.outcome);
    }
    let app = prod.spec().await?.machine("app").map(|m| m.memory_mib);
    step(&format!("production app memory is now {} MiB", app.unwrap_or(0)));
    if guests {
        common::wait_all(&*prod).await?;
        let query = GuestExec::new(["dpkg-query", "-W", "stagecore-demo-app"]);
        let version = prod.guest().expect("guest").exec("app", &query).await?;
        step(&format!("production's app package: {}", version.stdout_text().trim()));
        step(&format!("production's app serves: {}", app_page(&prod, "app").await?));
    }

    backend.destroy("try-1").await?;
    backend.destroy(prod.name()).await?;
    step("stage and production destroyed; done");
    Ok(())
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
        description: "app upgraded to stagecore-demo-app 1.1 from a local .deb and restarted; app gets 384 MiB".into(),
        changes: vec![
            Change::SetMemory { machine: "app".into(), memory_mib: 384 },
            Change::GuestFile { machine: "app".into(), path: DEB_IN_GUEST.into(), content, mode: Some(0o644) },
            Change::GuestCommand {
                machine: "app".into(),
                command: sh(&format!("dpkg -i {DEB_IN_GUEST}")),
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
