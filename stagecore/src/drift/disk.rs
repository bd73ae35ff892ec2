//! The disk layer: compare each disk's changed extents since the baseline on both sides.

use std::collections::{BTreeMap, HashMap};

use crate::drift::report::{DiskRecord, DiskSide, Side, Status};
use crate::extent::{self, ChangeMap, DiskChanges, Extent};
use crate::{Baseline, ChangeSet, DiskScope};

/// What the recorded ChangeSets say a disk may have written.
#[derive(Default)]
struct Allowance {
    whole: bool,
    extents: Vec<Extent>,
}

fn allowances(change_sets: &[ChangeSet]) -> (BTreeMap<(String, String), Allowance>, Vec<String>) {
    let mut per_disk: BTreeMap<(String, String), Allowance> = BTreeMap::new();
    let mut machines = Vec::new();
    for change in change_sets.iter().flat_map(|cs| &cs.changes) {
        match change.disk_scope() {
            Some(DiskScope::Extents { machine, disk, extents }) => {
                per_disk.entry((machine, disk)).or_default().extents.extend(extents);
            }
            Some(DiskScope::WholeDisk { machine, disk }) => per_disk.entry((machine, disk)).or_default().whole = true,
            Some(DiskScope::Machine { machine }) => machines.push(machine),
            None => {}
        }
    }
    (per_disk, machines)
}

/// Disk records for every disk of the baseline. `production` / `stage` are the backends' reports
/// (an `Err` reason when the side could not report at all).
pub(crate) fn records(
    baseline: &Baseline,
    production: Result<Vec<DiskChanges>, String>,
    stage: Result<Vec<DiskChanges>, String>,
    change_sets: &[ChangeSet],
) -> Vec<DiskRecord> {
    let (allow, guest_machines) = allowances(change_sets);
    // Index each side's reports once (a report is consumed: its extents move into the record).
    type Reports = Result<HashMap<(String, String), DiskChanges>, String>;
    let index = |side: Result<Vec<DiskChanges>, String>| -> Reports {
        side.map(|list| list.into_iter().map(|c| ((c.machine.clone(), c.disk.clone()), c)).collect())
    };
    let (mut production, mut stage) = (index(production), index(stage));
    let take = |side: &mut Reports, m: &str, d: &str| -> Result<(u64, u64, ChangeMap), String> {
        let map = side.as_mut().map_err(|e| e.clone())?;
        map.remove(&(m.to_string(), d.to_string()))
            .map(|c| (c.virtual_size, c.granularity, c.changes))
            .ok_or_else(|| format!("no change report for {m}/{d}"))
    };
    let mut out = Vec::with_capacity(baseline.spec.machines.iter().map(|m| m.disks.len()).sum());
    for m in &baseline.spec.machines {
        for d in &m.disks {
            let p = take(&mut production, &m.name, &d.name);
            let s = take(&mut stage, &m.name, &d.name);
            out.push(record(&m.name, &d.name, d.size_bytes, p, s, &allow, &guest_machines));
        }
    }
    out
}

fn record(
    machine: &str,
    disk: &str,
    size_hint: Option<u64>,
    production: Result<(u64, u64, ChangeMap), String>,
    stage: Result<(u64, u64, ChangeMap), String>,
    allow: &BTreeMap<(String, String), Allowance>,
    guest_machines: &[String],
) -> DiskRecord {
    let size = [&production, &stage].iter().find_map(|r| r.as_ref().ok().map(|(s, _, _)| *s)).or(size_hint);
    let granularity = stage.as_ref().map(|(_, g, _)| *g).unwrap_or(1);
    let mut rec = DiskRecord {
        machine: machine.into(),
        disk: disk.into(),
        virtual_size: size.unwrap_or(0),
        status: Status::NotChecked,
        reason: None,
        production: DiskSide::default(),
        stage: DiskSide::default(),
        intended_bytes: 0,
        overlap_bytes: 0,
        drifted_bytes: 0,
        side: None,
        intended: false,
    };
    let checked = |r: Result<(u64, u64, ChangeMap), String>, side: &str| match r {
        Ok((_, _, ChangeMap::Checked { extents })) => Ok(extent::normalize(extents)),
        Ok((_, _, ChangeMap::NotChecked { reason })) | Err(reason) => Err(format!("{side}: {reason}")),
    };
    let (pe, se) = match (checked(production, "production"), checked(stage, "stage")) {
        (Ok(p), Ok(s)) => (p, s),
        (Err(a), Err(b)) => {
            rec.reason = Some(format!("{a}; {b}"));
            return rec;
        }
        (Err(r), _) | (_, Err(r)) => {
            rec.reason = Some(r);
            return rec;
        }
    };
    let allowance = if allow.is_empty() { None } else { allow.get(&(machine.to_string(), disk.to_string())) };
    let allowed_all = guest_machines.iter().any(|g| g == machine) || allowance.is_some_and(|a| a.whole);
    let allowed = allowance
        .map(|a| extent::align(&extent::normalize(a.extents.clone()), granularity, rec.virtual_size))
        .unwrap_or_default();
    let stage_unintended = if allowed_all {
        Vec::new()
    } else if allowed.is_empty() {
        se.clone()
    } else {
        extent::subtract(&se, &allowed)
    };
    let (p_bytes, s_bytes) = (extent::total(&pe), extent::total(&se));
    rec.intended_bytes = s_bytes - extent::total(&stage_unintended);
    rec.overlap_bytes = if pe.is_empty() || se.is_empty() { 0 } else { extent::total(&extent::intersect(&pe, &se)) };
    rec.drifted_bytes = if pe.is_empty() {
        extent::total(&stage_unintended)
    } else {
        extent::total(&extent::union(&pe, &stage_unintended))
    };
    rec.side = match (pe.is_empty(), se.is_empty()) {
        (false, false) => Some(Side::Both),
        (false, true) => Some(Side::Production),
        (true, false) => Some(Side::Stage),
        (true, true) => None,
    };
    rec.intended = pe.is_empty() && !se.is_empty() && stage_unintended.is_empty();
    rec.status = if rec.drifted_bytes == 0 { Status::InSync } else { Status::Drifted };
    rec.production = DiskSide { bytes: p_bytes, extents: pe };
    rec.stage = DiskSide { bytes: s_bytes, extents: se };
    rec
}
