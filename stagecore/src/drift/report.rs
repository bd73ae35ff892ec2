//! The drift report: layers of typed records, statuses, a score. Its JSON form is documented in
//! `docs/drift.md` (schema `stagecore.drift/v3`).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::Extent;
use crate::inventory::Category;

/// The schema tag written into every JSON report.
pub const SCHEMA: &str = "stagecore.drift/v3";

/// Whether a machine, a layer or the environment matches production.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// No unintended difference.
    InSync,
    /// At least one unintended difference.
    Drifted,
    /// Could not be checked (the reason is in the layer).
    NotChecked,
    /// Reported, not judged: the disk bytes of a machine that runs on both sides and whose guest
    /// layer is checked against a recorded baseline inventory (a running OS writes its disks all
    /// the time — journal commits, the superblock ext4 rewrites when thawed — so its guest layer
    /// says whether it moved; see [`guest_judged`](crate::drift::guest_judged)). Only on disk
    /// records and the disk layer; never makes a machine or the environment DRIFTED.
    Informational,
}

/// Which side moved since the baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// Production changed since the baseline.
    Production,
    /// The stage changed since the baseline.
    Stage,
    /// Both changed (a conflict where they differ).
    Both,
}

/// How the stage's value relates to production's (CloudFormation's vocabulary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RecordKind {
    /// Present on the stage, absent in production.
    Add,
    /// Present in production, absent on the stage.
    Remove,
    /// Present on both with different values.
    NotEqual,
}

/// One configuration difference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigRecord {
    /// JSON-pointer-style path with logical names: `/machines/app/memory_mib`.
    pub path: String,
    /// The machine the path lies under, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// ADD / REMOVE / NOT_EQUAL (stage relative to production).
    pub kind: RecordKind,
    /// Production's current value (`null` when absent).
    pub expected: Value,
    /// The stage's current value (`null` when absent).
    pub actual: Value,
    /// The value at the baseline (`null` when absent).
    pub baseline: Value,
    /// Which side moved.
    pub side: Side,
    /// Explained by the stage's recorded ChangeSets.
    pub intended: bool,
}

/// Changed data on one side of one disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSide {
    /// Changed bytes since the baseline.
    pub bytes: u64,
    /// Changed extents since the baseline.
    pub extents: Vec<Extent>,
}

/// Data differences of one disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// Logical machine name.
    pub machine: String,
    /// Logical disk name.
    pub disk: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// IN_SYNC, DRIFTED, NOT_CHECKED (with `reason`), or INFORMATIONAL (the machine's guest layer
    /// judges it; the bytes that would have been drift are still in `drifted_bytes`).
    pub status: Status,
    /// Why the disk could not be checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Production's changes since the baseline.
    pub production: DiskSide,
    /// The stage's changes since the baseline.
    pub stage: DiskSide,
    /// Stage bytes explained by the recorded ChangeSets.
    pub intended_bytes: u64,
    /// Bytes changed on both sides (conflicting writes).
    pub overlap_bytes: u64,
    /// Bytes that differ and are not intended: production's changes ∪ the stage's unintended ones.
    pub drifted_bytes: u64,
    /// Which side moved (absent when nothing did).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub side: Option<Side>,
    /// All of the stage's changes are intended and production did not move.
    pub intended: bool,
}

/// A layer of the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Layer<R> {
    /// The layer's status.
    pub status: Status,
    /// Why the layer, or part of it, was not checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The records.
    pub records: Vec<R>,
}

/// A guest-level difference: one inventory item (package, file, service, port, OS, kernel) that
/// differs between production's and the stage's guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestRecord {
    /// `/machines/web/guest/packages/nginx`, `/machines/app/guest/files/etc/app.conf`.
    pub path: String,
    /// Logical machine name.
    pub machine: String,
    /// What kind of item.
    pub category: Category,
    /// The item (package or service name, file path, `tcp:8080`; empty for os and kernel).
    pub item: String,
    /// ADD (only on the stage) / REMOVE (only in production) / NOT_EQUAL.
    pub kind: RecordKind,
    /// Production's value (`null` when absent).
    pub expected: Value,
    /// The stage's value (`null` when absent).
    pub actual: Value,
    /// The value in the baseline inventory (`null` when absent or not recorded).
    pub baseline: Value,
    /// Which side moved; absent when no baseline inventory was recorded and no footprint explains it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub side: Option<Side>,
    /// Explained by the footprints of the stage's ChangeSets.
    pub intended: bool,
}

/// Status of one machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineDrift {
    /// Logical machine name.
    pub machine: String,
    /// Its status.
    pub status: Status,
    /// Unintended config records under the machine.
    pub config_drift: usize,
    /// Unintended changed bytes on its disks.
    pub disk_drift_bytes: u64,
    /// Status of its guest layer (NOT_CHECKED when either side's inventory could not be taken).
    pub guest: Status,
    /// Unintended guest records.
    pub guest_drift: usize,
    /// Why its guest layer was not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_reason: Option<String>,
}

/// How a stage differs from production.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftReport {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// Production environment.
    pub production: String,
    /// Stage environment.
    pub stage: String,
    /// The baseline the stage was cloned from.
    pub baseline: String,
    /// When the report was made.
    #[serde(with = "time::serde::rfc3339")]
    pub generated_at: OffsetDateTime,
    /// The environment's status.
    pub status: Status,
    /// Match score, 0–100 % (see `docs/drift.md`).
    pub score: f64,
    /// Per machine.
    pub machines: Vec<MachineDrift>,
    /// Configuration layer.
    pub config: Layer<ConfigRecord>,
    /// Disk layer.
    pub disk: Layer<DiskRecord>,
    /// Guest layer.
    pub guest: Layer<GuestRecord>,
}

impl DriftReport {
    /// Unintended guest records.
    pub fn guest_drift(&self) -> impl Iterator<Item = &GuestRecord> {
        self.guest.records.iter().filter(|r| !r.intended)
    }

    /// Unintended config records.
    pub fn config_drift(&self) -> impl Iterator<Item = &ConfigRecord> {
        self.config.records.iter().filter(|r| !r.intended)
    }

    /// Whether the stage is known to match: the environment is IN_SYNC and no disk record is
    /// NOT_CHECKED (drift that could not be seen never reads clean). INFORMATIONAL disk records
    /// do not count against it; a machine whose guest could not be inventoried shows that in its
    /// `guest` status, not here.
    pub fn is_clean(&self) -> bool {
        self.status == Status::InSync && self.disk.records.iter().all(|r| r.status != Status::NotChecked)
    }

    /// Disk records that could not be checked.
    pub fn not_checked_disks(&self) -> impl Iterator<Item = &DiskRecord> {
        self.disk.records.iter().filter(|r| r.status == Status::NotChecked)
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a drift report always serialises")
    }
}
