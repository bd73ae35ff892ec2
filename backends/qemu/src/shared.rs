//! The process-wide state of open environments: one [`EnvShared`] per environment directory,
//! found through a registry of weak references, so every handle in a process shares one lock,
//! one record and one QMP session per machine.
//!
//! Contract: [`open_shared`] returns the live [`EnvShared`] of an environment or opens it (taking
//! its cross-process lock: `Error::Locked` when another process holds it). [`NewEnv`] creates a
//! fresh environment directory and removes it again unless [`NewEnv::commit`] is called.
//!
//! This is the crate's core module: [`QemuEnvironment`] (the handle type) lives here so that the
//! modules implementing its traits (`env`, `diskio`, `guest`, `snapshot`) depend on this module
//! and not on each other.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use stagecore::{Error, Result};

use crate::config::FaultHooks;
use crate::error;
use crate::lock::EnvLock;
use crate::process::Launcher;
use crate::qmp::QmpClient;
use crate::store::{EnvPaths, EnvRecord, QemuRecord};

/// Runs blocking file work (qcow2 layers) off the async runtime, as this backend.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    stagecore::toolbox::blocking(error::BACKEND, f).await
}

/// A handle on one environment run by the QEMU backend. All handles on one environment in a
/// process share its state, lock and QMP sessions.
#[derive(Debug, Clone)]
pub struct QemuEnvironment {
    pub(crate) shared: Arc<EnvShared>,
}

impl QemuEnvironment {
    pub(crate) fn new(shared: Arc<EnvShared>) -> Self {
        QemuEnvironment { shared }
    }

    pub(crate) fn span(&self, op: &'static str) -> tracing::Span {
        tracing::info_span!("qemu.env", env = %self.shared.name, op)
    }
}

/// What every environment of one backend shares.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) root: PathBuf,
    pub(crate) accel: crate::cmdline::Accel,
    pub(crate) launcher: Launcher,
    pub(crate) hooks: FaultHooks,
    pub(crate) agent_timeout: std::time::Duration,
    pub(crate) quiesce: bool,
}

/// The mutable part of an open environment.
#[derive(Debug)]
pub(crate) struct EnvState {
    /// `None` once the environment is destroyed.
    pub(crate) rec: Option<EnvRecord>,
    /// The QMP session of each running machine (QEMU serves one at a time).
    pub(crate) qmp: HashMap<String, QmpClient>,
    /// The guest agent client of each running machine (its socket serves one client at a
    /// time too); dropped when the machine stops or restarts.
    pub(crate) agents: HashMap<String, stagecore_qga::Agent>,
    /// Running machines whose agent did not answer a freeze probe: not probed again until
    /// they restart (or `wait_ready` reaches their agent).
    pub(crate) agentless: HashSet<String>,
    /// Whether freeze/pause markers a dead process left were settled since this state was
    /// loaded.
    pub(crate) recovered: bool,
}

/// One open environment, shared by all its handles in this process.
#[derive(Debug)]
pub(crate) struct EnvShared {
    pub(crate) name: String,
    pub(crate) paths: EnvPaths,
    pub(crate) ctx: Arc<Ctx>,
    pub(crate) state: tokio::sync::Mutex<EnvState>,
    destroyed: AtomicBool,
    _lock: EnvLock,
}

impl EnvShared {
    pub(crate) fn mark_destroyed(&self) {
        self.destroyed.store(true, Ordering::SeqCst);
        registry().lock().unwrap_or_else(|p| p.into_inner()).remove(&self.paths.dir);
    }
}

impl EnvState {
    pub(crate) fn rec(&self, env: &str) -> Result<&EnvRecord> {
        self.rec.as_ref().ok_or_else(|| Error::not_found("environment", env))
    }

    pub(crate) fn rec_mut(&mut self, env: &str) -> Result<&mut EnvRecord> {
        self.rec.as_mut().ok_or_else(|| Error::not_found("environment", env))
    }

    /// Forgets the QMP session and agent of `machine` (it stopped, restarts or went away).
    pub(crate) fn forget(&mut self, machine: &str) {
        self.qmp.remove(machine);
        self.forget_agent(machine);
    }

    /// Forgets the agent client of `machine` and whether it had one.
    pub(crate) fn forget_agent(&mut self, machine: &str) {
        self.agents.remove(machine);
        self.agentless.remove(machine);
    }
}

type Registry = Mutex<HashMap<PathBuf, Weak<EnvShared>>>;

fn registry() -> &'static Registry {
    static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::default);
    &REGISTRY
}

fn make(ctx: &Arc<Ctx>, paths: EnvPaths, name: &str, lock: EnvLock, rec: EnvRecord) -> Arc<EnvShared> {
    Arc::new(EnvShared {
        name: name.to_string(),
        paths,
        ctx: ctx.clone(),
        state: tokio::sync::Mutex::new(EnvState {
            rec: Some(rec),
            qmp: HashMap::new(),
            agents: HashMap::new(),
            agentless: HashSet::new(),
            recovered: false,
        }),
        destroyed: AtomicBool::new(false),
        _lock: lock,
    })
}

/// The live shared state of environment `name`, opening it (and taking its lock) if needed.
pub(crate) fn open_shared(ctx: &Arc<Ctx>, name: &str) -> Result<Arc<EnvShared>> {
    let paths = EnvPaths::new(&ctx.root, name);
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(live) = reg.get(&paths.dir).and_then(Weak::upgrade)
        && !live.destroyed.load(Ordering::SeqCst)
    {
        return Ok(live);
    }
    EnvRecord::load(&paths, name)?;
    let lock = EnvLock::acquire(&paths.lock(), name)?;
    let rec = EnvRecord::load(&paths, name)?;
    let shared = make(ctx, paths.clone(), name, lock, rec);
    reg.insert(paths.dir, Arc::downgrade(&shared));
    Ok(shared)
}

/// A new environment directory being built; removed on drop unless committed.
#[derive(Debug)]
pub(crate) struct NewEnv {
    pub(crate) paths: EnvPaths,
    pub(crate) owned: Vec<PathBuf>,
    lock: Option<EnvLock>,
    committed: bool,
}

impl NewEnv {
    /// Creates `root/envs/<name>` (with `disks/`), failing with `AlreadyExists` if it exists.
    pub(crate) fn begin(root: &Path, name: &str) -> Result<NewEnv> {
        let paths = EnvPaths::new(root, name);
        let envs = paths.dir.parent().expect("envs dir");
        std::fs::create_dir_all(envs).map_err(|e| error::io("creating", envs, &e))?;
        match std::fs::create_dir(&paths.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                remove_leftover(&paths, name)?;
                std::fs::create_dir(&paths.dir).map_err(|e| error::io("creating", &paths.dir, &e))?;
            }
            Err(e) => return Err(error::io("creating", &paths.dir, &e)),
        }
        // Until the lock is ours, the directory may be another creator's: never remove it then.
        let lock = EnvLock::acquire(&paths.lock(), name).map_err(|e| match e {
            Error::Locked { .. } => Error::already_exists("environment", name),
            other => other,
        })?;
        let new = NewEnv { paths, owned: Vec::new(), lock: Some(lock), committed: false };
        std::fs::create_dir(new.paths.disks()).map_err(|e| error::io("creating", &new.paths.disks(), &e))?;
        Ok(new)
    }

    /// Writes the record and turns the directory into a registered, open environment.
    pub(crate) fn commit(mut self, ctx: &Arc<Ctx>, rec: EnvRecord) -> Result<Arc<EnvShared>> {
        rec.save(&self.paths)?;
        self.committed = true;
        let lock = self.lock.take().expect("lock taken in begin");
        let shared = make(ctx, self.paths.clone(), &rec.name.clone(), lock, rec);
        registry().lock().unwrap_or_else(|p| p.into_inner()).insert(self.paths.dir.clone(), Arc::downgrade(&shared));
        Ok(shared)
    }
}

impl NewEnv {
    /// Leaves the directory as a process that died now would (files, no record) and releases
    /// the lock: for crash-injection tests.
    pub(crate) fn abandon(mut self) {
        self.committed = true;
        self.lock.take();
    }
}

/// An environment directory without a record is what a process that crashed while creating it
/// left behind: removed when nobody holds its lock. With a record, or while another creator holds
/// the lock, the name is taken (`AlreadyExists`).
fn remove_leftover(paths: &EnvPaths, name: &str) -> Result<()> {
    if paths.record().exists() {
        return Err(Error::already_exists("environment", name));
    }
    let lock = match EnvLock::acquire(&paths.lock(), name) {
        Ok(lock) => lock,
        Err(Error::Locked { .. }) => return Err(Error::already_exists("environment", name)),
        Err(e) => return Err(e),
    };
    if paths.record().exists() {
        return Err(Error::already_exists("environment", name));
    }
    tracing::warn!(env = name, dir = %paths.dir.display(), "removing a half-built environment left by a crash");
    std::fs::remove_dir_all(&paths.dir).map_err(|e| error::io("removing", &paths.dir, &e))?;
    drop(lock);
    Ok(())
}

impl Drop for NewEnv {
    fn drop(&mut self) {
        if !self.committed && self.lock.is_some() {
            for f in &self.owned {
                let _ = std::fs::remove_file(f);
            }
            let _ = std::fs::remove_dir_all(&self.paths.dir);
        }
    }
}

/// The agent client of `machine`, made on first use (named `env/machine` in errors). The caller
/// knows the machine runs.
pub(crate) fn running_agent(shared: &EnvShared, st: &mut EnvState, machine: &str) -> stagecore_qga::Agent {
    st.agents
        .entry(machine.to_string())
        .or_insert_with(|| {
            let label = format!("{}/{machine}", shared.name);
            let transport = stagecore_qga::SocketTransport::new(shared.paths.agent_socket(machine), label.clone());
            stagecore_qga::Agent::new(Arc::new(transport), label)
        })
        .clone()
}
