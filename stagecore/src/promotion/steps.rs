//! The steps of a promotion between lock and finish: precondition, snapshot, apply (replay or
//! swap), verify, commit and rollback. Each writes its journal line through [`Run::log`] before it
//! acts. Commit and rollback are idempotent, so recovery can run them again after a crash.

use std::collections::BTreeSet;

use super::journal::{JournalStep, Plan};
use super::run::{Halt, Run, Timer};
use super::types::{PreconditionPolicy, Strategy};
use crate::drift::{Drift, DriftEngine, DriftReport, Side, config_differences};
use crate::inventory::{self, InventoryConfig, MachineInventory};
use crate::{Backend, Change, Environment, EnvironmentSpec, Result};

/// Whether two config paths overlap (equal, or one lies below the other).
pub(crate) fn related(a: &str, b: &str) -> bool {
    a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/"))
}

/// Why the precondition refuses a promotion, with the drift report if one was made.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) reason: String,
    pub(crate) drift: Option<DriftReport>,
}

/// Checks that production has not moved where the policy looks (see `docs/promotion.md`), and for
/// replay that the ChangeSets apply to production and carry everything the stage changed.
pub(crate) async fn precondition(
    plan: &Plan,
    engine: &DriftEngine,
    production: &dyn Environment,
    stage: &dyn Environment,
) -> std::result::Result<(DriftReport, String), Refusal> {
    let report = engine
        .drift(production, stage)
        .await
        .map_err(|e| Refusal { reason: format!("the drift report failed: {e}"), drift: None })?;
    let judged = guest_judged(&report, stage).await;
    let mut problems = failures(&report, plan, &judged);
    if plan.strategy == Strategy::Replay {
        let mut scratch = plan.production_spec.clone();
        for (i, change) in plan.changes().enumerate() {
            if let Err(e) = change.apply_to_spec(&mut scratch, i) {
                problems.push(format!("changes[{i}] ({}) does not apply to production: {e}", change.kind()));
                break;
            }
        }
    }
    if problems.is_empty() {
        let note = unchecked_note(&report, &judged);
        Ok((report, note))
    } else {
        let reason = format!("production {} cannot take the change: {}", plan.production, problems.join("; "));
        Err(Refusal { reason, drift: Some(report) })
    }
}

/// The machines whose movement in production is judged by their guest layer rather than by raw
/// disk bytes ([`crate::drift::guest_judged`], the same rule that makes the drift report's disk
/// records of those machines INFORMATIONAL). Their disk bytes are only reported.
async fn guest_judged(report: &DriftReport, stage: &dyn Environment) -> BTreeSet<String> {
    let Ok(info) = stage.info().await else { return BTreeSet::new() };
    let Some(staged) = info.stage() else { return BTreeSet::new() };
    crate::drift::guest_judged(staged, report.machines.iter().map(|m| (m.machine.as_str(), m.guest)))
}

fn failures(report: &DriftReport, plan: &Plan, guest_judged: &BTreeSet<String>) -> Vec<String> {
    // Swap replaces every machine, so everything is "touched".
    let everywhere = plan.policy == PreconditionPolicy::Anywhere || plan.strategy == Strategy::Swap;
    let paths: Vec<String> = plan.changes().flat_map(Change::config_paths).collect();
    let machines: BTreeSet<&str> = plan.changes().map(Change::machine).collect();
    let mut out = Vec::new();
    for r in &report.config.records {
        let production_moved = matches!(r.side, Side::Production | Side::Both);
        if production_moved && (everywhere || paths.iter().any(|p| related(p, &r.path))) {
            out.push(format!(
                "config {} changed in production since the baseline ({} -> {})",
                r.path, r.baseline, r.expected
            ));
        } else if plan.strategy == Strategy::Replay && matches!(r.side, Side::Stage | Side::Both) && !r.intended {
            out.push(format!(
                "config {} changed on the stage outside its recorded ChangeSets (replay cannot carry it)",
                r.path
            ));
        }
    }
    let footprint = inventory::combined_footprint(&plan.change_sets);
    let fp_machines: BTreeSet<&str> = footprint.keys().map(|(m, _)| m.as_str()).collect();
    let guest_machines: BTreeSet<String> = plan.change_sets.iter().flat_map(inventory::guest_machines).collect();
    for r in &report.guest.records {
        let touched = footprint.contains_key(&(r.machine.clone(), r.path.clone()))
            || (guest_machines.contains(&r.machine) && !fp_machines.contains(r.machine.as_str()));
        if matches!(r.side, Some(Side::Production | Side::Both)) && (everywhere || touched) {
            out.push(format!(
                "guest {} changed in production since the baseline ({} -> {})",
                r.path, r.baseline, r.expected
            ));
        } else if plan.strategy == Strategy::Replay && r.side == Some(Side::Stage) && !r.intended {
            out.push(format!(
                "guest {} changed on the stage outside its recorded ChangeSets (replay cannot carry it)",
                r.path
            ));
        }
    }
    for d in &report.disk.records {
        if guest_judged.contains(&d.machine) {
            continue;
        }
        if d.production.bytes > 0 && (everywhere || machines.contains(d.machine.as_str())) {
            out.push(format!(
                "disk {}/{}: {} bytes written in production since the baseline",
                d.machine, d.disk, d.production.bytes
            ));
        }
    }
    out
}

/// A summary of what the precondition could not check, and of the disk bytes it judged by guest
/// layers, for the step's outcome.
pub(crate) fn unchecked_note(report: &DriftReport, guest_judged: &BTreeSet<String>) -> String {
    let mut note = match &report.disk.reason {
        Some(reason) => format!("ok: disk layer not fully checked: {reason}"),
        None => "ok".to_string(),
    };
    let live: Vec<String> = report
        .disk
        .records
        .iter()
        .filter(|d| d.production.bytes > 0 && guest_judged.contains(&d.machine))
        .map(|d| format!("{}/{} {} B", d.machine, d.disk, d.production.bytes))
        .collect();
    if !live.is_empty() {
        note.push_str(&format!(
            "; written by running guests since the baseline, judged by their guest layers: {}",
            live.join(", ")
        ));
    }
    note
}

/// Replay: applies every change of the ChangeSets, journalling each index first.
pub(crate) async fn replay(run: &mut Run, production: &dyn Environment) -> Result<(), Halt> {
    let changes: Vec<Change> = run.plan.changes().cloned().collect();
    for (i, change) in changes.iter().enumerate() {
        run.log(JournalStep::Apply { change: i, kind: change.kind().into() }).await?;
        production.apply(change).await.map_err(|e| {
            Halt::Failed(format!("applying changes[{i}] ({} on {}) failed: {e}", change.kind(), change.machine()))
        })?;
    }
    Ok(())
}

/// Swap: the stage's machines take production's identity; production is restarted if it ran.
pub(crate) async fn swap(run: &mut Run, backend: &dyn Backend, production: &dyn Environment) -> Result<(), Halt> {
    run.log(JournalStep::Swap).await?;
    backend.swap(&run.plan.production, &run.plan.stage).await?;
    if run.plan.production_running {
        production.start().await?;
    }
    Ok(())
}

/// Verifies production against the stage as it was when the promotion started; returns a note.
pub(crate) async fn verify(
    plan: &Plan,
    drift: Option<&DriftReport>,
    production: &dyn Environment,
    inventory: &InventoryConfig,
) -> Result<String, Halt> {
    let now = production.spec().await?;
    // Production-side drift the policy accepted (replay, policy `touched`) may remain.
    let accepted: Vec<&str> = match (plan.strategy, drift) {
        (Strategy::Replay, Some(d)) => {
            d.config.records.iter().filter(|r| r.side == Side::Production).map(|r| r.path.as_str()).collect()
        }
        _ => Vec::new(),
    };
    let diffs: Vec<String> = config_differences(&now, &plan.stage_spec)
        .into_iter()
        .filter(|d| !accepted.iter().any(|a| related(a, d)))
        .collect();
    if !diffs.is_empty() {
        return Err(Halt::Failed(format!(
            "production does not match the stage after the {:?} at {}",
            plan.strategy,
            diffs.join(", ")
        )));
    }
    match plan.strategy {
        Strategy::Replay => {
            let writes = verify_writes(plan, &now, production).await?;
            match verify_footprint(plan, production, inventory).await? {
                Some(note) => Ok(format!("{writes}; {note}")),
                None => Ok(writes),
            }
        }
        Strategy::Swap => verify_identity(plan, &now),
    }
}

/// Replay: production's guests must now show the footprint the ChangeSets left on the stage —
/// every item at the value the stage's change gave it. `None` when there is no footprint.
async fn verify_footprint(
    plan: &Plan,
    production: &dyn Environment,
    config: &InventoryConfig,
) -> Result<Option<String>, Halt> {
    let footprint = inventory::combined_footprint(&plan.change_sets);
    let expected: Vec<_> = footprint.iter().filter(|(_, d)| d.before != d.after).collect();
    if expected.is_empty() {
        return Ok(None);
    }
    let machines: Vec<String> =
        expected.iter().map(|((m, _), _)| m.clone()).collect::<BTreeSet<_>>().into_iter().collect();
    let collected = inventory::collect(production, Some(&machines), config, None).await?;
    let mut wrong = Vec::new();
    for m in &machines {
        let inv = match collected.get(m) {
            Some(MachineInventory::Collected { inventory }) => inventory,
            other => {
                let why = other.and_then(MachineInventory::reason).unwrap_or("not collected");
                return Err(Halt::Failed(format!("cannot verify the guest footprint on {m}: {why}")));
            }
        };
        let items: std::collections::BTreeMap<String, serde_json::Value> =
            inventory::items(inv).into_iter().map(|((c, i), v)| (inventory::item_path(m, c, &i), v)).collect();
        for ((_, path), d) in expected.iter().filter(|((fm, _), _)| fm == m) {
            let got = items.get(path).cloned().unwrap_or(serde_json::Value::Null);
            if got != d.after {
                wrong.push(format!("{path}: production has {got}, the stage's change gave {}", d.after));
            }
        }
    }
    if wrong.is_empty() {
        Ok(Some(format!("guest footprint verified ({} items)", expected.len())))
    } else {
        Err(Halt::Failed(format!("production's guests do not show the stage's footprint: {}", wrong.join("; "))))
    }
}

async fn verify_writes(plan: &Plan, now: &EnvironmentSpec, production: &dyn Environment) -> Result<String, Halt> {
    let writes = expected_writes(plan, now);
    if writes.is_empty() {
        return Ok("ok: config matches the stage".into());
    }
    let Some(io) = production.disk_io() else {
        return Ok(format!("ok: config matches the stage; {} disk writes not read back (no disk_io)", writes.len()));
    };
    for (machine, disk, offset, expected) in &writes {
        let got = io.read(machine, disk, *offset, expected.len() as u64).await?;
        if &got != expected {
            return Err(Halt::Failed(format!(
                "disk {machine}/{disk}: bytes {offset}+{} read back differ from the ChangeSets' writes",
                expected.len()
            )));
        }
    }
    Ok(format!("ok: config matches the stage; {} disk writes read back", writes.len()))
}

/// The final bytes every `WriteDisk` range must hold after all changes: later writes overlaid,
/// ranges of disks later removed or replaced (or no longer present) left out.
fn expected_writes(plan: &Plan, now: &EnvironmentSpec) -> Vec<(String, String, u64, Vec<u8>)> {
    let changes: Vec<&Change> = plan.changes().collect();
    let mut out = Vec::new();
    for (i, c) in changes.iter().enumerate() {
        let Change::WriteDisk { machine, disk, offset, data } = c else { continue };
        let later = &changes[i + 1..];
        let same = |m: &str, d: &str| m == machine && d == disk;
        let superseded = later.iter().any(|l| match l {
            Change::RemoveDisk { machine: m, disk: d } | Change::ReplaceDiskImage { machine: m, disk: d, .. } => {
                same(m, d)
            }
            Change::AddDisk { machine: m, disk: spec } => same(m, &spec.name),
            _ => false,
        });
        if superseded || now.machine(machine).and_then(|m| m.disk(disk)).is_none() {
            continue;
        }
        let mut expected = data.clone();
        let end = offset + data.len() as u64;
        for l in later {
            if let Change::WriteDisk { machine: m, disk: d, offset: o, data: bytes } = l {
                let (lo, hi) = ((*o).max(*offset), (o + bytes.len() as u64).min(end));
                if same(m, d) && lo < hi {
                    let dst = (lo - offset) as usize..(hi - offset) as usize;
                    expected[dst].copy_from_slice(&bytes[(lo - o) as usize..(hi - o) as usize]);
                }
            }
        }
        out.push((machine.clone(), disk.clone(), *offset, expected));
    }
    out
}

fn verify_identity(plan: &Plan, now: &EnvironmentSpec) -> Result<String, Halt> {
    for before in &plan.production_spec.machines {
        let Some(after) = now.machine(&before.name) else { continue };
        for nic in &before.nics {
            let mac = after.nic(&nic.name).and_then(|n| n.mac.as_ref());
            if let (Some(old), Some(new)) = (nic.mac.as_ref(), mac)
                && old != new
            {
                return Err(Halt::Failed(format!(
                    "swap did not keep production's identity: {}/{} has MAC {new}, production had {old}",
                    before.name, nic.name
                )));
            }
        }
    }
    Ok("ok: config matches the stage; production's MACs kept".into())
}

async fn has_snapshot(env: &dyn Environment, name: &str) -> Result<bool> {
    Ok(env.list_snapshots().await?.iter().any(|s| s.name == name))
}

/// Commit: deletes the pre-promotion snapshot (if still there). Idempotent.
pub(crate) async fn commit(run: &mut Run, production: &dyn Environment) -> Result<(), Halt> {
    let t = Timer::start();
    run.log(JournalStep::Commit).await?;
    if has_snapshot(production, &run.plan.snapshot).await? {
        production.delete_snapshot(&run.plan.snapshot).await?;
    }
    let note = match planned_power(production, &run.plan).await? {
        power if power.is_empty() => "ok".to_string(),
        power => format!("ok; power as planned: {power}"),
    };
    run.done(t.record("commit", note), None, None).await
}

/// After a commit: production's machines at their planned power states — each machine as it was
/// before the promotion (a swap's machines by name). A no-op when they already are.
pub(crate) async fn planned_power(production: &dyn Environment, plan: &Plan) -> Result<String> {
    super::power::restore(production, &plan.production_power, plan.production_running).await
}

/// Whether production's machines are the stage's (swapped), judged by disk sources; `None` when
/// they match neither side.
fn swap_state(plan: &Plan, now: &EnvironmentSpec) -> Option<bool> {
    let sources = |s: &EnvironmentSpec| -> BTreeSet<String> {
        s.machines.iter().flat_map(|m| m.disks.iter().map(|d| d.source.clone())).collect()
    };
    let (now, p, s) = (sources(now), sources(&plan.production_spec), sources(&plan.stage_spec));
    if now == p {
        Some(false)
    } else if now == s {
        Some(true)
    } else {
        None
    }
}

/// Rollback: returns production to its pre-promotion state and deletes the snapshot. Idempotent:
/// each action checks whether it is still needed. Returns a note for the receipt.
pub(crate) async fn roll_back(
    run: &mut Run,
    reason: &str,
    backend: &dyn Backend,
    production: &dyn Environment,
) -> Result<String, Halt> {
    let t = Timer::start();
    run.log(JournalStep::Rollback { reason: reason.into() }).await?;
    let note = undo(run, backend, production).await.map_err(|e| match e {
        Halt::Failed(r) => Halt::Failed(format!("rollback failed: {r}")),
        crashed => crashed,
    })?;
    run.done(t.record("rollback", note.clone()), None, None).await?;
    Ok(note)
}

async fn undo(run: &Run, backend: &dyn Backend, production: &dyn Environment) -> Result<String, Halt> {
    let plan = &run.plan;
    let snapshot_left = has_snapshot(production, &plan.snapshot).await?;
    let mut note = match plan.strategy {
        Strategy::Replay if run.touched && snapshot_left => {
            production.revert_snapshot(&plan.snapshot).await?;
            format!("reverted production to {}", plan.snapshot)
        }
        Strategy::Replay if run.touched => "already reverted".to_string(),
        Strategy::Swap if run.swapped => {
            let note = match swap_state(plan, &production.spec().await?) {
                Some(true) => {
                    backend.swap(&plan.production, &plan.stage).await?;
                    "swapped back"
                }
                Some(false) => "not swapped (or already swapped back)",
                None => {
                    return Err(Halt::Failed(format!(
                        "cannot tell whether {} runs its own machines or {}'s: disk sources match neither",
                        plan.production, plan.stage
                    )));
                }
            };
            note.to_string()
        }
        _ => "production was not changed".to_string(),
    };
    // A killed config change, revert or swap may have left machines stopped (or started).
    let power = super::power::restore(production, &plan.production_power, plan.production_running).await?;
    if !power.is_empty() {
        note.push_str(&format!("; power restored: {power}"));
    }
    if snapshot_left {
        production.delete_snapshot(&plan.snapshot).await?;
        note.push_str("; pre-promotion snapshot deleted");
    }
    Ok(note)
}
