//! Our own `<metadata>` element (namespace [`NS`]): environment membership, role, stage info,
//! snapshots and labels of one domain.
//!
//! ```xml
//! <metadata>
//!   <stage:env xmlns:stage="https://stagecore.dev/xmlns/stage/1">
//!     <stage:label key="tier">web</stage:label>
//!     <stage:record>{ JSON of MachineRecord }</stage:record>
//!   </stage:env>
//! </metadata>
//! ```
//! Labels may be written by people (for [`stagecore::Selector::Label`]); the record is written by
//! this crate only, on domains it defines (created productions and stages).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use stagecore::{Result, Role, SnapshotInfo};

use super::tree::{Element, Node};

/// The XML namespace of our metadata.
pub(crate) const NS: &str = "https://stagecore.dev/xmlns/stage/1";
/// The prefix we write it with.
pub(crate) const PREFIX: &str = "stage";
/// The local name of our metadata element.
pub(crate) const KEY: &str = "env";

/// What this crate records about one domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MachineRecord {
    /// The environment the domain belongs to.
    pub(crate) environment: String,
    /// The machine's logical name.
    pub(crate) machine: String,
    /// Production or stage (with its StageInfo).
    pub(crate) role: Role,
    /// Logical network name → libvirt network name.
    #[serde(default)]
    pub(crate) networks: BTreeMap<String, String>,
    /// Logical network → CIDR, as the spec declared it.
    #[serde(default)]
    pub(crate) cidrs: BTreeMap<String, String>,
    /// The environment's labels (kept on every machine).
    #[serde(default)]
    pub(crate) env_labels: BTreeMap<String, String>,
    /// Networks this environment created (removed on destroy).
    #[serde(default)]
    pub(crate) owned_networks: Vec<String>,
    /// For a stage: logical disk → the layer holding the baseline's content in this stage's chain.
    #[serde(default)]
    pub(crate) origins: BTreeMap<String, String>,
    /// Whole-environment snapshots, oldest first.
    #[serde(default)]
    pub(crate) snapshots: Vec<SnapshotRecord>,
    /// Logical disk → the source the spec reports: the file as created, staged or attached. It
    /// stays put while baselines, snapshots and reverts put new overlays on top, so a spec (and a
    /// fingerprint) does not change when only the layering did.
    #[serde(default)]
    pub(crate) sources: BTreeMap<String, String>,
    /// The machines this one starts after (the spec's `after`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) after: Vec<String>,
    /// For a stage: the host-side chardev paths of production's definition that were changed
    /// (old path → the stage's own path, or "" when libvirt assigns a new socket).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) host_paths: BTreeMap<String, String>,
    /// For a stage: what of production's host-side files it could not own (devices dropped,
    /// NVRAM not copied), one sentence each ([`crate::hostfiles`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) host_notes: Vec<String>,
}

/// One snapshot as seen from one domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SnapshotRecord {
    /// The environment-level information.
    pub(crate) info: SnapshotInfo,
    /// Logical disk → frozen layer file.
    pub(crate) layers: BTreeMap<String, String>,
    /// The domain's inactive XML at that moment, without our metadata.
    pub(crate) xml: String,
}

/// Our `<stage:env>` element inside `<metadata>`, if present.
pub(crate) fn find(domain: &Element) -> Option<&Element> {
    domain.child("metadata")?.elements().find(|e| is_ours(e))
}

fn is_ours(e: &Element) -> bool {
    e.attrs.iter().any(|(k, v)| (k == "xmlns" || k.starts_with("xmlns:")) && v == NS)
}

fn prefix_of(e: &Element) -> String {
    e.name.split_once(':').map(|(p, _)| format!("{p}:")).unwrap_or_default()
}

/// Labels written in our metadata.
pub(crate) fn labels(domain: &Element) -> BTreeMap<String, String> {
    let Some(env) = find(domain) else { return BTreeMap::new() };
    let label = format!("{}label", prefix_of(env));
    env.elements().filter(|e| e.name == label).filter_map(|e| Some((e.attr("key")?.to_string(), e.text()))).collect()
}

/// The record, if this crate wrote one. A record that does not parse is an error naming the domain.
pub(crate) fn record(domain: &Element, what: &str) -> Result<Option<MachineRecord>> {
    let Some(env) = find(domain) else { return Ok(None) };
    let name = format!("{}record", prefix_of(env));
    let Some(rec) = env.elements().find(|e| e.name == name) else { return Ok(None) };
    serde_json::from_str(&rec.text())
        .map(Some)
        .map_err(|e| stagecore::Error::invalid(format!("domain {what} metadata"), format!("stagecore record: {e}")))
}

/// Builds our metadata element holding `labels` and `record`.
pub(crate) fn element(labels: &BTreeMap<String, String>, record: &MachineRecord) -> Result<Element> {
    build(&format!("{PREFIX}:"), labels, record).map(|mut env| {
        env.set_attr(&format!("xmlns:{PREFIX}"), NS);
        env
    })
}

/// The same without prefixes or namespace declaration, as `virDomainSetMetadata` wants it
/// (libvirt puts every element into the namespace under the key's prefix).
pub(crate) fn fragment(labels: &BTreeMap<String, String>, record: &MachineRecord) -> Result<Element> {
    build("", labels, record)
}

fn build(prefix: &str, labels: &BTreeMap<String, String>, record: &MachineRecord) -> Result<Element> {
    let mut env = Element::new(&format!("{prefix}{KEY}"));
    for (k, v) in labels {
        let mut l = Element::new(&format!("{prefix}label"));
        l.set_attr("key", k);
        l.set_text(v);
        env.children.push(Node::Element(l));
    }
    let mut rec = Element::new(&format!("{prefix}record"));
    rec.set_text(&serde_json::to_string(record).map_err(|e| crate::error::json("record", e))?);
    env.children.push(Node::Element(rec));
    Ok(env)
}

/// Replaces (or inserts) our metadata element in a domain tree.
pub(crate) fn set(domain: &mut Element, labels: &BTreeMap<String, String>, record: &MachineRecord) -> Result<()> {
    let el = element(labels, record)?;
    let meta = domain.child_or_insert("metadata");
    meta.remove_children(is_ours);
    meta.children.push(Node::Element(el));
    Ok(())
}

/// Removes our metadata element from a domain tree.
pub(crate) fn strip(domain: &mut Element) {
    if let Some(meta) = domain.child_mut("metadata") {
        meta.remove_children(is_ours);
    }
}
