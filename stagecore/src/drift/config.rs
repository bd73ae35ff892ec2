//! The config layer: normalise specs into name-keyed JSON trees and diff them three ways
//! (baseline, production, stage).
//!
//! Normalisation keys every list of named things (machines, disks, NICs, networks) by name, so a
//! reordering is not drift, and drops what a stage must differ in: machine UUIDs, NIC MACs and disk
//! sources (the disk layer compares data; the source is backend bookkeeping that changes with every
//! baseline and overlay). Production's own UUID/MAC changes since the baseline are still reported,
//! from a separate comparison of production against the baseline.

use serde_json::{Map, Value};

use crate::EnvironmentSpec;
use crate::drift::report::{ConfigRecord, RecordKind, Side};

/// Fields a stage must differ in, relative to the object that holds them.
const IDENTITY_FIELDS: &[&str] = &["uuid", "mac"];

/// A spec as a name-keyed JSON tree. `identity` keeps UUIDs and MACs.
pub(crate) fn normalise(spec: &EnvironmentSpec, identity: bool) -> Value {
    let raw = serde_json::to_value(spec).expect("a spec always serialises");
    let mut root = key_lists(raw);
    if let Some(obj) = root.as_object_mut() {
        obj.remove("name");
    }
    strip(&mut root, identity);
    root
}

fn key_lists(v: Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, key_lists(v))).collect()),
        Value::Array(items) if items.iter().all(|i| i.get("name").and_then(Value::as_str).is_some()) => {
            let mut keyed = Map::new();
            for item in items {
                let name = item["name"].as_str().unwrap_or_default().to_string();
                let mut item = key_lists(item);
                if let Some(o) = item.as_object_mut() {
                    o.remove("name");
                }
                keyed.insert(name, item);
            }
            Value::Object(keyed)
        }
        Value::Array(items) => Value::Array(items.into_iter().map(key_lists).collect()),
        other => other,
    }
}

fn strip(v: &mut Value, identity: bool) {
    if let Value::Object(map) = v {
        map.remove("source");
        if !identity {
            for f in IDENTITY_FIELDS {
                map.remove(*f);
            }
        }
        for child in map.values_mut() {
            strip(child, identity);
        }
    }
}

/// The value at a JSON pointer (`/machines/app/memory_mib`), `Null` when absent.
pub(crate) fn at(v: &Value, path: &str) -> Value {
    v.pointer(path).cloned().unwrap_or(Value::Null)
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The machine a path lies under.
pub(crate) fn machine_of(path: &str) -> Option<String> {
    let mut parts = path.trim_start_matches('/').split('/');
    (parts.next() == Some("machines")).then(|| parts.next().map(|m| m.replace("~1", "/").replace("~0", "~")))?
}

/// Paths where production and stage differ, at the highest node that differs as a whole.
pub(crate) fn differences(production: &Value, stage: &Value) -> Vec<(String, RecordKind)> {
    let mut out = Vec::new();
    walk("", Some(production), Some(stage), &mut out);
    out
}

fn walk(path: &str, p: Option<&Value>, s: Option<&Value>, out: &mut Vec<(String, RecordKind)>) {
    match (p, s) {
        (Some(a), Some(b)) if a == b => {}
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                walk(&format!("{path}/{}", escape(k)), a.get(k), b.get(k), out);
            }
        }
        (Some(_), Some(_)) => out.push((path.to_string(), RecordKind::NotEqual)),
        (None, Some(_)) => out.push((path.to_string(), RecordKind::Add)),
        (Some(_), None) => out.push((path.to_string(), RecordKind::Remove)),
        (None, None) => {}
    }
}

/// Number of leaf values in a tree (the denominator of the config score).
pub(crate) fn leaves(v: &Value) -> usize {
    match v {
        Value::Object(m) if !m.is_empty() => m.values().map(leaves).sum(),
        _ => 1,
    }
}

/// Builds the config records for (baseline, production, stage) specs. `intended` tells whether a
/// path is explained by the stage's ChangeSets.
pub(crate) fn records(
    baseline: &EnvironmentSpec,
    production: &EnvironmentSpec,
    stage: &EnvironmentSpec,
    intended: impl Fn(&str) -> bool,
) -> (Vec<ConfigRecord>, usize) {
    let (b, p, s) = (normalise(baseline, false), normalise(production, false), normalise(stage, false));
    let mut out = Vec::new();
    for (path, kind) in differences(&p, &s) {
        let (bv, pv, sv) = (at(&b, &path), at(&p, &path), at(&s, &path));
        let side = match (pv != bv, sv != bv) {
            (true, true) => Side::Both,
            (true, false) => Side::Production,
            _ => Side::Stage,
        };
        let intended = side == Side::Stage && intended(&path);
        out.push(ConfigRecord {
            machine: machine_of(&path),
            path,
            kind,
            expected: pv,
            actual: sv,
            baseline: bv,
            side,
            intended,
        });
    }
    // Production's own identity fields that moved since the baseline.
    let (bi, pi) = (normalise(baseline, true), normalise(production, true));
    for (path, kind) in differences(&bi, &pi) {
        let last = path.rsplit('/').next().unwrap_or_default();
        if IDENTITY_FIELDS.contains(&last) && !at(&bi, &path).is_null() && !at(&pi, &path).is_null() {
            out.push(ConfigRecord {
                machine: machine_of(&path),
                expected: at(&pi, &path),
                actual: Value::Null,
                baseline: at(&bi, &path),
                path,
                kind,
                side: Side::Production,
                intended: false,
            });
        }
    }
    let compared = leaves(&p).max(leaves(&s)).max(1);
    (out, compared)
}
