//! Spawning and stopping `qemu-system-x86_64`, detached from the embedding program.
//!
//! Contract:
//! - [`Launcher::launch`] refuses to start over a live QEMU of ours, clears stale state, starts
//!   QEMU in its own session (`setsid`; stdin null; stdout/stderr appended to the machine's log;
//!   `-pidfile`, no `-daemonize`), and returns once QMP is negotiated, bounded by `ready_timeout`.
//!   A QEMU that exits during startup gives an error quoting its log; one that is not ready in
//!   time is killed. A missing binary gives `NotFound` naming the binary, a missing disk image
//!   `NotFound` naming the image. Nothing is left running or half-written on failure.
//! - The VM survives the embedding program: a reaper thread only collects its exit status.
//! - [`QemuProcess::kill`] / [`QemuProcess::shutdown`] are bounded and only ever signal the process
//!   identified as ours (pid plus its /proc start time), never a reused pid.

mod state;

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stagecore::{Error, Result};
use tracing::Instrument;

use crate::cmdline::MachineConfig;
use crate::error;
use crate::qmp::QmpClient;
pub use state::{ProcScan, ProcessState, inspect};
use state::{remove_state_files, start_time};

/// The files QEMU keeps for one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuPaths {
    /// The QMP unix socket.
    pub qmp_socket: PathBuf,
    /// The pid file.
    pub pidfile: PathBuf,
    /// The stdout/stderr log.
    pub log: PathBuf,
}

impl QemuPaths {
    /// The paths named in `config`.
    pub fn of(config: &MachineConfig) -> Self {
        QemuPaths { qmp_socket: config.qmp_socket.clone(), pidfile: config.pidfile.clone(), log: config.log.clone() }
    }
}

/// How to start QEMU.
#[derive(Debug, Clone)]
pub struct Launcher {
    /// The emulator binary (a name looked up on PATH, or a path).
    pub binary: PathBuf,
    /// Bound on spawn to QMP negotiated.
    pub ready_timeout: Duration,
    /// Default bound of each QMP call on the returned client.
    pub call_timeout: Duration,
}

impl Default for Launcher {
    fn default() -> Self {
        Launcher {
            binary: PathBuf::from("qemu-system-x86_64"),
            ready_timeout: Duration::from_secs(10),
            call_timeout: crate::qmp::DEFAULT_CALL_TIMEOUT,
        }
    }
}

/// A started machine: its process and its negotiated QMP session.
#[derive(Debug)]
pub struct Launched {
    /// The QEMU process.
    pub process: QemuProcess,
    /// The QMP session (QEMU serves one at a time: share this one).
    pub qmp: QmpClient,
}

type ExitSlot = Arc<Mutex<Option<std::io::Result<ExitStatus>>>>;

impl Launcher {
    /// Starts the machine described by `config` and waits until QMP is ready.
    pub async fn launch(&self, config: &MachineConfig) -> Result<Launched> {
        let argv = config.argv()?;
        for (i, disk) in config.disks.iter().enumerate() {
            if !disk.path.is_file() {
                tracing::debug!(disk = i, "disk image missing");
                return Err(Error::not_found("disk image", disk.path.display().to_string()));
            }
        }
        if let Some(boot) = &config.boot {
            for (what, file) in [("kernel", Some(&boot.kernel)), ("initrd", boot.initrd.as_ref())] {
                if let Some(file) = file.filter(|f| !f.is_file()) {
                    return Err(Error::not_found(what, file.display().to_string()));
                }
            }
        }
        self.launch_argv(&QemuPaths::of(config), &argv).await
    }

    /// Starts QEMU with a ready-made `argv` (which must use `paths`' socket and pid file).
    pub async fn launch_argv(&self, paths: &QemuPaths, argv: &[OsString]) -> Result<Launched> {
        let span = tracing::info_span!("qemu.launch", socket = %paths.qmp_socket.display());
        async {
            match inspect(paths).await? {
                ProcessState::Running { pid } | ProcessState::Unresponsive { pid, .. } => {
                    return Err(Error::already_exists(
                        "qemu process",
                        format!("pid {pid} for {}", paths.qmp_socket.display()),
                    ));
                }
                _ => remove_state_files(paths)?,
            }
            let started = Instant::now();
            let (process, log_offset) = self.spawn(paths, argv)?;
            match self.wait_ready(&process, log_offset).await {
                Ok(qmp) => {
                    tracing::info!(pid = process.pid, ms = started.elapsed().as_millis() as u64, "qemu ready");
                    Ok(Launched { process, qmp })
                }
                Err(e) => {
                    let _ = process.kill(Duration::from_secs(5)).await;
                    let _ = remove_state_files(paths);
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await
    }

    fn spawn(&self, paths: &QemuPaths, argv: &[OsString]) -> Result<(QemuProcess, u64)> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.log)
            .map_err(|e| error::io("opening log", &paths.log, &e))?;
        let log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let stderr = log.try_clone().map_err(|e| error::io("opening log", &paths.log, &e))?;
        let mut cmd = std::process::Command::new(&self.binary);
        cmd.args(argv).stdin(Stdio::null()).stdout(log).stderr(stderr);
        // SAFETY: setsid(2) is async-signal-safe and touches no memory of the parent; it only
        // makes the child a session leader so terminal and process-group signals of the
        // embedding program never reach QEMU.
        unsafe {
            cmd.pre_exec(|| if libc::setsid() < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
        }
        let mut child = cmd.spawn().map_err(|e| error::binary(&self.binary, &e))?;
        let pid = child.id();
        let exit: ExitSlot = Arc::default();
        let slot = exit.clone();
        let reaper = std::thread::Builder::new().name(format!("qemu-reaper-{pid}")).spawn(move || {
            let status = child.wait();
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
        });
        let process = QemuProcess { pid, start: start_time(pid), paths: paths.clone(), exit: Some(exit) };
        if let Err(e) = reaper {
            kill_pid(pid, libc::SIGKILL);
            return Err(error::msg(format!("cannot start reaper thread for qemu pid {pid}: {e}")));
        }
        tracing::debug!(pid, "qemu spawned");
        Ok((process, log_offset))
    }

    async fn wait_ready(&self, process: &QemuProcess, log_offset: u64) -> Result<QmpClient> {
        let deadline = Instant::now() + self.ready_timeout;
        let socket = &process.paths.qmp_socket;
        loop {
            if let Some(status) = process.exit_status() {
                let tail = log_tail(&process.paths.log, log_offset);
                return Err(error::msg(format!(
                    "{} exited during startup ({status}); {}: {tail}",
                    self.binary.display(),
                    process.paths.log.display()
                )));
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(error::timeout(
                    format!("qemu startup (QMP ready on {})", socket.display()),
                    self.ready_timeout,
                ));
            }
            if socket.exists() {
                match QmpClient::connect_with(socket, remaining, self.call_timeout).await {
                    Ok(qmp) => return Ok(qmp),
                    Err(Error::Unreachable { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Removes a dead machine's pid file and socket (missing files are fine).
pub(crate) fn remove_state_files_of(paths: &QemuPaths) -> Result<()> {
    remove_state_files(paths)
}

/// The text QEMU logged since `offset` (its last 2000 bytes), for startup errors.
fn log_tail(log: &Path, offset: u64) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let start = (offset as usize).min(text.len()).max(text.len().saturating_sub(2000));
    let tail = String::from_utf8_lossy(&text[start..]).trim().to_string();
    if tail.is_empty() { "(log empty)".to_string() } else { tail }
}

fn kill_pid(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// A QEMU process of ours (spawned here, or found running by [`QemuProcess::attach`]).
#[derive(Debug)]
pub struct QemuProcess {
    pid: u32,
    /// The process start time when it was identified as ours (pid + start time = one process).
    start: Option<u64>,
    paths: QemuPaths,
    exit: Option<ExitSlot>,
}

impl QemuProcess {
    /// Attaches to the machine's running QEMU; fails with `Precondition` naming the state found
    /// when it is not [`ProcessState::Running`].
    pub async fn attach(paths: &QemuPaths) -> Result<QemuProcess> {
        match inspect(paths).await? {
            ProcessState::Running { pid } => {
                Ok(QemuProcess { pid, start: start_time(pid), paths: paths.clone(), exit: None })
            }
            other => Err(Error::Precondition(format!("no running qemu for {}: {other:?}", paths.qmp_socket.display()))),
        }
    }

    /// The machine's QEMU if it is alive and ours (running, or unresponsive on QMP), so it can
    /// be stopped or killed; `None` when nothing of ours runs.
    pub async fn find(paths: &QemuPaths) -> Result<Option<QemuProcess>> {
        match inspect(paths).await? {
            ProcessState::Running { pid } | ProcessState::Unresponsive { pid, .. } => {
                Ok(Some(QemuProcess { pid, start: start_time(pid), paths: paths.clone(), exit: None }))
            }
            _ => Ok(None),
        }
    }

    /// Every live QEMU of ours for the machine of `paths` found in /proc by its command line
    /// (it names the machine's QMP socket), whether or not a pid file names it — e.g. one that a
    /// killed process was starting and that has not written its pid file yet.
    pub fn by_cmdline(paths: &QemuPaths) -> Vec<QemuProcess> {
        Self::by_cmdline_in(paths, &ProcScan::new())
    }

    /// [`QemuProcess::by_cmdline`] from the processes of `scan`.
    pub fn by_cmdline_in(paths: &QemuPaths, scan: &ProcScan) -> Vec<QemuProcess> {
        scan.pids_naming(&paths.qmp_socket)
            .into_iter()
            .filter_map(|pid| {
                let start = start_time(pid)?;
                Some(QemuProcess { pid, start: Some(start), paths: paths.clone(), exit: None })
            })
            .collect()
    }

    /// The process's command line (argv, the binary first), `None` once it is gone.
    pub fn cmdline(&self) -> Option<Vec<OsString>> {
        let raw = std::fs::read(format!("/proc/{}/cmdline", self.pid)).ok()?;
        if raw.is_empty() || !self.is_alive() {
            return None;
        }
        use std::os::unix::ffi::OsStrExt;
        Some(
            raw.split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| std::ffi::OsStr::from_bytes(a).to_os_string())
                .collect(),
        )
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The machine's files.
    pub fn paths(&self) -> &QemuPaths {
        &self.paths
    }

    /// Whether the process is still alive (not a zombie, not exited, pid not reused).
    pub fn is_alive(&self) -> bool {
        self.start.is_some() && start_time(self.pid) == self.start
    }

    /// The exit status, when this process was spawned here and has exited.
    fn exit_status(&self) -> Option<String> {
        let slot = self.exit.as_ref()?;
        let guard = slot.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().map(|r| match r {
            Ok(status) => status.to_string(),
            Err(e) => format!("wait failed: {e}"),
        })
    }

    /// Opens a new QMP session (only when no other session is open: QEMU serves one at a time).
    pub async fn connect(&self, timeout: Duration) -> Result<QmpClient> {
        QmpClient::connect(&self.paths.qmp_socket, timeout).await
    }

    /// Waits until the process is gone, bounded by `limit`.
    pub async fn wait_exit(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while self.is_alive() {
            if Instant::now() >= deadline {
                return Err(error::timeout(format!("waiting for qemu pid {} to exit", self.pid), limit));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    fn signal(&self, signal: libc::c_int) {
        if self.is_alive() {
            kill_pid(self.pid, signal);
        }
    }

    /// Sends SIGKILL if the process is still our QEMU, without waiting (for drop guards).
    pub fn start_kill(&self) {
        self.signal(libc::SIGKILL);
    }

    /// SIGKILLs QEMU (if still ours), waits up to `limit`, then removes its socket and pid file.
    pub async fn kill(&self, limit: Duration) -> Result<()> {
        tracing::info!(pid = self.pid, "killing qemu");
        self.signal(libc::SIGKILL);
        self.wait_exit(limit).await?;
        remove_state_files(&self.paths)
    }

    /// Orderly stop: QMP `quit`, then SIGTERM, then SIGKILL, waiting up to `grace` after each.
    pub async fn shutdown(&self, qmp: &QmpClient, grace: Duration) -> Result<()> {
        let span = tracing::info_span!("qemu.shutdown", pid = self.pid);
        async {
            if let Err(e) = qmp.quit().await {
                tracing::warn!(%e, "QMP quit failed");
            }
            if self.wait_exit(grace).await.is_ok() {
                return remove_state_files(&self.paths);
            }
            tracing::warn!("qemu ignored quit; sending SIGTERM");
            self.signal(libc::SIGTERM);
            if self.wait_exit(grace).await.is_ok() {
                return remove_state_files(&self.paths);
            }
            self.kill(grace).await
        }
        .instrument(span)
        .await
    }
}
