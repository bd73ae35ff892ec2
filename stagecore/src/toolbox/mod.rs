//! The staging toolbox: everything every backend needs, written once.
//!
//! A backend provides *mechanisms* (make an overlay, copy a disk, define a machine, pause and
//! resume); the toolbox owns the *algorithms and bookkeeping* around them:
//!
//! - [`StagePlan`]: the stage algorithm — validate the options, check the baseline, choose new
//!   instance names, UUIDs and MACs, a clone plan per disk, the fencing plan and the
//!   [`crate::StageInfo`]. The backend executes the plan and records the result.
//! - [`EnvRecord`]: the one environment record (role, spec, identities, baselines, origins,
//!   snapshots, recorded ChangeSets) with the bookkeeping of baselines, snapshots, ChangeSets and
//!   the linked-child refusal of destroy; [`RecordFile`] keeps it durable (temporary file, fsync,
//!   rename, directory fsync).
//! - [`DurableBatch`]: makes the many new files of one operation durable together (batched
//!   `fdatasync` + one directory `fsync` each, or `syncfs`) before its record is published.
//! - [`Undo`]: rolls back what an operation did when a later step fails, and says exactly what
//!   it could not undo ([`crate::Error::LeftBehind`]).
//! - [`blocking`] for file work off the async runtime, [`check_range`] for disk I/O bounds,
//!   [`require_machines`] for per-machine operations, [`fill_identities`] for new productions,
//!   and [`FaultInjector`] for tests.
//!
//! `docs/adding-a-backend.md` walks through a backend built on it (the memory backend).

mod durable;
mod fault;
mod identity;
mod plan;
mod record;
mod store;
mod undo;

pub use crate::extent::check_range;
pub use durable::{Durability, DurableBatch, MAX_PARALLEL_SYNCS};
pub use fault::FaultInjector;
pub use identity::{fill_identities, new_baseline_id, new_uuid};
pub use plan::{DiskPlan, FencingPlan, StagePlan};
pub use record::{EnvRecord, SnapshotRecord, check_destroy, disk_key};
pub use store::{RecordFile, write_atomic};
pub use undo::Undo;

use crate::{EnvironmentSpec, Error, Result};

/// Runs blocking work (file I/O, a synchronous hypervisor library) off the async runtime; a
/// panic or cancellation of the task becomes an error of `backend`.
pub async fn blocking<T: Send + 'static>(
    backend: &'static str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::backend_msg(backend, format!("blocking task failed: {e}")))?
}

/// Checks that every name in `machines` is a machine of `spec` (environment `spec.name`), for
/// operations on some machines ([`crate::Environment::start_machines`], `stop_machines`):
/// `NotFound` naming `environment/machine` for the first that is not, before anything is done.
///
/// ```
/// let spec = stagecore::memory::sample_spec("prod");
/// assert!(stagecore::toolbox::require_machines(&spec, &["web".into()]).is_ok());
/// let err = stagecore::toolbox::require_machines(&spec, &["nope".into()]).unwrap_err();
/// assert!(err.to_string().contains("prod/nope"), "{err}");
/// ```
pub fn require_machines(spec: &EnvironmentSpec, machines: &[String]) -> Result<()> {
    match machines.iter().find(|m| spec.machine(m).is_none()) {
        Some(m) => Err(Error::not_found("machine", format!("{}/{m}", spec.name))),
        None => Ok(()),
    }
}
