//! Guest functions: what a backend that declares [`stagecore::Capabilities::guest_channel`] must do
//! with real guests — commands and files round trip, a guest change on a stage stays out of
//! production, snapshot → guest change → revert gives the old file back, a replay promotion
//! carries a guest change into production, and a guest command that fails in production rolls
//! the promotion back.
//!
//! These functions need productions of *real guests* whose agents answer: build the [`Kit`] with
//! [`guest_kit`], which boots the project's test image ([`crate::guest_image::GuestImage`]) — a
//! Debian 12 guest running the demo app (`/etc/app/app.conf`, `svc restart app`) — on every
//! machine of an app/db production.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use stagecore::inventory::{self, InventoryConfig};
use stagecore::promotion::{Outcome, PreconditionPolicy, Promotion, PromotionEngine, PromotionRequest, Strategy};
use stagecore::{
    Backend, Change, ChangeSet, DynEnvironment, Environment, EnvironmentExt, Error, GuestChannel, GuestExec,
    StageOptions,
};

use crate::guest_image::GuestImage;
use crate::{Kit, ProductionFactory, cleanup, unique};

/// How long a booting guest's agent is waited for.
pub const READY: Duration = Duration::from_secs(120);

/// The demo app's config file inside the test guest.
pub const APP_CONF: &str = "/etc/app/app.conf";

/// A kit whose productions are app/db environments of real guests booted from the test image
/// (the machines the functions of this module use), started (in start order) and with every
/// agent answering. Each production's disk overlays are made in `disk_dir/<name>/` (the caller
/// owns `disk_dir`; for libvirt it must be traversable by the `libvirt-qemu` user).
pub fn guest_kit(backend: Arc<dyn Backend>, disk_dir: PathBuf) -> Kit {
    guest_kit_of(backend, disk_dir, &["app", "db"])
}

/// [`guest_kit`] with productions of the machines `only` (of `web`, `app`, `db`,
/// [`GuestImage::production_spec_of`]): the guest-drift functions need `app` alone.
pub fn guest_kit_of(backend: Arc<dyn Backend>, disk_dir: PathBuf, only: &'static [&'static str]) -> Kit {
    let image = GuestImage::locate();
    let b = backend.clone();
    let factory: ProductionFactory = Arc::new(move |name: String| {
        let (b, image, dir) = (b.clone(), image.clone(), disk_dir.join(&name));
        Box::pin(async move {
            std::fs::create_dir_all(&dir).map_err(|e| Error::backend("testkit", e))?;
            let spec = image.production_spec_of(&name, &dir, only).map_err(|e| Error::backend("testkit", e))?;
            let env = b.create(&spec).await?;
            env.start().await?;
            wait_all(&*env).await?;
            Ok(env)
        })
    });
    Kit::with_factory(backend, factory)
}

/// Waits until the agent of every machine of `env` answers.
pub async fn wait_all(env: &dyn Environment) -> stagecore::Result<()> {
    let guest = env.guest().ok_or(Error::NotSupported { operation: "guest channel", backend: "testkit" })?;
    for m in env.spec().await?.machines {
        guest.wait_ready(&m.name, READY).await?;
    }
    Ok(())
}

fn channel<'a>(kit: &Kit, env: &'a DynEnvironment) -> &'a dyn GuestChannel {
    kit.require("guest_channel", kit.caps().guest_channel);
    env.guest().expect("a backend that declares guest_channel gives a guest channel")
}

async fn sh(guest: &dyn GuestChannel, machine: &str, script: &str) -> stagecore::GuestOutput {
    guest.exec(machine, &GuestExec::new(["/bin/sh", "-c", script])).await.unwrap_or_else(|e| panic!("{script}: {e}"))
}

/// A guest file's content, `None` when it does not exist (any other error panics).
async fn file(guest: &dyn GuestChannel, machine: &str, path: &str) -> Option<Vec<u8>> {
    match guest.read_file(machine, path).await {
        Ok(data) => Some(data),
        Err(Error::NotFound { .. }) => None,
        Err(e) => panic!("reading {path} in {machine}: {e}"),
    }
}

/// `exec` with stdin, environment and a non-zero exit code; `write_file` with a mode, read back
/// byte for byte (binary content); a missing file is `NotFound`; an unknown machine is `NotFound`.
pub async fn exec_read_write_round_trip(kit: &Kit) {
    let pname = unique("kit-guest");
    let prod = kit.production(&pname).await.expect("production of real guests");
    let guest = channel(kit, &prod);

    let req = GuestExec::new(["/bin/sh", "-c", "cat; echo \"to-stderr $KIT_VAR\" >&2; exit 7"])
        .stdin(b"from stdin".to_vec())
        .env("KIT_VAR", "kit-value")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    let out = guest.exec("app", &req).await.expect("exec");
    assert_eq!(out.exit_code, 7, "{out:?}");
    assert_eq!(out.stdout, b"from stdin", "{out:?}");
    assert_eq!(out.stderr_text().trim(), "to-stderr kit-value", "{out:?}");
    assert!(!out.truncated);

    let content: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    guest.write_file("app", "/root/kit.bin", &content, Some(0o600)).await.expect("write_file");
    assert_eq!(guest.read_file("app", "/root/kit.bin").await.expect("read_file"), content);
    let mode = sh(guest, "app", "stat -c %a /root/kit.bin").await;
    assert_eq!(mode.stdout_text().trim(), "600", "{mode:?}");
    guest.write_file("app", "/root/kit.bin", b"short", None).await.expect("overwrite keeps the mode");
    assert_eq!(guest.read_file("app", "/root/kit.bin").await.unwrap(), b"short");
    assert_eq!(sh(guest, "app", "stat -c %a /root/kit.bin").await.stdout_text().trim(), "600");

    let missing = guest.read_file("app", "/root/no-such-file").await.unwrap_err();
    assert!(matches!(missing, Error::NotFound { .. }), "{missing}");
    let unknown = guest.exec("no-such-machine", &GuestExec::new(["/bin/true"])).await.unwrap_err();
    assert!(matches!(unknown, Error::NotFound { .. }), "{unknown}");
    cleanup(&*kit.backend, &[&pname]).await;
}

/// A guest change applied to a started linked stage (a config file and a service restart) is seen
/// in the stage and not in production: production's file, spec and boot are as before, and the
/// stage's guests are other guests (their own boot ids).
pub async fn guest_change_invisible_in_production(kit: &Kit) {
    let (pname, sname) = (unique("kit-gprod"), unique("kit-gstage"));
    let prod = kit.production(&pname).await.expect("production of real guests");
    let pguest = channel(kit, &prod);
    let before = file(pguest, "app", APP_CONF).await.expect("the demo app's config exists in production");
    let prod_boot = sh(pguest, "app", "cat /proc/sys/kernel/random/boot_id").await.stdout;
    let spec_before = prod.spec().await.unwrap();

    let baseline = prod.take_baseline().await.expect("baseline of running production");
    let stage = kit
        .backend
        .stage(&baseline, &StageOptions { start: true, ..StageOptions::linked(&sname) })
        .await
        .expect("started stage");
    wait_all(&*stage).await.expect("the stage's agents answer");
    let sguest = channel(kit, &stage);
    let stage_boot = sh(sguest, "app", "cat /proc/sys/kernel/random/boot_id").await.stdout;
    assert_ne!(stage_boot, prod_boot, "the stage's channel reached production's guest");

    let edited = b"port=8080\nmode=staged\n".to_vec();
    let cs = ChangeSet {
        id: "cs-kit-guest".into(),
        description: "app config edit and restart".into(),
        changes: vec![
            Change::GuestFile { machine: "app".into(), path: APP_CONF.into(), content: edited.clone(), mode: None },
            Change::GuestCommand {
                machine: "app".into(),
                command: vec!["/usr/local/sbin/svc".into(), "restart".into(), "app".into()],
                timeout_secs: Some(60),
            },
        ],
    };
    stage.apply_change_set(&cs).await.expect("guest ChangeSet on the stage");
    assert_eq!(file(sguest, "app", APP_CONF).await.as_deref(), Some(&edited[..]));
    assert!(sh(sguest, "app", "/usr/local/sbin/svc status app").await.success(), "the app runs after its restart");

    assert_eq!(file(pguest, "app", APP_CONF).await, Some(before), "the stage's guest change reached production");
    assert_eq!(sh(pguest, "app", "cat /proc/sys/kernel/random/boot_id").await.stdout, prod_boot, "production rebooted");
    assert_eq!(prod.spec().await.unwrap(), spec_before, "production's spec changed");
    let info = stage.info().await.unwrap();
    assert_eq!(info.stage().expect("a stage").change_sets, [cs], "the ChangeSet is recorded on the stage");
    cleanup(&*kit.backend, &[&sname, &pname]).await;
}

/// Snapshot → guest change → revert gives the old file back and removes the new one; the
/// machines run again after the revert and their agents answer.
pub async fn snapshot_revert_restores_guest_file(kit: &Kit) {
    let pname = unique("kit-gsnap");
    let prod = kit.production(&pname).await.expect("production of real guests");
    let guest = channel(kit, &prod);
    guest.write_file("db", "/root/state.txt", b"v1", None).await.unwrap();
    assert!(sh(guest, "db", "sync").await.success());
    prod.create_snapshot("before").await.expect("snapshot");
    guest.write_file("db", "/root/state.txt", b"v2", None).await.unwrap();
    guest.write_file("db", "/root/new.txt", b"new", None).await.unwrap();
    assert!(sh(guest, "db", "sync").await.success());

    prod.revert_snapshot("before").await.expect("revert");
    wait_all(&*prod).await.expect("the machines run again after the revert");
    assert_eq!(file(guest, "db", "/root/state.txt").await.as_deref(), Some(&b"v1"[..]), "the old file is not back");
    assert_eq!(file(guest, "db", "/root/new.txt").await, None, "a file written after the snapshot survived the revert");
    cleanup(&*kit.backend, &[&pname]).await;
}

/// A started linked stage of `prod` whose baseline carries production's guest inventory (so the
/// drift engine and the promotion's precondition know which side moved inside the guests).
async fn guest_stage(kit: &Kit, prod: &DynEnvironment, name: &str) -> DynEnvironment {
    let config = InventoryConfig::default();
    let (baseline, at_baseline) = inventory::take_baseline(&**prod, &config, None).await.expect("baseline");
    let options = StageOptions { start: true, ..StageOptions::linked(name) };
    let stage = inventory::stage(&*kit.backend, &baseline, &at_baseline, &options).await.expect("started stage");
    wait_all(&*stage).await.expect("the stage's agents answer");
    stage
}

/// A stage with a recorded guest ChangeSet and an engine over a fresh state directory.
struct Promo {
    pname: String,
    sname: String,
    prod: DynEnvironment,
    stage: DynEnvironment,
    dir: tempfile::TempDir,
}

impl Promo {
    async fn new(kit: &Kit, changes: Vec<Change>) -> Promo {
        let (pname, sname) = (unique("kit-gpromo-prod"), unique("kit-gpromo"));
        let prod = kit.production(&pname).await.expect("production of real guests");
        channel(kit, &prod);
        let stage = guest_stage(kit, &prod, &sname).await;
        let cs = ChangeSet { id: "cs-kit-guest-promo".into(), description: "guest change".into(), changes };
        inventory::apply_change_set(&*stage, &cs, &InventoryConfig::default())
            .await
            .expect("the ChangeSet works on the stage");
        Promo { pname, sname, prod, stage, dir: tempfile::tempdir().expect("state dir") }
    }

    async fn promote(&self, kit: &Kit) -> stagecore::promotion::Receipt {
        let (engine, recovered) = PromotionEngine::open(self.dir.path(), kit.backend.clone()).await.expect("engine");
        assert!(recovered.is_empty());
        let request = PromotionRequest {
            production: self.prod.clone(),
            stage: self.stage.clone(),
            strategy: Strategy::Replay,
            policy: PreconditionPolicy::Touched,
            requested_by: "testkit".into(),
            gates: Vec::new(),
        };
        engine.promote(request).await.expect("promote")
    }

    async fn cleanup(self, kit: &Kit) {
        cleanup(&*kit.backend, &[&self.sname, &self.pname]).await;
    }
}

/// A replay promotion of a guest change (a config file plus a service restart) commits, and
/// production's guest shows the change afterwards.
pub async fn replay_promotion_reaches_production(kit: &Kit) {
    let edited = b"port=8080\nmode=promoted\n".to_vec();
    let p = Promo::new(
        kit,
        vec![
            Change::GuestFile {
                machine: "app".into(),
                path: APP_CONF.into(),
                content: edited.clone(),
                mode: Some(0o644),
            },
            Change::GuestCommand {
                machine: "app".into(),
                command: vec!["/usr/local/sbin/svc".into(), "restart".into(), "app".into()],
                timeout_secs: None,
            },
        ],
    )
    .await;
    let receipt = p.promote(kit).await;
    assert_eq!(receipt.outcome, Outcome::Committed, "{receipt:#?}");
    let guest = channel(kit, &p.prod);
    assert_eq!(file(guest, "app", APP_CONF).await.as_deref(), Some(&edited[..]), "production lacks the change");
    assert!(sh(guest, "app", "/usr/local/sbin/svc status app").await.success(), "production's app is not running");
    p.cleanup(kit).await;
}

/// A guest command that passed on the stage but exits non-zero in production (it checks the
/// machine's SMBIOS UUID, which a stage never shares) rolls the promotion back: the receipt names
/// the exit code, production's guest file written earlier in the same ChangeSet is gone again, and
/// production's machines run with answering agents.
pub async fn failing_guest_command_rolls_back(kit: &Kit) {
    // The production's app UUID is only known once it exists, so this builds its own setup.
    let (pname, sname) = (unique("kit-gfail-prod"), unique("kit-gfail"));
    let prod = kit.production(&pname).await.expect("production of real guests");
    channel(kit, &prod);
    let uuid = prod.info().await.unwrap().machines.iter().find(|m| m.name == "app").expect("app").uuid.clone();
    assert!(!uuid.is_empty(), "the backend reports machine UUIDs");
    let stage = guest_stage(kit, &prod, &sname).await;
    let check = format!("! grep -qi {uuid} /sys/class/dmi/id/product_uuid || exit 3");
    let cs = ChangeSet {
        id: "cs-kit-guest-fails".into(),
        description: "a file, then a check that fails only in production".into(),
        changes: vec![
            Change::GuestFile {
                machine: "app".into(),
                path: "/root/promoted.txt".into(),
                content: b"x".to_vec(),
                mode: None,
            },
            Change::GuestCommand {
                machine: "app".into(),
                command: vec!["/bin/sh".into(), "-c".into(), check],
                timeout_secs: Some(30),
            },
        ],
    };
    inventory::apply_change_set(&*stage, &cs, &InventoryConfig::default())
        .await
        .expect("the check passes on the stage (other UUID)");
    let p = Promo { pname, sname, prod, stage, dir: tempfile::tempdir().expect("state dir") };
    let receipt = p.promote(kit).await;
    let Outcome::RolledBack { reason } = &receipt.outcome else { panic!("not rolled back: {receipt:#?}") };
    assert!(reason.contains("exited with 3"), "the reason names the exit code: {reason}");
    wait_all(&*p.prod).await.expect("production's agents answer after the rollback");
    let guest = channel(kit, &p.prod);
    assert_eq!(file(guest, "app", "/root/promoted.txt").await, None, "the rolled-back guest file is still there");
    let status = p.prod.status().await.unwrap();
    assert!(status.iter().all(|s| s.power == stagecore::PowerState::Running), "production not running: {status:?}");
    p.cleanup(kit).await;
}

/// Every guest function, one after another.
pub async fn run_all(kit: &Kit) {
    exec_read_write_round_trip(kit).await;
    guest_change_invisible_in_production(kit).await;
    snapshot_revert_restores_guest_file(kit).await;
    replay_promotion_reaches_production(kit).await;
    failing_guest_command_rolls_back(kit).await;
}
