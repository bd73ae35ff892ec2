//! [`QemuBackend`]: the [`Backend`] entry point — create productions, stage them, open, list and
//! destroy environments under one state root.
//!
//! Contract: names are validated before anything is touched; a failed `create` or `stage`
//! removes everything it made (the environment directory and any image it created). `destroy`
//! refuses (`Precondition`) while a linked stage depends on the environment's layers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stagecore::checked::{check_stage, hand_out};
use stagecore::toolbox::{check_destroy, disk_key, fill_identities};
use stagecore::{
    Backend, Baseline, Capabilities, Environment, EnvironmentInfo, EnvironmentSpec, Error, Result, Role, Selector,
    StageOptions,
};
use tracing::Instrument;

use crate::config::QemuConfig;
use crate::env::stop_all;
use crate::error::{self, BACKEND};
use crate::process::Launcher;
use crate::shared::{Ctx, EnvShared, NewEnv, QemuEnvironment, blocking, open_shared};
use crate::store::{EnvPaths, EnvRecord, QemuExtra, QemuRecord};

/// The daemonless QEMU backend. Cheap to clone; clones share their configuration.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    ctx: Arc<Ctx>,
}

impl QemuBackend {
    /// A backend keeping its state under `config.root` (created when first needed).
    pub fn new(config: QemuConfig) -> Self {
        let root = if config.root.is_absolute() {
            config.root
        } else {
            std::env::current_dir().map(|d| d.join(&config.root)).unwrap_or(config.root)
        };
        let launcher = Launcher {
            binary: config.binary.unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
            ready_timeout: Duration::from_secs(30),
            ..Launcher::default()
        };
        let ctx = Ctx {
            root,
            accel: config.accel,
            launcher,
            hooks: config.hooks,
            agent_timeout: config.agent_timeout,
            quiesce: config.quiesce,
        };
        QemuBackend { ctx: Arc::new(ctx) }
    }

    /// The state root.
    pub fn root(&self) -> &Path {
        &self.ctx.root
    }

    /// Opens an environment as its concrete type (for the QEMU-specific inspection methods).
    pub async fn open_qemu(&self, name: &str) -> Result<QemuEnvironment> {
        stagecore::name::validate("environment", name)?;
        self.settle_swap(name).await?;
        let env = QemuEnvironment::new(open_shared(&self.ctx, name)?);
        env.recover().await;
        Ok(env)
    }

    /// Finishes or undoes a swap a crash interrupted that involves `name` (see `crate::swap`).
    async fn settle_swap(&self, name: &str) -> Result<()> {
        let production = match EnvRecord::load(&EnvPaths::new(&self.ctx.root, name), name) {
            Ok(rec) => match rec.role {
                Role::Production => name.to_string(),
                Role::Stage(s) => s.source,
            },
            Err(_) => return Ok(()),
        };
        crate::swap::settle(&self.ctx, &production).await
    }

    /// Hands out `env` through the capability check layer.
    fn hand_out(&self, env: QemuEnvironment) -> Result<Arc<dyn Environment>> {
        hand_out(Arc::new(env), self.capabilities(), BACKEND)
    }

    /// Records of every environment under the root (unreadable ones are skipped with a warning).
    fn records(&self) -> Result<Vec<EnvRecord>> {
        let envs = self.ctx.root.join("envs");
        let entries = match std::fs::read_dir(&envs) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(error::io("listing", &envs, &e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
            match EnvRecord::load(&EnvPaths::new(&self.ctx.root, &name), &name) {
                Ok(rec) => out.push(rec),
                Err(Error::NotFound { .. }) => {}
                Err(e) => tracing::warn!(env = %name, %e, "skipping unreadable environment"),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn create_inner(&self, spec: &EnvironmentSpec) -> Result<Arc<dyn Environment>> {
        spec.validate()?;
        let mut files = Vec::new();
        for (i, m) in spec.machines.iter().enumerate() {
            for (j, d) in m.disks.iter().enumerate() {
                let field = format!("machines[{i}].disks[{j}]");
                if d.format != stagecore::DiskFormat::Qcow2 {
                    return Err(Error::invalid(format!("{field}.format"), "the qemu backend runs qcow2 disks only"));
                }
                let file = crate::images::resolve(&self.ctx.root, &format!("{field}.source"), &d.source)?;
                if files.iter().any(|(_, _, f, _)| *f == file) {
                    return Err(Error::invalid(format!("{field}.source"), "two disks share one image file"));
                }
                if file.exists() {
                    crate::images::check_existing(&format!("{field}.source"), &file).await?;
                } else if d.size_bytes.is_none() {
                    return Err(Error::invalid(format!("{field}.size_bytes"), "a new disk needs a size"));
                }
                files.push((m.name.clone(), d.name.clone(), file, d.size_bytes));
            }
        }
        let mut new = NewEnv::begin(&self.ctx.root, &spec.name)?;
        let mut disks = std::collections::BTreeMap::new();
        for (m, d, file, size) in files {
            if !file.exists() {
                crate::images::create_empty(&file, size.unwrap_or(0)).await?;
                new.owned.push(file.clone());
            }
            disks.insert(disk_key(&m, &d), file);
        }
        let mut spec = spec.clone();
        fill_identities(&mut spec);
        let extra = QemuExtra { next_layer: 1, owned_files: new.owned.clone(), ..QemuExtra::default() };
        let rec = EnvRecord::production(spec, disks, extra);
        self.hand_out(QemuEnvironment::new(new.commit(&self.ctx, rec)?))
    }

    /// Stops the machines of `shared`, removes its directory and owned files, and forgets it.
    async fn remove(shared: &EnvShared) -> Result<()> {
        let mut st = shared.state.lock().await;
        stop_all(shared, &mut st).await?;
        let rec = st.rec.take();
        shared.mark_destroyed();
        for f in rec.iter().flat_map(|r| r.backend.owned_files.iter()) {
            let _ = std::fs::remove_file(f);
        }
        match std::fs::remove_dir_all(&shared.paths.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(error::io("removing", &shared.paths.dir, &e)),
        }
    }
}

#[async_trait]
impl Backend for QemuBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.create = true;
        c.linked_clone = true;
        c.full_clone = true;
        c.fencing = true;
        c.live_snapshot = true;
        c.atomic_snapshot = true;
        c.disk_drift = true;
        c.disk_io = true;
        c.changes = stagecore::ChangeKinds::all();
        c.persistent = true;
        c.swap = true;
        c.guest_channel = true;
        c
    }

    async fn create(&self, spec: &EnvironmentSpec) -> Result<Arc<dyn Environment>> {
        let span = tracing::info_span!("qemu.create", env = %spec.name);
        self.create_inner(spec).instrument(span).await
    }

    async fn attach(&self, selector: &Selector) -> Result<Arc<dyn Environment>> {
        match selector {
            Selector::Environment { name } => self.open(name).await,
            _ => Err(Error::not_supported("attach by machines, label or folder", BACKEND)),
        }
    }

    async fn stage(&self, baseline: &Baseline, options: &StageOptions) -> Result<Arc<dyn Environment>> {
        check_stage(&self.capabilities(), options, BACKEND)?;
        options.validate()?;
        let span = tracing::info_span!("qemu.stage", env = %options.name, source = %baseline.environment);
        async {
            let shared = crate::stage::stage(&self.ctx, baseline, options).await?;
            if options.start {
                let started = {
                    let mut st = shared.state.lock().await;
                    crate::env::start_all(&shared, &mut st).await
                };
                if let Err(e) = started {
                    let _ = Self::remove(&shared).await;
                    return Err(e);
                }
            }
            self.hand_out(QemuEnvironment::new(shared))
        }
        .instrument(span)
        .await
    }

    async fn open(&self, name: &str) -> Result<Arc<dyn Environment>> {
        stagecore::name::validate("environment", name)?;
        self.hand_out(self.open_qemu(name).await?)
    }

    async fn list(&self) -> Result<Vec<EnvironmentInfo>> {
        Ok(self.records()?.iter().map(|r| r.info(BACKEND)).collect())
    }

    async fn destroy(&self, name: &str) -> Result<()> {
        stagecore::name::validate("environment", name)?;
        let span = tracing::info_span!("qemu.destroy", env = %name);
        async {
            let shared = open_shared(&self.ctx, name)?;
            let records = self.records()?;
            check_destroy(name, records.iter().map(|r| (r.name.as_str(), &r.role)))?;
            let mut files = crate::gc::layer_files(&shared.paths.disks())?;
            files.extend(shared.state.lock().await.rec(name)?.backend.owned_files.iter().cloned());
            let (root, env) = (self.ctx.root.clone(), name.to_string());
            if let Some((other, file)) = blocking(move || crate::gc::dependent(&root, &env, &files)).await? {
                return Err(Error::Precondition(format!(
                    "environment {other} runs on layer {} of {name}; destroy it first",
                    file.display()
                )));
            }
            Self::remove(&shared).await
        }
        .instrument(span)
        .await
    }

    async fn swap(&self, production: &str, stage: &str) -> Result<()> {
        let span = tracing::info_span!("qemu.swap", production, stage);
        crate::swap::swap(&self.ctx, production, stage).instrument(span).await
    }
}
