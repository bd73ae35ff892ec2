//! Where baseline inventories and footprints are kept: as *records* in the stage's list of
//! ChangeSets ([`crate::StageInfo::change_sets`]), which every backend already persists through
//! [`crate::Environment::record_change_set`] — so no backend needs to change.
//!
//! A record is a ChangeSet with a reserved id (`stagecore.baseline-inventory`,
//! `stagecore.footprint.<change-set-id>`), **no changes**, and its JSON payload in
//! `description`. Having no changes, records are never replayed, never mark drift as intended by
//! themselves, and are skipped by rebase; [`user_change_sets`] lists the ChangeSets without them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{GuestDelta, MachineInventory};
use crate::{ChangeSet, StageInfo};

/// Id of the record holding a stage's baseline inventory.
pub const BASELINE_RECORD: &str = "stagecore.baseline-inventory";
/// Prefix of the ids of footprint records (`stagecore.footprint.<change-set-id>`).
pub const FOOTPRINT_PREFIX: &str = "stagecore.footprint.";

/// Production's guest inventory at the moment a baseline was taken (collected just before the
/// freeze), per machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaselineInventory {
    /// The baseline's id.
    pub baseline: String,
    /// Per logical machine.
    pub machines: BTreeMap<String, MachineInventory>,
}

/// What a ChangeSet's guest changes changed in the inventory of the stage they were applied to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Footprint {
    /// The ChangeSet's id.
    pub change_set: String,
    /// Per machine with guest changes: the items that differ between the inventories taken
    /// before and after the ChangeSet.
    pub machines: BTreeMap<String, Vec<GuestDelta>>,
    /// Machines whose inventory after the change could not be taken, with the reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, String>,
}

impl Footprint {
    /// Every delta, with its machine.
    pub fn deltas(&self) -> impl Iterator<Item = (&str, &GuestDelta)> {
        self.machines.iter().flat_map(|(m, ds)| ds.iter().map(move |d| (m.as_str(), d)))
    }
}

/// Whether a ChangeSet is a stagecore record rather than a change.
pub fn is_record(cs: &ChangeSet) -> bool {
    cs.changes.is_empty() && (cs.id == BASELINE_RECORD || cs.id.starts_with(FOOTPRINT_PREFIX))
}

/// The ChangeSets that are changes (records left out), in order.
pub fn user_change_sets(change_sets: &[ChangeSet]) -> Vec<&ChangeSet> {
    change_sets.iter().filter(|cs| !is_record(cs)).collect()
}

fn record<T: Serialize>(id: String, what: &str, payload: &T) -> ChangeSet {
    let description = serde_json::to_string(payload).unwrap_or_else(|_| Value::Null.to_string());
    tracing::debug!(record = %id, bytes = description.len(), "stagecore record: {what}");
    ChangeSet { id, description, changes: Vec::new() }
}

/// The record that keeps a baseline inventory on a stage.
pub fn baseline_record(inventory: &BaselineInventory) -> ChangeSet {
    record(BASELINE_RECORD.into(), "baseline inventory", inventory)
}

/// The record that keeps a footprint on a stage.
pub fn footprint_record(footprint: &Footprint) -> ChangeSet {
    record(format!("{FOOTPRINT_PREFIX}{}", footprint.change_set), "footprint", footprint)
}

/// The baseline inventory recorded on a stage for its own baseline, if any.
pub fn baseline_inventory(stage: &StageInfo) -> Option<BaselineInventory> {
    stage
        .change_sets
        .iter()
        .rev()
        .filter(|cs| cs.id == BASELINE_RECORD && cs.changes.is_empty())
        .filter_map(|cs| serde_json::from_str::<BaselineInventory>(&cs.description).ok())
        .find(|inv| inv.baseline == stage.baseline.id)
}

/// The footprints recorded among `change_sets`, in order.
pub fn footprints(change_sets: &[ChangeSet]) -> Vec<Footprint> {
    change_sets
        .iter()
        .filter(|cs| cs.changes.is_empty() && cs.id.starts_with(FOOTPRINT_PREFIX))
        .filter_map(|cs| serde_json::from_str(&cs.description).ok())
        .collect()
}
