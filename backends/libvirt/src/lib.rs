//! # stagecore-libvirt
//!
//! The libvirt backend of stagecore: stages real libvirt domains (`qemu:///system`,
//! `qemu+ssh://host/system`, `test:///default`) through the `virt` crate.
//!
//! - Every libvirt call runs on tokio's blocking pool with its error read and mapped in the same
//!   closure ([`conn`](self)); libvirt error numbers map into [`stagecore::Error`] in one module.
//! - Domain XML is read with quick-xml + serde and *edited*, never rebuilt, so nothing the spec
//!   does not model is lost when a stage is defined.
//! - Environment membership, stage info (source, baseline, ChangeSets) and snapshots live in each
//!   domain's `<metadata>` under `https://stagecore.dev/xmlns/stage/1`, so any process can reopen
//!   a stage from libvirt alone. Productions attached by name or label are *not* edited: they are
//!   tracked in a registry file under the state directory.
//! - Image layers (overlays, allocation maps, allocated-only copies, guest reads/writes) go
//!   through one private module built on the shared in-process crate `stagecore-qcow2`.
//! - Promotion by replay (config ChangeSets through libvirt) and by swap (definitions exchanged,
//!   identities kept). Remote URIs work for everything that does not need the image files; disk
//!   drift there is `NotChecked` with the reason.
//! - Baseline layers are sealed (`stagecore_qcow2::Seals`, every file of each frozen layer's
//!   chain, in `<state>/<env>/baselines/<id>/seals.json`; a stage keeps its own copy). Before
//!   `disk_changes` and before `stage` makes anything, the seals of the layers involved are
//!   checked: a layer rewritten behind stagecore's back (an internal-snapshot revert, a plain
//!   write) is `Error::Precondition("<file>: layer changed since it was sealed: <what>")`, so the
//!   drift report fails and a promotion is refused before production is touched. Relabeling when
//!   a domain starts (chown, ctime) is not a change. Local storage only.
//!
//! ```no_run
//! # async fn demo() -> stagecore::Result<()> {
//! use stagecore::{Backend, StageOptions};
//! let backend = stagecore_libvirt::LibvirtBackend::connect("qemu:///system", "/var/lib/libvirt/images/stagecore").await?;
//! let prod = backend.open("prod").await?;
//! let baseline = prod.take_baseline().await?;
//! let stage = backend.stage(&baseline, &StageOptions::linked("try-1")).await?;
//! # let _ = stage; Ok(()) }
//! ```
//!
//! See `docs/backends/libvirt.md` for the layout on disk and what is not supported yet.

mod agent;
mod apply;
mod backend;
mod conn;
mod create;
mod env;
mod error;
mod freeze;
mod handle;
mod hostfiles;
mod layers;
mod machines;
mod markers;
mod quiesce;
mod registry;
mod seals;
mod shared;
mod snapshot;
mod stage;
mod storage;
mod swap;
mod xml;

pub use backend::LibvirtBackend;
pub use handle::LibvirtEnvironment;
