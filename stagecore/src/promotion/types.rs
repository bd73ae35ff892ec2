//! Promotion requests, gates, receipts.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::drift::DriftReport;
use crate::{ChangeSet, Environment, Result};

/// How a tested change reaches production.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Apply the stage's ChangeSets to production, then verify production matches the stage.
    #[default]
    Replay,
    /// The stage's machines take over production's identity; old production is kept stopped.
    Swap,
}

/// What "production has not drifted from the baseline" means for the precondition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreconditionPolicy {
    /// Production must not have moved anywhere since the baseline.
    #[default]
    Anywhere,
    /// Production must not have moved where the ChangeSets touch (same config paths, same machines' disks).
    Touched,
}

/// What a gate is shown.
#[derive(Debug)]
pub struct GateContext<'a> {
    /// Production (already changed, before commit).
    pub production: &'a dyn Environment,
    /// The stage.
    pub stage: &'a dyn Environment,
    /// The drift report accepted before the promotion.
    pub drift: &'a DriftReport,
    /// The ChangeSets being promoted.
    pub change_sets: &'a [ChangeSet],
}

/// A gate's decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateVerdict {
    /// Whether the promotion may commit.
    pub passed: bool,
    /// Who approved or refused (for approval gates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// A note for the receipt.
    #[serde(default)]
    pub note: String,
}

/// A check run after production was changed and before the promotion commits: a health probe,
/// an approval callback. A failed (or erroring) gate rolls the promotion back.
#[async_trait]
pub trait Gate: Send + Sync + Debug {
    /// The gate's name, for the receipt.
    fn name(&self) -> &str;
    /// Decides.
    async fn check(&self, ctx: &GateContext<'_>) -> Result<GateVerdict>;
}

/// A request to promote a stage's tested ChangeSets into production.
#[derive(Debug, Clone)]
pub struct PromotionRequest {
    /// Production.
    pub production: Arc<dyn Environment>,
    /// The stage whose ChangeSets are promoted.
    pub stage: Arc<dyn Environment>,
    /// Replay or swap.
    pub strategy: Strategy,
    /// Precondition policy.
    pub policy: PreconditionPolicy,
    /// Who asked for it.
    pub requested_by: String,
    /// Gates run before commit, in order.
    pub gates: Vec<Arc<dyn Gate>>,
}

/// An approval recorded in a receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// The gate that approved.
    pub gate: String,
    /// Who approved.
    pub by: Option<String>,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The gate's note.
    pub note: String,
}

/// One step of a promotion, as recorded in the receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step's name (`lock`, `precondition`, `snapshot`, `apply`, `verify`, `gate:<name>`, `commit`, `rollback`).
    pub step: String,
    /// When it started.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// How long it took, in milliseconds.
    pub millis: u64,
    /// `ok`, or what went wrong.
    pub outcome: String,
}

/// How a promotion ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Production now carries the change.
    Committed,
    /// Production was returned to its pre-promotion state.
    RolledBack {
        /// Why.
        reason: String,
    },
    /// Refused before production was touched (precondition, lock).
    Refused {
        /// Why.
        reason: String,
    },
}

/// The record of a promotion: the plan, the accepted drift report, approvals, steps, outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    /// Promotion id.
    pub id: String,
    /// Production.
    pub production: String,
    /// Stage.
    pub stage: String,
    /// Strategy.
    pub strategy: Strategy,
    /// Precondition policy.
    pub policy: PreconditionPolicy,
    /// Who asked.
    pub requested_by: String,
    /// The ChangeSets promoted.
    pub change_sets: Vec<ChangeSet>,
    /// The drift report accepted at the start.
    pub drift: Option<DriftReport>,
    /// Approvals given by gates.
    pub approvals: Vec<Approval>,
    /// Steps with timings.
    pub steps: Vec<StepRecord>,
    /// How it ended.
    pub outcome: Outcome,
    /// Start.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// End.
    #[serde(with = "time::serde::rfc3339")]
    pub finished_at: OffsetDateTime,
    /// Whether this receipt was completed by recovery after a crash.
    #[serde(default)]
    pub recovered: bool,
}

/// Carries a tested ChangeSet into production safely.
///
/// # Contract
/// - One promotion per production at a time; a second gets [`crate::Error::Locked`] naming the holder.
/// - The precondition is checked before production is touched.
/// - Every step is journalled before it happens; a promotion ends fully applied or fully rolled
///   back, even if the process dies at any step (recovery runs on the next open).
#[async_trait]
pub trait Promotion: Send + Sync + Debug {
    /// Runs a promotion to its end and returns its receipt (also for rolled-back ones). Errors are
    /// returned only when no promotion started (bad request, lock held).
    async fn promote(&self, request: PromotionRequest) -> Result<Receipt>;
    /// The receipts kept so far (the audit archive), oldest first.
    async fn receipts(&self) -> Result<Vec<Receipt>>;
}
