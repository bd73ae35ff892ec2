//! The [`Environment`] trait: one production or stage, as a backend runs it, plus the optional
//! abilities reached from it ([`Snapshot`], [`DiskIo`], [`GuestChannel`]).

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;

use crate::{
    Baseline, Change, ChangeSet, DiskChanges, EnvironmentInfo, EnvironmentSpec, MachineStatus, Result, SnapshotInfo,
};

/// One environment (production or stage) as a backend runs it.
///
/// # Contract
/// - Machines, disks and NICs are addressed by *logical* names (the spec's), never by the
///   hypervisor-level instance names.
/// - Operations on a stage never write production's disks or definitions (invariant 1).
/// - Operations that fail leave the environment as it was, or say in the error what is left.
/// - Operations the backend cannot do return [`crate::Error::NotSupported`] (see
///   [`crate::Capabilities`]).
#[async_trait]
pub trait Environment: Snapshot + Send + Sync + Debug {
    /// The environment's name.
    fn name(&self) -> &str;

    /// Role (production/stage with its baseline and recorded ChangeSets) and machine identities.
    async fn info(&self) -> Result<EnvironmentInfo>;

    /// The spec as the hypervisor sees it now.
    async fn spec(&self) -> Result<EnvironmentSpec>;

    /// Power state of every machine.
    async fn status(&self) -> Result<Vec<MachineStatus>>;

    /// Starts every machine that is not running.
    async fn start(&self) -> Result<()>;

    /// Stops every machine that is running (hard stop; guests are not asked).
    async fn stop(&self) -> Result<()>;

    /// Starts the named machines that are not running, in start order, waiting for the agents
    /// of machines they start after as [`start`](Environment::start) does; machines not named are
    /// left as they are. A name the spec does not have is `NotFound` and nothing is started
    /// ([`crate::toolbox::require_machines`]).
    async fn start_machines(&self, machines: &[String]) -> Result<()>;

    /// Stops the named machines that are running (hard stop); the others are left as they are.
    /// A name the spec does not have is `NotFound` and nothing is stopped.
    async fn stop_machines(&self, machines: &[String]) -> Result<()>;

    /// Freezes the current state as a [`Baseline`]: a read-only layer per disk plus the spec.
    /// On a running environment this adds a copy-on-write layer under the running disks, which the
    /// guests do not notice.
    async fn take_baseline(&self) -> Result<Baseline>;

    /// For every disk: the extents changed since `baseline` (of this environment, or the one this
    /// stage was cloned from). Requires [`crate::Capabilities::disk_drift`]; disks the backend
    /// cannot check are reported as `NotChecked` with the reason, never as unchanged.
    /// `Err(Precondition)` when a layer the baseline stands on changed since it was sealed
    /// (QEMU, libvirt): the drift engine then fails the whole report.
    async fn disk_changes(&self, baseline: &Baseline) -> Result<Vec<DiskChanges>>;

    /// Applies one change. Each kind needs its flag in [`crate::Capabilities::changes`]; guest
    /// changes also need [`crate::Capabilities::guest_channel`].
    async fn apply(&self, change: &Change) -> Result<()>;

    /// Records a ChangeSet as applied to this stage (kept with the stage; see
    /// [`crate::StageInfo::change_sets`]).
    async fn record_change_set(&self, change_set: &ChangeSet) -> Result<()>;

    /// Raw disk access, if the backend offers it ([`crate::Capabilities::disk_io`]).
    fn disk_io(&self) -> Option<&dyn DiskIo>;

    /// The guest channel, if the backend offers one ([`crate::Capabilities::guest_channel`]).
    fn guest(&self) -> Option<&dyn GuestChannel>;
}

/// Whole-environment snapshots.
///
/// # Contract
/// A snapshot captures every disk of every machine plus the spec; with
/// [`crate::Capabilities::atomic_snapshot`] all disks are captured at one instant. Reverting gives
/// back the same disks and spec (invariant 3); later snapshots stay listed and valid.
#[async_trait]
pub trait Snapshot: Send + Sync + Debug {
    /// Takes a snapshot called `name` (unique in the environment).
    async fn create_snapshot(&self, name: &str) -> Result<SnapshotInfo>;
    /// Lists snapshots, oldest first.
    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>>;
    /// Reverts disks and spec to the snapshot; machines that were running run again afterwards.
    async fn revert_snapshot(&self, name: &str) -> Result<()>;
    /// Deletes the snapshot, keeping every other snapshot and the current state valid.
    async fn delete_snapshot(&self, name: &str) -> Result<()>;
}

/// Raw access to what a guest reads from its disks. Used by tests to write changes and to
/// fingerprint production, and by `WriteDisk` changes.
#[async_trait]
pub trait DiskIo: Send + Sync + Debug {
    /// Reads `length` bytes at `offset` of `machine`/`disk`, as the guest sees them.
    async fn read(&self, machine: &str, disk: &str, offset: u64, length: u64) -> Result<Vec<u8>>;
    /// Writes `data` at `offset` of `machine`/`disk`, as the guest would.
    async fn write(&self, machine: &str, disk: &str, offset: u64, data: &[u8]) -> Result<()>;
    /// SHA-256 of the whole guest-visible content of `machine`/`disk`.
    async fn digest(&self, machine: &str, disk: &str) -> Result<[u8; 32]>;
}

/// The output of a guest command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestOutput {
    /// Exit code (a command killed by a signal reports `128 + signal`, as a shell does).
    pub exit_code: i32,
    /// Standard output (at most the channel's output cap; see [`GuestOutput::truncated`]).
    pub stdout: Vec<u8>,
    /// Standard error (at most the channel's output cap).
    pub stderr: Vec<u8>,
    /// Whether stdout or stderr was cut at the channel's output cap.
    pub truncated: bool,
}

impl GuestOutput {
    /// Whether the command exited with code 0.
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }

    /// Standard output as text (lossy UTF-8).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Standard error as text (lossy UTF-8).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// A command to run in a guest: argv, optional standard input and environment, and a timeout.
///
/// ```
/// use std::time::Duration;
/// let req = stagecore::GuestExec::new(["/bin/sh", "-c", "cat"]).stdin(b"hi".to_vec()).timeout(Duration::from_secs(5));
/// assert_eq!(req.argv[0], "/bin/sh");
/// let debug = format!("{:?}", req.env("TOKEN", "s3cret"));
/// assert!(debug.contains("TOKEN") && !debug.contains("s3cret") && !debug.contains("hi"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct GuestExec {
    /// The program (absolute path or found on the guest's `PATH`) and its arguments.
    pub argv: Vec<String>,
    /// Bytes fed to the command's standard input.
    pub stdin: Option<Vec<u8>>,
    /// Environment variables as `KEY=VALUE`; when empty the agent's default environment is used.
    pub env: Vec<String>,
    /// How long the command may run before the call fails with [`crate::Error::Timeout`].
    pub timeout: Duration,
}

impl GuestExec {
    /// The default timeout of a guest command.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

    /// A command with no stdin, the default environment and [`GuestExec::DEFAULT_TIMEOUT`].
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        GuestExec {
            argv: argv.into_iter().map(Into::into).collect(),
            stdin: None,
            env: Vec::new(),
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    /// Sets standard input.
    pub fn stdin(mut self, data: Vec<u8>) -> Self {
        self.stdin = Some(data);
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push(format!("{key}={value}"));
        self
    }

    /// Sets the timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The argv as one line for logs and errors (never contains stdin or environment values).
    pub fn display(&self) -> String {
        self.argv.join(" ")
    }
}

/// `Debug` shows the argv, the stdin size and the environment *names* only: stdin and values may
/// carry secrets.
impl std::fmt::Debug for GuestExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.env.iter().map(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k)).collect();
        f.debug_struct("GuestExec")
            .field("argv", &self.argv)
            .field("stdin_bytes", &self.stdin.as_ref().map(Vec::len))
            .field("env", &names)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Commands and files inside a guest (qemu-guest-agent on QEMU and libvirt, VMware Tools guest
/// operations on vSphere).
///
/// # Contract
/// - Machines are logical names; a stage's channel reaches the stage's guest, never production's.
/// - A machine whose agent does not answer gives a typed error naming the machine and what was
///   tried ([`crate::Error::Unreachable`] or [`crate::Error::Timeout`]), never a hang.
/// - `exec` returns the exit code even when it is not 0: callers decide. Changes that run
///   commands ([`crate::Change::GuestCommand`]) fail with [`crate::Error::GuestCommand`] then.
#[async_trait]
pub trait GuestChannel: Send + Sync + Debug {
    /// Runs a command in `machine` and waits (up to its timeout) for it to exit.
    async fn exec(&self, machine: &str, request: &GuestExec) -> Result<GuestOutput>;
    /// Writes a whole file in `machine`; `mode` sets its permission bits (e.g. `0o644`), `None`
    /// keeps an existing file's mode (new files get the agent's default).
    async fn write_file(&self, machine: &str, path: &str, content: &[u8], mode: Option<u32>) -> Result<()>;
    /// Reads a whole file in `machine`.
    async fn read_file(&self, machine: &str, path: &str) -> Result<Vec<u8>>;
    /// Waits until the agent of `machine` answers, at most `timeout`.
    async fn wait_ready(&self, machine: &str, timeout: Duration) -> Result<()>;
}
