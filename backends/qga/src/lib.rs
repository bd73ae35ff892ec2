//! A qemu-guest-agent client for stagecore backends.
//!
//! [`Agent`] speaks the agent's commands (`guest-exec`, `guest-file-*`, `guest-fsfreeze-*`, `guest-ping`, ...)
//! over a [`Transport`]: [`SocketTransport`] for QEMU's `-chardev socket,…` agent socket (with the
//! `guest-sync-delimited` handshake), or a backend's own transport (libvirt's `virDomainQemuAgentCommand`).
//!
//! ```no_run
//! # async fn demo() -> stagecore::Result<()> {
//! use std::{sync::Arc, time::Duration};
//! use stagecore_qga::{Agent, SocketTransport};
//!
//! let agent = Agent::new(Arc::new(SocketTransport::new("/run/vm/qga.sock", "prod/web")), "prod/web");
//! agent.wait_ready(Duration::from_secs(60)).await?;
//! let out = agent.exec(&stagecore::GuestExec::new(["uname", "-r"])).await?;
//! println!("{}", out.stdout_text());
//! # Ok(()) }
//! ```
//!
//! Errors are [`stagecore::Error`]: `Unreachable` (connect or I/O), `Timeout` (naming the operation and the
//! label), `NotFound` (a missing guest file), and `Backend { backend: "qga", .. }` for the rest; an agent's own
//! error reply is an [`AgentFailure`] inside `Backend`.

mod agent;
mod error;
mod transport;

pub use agent::{Agent, AgentInfo, DEFAULT_PATH, FreezeStatus, Limits, OsInfo};
pub use error::AgentFailure;
pub use transport::{SocketTransport, Transport};
