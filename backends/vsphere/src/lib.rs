//! stagecore-vsphere: the vSphere backend of stagecore.
//!
//! [`VsphereBackend`] implements [`stagecore::Backend`] over vCenter: productions are attached
//! (existing VMs by name or folder), baselines are per-VM snapshots, stages are linked or full
//! clones of them (fenced onto an isolated port group), disk drift comes from Changed Block
//! Tracking; with guest credentials, guest commands and files go through VMware Tools guest
//! operations. Environment membership is kept in a local registry directory
//! ([`VsphereOptions::state_dir`]). See `docs/backends/vsphere.md`.
//!
//! [`VsphereClient`] talks to vCenter through the Automation REST API (`/api/...`: sessions,
//! inventory, power, full clone) and the VI/JSON API (`/sdk/vim25/{release}/...`, vSphere 8.0U1+:
//! snapshots, linked clones, reconfiguration, changed block tracking), which REST lacks.
//! Every failure is a [`stagecore::Error`]; vSphere faults keep their type and message in a
//! [`VsphereFault`] (reachable through `Error::Backend`'s source). Secrets never appear in `Debug`,
//! errors or tracing.

mod backend;
mod client;
mod core;
mod drift;
mod env;
mod guest;
mod inspect;
mod record;
mod snapshots;
mod stage;
mod vms;

pub use backend::VsphereBackend;
pub use core::{GuestCredentials, VsphereOptions};
pub use env::VsphereEnvironment;

pub use client::config::{RetryPolicy, TaskPolicy, VsphereConfig};
pub use client::error::VsphereFault;
pub use client::guest::{GuestProcess, GuestProcessSummary};
pub use client::rest::{
    BootInfo, CpuInfo, DiskInfo, FolderSummary, Identity, MemoryInfo, NetworkSummary, NicInfo, VmInfo, VmSummary,
};
pub use client::task::TaskOutcome;
pub use client::vim::{
    ChangedArea, LinkedCloneSpec, MoRef, Reconfig, SnapshotNode, SnapshotTree, VimConfig, VimDisk, VimNic,
};
pub use client::{VIM_RELEASES, VimEndpoint, VsphereClient};

/// The backend name used in errors.
pub const BACKEND: &str = "vsphere";
