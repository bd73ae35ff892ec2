//! Rebase: re-create a stage on a newer production baseline and re-apply its recorded ChangeSets
//! in order.
//!
//! Before anything is created, [`rebase`] checks whether production moved, since the stage's
//! baseline, on what the ChangeSets touch:
//! - **config**: a path a change edits (`/machines/app/memory_mib`), or one above or below it;
//! - **disk**: bytes a `WriteDisk` writes (production wrote an overlapping range), or any write
//!   to a disk a `ReplaceDiskImage` replaces;
//! - **guest**: an item in a ChangeSet's footprint (package, file, service, port) whose value in
//!   production is no longer the one the footprint started from; a ChangeSet with guest changes
//!   but no recorded footprint is a conflict too (what it touches is unknown).
//!
//! Any of these stops the rebase with a [`ConflictReport`] instead of guessing. Otherwise a new
//! baseline (with guest inventory) is taken, a new stage created (same clone kind and fencing),
//! started when the ChangeSets have guest changes (or the old stage ran), and every ChangeSet
//! applied again in order with its footprint re-recorded. The old stage is never touched: it stays
//! until the caller destroys it. If re-applying fails, the new stage is destroyed and the error
//! returned.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::drift::config_differences;
use crate::extent::{self, ChangeMap, Extent};
use crate::inventory::{self, InventoryConfig, MachineInventory};
use crate::progress::{Progress, emit};
use crate::{
    Backend, Baseline, Change, ChangeSet, CloneKind, DynEnvironment, Environment, Error, PowerState, Result,
    StageOptions,
};

/// How to rebase.
#[derive(Debug, Clone)]
pub struct RebaseOptions {
    /// The new stage's name.
    pub name: String,
    /// Linked or full (default: as the old stage).
    pub clone: Option<CloneKind>,
    /// Guest inventory settings (baseline inventory, footprints, guest conflict checks).
    pub inventory: InventoryConfig,
}

impl RebaseOptions {
    /// Rebase into a new stage called `name`, same clone kind, default inventory settings.
    pub fn new(name: impl Into<String>) -> Self {
        RebaseOptions { name: name.into(), clone: None, inventory: InventoryConfig::default() }
    }
}

/// One place where production moved on what a ChangeSet touches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    /// The ChangeSet.
    pub change_set: String,
    /// The config path, disk (`disk:/machines/db/disks/disk0`) or guest item path.
    pub path: String,
    /// What the ChangeSet expected to find (baseline value, footprint's before value).
    pub expected: Value,
    /// What production has now.
    pub production: Value,
    /// In words.
    pub reason: String,
}

/// Why a rebase stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictReport {
    /// The stage that was to be rebased (unchanged).
    pub stage: String,
    /// Its production.
    pub production: String,
    /// The stage's baseline.
    pub baseline: String,
    /// The conflicts, in ChangeSet order.
    pub conflicts: Vec<Conflict>,
}

/// How a rebase ended.
#[derive(Debug)]
pub enum RebaseOutcome {
    /// The new stage exists with every ChangeSet re-applied.
    Rebased {
        /// The new stage.
        stage: DynEnvironment,
        /// Its baseline.
        baseline: Baseline,
        /// Ids of the ChangeSets re-applied, in order.
        applied: Vec<String>,
    },
    /// Production moved on what the ChangeSets touch; nothing was created.
    Conflict(ConflictReport),
}

async fn conflicts(
    production: &dyn Environment,
    baseline: &Baseline,
    change_sets: &[&ChangeSet],
    all: &[ChangeSet],
    config: &InventoryConfig,
) -> Result<Vec<Conflict>> {
    let now = production.spec().await?;
    let moved = config_differences(&baseline.spec, &now);
    let value = crate::drift::config_value;
    let mut out = Vec::new();
    let disks = production.disk_changes(baseline).await.ok();
    let footprints = inventory::footprints(all);
    let guest_items: Vec<(String, String)> = footprints
        .iter()
        .filter(|f| change_sets.iter().any(|cs| cs.id == f.change_set))
        .flat_map(|f| f.deltas().map(|(m, d)| (m.to_string(), d.path.clone())).collect::<Vec<_>>())
        .collect();
    let guest_machines: Vec<String> = {
        let mut ms: Vec<String> = guest_items.iter().map(|(m, _)| m.clone()).collect();
        ms.sort();
        ms.dedup();
        ms
    };
    let prod_inv = if guest_machines.is_empty() {
        Default::default()
    } else {
        inventory::collect(production, Some(&guest_machines), config, None).await?
    };
    for cs in change_sets {
        for change in &cs.changes {
            for path in change.config_paths() {
                for m in moved.iter().filter(|m| super::steps::related(m, &path)) {
                    out.push(Conflict {
                        change_set: cs.id.clone(),
                        path: m.clone(),
                        expected: value(&baseline.spec, m),
                        production: value(&now, m),
                        reason: format!(
                            "{} ({}) edits {path}, which production changed since the baseline",
                            cs.id,
                            change.kind()
                        ),
                    });
                }
            }
            let (machine, written): (&str, Option<(&str, Option<Extent>)>) = match change {
                Change::WriteDisk { machine, disk, offset, data } => {
                    (machine, Some((disk, Some(Extent { offset: *offset, length: data.len() as u64 }))))
                }
                Change::ReplaceDiskImage { machine, disk, .. } => (machine, Some((disk, None))),
                other => (other.machine(), None),
            };
            if let Some((disk, range)) = written {
                let changed = disks.as_ref().and_then(|ds| ds.iter().find(|d| d.machine == machine && d.disk == disk));
                let hit = match changed.map(|d| &d.changes) {
                    Some(ChangeMap::Checked { extents }) => match range {
                        Some(r) => !extent::intersect(&extent::normalize(extents.clone()), &[r]).is_empty(),
                        None => !extents.is_empty(),
                    },
                    Some(ChangeMap::NotChecked { .. }) | None => true,
                };
                if hit {
                    out.push(Conflict {
                        change_set: cs.id.clone(),
                        path: format!("disk:/machines/{machine}/disks/{disk}"),
                        expected: Value::Null,
                        production: Value::Null,
                        reason: format!(
                            "{} ({}) writes {machine}/{disk}, where production wrote (or may have written) since the baseline",
                            cs.id,
                            change.kind()
                        ),
                    });
                }
            }
        }
        let with_guest = inventory::guest_machines(cs);
        match footprints.iter().find(|f| f.change_set == cs.id) {
            None if !with_guest.is_empty() => out.push(Conflict {
                change_set: cs.id.clone(),
                path: format!("/machines/{}/guest", with_guest[0]),
                expected: Value::Null,
                production: Value::Null,
                reason: format!(
                    "{} runs guest changes on {} but has no recorded footprint, so what it touches is unknown \
                     (apply ChangeSets with stagecore::inventory::apply_change_set)",
                    cs.id,
                    with_guest.join(", ")
                ),
            }),
            None => {}
            Some(fp) => {
                for (m, why) in &fp.unknown {
                    out.push(Conflict {
                        change_set: cs.id.clone(),
                        path: format!("/machines/{m}/guest"),
                        expected: Value::Null,
                        production: Value::Null,
                        reason: format!("the footprint of {} on {m} is unknown: {why}", cs.id),
                    });
                }
                for (m, d) in fp.deltas() {
                    let now = match prod_inv.get(m) {
                        Some(MachineInventory::Collected { inventory }) => inventory::items(inventory)
                            .into_iter()
                            .find(|((c, i), _)| inventory::item_path(m, *c, i) == d.path)
                            .map(|(_, v)| v)
                            .unwrap_or(Value::Null),
                        other => {
                            let why = other.and_then(MachineInventory::reason).unwrap_or("not collected");
                            out.push(Conflict {
                                change_set: cs.id.clone(),
                                path: d.path.clone(),
                                expected: d.before.clone(),
                                production: Value::Null,
                                reason: format!(
                                    "cannot tell whether production moved: its inventory of {m} failed: {why}"
                                ),
                            });
                            continue;
                        }
                    };
                    if now != d.before {
                        out.push(Conflict {
                            change_set: cs.id.clone(),
                            path: d.path.clone(),
                            expected: d.before.clone(),
                            production: now,
                            reason: format!(
                                "{} changed {}, which production changed since the baseline",
                                cs.id, d.path
                            ),
                        });
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Re-creates `stage` on a new baseline of `production` and re-applies its ChangeSets (see the
/// module docs). Errors are returned when nothing could be decided (the stage is not a stage of
/// this production, the backend failed); a conflict is an outcome, not an error.
#[tracing::instrument(skip_all, fields(production = production.name(), stage = stage.name(), new = %options.name))]
pub async fn rebase(
    backend: &dyn Backend,
    production: &dyn Environment,
    stage: &dyn Environment,
    options: &RebaseOptions,
    progress: Option<&Progress>,
) -> Result<RebaseOutcome> {
    crate::name::validate("rebase.name", &options.name)?;
    let info = crate::drift::engine::stage_info_of(production, stage).await?;
    let staged = info.stage().expect("checked by stage_info_of");
    let user = inventory::user_change_sets(&staged.change_sets);
    let total = user.len() as u64 + 3;
    let subject = format!("{} -> {}", stage.name(), options.name);
    emit(progress, "rebase", &subject, "checking conflicts", 0, total);
    let found = conflicts(production, &staged.baseline, &user, &staged.change_sets, &options.inventory).await?;
    if !found.is_empty() {
        emit(progress, "rebase", &subject, "conflict", total, total);
        return Ok(RebaseOutcome::Conflict(ConflictReport {
            stage: stage.name().into(),
            production: production.name().into(),
            baseline: staged.baseline.id.clone(),
            conflicts: found,
        }));
    }
    let (baseline, inv) = inventory::take_baseline(production, &options.inventory, progress).await?;
    emit(progress, "rebase", &subject, "baseline taken", 1, total);
    let opts = StageOptions {
        name: options.name.clone(),
        clone: options.clone.unwrap_or(staged.clone),
        fenced: staged.fenced,
        name_prefix: None,
        start: false,
    };
    let new = inventory::stage(backend, &baseline, &inv, &opts).await?;
    emit(progress, "rebase", &subject, "stage created", 2, total);
    let result = reapply(stage, &*new, &user, &options.inventory, progress, &subject, total).await;
    match result {
        Ok(applied) => {
            emit(progress, "rebase", &subject, "done", total, total);
            Ok(RebaseOutcome::Rebased { stage: new, baseline, applied })
        }
        Err(e) => {
            if let Err(d) = backend.destroy(&options.name).await {
                tracing::error!(stage = %options.name, error = %d, "destroying the half-rebased stage failed");
            }
            Err(e)
        }
    }
}

async fn reapply(
    old: &dyn Environment,
    new: &dyn Environment,
    change_sets: &[&ChangeSet],
    config: &InventoryConfig,
    progress: Option<&Progress>,
    subject: &str,
    total: u64,
) -> Result<Vec<String>> {
    let guest: Vec<String> = change_sets.iter().flat_map(|cs| inventory::guest_machines(cs)).collect();
    let old_ran = old.status().await?.iter().any(|s| s.power == PowerState::Running);
    if !guest.is_empty() || old_ran {
        new.start().await?;
        if let Some(g) = new.guest() {
            for m in &guest {
                g.wait_ready(m, crate::guest::AGENT_READY).await?;
            }
        }
    }
    let mut applied = Vec::new();
    for (i, cs) in change_sets.iter().enumerate() {
        inventory::apply_change_set(new, cs, config).await.map_err(|e| {
            Error::Precondition(format!("re-applying ChangeSet {} to {} failed: {e}", cs.id, new.name()))
        })?;
        applied.push(cs.id.clone());
        emit(progress, "rebase", subject, &format!("applied {}", cs.id), 3 + i as u64, total);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ProgressEvent;
    use crate::memory::{MemoryBackend, sample_spec};
    use crate::promotion::{PreconditionPolicy, Promotion, PromotionEngine, PromotionRequest, Strategy};

    fn drain(rx: &mut tokio::sync::mpsc::UnboundedReceiver<ProgressEvent>) -> Vec<ProgressEvent> {
        let mut out = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            out.push(ev);
        }
        out
    }

    #[tokio::test]
    async fn rebase_and_promotion_report_progress() {
        let backend = std::sync::Arc::new(MemoryBackend::new());
        let prod = backend.create(&sample_spec("prod")).await.unwrap();
        prod.start().await.unwrap();
        let (b, inv) = inventory::take_baseline(&*prod, &InventoryConfig::default(), None).await.unwrap();
        let stage = inventory::stage(&*backend, &b, &inv, &StageOptions::linked("try")).await.unwrap();
        stage.start().await.unwrap();
        let cs = ChangeSet {
            id: "cs-1".into(),
            description: String::new(),
            changes: vec![
                Change::SetVcpus { machine: "web".into(), vcpus: 2 },
                Change::GuestCommand {
                    machine: "web".into(),
                    command: vec![
                        "stagecore-sim".into(),
                        "pkg".into(),
                        "install".into(),
                        "nginx".into(),
                        "1.24".into(),
                    ],
                    timeout_secs: None,
                },
            ],
        };
        inventory::apply_change_set(&*stage, &cs, &InventoryConfig::default()).await.unwrap();
        let (progress, mut rx) = Progress::channel();
        let out = rebase(&*backend, &*prod, &*stage, &RebaseOptions::new("try-2"), Some(&progress)).await.unwrap();
        let RebaseOutcome::Rebased { stage: new, .. } = out else { panic!("conflict: {out:?}") };
        let steps: Vec<String> =
            drain(&mut rx).into_iter().filter(|e| e.operation == "rebase").map(|e| e.step).collect();
        assert_eq!(steps, ["checking conflicts", "baseline taken", "stage created", "applied cs-1", "done"]);

        let dir = tempfile::tempdir().unwrap();
        let engine = PromotionEngine::new(dir.path(), backend.clone()).unwrap().with_progress(progress);
        let receipt = engine
            .promote(PromotionRequest {
                production: prod.clone(),
                stage: new.clone(),
                strategy: Strategy::Replay,
                policy: PreconditionPolicy::Anywhere,
                requested_by: "test".into(),
                gates: Vec::new(),
            })
            .await
            .unwrap();
        assert_eq!(receipt.outcome, crate::promotion::Outcome::Committed, "{receipt:#?}");
        let events = drain(&mut rx);
        let steps: Vec<&str> = events.iter().filter(|e| e.operation == "promotion").map(|e| e.step.as_str()).collect();
        assert_eq!(steps, ["precondition", "snapshot", "apply", "verify", "commit"]);
        assert!(events.iter().any(|e| e.operation == "inventory"), "the precondition's inventories report too");
        assert_eq!(prod.spec().await.unwrap().machine("web").unwrap().vcpus, 2);
    }
}
