//! # stagecore
//!
//! Production-like staging copies of VM environments: clone production into a *stage*, apply and
//! test a [`ChangeSet`] there, know exactly how far the stage has drifted from production
//! ([`drift`]), and promote the tested change into production safely ([`promotion`]).
//!
//! The crate holds the model ([`EnvironmentSpec`] and friends), the small object-safe traits every
//! backend implements ([`Backend`], [`Environment`], [`Snapshot`]), the one [`Error`] type,
//! [`Capabilities`] as data, the drift and promotion engines, and [`memory`] — a complete
//! in-memory reference backend with fault injection.
//!
//! ```
//! use stagecore::{memory::MemoryBackend, Backend, BackendExt, StageOptions};
//! # tokio_test();
//! # fn tokio_test() { tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let backend = MemoryBackend::new();
//! let prod = backend.create(&stagecore::memory::sample_spec("prod")).await?;
//! let baseline = prod.take_baseline().await?;
//! let stage = backend.stage(&baseline, &StageOptions::linked("try-1")).await?;
//! let report = backend.drift(&*prod, &*stage).await?;
//! assert_eq!(report.score, 100.0);
//! # Ok::<(), stagecore::Error>(()) }).unwrap() }
//! ```

mod backend;
mod baseline;
mod capabilities;
mod change;
pub mod checked;
pub mod drift;
mod environment;
mod error;
mod ext;
pub mod extent;
pub mod guest;
pub mod inventory;
pub mod memory;
pub mod name;
pub mod progress;
pub mod promotion;
mod selector;
pub mod sim_guest;
mod snapshot_info;
mod spec;
mod stage;
mod start_order;
mod status;
pub mod toolbox;

pub use backend::{Backend, DynEnvironment};
pub use baseline::{Baseline, BaselineLayer, ConsistencyLevel, MachineConsistency};
pub use capabilities::{Capabilities, ChangeKinds};
pub use change::{Change, ChangeSet, DiskScope};
pub use environment::{DiskIo, Environment, GuestChannel, GuestExec, GuestOutput, Snapshot};
pub use error::{BoxError, Error, Result, Secret};
pub use ext::{BackendExt, EnvironmentExt, Fingerprint};
pub use extent::{ChangeMap, DiskChanges, Extent};
pub use progress::{Progress, ProgressEvent};
pub use selector::Selector;
pub use snapshot_info::{Consistency, SnapshotInfo};
pub use spec::{
    BootSpec, DiskFormat, DiskSpec, EnvironmentSpec, Firmware, Identities, MachineSpec, NetworkSpec, NicSpec,
    SpecFormat, check_mac, random_mac,
};
pub use stage::{CloneKind, Role, StageInfo, StageOptions};
pub use status::{EnvironmentInfo, MachineInstance, MachineStatus, PowerState};
