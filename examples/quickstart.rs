//! Quickstart: stage a production-like copy, change it, report drift, snapshot and revert, and
//! promote the tested change by replay — on the embedded default backend (QEMU), or on the
//! in-memory backend with `--backend memory`.
//!
//! ```text
//! cargo xtask demo                    # QEMU (TCG), no daemon needed
//! cargo xtask demo -- --backend memory
//! ```

use std::sync::Arc;
use std::time::Instant;

use stagekit::stagecore::promotion::{PreconditionPolicy, Promotion, PromotionEngine, PromotionRequest, Strategy};
use stagekit::stagecore::{
    self, Backend, BackendExt, Change, ChangeSet, DynEnvironment, EnvironmentExt, Result, StageOptions,
};

mod common;

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.iter().position(|a| a == "--backend").and_then(|i| args.get(i + 1)).map(String::as_str);
    let work = tempfile::tempdir()?;
    let (backend, production_spec) = common::backend(which.unwrap_or(common::DEFAULT_BACKEND), work.path()).await?;
    let t0 = Instant::now();
    let step = |what: &str| println!("[{:>6.2}s] {what}", t0.elapsed().as_secs_f64());

    step(&format!("backend: {} — capabilities: {:?}", backend.name(), backend.capabilities()));
    let prod = backend.create(&production_spec).await?;
    seed(&prod).await?;
    prod.start().await?;
    step("production web + app + db created with data on their disks, and started");

    let baseline = prod.take_baseline().await?;
    step(&format!("baseline {} taken (copy-on-write layer under every running disk)", baseline.id));

    let stage = backend.stage(&baseline, &StageOptions { start: true, ..StageOptions::linked("try-1") }).await?;
    let info = stage.info().await?;
    let names: Vec<_> = info.machines.iter().map(|m| m.instance_name.as_str()).collect();
    step(&format!("linked, fenced stage `try-1` cloned and started: {names:?}"));
    let report = backend.drift(&*prod, &*stage).await?;
    step(&format!("fresh clone: {:?}, match {:.1} %", report.status, report.score));

    let change = ChangeSet {
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
    };
    stage.apply_change_set(&change).await?;
    stage.apply(&Change::SetVcpus { machine: "db".into(), vcpus: 2 }).await?;
    step("ChangeSet applied to the stage (plus an unrecorded vCPU edit on db, which is drift)");
    println!("{}", backend.drift(&*prod, &*stage).await?);

    stage.create_snapshot("tested").await?;
    stage.apply(&Change::SetVcpus { machine: "db".into(), vcpus: 1 }).await?;
    stage.disk_io().expect("disk io").write("app", "disk0", 0, b"oops").await?;
    step("snapshot `tested` taken; then db's edit undone and a stray write on app");
    stage.revert_snapshot("tested").await?;
    step("reverted to `tested`");
    stage.apply(&Change::SetVcpus { machine: "db".into(), vcpus: 1 }).await?;
    let report = backend.drift(&*prod, &*stage).await?;
    step(&format!("after removing the stray edit: {:?}, match {:.1} %", report.status, report.score));

    let (engine, _) = PromotionEngine::open(work.path().join("promotions"), backend.clone()).await?;
    let request = PromotionRequest {
        production: prod.clone(),
        stage: stage.clone(),
        strategy: Strategy::Replay,
        policy: PreconditionPolicy::Anywhere,
        requested_by: "quickstart".into(),
        gates: vec![Arc::new(common::Approve("ops-lead"))],
    };
    let receipt = engine.promote(request).await?;
    step(&format!("promotion {} by replay: {:?}", receipt.id, receipt.outcome));
    for s in &receipt.steps {
        println!("           {:<22} {:>5} ms  {}", s.step, s.millis, s.outcome);
    }
    let app = prod.spec().await?.machine("app").map(|m| m.memory_mib);
    step(&format!("production app memory is now {} MiB", app.unwrap_or(0)));

    backend.destroy("try-1").await?;
    backend.destroy(prod.name()).await?;
    step("stage and production destroyed; done");
    Ok(())
}

async fn seed(env: &DynEnvironment) -> Result<()> {
    let io = env.disk_io().ok_or(stagecore::Error::not_supported("disk_io", "quickstart"))?;
    for m in env.spec().await?.machines {
        io.write(&m.name, "disk0", 0, format!("{} data v1", m.name).as_bytes()).await?;
    }
    Ok(())
}

#[allow(dead_code)]
fn _assert_backend_object_safe(_: Arc<dyn Backend>) {}
