//! The **stage**: a production-like copy of a production environment. [`StageOptions`] say how
//! to clone one, [`StageInfo`] is what a stage knows about where it came from, [`Role`] tells a
//! stage from a production. The algorithm that makes a stage lives in [`crate::toolbox::StagePlan`].

use serde::{Deserialize, Serialize};

use crate::{Baseline, ChangeSet};

/// Whether an environment is a production or a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Role {
    /// A production environment (created from a spec or attached to existing machines).
    Production,
    /// A stage cloned from a production.
    Stage(Box<StageInfo>),
}

/// What a stage knows about where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageInfo {
    /// The production environment it was cloned from.
    pub source: String,
    /// The baseline it was cloned from.
    pub baseline: Baseline,
    /// Linked or full.
    pub clone: CloneKind,
    /// Whether the stage is fenced.
    pub fenced: bool,
    /// The ChangeSets applied to the stage, in order.
    #[serde(default)]
    pub change_sets: Vec<ChangeSet>,
}

impl StageInfo {
    /// The stage information of a fresh stage cloned from `baseline` with `options` (no ChangeSets yet).
    pub fn new(baseline: &Baseline, options: &StageOptions) -> Self {
        StageInfo {
            source: baseline.environment.clone(),
            baseline: baseline.clone(),
            clone: options.clone,
            fenced: options.fenced,
            change_sets: Vec::new(),
        }
    }
}

/// Linked or full clone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloneKind {
    /// Copy-on-write over the baseline layer: near-instant, shares production's frozen data.
    #[default]
    Linked,
    /// An independent copy of the allocated data.
    Full,
}

/// How to create a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageOptions {
    /// The stage environment's name.
    pub name: String,
    /// Linked or full clone.
    #[serde(default)]
    pub clone: CloneKind,
    /// Fence the stage: its machines reach each other at production's addresses but nothing else.
    #[serde(default = "yes")]
    pub fenced: bool,
    /// Prefix of the stage machines' hypervisor-level names; defaults to `"{name}-"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_prefix: Option<String>,
    /// Start the stage's machines once cloned.
    #[serde(default)]
    pub start: bool,
}

fn yes() -> bool {
    true
}

impl StageOptions {
    /// A linked, fenced, not-started stage called `name`.
    pub fn linked(name: impl Into<String>) -> Self {
        StageOptions { name: name.into(), clone: CloneKind::Linked, fenced: true, name_prefix: None, start: false }
    }

    /// A full, fenced, not-started stage called `name`.
    pub fn full(name: impl Into<String>) -> Self {
        StageOptions { clone: CloneKind::Full, ..Self::linked(name) }
    }

    /// The prefix of hypervisor-level names (`name_prefix`, or `"{name}-"`).
    pub fn prefix(&self) -> String {
        self.name_prefix.clone().unwrap_or_else(|| format!("{}-", self.name))
    }

    /// Checks the options; errors name the field (`stage.name`, `stage.name_prefix`).
    pub fn validate(&self) -> crate::Result<()> {
        crate::name::validate("stage.name", &self.name)?;
        let probe = format!("{}x", self.prefix());
        crate::name::check(&probe).map_err(|r| crate::Error::invalid("stage.name_prefix", format!("prefix {r}")))
    }
}
