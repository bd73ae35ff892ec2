//! stagecore-qemu: the daemonless QEMU backend of stagecore.
//!
//! [`QemuBackend`] runs every machine as a detached `qemu-system-x86_64` process with a QMP
//! socket, keeps each environment's state in `root/envs/<env>/` (a JSON record, a lock file,
//! qcow2 layers, per-machine sockets, pid files and logs), and reattaches to running machines
//! when an environment is opened again. Disks are qcow2 chains handled in-process by
//! `stagecore-qcow2`: linked clones are overlays, full clones copy allocated data, drift reads
//! the allocation above the baseline layer. `Backend::swap` exchanges a production's and a
//! stage's machines (identities stay) crash-safely, and
//! [`QemuEnvironment::collapse_layers`] merges layers nothing needs any more so chains stay short.
//!
//! Real guests: a machine may boot a kernel directly (`MachineSpec.boot`), every machine gets a
//! qemu-guest-agent channel (`machines/<m>/qga.sock` in its own environment's directory) and a
//! serial console log (`machines/<m>/console.log`). [`QemuEnvironment`] is a
//! [`stagecore::GuestChannel`] over `stagecore-qga` (commands, files, readiness; guest changes in
//! `apply`). `start` follows the spec's start waves and waits for the agents of machines others
//! start after. Baselines and snapshots freeze the filesystems of guests whose agent answers
//! around the pause (`Application` consistency), with durable markers so a process killed inside
//! the window leaves no frozen or paused guest behind the next open. See `docs/backends/qemu.md`.
//!
//! Baseline layers are sealed: `take_baseline` records a `stagecore_qcow2::LayerSeal` of every
//! file of each frozen layer's chain in the environment's record (a stage copies those of the
//! files it stands on and seals its full copies). `disk_changes` against a baseline, and `stage`
//! before it creates anything, check them: a layer rewritten behind stagecore's back (an
//! operator's `qemu-img snapshot -a` to an internal snapshot, a plain write) is
//! `Error::Precondition("<file>: layer changed since it was sealed: <what>")`; the drift report
//! fails with it and a promotion is refused in its precondition, before production is touched.
//! Layers the backend rewrites itself (collapse, swap) are resealed in the same record update.
//!
//! ```no_run
//! # async fn run() -> stagecore::Result<()> {
//! use stagecore::{Backend, StageOptions};
//! use stagecore_qemu::{Accel, QemuBackend, QemuConfig};
//! let backend = QemuBackend::new(QemuConfig::new("/var/lib/stagecore").with_accel(Accel::Tcg));
//! let prod = backend.create(&stagecore::memory::sample_spec("prod")).await?;
//! prod.start().await?;
//! let baseline = prod.take_baseline().await?;
//! let stage = backend.stage(&baseline, &StageOptions::linked("try-1")).await?;
//! # Ok(()) }
//! ```
//!
//! Low-level parts, public for tests and tools:
//! - [`qmp`]: an async QMP client (request ids, events, typed errors, timeouts) and typed helpers;
//! - [`process`]: spawning QEMU detached, readiness, stale-state detection, bounded kill/quit;
//! - [`cmdline`]: a plain [`cmdline::MachineConfig`] turned into a fenced QEMU argv.

mod apply;
mod backend;
pub mod cmdline;
mod collapse;
mod config;
mod diskio;
mod env;
mod error;
mod freeze;
mod gc;
mod guest;
mod images;
mod lock;
mod machines;
mod markers;
pub mod process;
pub mod qmp;
mod seals;
mod shared;
mod snapshot;
mod stage;
mod store;
mod swap;

pub use backend::QemuBackend;
pub use collapse::{CollapseReport, CollapsedDisk};
pub use config::{Accel, DEFAULT_AGENT_TIMEOUT, FailHook, FaultHooks, Hook, PointHook, QemuConfig};
pub use shared::QemuEnvironment;
