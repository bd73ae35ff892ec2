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

/// Whether two inventories have the same items (the cheap check before building them).
fn same_items(a: &inventory::GuestInventory, b: &inventory::GuestInventory) -> bool {
    a.os == b.os
        && a.kernel == b.kernel
        && a.packages == b.packages
        && a.services == b.services
        && a.ports == b.ports
        && a.files == b.files
}

/// How many items an inventory has (`items(inv).len()` without building them).
fn item_count(inv: &inventory::GuestInventory) -> usize {
    2 + inv.packages.len() + inv.services.len() + inv.ports.len() + inv.files.len()
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
    // Decoded only when some machine differs (it can be megabytes of JSON).
    let mut baseline: Option<Option<inventory::BaselineInventory>> = None;
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
        if same_items(p, s) {
            compared += item_count(p);
            out.machines.insert(m.clone(), (Status::InSync, 0, None));
            continue;
        }
        let b_items: Option<BTreeMap<ItemKey, Value>> = baseline
            .get_or_insert_with(|| inventory::baseline_inventory(staged))
            .as_ref()
            .and_then(|b| b.machines.get(m))
            .and_then(MachineInventory::inventory)
            .map(items);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drift::Drift;
    use crate::{BackendExt, GuestExec};

    async fn sim(env: &dyn Environment, machine: &str, args: &[&str]) {
        let argv = std::iter::once("stagecore-sim").chain(args.iter().copied());
        let out = env.guest().unwrap().exec(machine, &GuestExec::new(argv)).await.unwrap();
        assert!(out.success(), "{out:?}");
    }

    #[tokio::test]
    async fn an_agent_that_does_not_answer_is_not_checked() {
        let (backend, prod, stage) = crate::drift::test_support::running_pair(true).await;
        sim(&*stage, "db", &["agent-off"]).await;
        let r = backend.drift(&*prod, &*stage).await.unwrap();
        let db = r.machines.iter().find(|m| m.machine == "db").unwrap();
        assert_eq!(db.guest, Status::NotChecked, "{r}");
        assert!(db.guest_reason.as_deref().unwrap().contains("does not answer"), "{r}");
        assert_eq!(r.guest.status, Status::NotChecked, "{r}");
        assert!(r.guest.reason.as_deref().unwrap().contains("db: stage:"), "{r}");
        assert!(r.machines.iter().filter(|m| m.machine != "db").all(|m| m.guest == Status::InSync), "{r}");
    }

    #[tokio::test]
    async fn output_over_the_cap_is_not_checked() {
        let (_, prod, stage) = crate::drift::test_support::running_pair(true).await;
        let cfg = InventoryConfig { output_cap: 64, ..InventoryConfig::default() };
        let r = crate::drift::DriftEngine::new().with_inventory(cfg).drift(&*prod, &*stage).await.unwrap();
        assert_eq!(r.guest.status, Status::NotChecked, "{r}");
        assert!(r.guest.reason.as_deref().unwrap().contains("exceeded the cap"), "{r}");
        assert!(r.guest.records.is_empty());
    }

    #[tokio::test]
    async fn without_a_baseline_inventory_the_side_is_unknown() {
        let (backend, prod, stage) = crate::drift::test_support::running_pair(false).await;
        sim(&*prod, "web", &["pkg", "install", "nginx", "1.22"]).await;
        let r = backend.drift(&*prod, &*stage).await.unwrap();
        let rec = r.guest.records.iter().find(|x| x.path == "/machines/web/guest/packages/nginx").expect("record");
        assert_eq!((rec.kind, rec.side, rec.intended), (RecordKind::Remove, None, false), "{r}");
        assert_eq!(rec.baseline, Value::Null);
        assert!(r.guest.reason.as_deref().unwrap().contains("no baseline inventory"), "{r}");
        assert_eq!(r.status, Status::Drifted);
    }

    #[tokio::test]
    async fn both_sides_changing_a_package_is_a_conflict_and_progress_is_reported() {
        let (_, prod, stage) = crate::drift::test_support::running_pair(true).await;
        sim(&*prod, "app", &["pkg", "install", "stagecore-demo-app", "1.1"]).await;
        sim(&*stage, "app", &["pkg", "install", "stagecore-demo-app", "1.2"]).await;
        sim(&*stage, "web", &["service", "stop", "app"]).await;
        sim(&*stage, "web", &["port", "close", "8080"]).await;
        let (progress, mut events) = Progress::channel();
        let r = crate::drift::DriftEngine::new().with_progress(progress).drift(&*prod, &*stage).await.unwrap();
        let pkg = r.guest.records.iter().find(|x| x.path == "/machines/app/guest/packages/stagecore-demo-app").unwrap();
        assert_eq!((pkg.kind, pkg.side), (RecordKind::NotEqual, Some(Side::Both)), "{r}");
        assert_eq!(pkg.baseline["version"], "1.0");
        let svc = r.guest.records.iter().find(|x| x.path == "/machines/web/guest/services/app").unwrap();
        assert_eq!((svc.side, svc.actual["running"].clone()), (Some(Side::Stage), Value::Bool(false)), "{r}");
        assert!(
            r.guest
                .records
                .iter()
                .any(|x| x.path == "/machines/web/guest/ports/tcp:8080" && x.kind == RecordKind::Remove)
        );
        let mut seen = Vec::new();
        while let Ok(ev) = events.try_recv() {
            seen.push(ev);
        }
        assert_eq!(seen.iter().filter(|e| e.operation == "inventory").count(), 6, "{seen:?}");
        assert!(seen.iter().all(|e| e.total == 3 && e.step == "collected"), "{seen:?}");
    }
}
