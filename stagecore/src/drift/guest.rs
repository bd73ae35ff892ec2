//! The guest layer: compare production's and the stage's guest inventories item by item, with the
//! baseline inventory (when recorded) to tell which side moved, and the stage's footprints to tell
//! what is intended.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::drift::report::{GuestRecord, RecordKind, Side, Status};
use crate::inventory::{self, InventoryConfig, ItemKey, MachineInventory, item_path, items};
use crate::{Environment, EnvironmentSpec, Progress, StageInfo};

/// The guest layer of one report.
#[derive(Debug, Default)]
pub(crate) struct GuestLayer {
    pub(crate) records: Vec<GuestRecord>,
    pub(crate) status: Option<Status>,
    pub(crate) reason: Option<String>,
    /// Per machine: status, unintended records, reason when not checked.
    pub(crate) machines: BTreeMap<String, (Status, usize, Option<String>)>,
    /// Unintended records and compared items over the checked machines; `None` if none was checked.
    pub(crate) score: Option<(usize, usize)>,
}

fn not_checked(machines: &BTreeSet<String>, reason: &str) -> GuestLayer {
    GuestLayer {
        status: Some(Status::NotChecked),
        reason: Some(reason.into()),
        machines: machines.iter().map(|m| (m.clone(), (Status::NotChecked, 0, Some(reason.into())))).collect(),
        ..GuestLayer::default()
    }
}

/// Builds the guest layer.
pub(crate) async fn layer(
    production: &dyn Environment,
    stage: &dyn Environment,
    staged: &StageInfo,
    specs: (&EnvironmentSpec, &EnvironmentSpec),
    config: &InventoryConfig,
    progress: Option<&Progress>,
) -> GuestLayer {
    let (p_spec, s_spec) = specs;
    let names: BTreeSet<String> = p_spec.machines.iter().chain(&s_spec.machines).map(|m| m.name.clone()).collect();
    if production.guest().is_none() || stage.guest().is_none() {
        return not_checked(&names, "the backend offers no guest channel");
    }
    let p_names: Vec<String> = p_spec.machines.iter().map(|m| m.name.clone()).collect();
    let s_names: Vec<String> = s_spec.machines.iter().map(|m| m.name.clone()).collect();
    let (p_inv, s_inv) = tokio::join!(
        inventory::collect(production, Some(&p_names), config, progress),
        inventory::collect(stage, Some(&s_names), config, progress),
    );
    let (p_inv, s_inv) = match (p_inv, s_inv) {
        (Ok(p), Ok(s)) => (p, s),
        (Err(e), _) => return not_checked(&names, &format!("production's inventory failed: {e}")),
        (_, Err(e)) => return not_checked(&names, &format!("the stage's inventory failed: {e}")),
    };
    let baseline = inventory::baseline_inventory(staged);
    let footprint = inventory::combined_footprint(&staged.change_sets);
    // ChangeSets with guest changes but no footprint record: their machines' stage-side guest
    // changes count as intended as a whole (as the disk layer does for guest changes).
    let recorded: BTreeSet<String> =
        inventory::footprints(&staged.change_sets).into_iter().map(|f| f.change_set).collect();
    let coarse: BTreeSet<String> = inventory::user_change_sets(&staged.change_sets)
        .into_iter()
        .filter(|cs| !recorded.contains(&cs.id))
        .flat_map(inventory::guest_machines)
        .collect();

    let mut out = GuestLayer::default();
    let mut notes: Vec<String> = Vec::new();
    let (mut drift, mut compared, mut checked) = (0usize, 0usize, false);
    for m in &names {
        let (p, s) = (p_inv.get(m), s_inv.get(m));
        let (p, s) = match (p.and_then(MachineInventory::inventory), s.and_then(MachineInventory::inventory)) {
            (Some(p), Some(s)) => (p, s),
            _ => {
                let why = |side: &str, i: Option<&MachineInventory>| match i {
                    None => Some(format!("{side}: no such machine")),
                    Some(i) => i.reason().map(|r| format!("{side}: {r}")),
                };
                let reason =
                    [why("production", p), why("stage", s)].into_iter().flatten().collect::<Vec<_>>().join("; ");
                notes.push(format!("{m}: {reason}"));
                out.machines.insert(m.clone(), (Status::NotChecked, 0, Some(reason)));
                continue;
            }
        };
        checked = true;
        for note in [p.incomplete(config.max_files), s.incomplete(config.max_files)].into_iter().flatten() {
            notes.push(format!("{m}: {note}"));
        }
        let b_items: Option<BTreeMap<ItemKey, Value>> =
            baseline.as_ref().and_then(|b| b.machines.get(m)).and_then(MachineInventory::inventory).map(items);
        let (pi, si) = (items(p), items(s));
        let keys: BTreeSet<&ItemKey> = pi.keys().chain(si.keys()).collect();
        compared += keys.len();
        let mut machine_drift = 0;
        for key in keys {
            let (pv, sv) = (pi.get(key).cloned().unwrap_or(Value::Null), si.get(key).cloned().unwrap_or(Value::Null));
            if pv == sv {
                continue;
            }
            let path = item_path(m, key.0, &key.1);
            let bv = b_items.as_ref().map(|b| b.get(key).cloned().unwrap_or(Value::Null));
            let mut side = bv.as_ref().map(|bv| match (&pv != bv, &sv != bv) {
                (true, true) => Side::Both,
                (true, false) => Side::Production,
                _ => Side::Stage,
            });
            let explained = footprint.get(&(m.clone(), path.clone())).is_some_and(|f| f.after == sv && f.before == pv);
            let stage_side = matches!(side, None | Some(Side::Stage));
            let intended = stage_side && (explained || coarse.contains(m));
            if explained && side.is_none() {
                side = Some(Side::Stage);
            }
            let kind = match (&pv, &sv) {
                (Value::Null, _) => RecordKind::Add,
                (_, Value::Null) => RecordKind::Remove,
                _ => RecordKind::NotEqual,
            };
            if !intended {
                machine_drift += 1;
            }
            out.records.push(GuestRecord {
                path,
                machine: m.clone(),
                category: key.0,
                item: key.1.clone(),
                kind,
                expected: pv,
                actual: sv,
                baseline: bv.unwrap_or(Value::Null),
                side,
                intended,
            });
        }
        if b_items.is_none() && out.records.iter().any(|r| &r.machine == m && r.side.is_none()) {
            notes.push(format!("{m}: no baseline inventory recorded, so which side moved is unknown"));
        }
        drift += machine_drift;
        let status = if machine_drift > 0 { Status::Drifted } else { Status::InSync };
        out.machines.insert(m.clone(), (status, machine_drift, None));
    }
    out.status = Some(if drift > 0 {
        Status::Drifted
    } else if out.machines.values().any(|(s, _, _)| *s == Status::NotChecked) {
        Status::NotChecked
    } else {
        Status::InSync
    });
    out.reason = (!notes.is_empty()).then(|| notes.join("; "));
    out.score = checked.then_some((drift, compared.max(drift)));
    out
}
