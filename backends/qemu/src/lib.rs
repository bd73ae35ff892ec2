//! stagecore-qemu: the daemonless QEMU backend (work in progress).
//!
//! Low-level parts, wired into the stagecore traits later:
//! - [`qmp`]: an async QMP client (request ids, events, typed errors, timeouts) and typed helpers;
//! - [`process`]: spawning QEMU detached, readiness, stale-state detection, bounded kill/quit;
//! - [`cmdline`]: a plain [`cmdline::MachineConfig`] turned into a fenced QEMU argv.

pub mod cmdline;
mod error;
pub mod process;
pub mod qmp;
