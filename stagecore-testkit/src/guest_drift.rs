//! Guest drift through a backend's guest channel: inventory, the guest layer of the drift report,
//! footprints, probe gates and rebase. Every function requires
//! [`stagecore::Capabilities::guest_channel`] and productions whose guests answer once started
//! (the memory backend's simulated guests, or real guests: build the kit with
//! `crate::guest::guest_kit_of(backend, dir, &["app"])` — the functions change and read only
//! [`GuestFixture::machine`], so one TCG guest per side is enough; [`rebase_without_conflict`]
//! also changes a second machine: give it `&["app", "db"]`).
//!
//! What the functions change in the guests comes from a [`GuestFixture`]:
//! [`GuestFixture::simulated`] for the memory backend; for real guests the caller names a file
//! under a watched path, a package and the commands that upgrade it.

use std::time::Duration;

use stagecore::drift::{RecordKind, Side, Status};
use stagecore::inventory::{self, Category, InventoryConfig, MachineInventory};
use stagecore::promotion::{
    Outcome, PreconditionPolicy, ProbeGate, Promotion, PromotionEngine, PromotionRequest, RebaseOptions, RebaseOutcome,
    Strategy, rebase, test_environment,
};
use stagecore::{BackendExt, Change, ChangeSet, DynEnvironment, Environment, EnvironmentExt, Error, StageOptions};

use crate::{Kit, cleanup, unique};

/// What the guest-drift functions change inside the guests.
#[derive(Debug, Clone)]
pub struct GuestFixture {
    /// The machine whose guest is changed (`app`).
    pub machine: String,
    /// A file under a watched path that the functions rewrite (`/etc/app/app.conf`). Its
    /// directory is also where they add files.
    pub file: String,
    /// A package that [`GuestFixture::upgrade`] changes.
    pub package: String,
    /// Commands run in production's `machine` before the baseline (so production and its stages
    /// share them), e.g. making the upgrade available.
    pub prepare: Vec<Vec<String>>,
    /// A guest command that upgrades `package`.
    pub upgrade: Vec<String>,
    /// A command run in production's `machine` after the stage was changed, so that `upgrade`
    /// gives production a *different* version than the stage got. It must not change anything
    /// the inventory sees (a package source outside the watched paths, say).
    pub skew: Vec<String>,
    /// A TCP port `machine` listens on (serving HTTP on `/`).
    pub port: u16,
    /// A TCP port nothing listens on.
    pub closed_port: u16,
    /// How long a started machine's agent is waited for.
    pub ready: Duration,
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

impl GuestFixture {
    /// The fixture for the memory backend's simulated guest (see `stagecore::memory`).
    pub fn simulated() -> Self {
        GuestFixture {
            machine: "app".into(),
            file: "/etc/app/app.conf".into(),
            package: "stagecore-demo-app".into(),
            prepare: vec![argv(&["stagecore-sim", "repo", "set", "stagecore-demo-app", "2.0"])],
            upgrade: argv(&["stagecore-sim", "pkg", "upgrade", "stagecore-demo-app"]),
            skew: argv(&["stagecore-sim", "repo", "set", "stagecore-demo-app", "2.1"]),
            port: 8080,
            closed_port: 9,
            ready: Duration::from_secs(5),
        }
    }

    /// The fixture for the project's real test guest ([`crate::guest_image::GuestImage`]): the demo
    /// app's config file and package; `prepare` puts its 1.1 build at `/root/upgrade.deb` and
    /// its 1.0 build at `/root/other.deb` (outside the watched paths), `upgrade` installs the
    /// former, `skew` swaps in the latter so production's "upgrade" keeps 1.0.
    pub fn test_image(image: &crate::guest_image::GuestImage) -> Self {
        let put = |version: &str, path: &str| {
            let deb = image.app_debs.get(version).unwrap_or_else(|| panic!("the image has no demo app {version}"));
            let bytes = std::fs::read(deb).unwrap_or_else(|e| panic!("reading {}: {e}", deb.display()));
            // Every byte as an octal escape: `printf` writes it back exactly, with nothing to quote.
            let escaped: String = bytes.iter().map(|b| format!("\\{b:03o}")).collect();
            vec!["/bin/sh".to_string(), "-c".into(), format!("printf '{escaped}' > {path}")]
        };
        GuestFixture {
            machine: "app".into(),
            file: "/etc/app/app.conf".into(),
            package: "stagecore-demo-app".into(),
            prepare: vec![put("1.1", "/root/upgrade.deb"), put("1.0", "/root/other.deb")],
            upgrade: argv(&["dpkg", "-i", "/root/upgrade.deb"]),
            skew: argv(&["cp", "/root/other.deb", "/root/upgrade.deb"]),
            port: 8080,
            closed_port: 9,
            ready: Duration::from_secs(120),
        }
    }

    fn dir(&self) -> &str {
        self.file.rsplit_once('/').map_or("/", |(d, _)| if d.is_empty() { "/" } else { d })
    }

    fn file_path(&self) -> String {
        inventory::item_path(&self.machine, Category::Files, &self.file)
    }

    fn package_path(&self) -> String {
        inventory::item_path(&self.machine, Category::Packages, &self.package)
    }
}

async fn start_and_wait(env: &dyn Environment, ready: Duration) {
    env.start().await.unwrap_or_else(|e| panic!("starting {}: {e}", env.name()));
    wait_agents(env, ready).await;
}

async fn wait_agents(env: &dyn Environment, ready: Duration) {
    let guest = env.guest().expect("guest channel");
    for m in env.spec().await.expect("spec").machines {
        guest.wait_ready(&m.name, ready).await.unwrap_or_else(|e| panic!("agent of {}/{}: {e}", env.name(), m.name));
    }
}

async fn run(env: &dyn Environment, machine: &str, command: &[String]) {
    let out = env
        .guest()
        .expect("guest channel")
        .exec(machine, &stagecore::GuestExec::new(command.to_vec()))
        .await
        .unwrap_or_else(|e| panic!("`{}` in {}/{machine}: {e}", command.join(" "), env.name()));
    assert!(
        out.success(),
        "`{}` in {}/{machine} exited with {}: {}",
        command.join(" "),
        env.name(),
        out.exit_code,
        out.stderr_text()
    );
}

/// A running production (prepared), its baseline with inventory, and a running linked stage.
async fn pair(kit: &Kit, fx: &GuestFixture, tag: &str) -> (String, String, DynEnvironment, DynEnvironment) {
    kit.require("guest_channel", kit.caps().guest_channel);
    let (pname, sname) = (unique("kit-prod"), unique(tag));
    let prod = kit.production(&pname).await.expect("production");
    start_and_wait(&*prod, fx.ready).await;
    for c in &fx.prepare {
        run(&*prod, &fx.machine, c).await;
    }
    let (baseline, inv) = inventory::take_baseline(&*prod, &InventoryConfig::default(), None).await.expect("baseline");
    let stage = inventory::stage(&*kit.backend, &baseline, &inv, &StageOptions::linked(&sname)).await.expect("stage");
    start_and_wait(&*stage, fx.ready).await;
    (pname, sname, prod, stage)
}

fn edited(fx: &GuestFixture, tag: &str) -> Change {
    Change::GuestFile {
        machine: fx.machine.clone(),
        path: fx.file.clone(),
        content: format!("# changed by the stagecore kit: {tag}\nport={}\n", fx.port).into_bytes(),
        mode: Some(0o644),
    }
}

fn upgrade(fx: &GuestFixture) -> Change {
    Change::GuestCommand { machine: fx.machine.clone(), command: fx.upgrade.clone(), timeout_secs: Some(300) }
}

/// A fresh clone's guest layer: NOT_CHECKED with a reason while the stage is stopped (never a
/// clean result), IN_SYNC with no records once it runs — hostname, machine-id and SSH host keys
/// normalised away. The baseline inventory is recorded on the stage. Linked and full clones.
///
/// With both sides running, the whole report is IN_SYNC, clean and 100 %: what the running guests
/// write to their disks after the baseline (the thaw, journal commits) is reported as
/// INFORMATIONAL disk records, judged by the guest layer ([`stagecore::drift::guest_judged`]),
/// never as DRIFTED. While the stage is stopped its disks have no changes of their own; disk
/// drift can only be production's (its running guests).
pub async fn zero_guest_drift_after_clone(kit: &Kit, fx: &GuestFixture) {
    kit.require("guest_channel", kit.caps().guest_channel);
    let pname = unique("kit-prod");
    let prod = kit.production(&pname).await.expect("production");
    start_and_wait(&*prod, fx.ready).await;
    let (baseline, inv) = inventory::take_baseline(&*prod, &InventoryConfig::default(), None).await.expect("baseline");
    assert!(inv.machines.values().all(|m| m.inventory().is_some()), "production's inventory: {inv:?}");
    let mut kinds = vec![StageOptions::linked(unique("kit-gzero"))];
    if kit.caps().full_clone {
        kinds.push(StageOptions::full(unique("kit-gzero")));
    }
    let mut names = Vec::new();
    for opts in kinds {
        let stage = inventory::stage(&*kit.backend, &baseline, &inv, &opts).await.expect("stage");
        names.push(opts.name.clone());
        let info = stage.info().await.unwrap();
        let recorded =
            inventory::baseline_inventory(info.stage().expect("a stage")).expect("baseline inventory recorded");
        assert_eq!(recorded, inv);
        if stage.status().await.unwrap().iter().all(|s| s.power != stagecore::PowerState::Running) {
            let r = kit.backend.drift(&*prod, &*stage).await.expect("drift");
            assert_eq!(r.guest.status, Status::NotChecked, "a stopped stage's guest layer:\n{r}");
            assert!(r.guest.reason.as_deref().is_some_and(|s| !s.is_empty()), "NOT_CHECKED needs a reason:\n{r}");
            assert!(r.machines.iter().all(|m| m.guest == Status::NotChecked && m.guest_reason.is_some()), "{r}");
            assert!(r.guest.records.is_empty() && r.config.records.is_empty(), "{r}");
            // Nothing is judged by a guest layer that could not be checked.
            assert!(r.disk.records.iter().all(|d| d.status != Status::Informational), "{r}");
            assert!(r.disk.records.iter().all(|d| d.stage.bytes == 0), "a stopped fresh stage wrote:\n{r}");
            if r.status == Status::Drifted {
                assert!(r.disk.records.iter().all(|d| d.side.is_none_or(|s| s == Side::Production)), "{r}");
            }
        }
        start_and_wait(&*stage, fx.ready).await;
        let r = kit.backend.drift(&*prod, &*stage).await.expect("drift");
        assert!(r.guest.records.is_empty(), "false guest drift after a {:?} clone:\n{r}", opts.clone);
        assert_eq!(r.guest.status, Status::InSync, "{r}");
        assert!(r.machines.iter().all(|m| m.guest == Status::InSync && m.guest_drift == 0), "{r}");
        assert!(r.config.records.is_empty(), "{r}");
        assert!(r.disk.records.iter().all(|d| d.status != Status::Drifted), "{r}");
        assert_ne!(r.status, Status::Drifted, "{r}");
        if kit.caps().disk_drift {
            assert!(
                r.disk.records.iter().all(|d| matches!(d.status, Status::InSync | Status::Informational)),
                "running guests' disk bytes must be judged by their guest layer after a {:?} clone:\n{r}",
                opts.clone
            );
            assert!(r.machines.iter().all(|m| m.status == Status::InSync && m.disk_drift_bytes == 0), "{r}");
            assert_eq!(r.status, Status::InSync, "{r}");
            assert!(r.is_clean(), "{r}");
            assert_eq!(r.score, 100.0, "{r}");
        }
    }
    let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
    all.push(&pname);
    cleanup(&*kit.backend, &all).await;
}

/// A ChangeSet's guest changes applied with a footprint are intended (side `stage`); an
/// unrecorded file on the stage is drift (ADD, stage); a file added in production is drift
/// (REMOVE, production); the score falls; the JSON carries schema v3 and the guest paths.
pub async fn guest_change_is_intended(kit: &Kit, fx: &GuestFixture) {
    let (pname, sname, prod, stage) = pair(kit, fx, "kit-gintent").await;
    let cs = ChangeSet {
        id: "cs-kit-guest".into(),
        description: "rewrite the app's config and upgrade its package".into(),
        changes: vec![edited(fx, "intended"), upgrade(fx)],
    };
    let fp = inventory::apply_change_set(&*stage, &cs, &InventoryConfig::default())
        .await
        .expect("apply with footprint")
        .expect("a guest ChangeSet has a footprint");
    let paths: Vec<&str> = fp.deltas().map(|(_, d)| d.path.as_str()).collect();
    assert!(paths.contains(&fx.file_path().as_str()) && paths.contains(&fx.package_path().as_str()), "{fp:?}");

    let r = kit.backend.drift(&*prod, &*stage).await.expect("drift");
    for path in [fx.file_path(), fx.package_path()] {
        let rec = r.guest.records.iter().find(|x| x.path == path).unwrap_or_else(|| panic!("no record {path}:\n{r}"));
        assert_eq!((rec.kind, rec.side, rec.intended), (RecordKind::NotEqual, Some(Side::Stage), true), "{r}");
    }
    assert!(r.guest.records.iter().all(|x| x.intended), "{r}");
    assert_eq!(r.guest.status, Status::InSync, "{r}");
    let score = r.score;

    let extra = format!("{}/kit-extra.conf", fx.dir());
    stage.guest().unwrap().write_file(&fx.machine, &extra, b"unrecorded\n", Some(0o644)).await.expect("write");
    let r2 = kit.backend.drift(&*prod, &*stage).await.expect("drift");
    let path = inventory::item_path(&fx.machine, Category::Files, &extra);
    let rec = r2.guest.records.iter().find(|x| x.path == path).unwrap_or_else(|| panic!("no record {path}:\n{r2}"));
    assert_eq!((rec.kind, rec.side, rec.intended), (RecordKind::Add, Some(Side::Stage), false), "{r2}");
    assert_eq!((r2.guest.status, r2.status), (Status::Drifted, Status::Drifted), "{r2}");
    let m = r2.machines.iter().find(|m| m.machine == fx.machine).unwrap();
    assert_eq!((m.guest, m.guest_drift, m.status), (Status::Drifted, 1, Status::Drifted), "{r2}");
    // Scores are rounded to 0.1 %: with a real guest's thousands of items one more record may not
    // show, but it must never raise the score (monotone).
    assert!(r2.score <= score, "more guest drift must not raise the score ({} > {score})", r2.score);

    let prod_only = format!("{}/kit-production.conf", fx.dir());
    prod.guest().unwrap().write_file(&fx.machine, &prod_only, b"production moved\n", Some(0o644)).await.expect("write");
    let r3 = kit.backend.drift(&*prod, &*stage).await.expect("drift");
    let path = inventory::item_path(&fx.machine, Category::Files, &prod_only);
    let rec = r3.guest.records.iter().find(|x| x.path == path).unwrap_or_else(|| panic!("no record {path}:\n{r3}"));
    assert_eq!((rec.kind, rec.side, rec.intended), (RecordKind::Remove, Some(Side::Production), false), "{r3}");
    assert!(r3.score <= r2.score);
    let json: serde_json::Value = serde_json::from_str(&r3.to_json()).unwrap();
    assert_eq!(json["schema"], "stagecore.drift/v3");
    assert!(json["guest"]["records"].as_array().unwrap().iter().any(|x| x["path"] == path.as_str()), "{json}");
    cleanup(&*kit.backend, &[&sname, &pname]).await;
}

async fn engine(kit: &Kit) -> (PromotionEngine, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (engine, recovered) = PromotionEngine::open(dir.path(), kit.backend.clone()).await.expect("engine");
    assert!(recovered.is_empty());
    (engine, dir)
}

fn request(prod: &DynEnvironment, stage: &DynEnvironment, gates: Vec<ProbeGate>) -> PromotionRequest {
    PromotionRequest {
        production: prod.clone(),
        stage: stage.clone(),
        strategy: Strategy::Replay,
        policy: PreconditionPolicy::Touched,
        requested_by: "stagecore-testkit".into(),
        gates: gates.into_iter().map(|g| std::sync::Arc::new(g) as _).collect(),
    }
}

async fn package_version(env: &dyn Environment, fx: &GuestFixture) -> Option<String> {
    // A promotion's rollback may just have restarted the machine: its guest boots again.
    wait_agents(env, fx.ready).await;
    let inv = inventory::collect(env, Some(std::slice::from_ref(&fx.machine)), &InventoryConfig::default(), None)
        .await
        .unwrap();
    match &inv[&fx.machine] {
        MachineInventory::Collected { inventory } => inventory.packages.get(&fx.package).map(|p| p.version.clone()),
        MachineInventory::NotCollected { reason } => panic!("inventory of {}/{}: {reason}", env.name(), fx.machine),
    }
}

/// Replay promotion verifies the footprint: production after replay shows the stage's footprint
/// (committed, with a passing TCP gate in the receipt); when production's upgrade gives another
/// version than the stage's, verify fails naming the package record and the promotion rolls back.
pub async fn footprint_verify(kit: &Kit, fx: &GuestFixture) {
    let (pname, sname, prod, stage) = pair(kit, fx, "kit-gfoot").await;
    let cs = ChangeSet {
        id: "cs-kit-foot".into(),
        description: "upgrade".into(),
        changes: vec![edited(fx, "promoted"), upgrade(fx)],
    };
    inventory::apply_change_set(&*stage, &cs, &InventoryConfig::default()).await.expect("apply");
    let gate = ProbeGate::tcp("app-port", &fx.machine, "127.0.0.1", fx.port).retries(3, Duration::from_millis(200));
    let (engine, _dir) = engine(kit).await;
    let receipt = engine.promote(request(&prod, &stage, vec![gate])).await.expect("promote");
    assert_eq!(receipt.outcome, Outcome::Committed, "{receipt:#?}");
    let verify = receipt.steps.iter().find(|s| s.step == "verify").expect("verify step");
    assert!(verify.outcome.contains("guest footprint verified"), "{verify:?}");
    assert!(receipt.approvals.iter().any(|a| a.gate == "app-port" && a.note.contains("passed")), "{receipt:#?}");
    assert_eq!(package_version(&*prod, fx).await, package_version(&*stage, fx).await);
    cleanup(&*kit.backend, &[&sname, &pname]).await;

    let (pname, sname, prod, stage) = pair(kit, fx, "kit-gskew").await;
    let cs = ChangeSet { id: "cs-kit-skew".into(), description: "upgrade".into(), changes: vec![upgrade(fx)] };
    inventory::apply_change_set(&*stage, &cs, &InventoryConfig::default()).await.expect("apply");
    let before = package_version(&*prod, fx).await;
    run(&*prod, &fx.machine, &fx.skew).await;
    let receipt = engine.promote(request(&prod, &stage, Vec::new())).await.expect("promote");
    let Outcome::RolledBack { reason } = &receipt.outcome else { panic!("expected a rollback: {receipt:#?}") };
    assert!(reason.contains(&fx.package_path()), "the reason names the package record: {reason}");
    assert_eq!(package_version(&*prod, fx).await, before, "production's package was not rolled back");
    cleanup(&*kit.backend, &[&sname, &pname]).await;
}

/// Probe gates run against a stage before promotion: a guest command, TCP and HTTP probes from
/// inside a machine pass; a probe of a closed port fails after its retries. As a promotion gate a
/// failing probe rolls the promotion back, its note in the receipt.
pub async fn gates_on_stage(kit: &Kit, fx: &GuestFixture) {
    let (pname, sname, prod, stage) = pair(kit, fx, "kit-ggate").await;
    let m = fx.machine.as_str();
    let quick = |g: ProbeGate| g.timeout(Duration::from_secs(5)).retries(2, Duration::from_millis(100));
    let gates = vec![
        quick(ProbeGate::command("true", m, ["/bin/true"])),
        quick(ProbeGate::tcp("tcp", m, "127.0.0.1", fx.port)),
        quick(ProbeGate::http("http", m, "127.0.0.1", fx.port, "/")),
        quick(ProbeGate::tcp("closed", m, "127.0.0.1", fx.closed_port)),
        quick(ProbeGate::command("fails", m, ["/bin/false"])),
    ];
    let report = test_environment(&*stage, &gates, None).await;
    assert!(!report.passed, "{report:#?}");
    let by = |n: &str| report.results.iter().find(|r| r.gate == n).unwrap();
    assert!(by("true").passed && by("tcp").passed && by("http").passed, "{report:#?}");
    assert!(by("http").detail.contains("200"), "{report:#?}");
    assert!(!by("closed").passed && by("closed").attempts == 2, "{report:#?}");
    assert!(!by("fails").passed && by("fails").detail.contains("exited with 1"), "{report:#?}");

    let cs =
        ChangeSet { id: "cs-kit-gate".into(), description: "config edit".into(), changes: vec![edited(fx, "gated")] };
    inventory::apply_change_set(&*stage, &cs, &InventoryConfig::default()).await.expect("apply");
    let (engine, _dir) = engine(kit).await;
    let closed = quick(ProbeGate::tcp("closed", m, "127.0.0.1", fx.closed_port));
    let receipt = engine.promote(request(&prod, &stage, vec![closed])).await.expect("promote");
    let Outcome::RolledBack { reason } = &receipt.outcome else { panic!("expected a rollback: {receipt:#?}") };
    assert!(reason.contains("gate closed refused"), "{reason}");
    // Rolling back reverts production to its pre-promotion snapshot: a backend may restart the
    // machines for that (libvirt does), so their agents are waited for before reading.
    wait_agents(&*prod, fx.ready).await;
    let file = prod.guest().unwrap().read_file(m, &fx.file).await.expect("read");
    assert!(!String::from_utf8_lossy(&file).contains("gated"), "the rolled-back file is still in production");
    cleanup(&*kit.backend, &[&sname, &pname]).await;
}

fn kit_change_set(fx: &GuestFixture, memory_mib: u64) -> ChangeSet {
    ChangeSet {
        id: "cs-kit-rebase".into(),
        description: "more memory and a new config".into(),
        changes: vec![Change::SetMemory { machine: fx.machine.clone(), memory_mib }, edited(fx, "rebased")],
    }
}

/// Rebase where production moved elsewhere (another machine's vCPUs and a file on another
/// machine): a new stage on a new baseline carries the ChangeSet again, its drift all intended;
/// the old stage is still there, unchanged. Requires `config_changes` and productions of at
/// least two machines.
pub async fn rebase_without_conflict(kit: &Kit, fx: &GuestFixture) {
    kit.require_change("set_vcpus");
    let (pname, sname, prod, stage) = pair(kit, fx, "kit-grebase").await;
    let spec = prod.spec().await.unwrap();
    let app = spec.machine(&fx.machine).expect("fixture machine").clone();
    let other = spec.machines.iter().find(|m| m.name != fx.machine).expect("a second machine").clone();
    let cs = kit_change_set(fx, app.memory_mib + 64);
    inventory::apply_change_set(&*stage, &cs, &InventoryConfig::default()).await.expect("apply");
    let old_info = stage.info().await.unwrap();

    prod.apply(&Change::SetVcpus { machine: other.name.clone(), vcpus: other.vcpus + 1 }).await.expect("prod edit");
    wait_agents(&*prod, fx.ready).await; // a config change restarts the machine: its guest boots again
    let unrelated = format!("{}/kit-unrelated.conf", fx.dir());
    prod.guest().unwrap().write_file(&other.name, &unrelated, b"elsewhere\n", Some(0o644)).await.expect("prod write");

    let new_name = unique("kit-grebased");
    let outcome = rebase(&*kit.backend, &*prod, &*stage, &RebaseOptions::new(&new_name), None).await.expect("rebase");
    let RebaseOutcome::Rebased { stage: new, applied, .. } = outcome else {
        panic!("unexpected conflict: {outcome:?}")
    };
    assert_eq!(applied, vec![cs.id.clone()]);
    let info = new.info().await.unwrap();
    let staged = info.stage().unwrap();
    assert_eq!(inventory::user_change_sets(&staged.change_sets), vec![&cs]);
    assert_eq!(inventory::footprints(&staged.change_sets).len(), 1, "the footprint is recorded again");
    let r = kit.backend.drift(&*prod, &*new).await.expect("drift");
    assert!(r.config.records.iter().all(|x| x.intended), "{r}");
    assert!(r.guest.records.iter().all(|x| x.intended) && !r.guest.records.is_empty(), "{r}");
    assert_eq!(r.guest.status, Status::InSync, "{r}");
    assert_eq!(stage.info().await.expect("the old stage is still there"), old_info, "the old stage changed");
    cleanup(&*kit.backend, &[&new_name, &sname, &pname]).await;
}

/// Rebase where production changed what the ChangeSet touches (the same config path and the same
/// file): a conflict report naming both, no new stage, the old stage untouched. Requires
/// `config_changes`.
pub async fn rebase_with_conflict(kit: &Kit, fx: &GuestFixture) {
    kit.require_change("set_memory");
    let (pname, sname, prod, stage) = pair(kit, fx, "kit-gconflict").await;
    let app = prod.spec().await.unwrap().machine(&fx.machine).expect("fixture machine").clone();
    let cs = kit_change_set(fx, app.memory_mib + 64);
    inventory::apply_change_set(&*stage, &cs, &InventoryConfig::default()).await.expect("apply");
    let old_info = stage.info().await.unwrap();
    prod.apply(&Change::SetMemory { machine: fx.machine.clone(), memory_mib: app.memory_mib + 32 }).await.unwrap();
    wait_agents(&*prod, fx.ready).await; // a config change restarts the machine: its guest boots again
    prod.guest().unwrap().write_file(&fx.machine, &fx.file, b"production's own edit\n", None).await.unwrap();

    let new_name = unique("kit-gnot");
    let outcome = rebase(&*kit.backend, &*prod, &*stage, &RebaseOptions::new(&new_name), None).await.expect("rebase");
    let RebaseOutcome::Conflict(report) = outcome else { panic!("expected a conflict: {outcome:?}") };
    let paths: Vec<&str> = report.conflicts.iter().map(|c| c.path.as_str()).collect();
    let memory = format!("/machines/{}/memory_mib", fx.machine);
    assert!(paths.contains(&memory.as_str()) && paths.contains(&fx.file_path().as_str()), "{report:#?}");
    assert!(report.conflicts.iter().all(|c| c.change_set == cs.id));
    match kit.backend.open(&new_name).await {
        Err(Error::NotFound { .. }) => {}
        other => panic!("a conflicting rebase left a stage behind: {other:?}"),
    }
    assert_eq!(stage.info().await.unwrap(), old_info, "the old stage changed");
    cleanup(&*kit.backend, &[&sname, &pname]).await;
}

/// Taking production's inventory (baseline, drift, collect) leaves what its guests read from
/// their disks and its spec identical (invariant 1 with the guest layer on). Requires `disk_io`.
pub async fn production_untouched_by_inventory(kit: &Kit, fx: &GuestFixture) {
    kit.require("disk_io", kit.caps().disk_io);
    let (pname, sname, prod, stage) = pair(kit, fx, "kit-guntouched").await;
    let before = prod.fingerprint().await.expect("fingerprint");
    for _ in 0..2 {
        let r = kit.backend.drift(&*prod, &*stage).await.expect("drift");
        assert_ne!(r.guest.status, Status::NotChecked, "the guest layer must be on:\n{r}");
    }
    inventory::collect(&*prod, None, &InventoryConfig::default(), None).await.expect("collect");
    assert_eq!(prod.fingerprint().await.unwrap(), before, "taking production's inventory changed production");
    cleanup(&*kit.backend, &[&sname, &pname]).await;
}

/// Every function of this module, with `fixture`.
pub async fn run_all(kit: &Kit, fixture: &GuestFixture) {
    zero_guest_drift_after_clone(kit, fixture).await;
    guest_change_is_intended(kit, fixture).await;
    footprint_verify(kit, fixture).await;
    gates_on_stage(kit, fixture).await;
    if kit.caps().changes.set_vcpus && kit.caps().changes.set_memory {
        rebase_without_conflict(kit, fixture).await;
        rebase_with_conflict(kit, fixture).await;
    }
    if kit.caps().disk_io {
        production_untouched_by_inventory(kit, fixture).await;
    }
}
