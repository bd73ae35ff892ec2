//! [`QemuConfig`]: where the backend keeps its state, how it accelerates guests, which QEMU it
//! runs, and fault hooks for tests.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use crate::cmdline::Accel;

/// A callback the backend runs at a named point of an operation (fault injection for tests).
pub type Hook = Arc<dyn Fn() + Send + Sync>;

/// Fault-injection points, all empty by default. Tests use them to kill a QEMU at an exact
/// moment (e.g. while a snapshot has every machine paused).
#[derive(Clone, Default)]
pub struct FaultHooks {
    /// Runs after every running machine of an environment was paused for a baseline or
    /// snapshot, before the snapshot transactions.
    pub after_pause: Option<Hook>,
    /// Runs at the start of every `Environment::apply`; returning `Some(message)` makes that
    /// call fail with a backend error carrying the message, before anything changes.
    pub before_apply: Option<FailHook>,
    /// Runs at named points of multi-step operations — `swap:linked` (layers linked and
    /// rebased, production's record not yet saved), `swap:decided` (production's record
    /// saved, the stage's not), `freeze:frozen` (a baseline/snapshot froze the guests'
    /// filesystems, nothing paused yet), `freeze:paused` (guests frozen and paused, no
    /// disk switched), `stage:synced` (a stage's disks written and durable, its record not
    /// yet saved) and `collapse:merged` (a collapse's merges done, the record not yet
    /// updated); returning `true` stops the operation right there with an error,
    /// leaving everything as a process that died at that point would (guests stay frozen or
    /// paused until the environment is opened again). A hook may also end the process.
    pub crash_at: Option<PointHook>,
}

/// A callback told the name of a point; `true` injects a crash there.
pub type PointHook = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// A callback that may inject a failure (`Some(message)`).
pub type FailHook = Arc<dyn Fn() -> Option<String> + Send + Sync>;

impl FaultHooks {
    /// An injected crash at `point` when [`FaultHooks::crash_at`] asks for one: the error the
    /// operation returns there.
    pub(crate) fn crash(&self, point: &str) -> stagecore::Result<()> {
        match &self.crash_at {
            Some(hook) if hook(point) => Err(crate::error::msg(format!("{CRASH} {point}"))),
            _ => Ok(()),
        }
    }
}

/// How an injected crash's error message starts.
pub(crate) const CRASH: &str = "crash injected at";

impl std::fmt::Debug for FaultHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultHooks")
            .field("after_pause", &self.after_pause.is_some())
            .field("before_apply", &self.before_apply.is_some())
            .field("crash_at", &self.crash_at.is_some())
            .finish()
    }
}

/// How to run the QEMU backend.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// The state directory: `envs/<env>/` per environment, `images/` for relative disk sources.
    /// A relative path is taken relative to the current directory when the backend is made.
    pub root: PathBuf,
    /// CPU acceleration (`Auto`: KVM when `/dev/kvm` is usable, else TCG).
    pub accel: Accel,
    /// The emulator; `None` means `qemu-system-x86_64` on `PATH`.
    pub binary: Option<PathBuf>,
    /// Fault-injection hooks (tests only).
    pub hooks: FaultHooks,
    /// How long `start` waits for the guest agent of a machine that others start after
    /// ([`stagecore::MachineSpec::after`]) before it fails (default 90 s).
    pub agent_timeout: Duration,
    /// Whether baselines and snapshots freeze the filesystems of guests whose agent answers
    /// (`guest-fsfreeze-freeze` around the pause; default `true`). `false` keeps every capture
    /// crash-consistent (for comparisons).
    pub quiesce: bool,
}

/// The default [`QemuConfig::agent_timeout`].
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(90);

impl QemuConfig {
    /// State under `root`, acceleration `Auto`, QEMU from `PATH`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        QemuConfig {
            root: root.into(),
            accel: Accel::Auto,
            binary: None,
            hooks: FaultHooks::default(),
            agent_timeout: DEFAULT_AGENT_TIMEOUT,
            quiesce: true,
        }
    }

    /// The same config with `agent_timeout`.
    pub fn with_agent_timeout(mut self, timeout: Duration) -> Self {
        self.agent_timeout = timeout;
        self
    }

    /// The same config with `accel`.
    pub fn with_accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }
}
