//! [`Run`]: one promotion in flight (or under recovery) — its plan, journal, production lock,
//! the steps recorded so far, and the crash-injection countdown.
//!
//! Every journal line goes through [`Run::log`], which also keeps the run's view of what has
//! happened (the same code replays an existing journal for recovery), and which "kills" the run
//! after the configured line: the journal and lock are closed as a dying process's would be, and
//! [`Halt::Crashed`] makes every caller return at once without cleanup.

use std::path::Path;
use std::time::Instant;

use time::OffsetDateTime;

use super::archive;
use super::fsutil::blocking;
use super::journal::{Journal, JournalEntry, JournalStep, Plan};
use super::lock::ProductionLock;
use super::types::{Approval, Outcome, Receipt, StepRecord};
use crate::drift::DriftReport;
use crate::{Error, Result};

/// Why a run stopped before its end.
#[derive(Debug)]
pub(crate) enum Halt {
    /// Crash injection: the "process" is dead; nothing may be cleaned up.
    Crashed(Error),
    /// A step failed; the reason goes to the receipt and decides refusal or rollback.
    Failed(String),
}

impl From<Error> for Halt {
    fn from(e: Error) -> Self {
        Halt::Failed(e.to_string())
    }
}

/// The start of a step, for its [`StepRecord`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timer {
    at: OffsetDateTime,
    start: Instant,
}

impl Timer {
    pub(crate) fn start() -> Self {
        Timer { at: OffsetDateTime::now_utc(), start: Instant::now() }
    }

    pub(crate) fn record(&self, step: &str, outcome: impl Into<String>) -> StepRecord {
        let millis = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        StepRecord { step: step.into(), started_at: self.at, millis, outcome: outcome.into() }
    }
}

/// One promotion in flight or under recovery.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) plan: Plan,
    journal: Journal,
    lock: Option<ProductionLock>,
    crash_after: Option<u64>,
    written: u64,
    crashed: bool,
    pub(crate) steps: Vec<StepRecord>,
    pub(crate) approvals: Vec<Approval>,
    pub(crate) drift: Option<DriftReport>,
    /// An `apply` or `swap` line was written: production may have been changed.
    pub(crate) touched: bool,
    /// A `swap` line was written.
    pub(crate) swapped: bool,
    /// The last decision line (`commit`, `refuse` or `rollback`).
    pub(crate) decision: Option<JournalStep>,
    /// The outcome of a `finished` line.
    pub(crate) finished: Option<Outcome>,
    /// What the last line said (`begin`, `apply changes[1] (write_disk)`, `verify done`).
    pub(crate) last: String,
    /// Recovery is finishing this run.
    pub(crate) recovered: bool,
}

impl Run {
    /// A new run whose journal has just been created (no lines yet).
    pub(crate) fn new(plan: Plan, journal: Journal, crash_after: Option<u64>) -> Self {
        Run {
            plan,
            journal,
            lock: None,
            crash_after,
            written: 0,
            crashed: false,
            steps: Vec::new(),
            approvals: Vec::new(),
            drift: None,
            touched: false,
            swapped: false,
            decision: None,
            finished: None,
            last: "none".into(),
            recovered: false,
        }
    }

    /// A run rebuilt from the journal of a dead promotion (its first line must be `begin`).
    pub(crate) fn resume(journal: Journal, entries: Vec<JournalEntry>, crash_after: Option<u64>) -> Result<Self> {
        let mut entries = entries.into_iter();
        let plan = match entries.next().map(|e| e.step) {
            Some(JournalStep::Begin { plan }) => *plan,
            other => {
                return Err(Error::invalid(
                    format!("journal of {}", journal.promotion()),
                    format!("the first line must be `begin`, found {:?}", other.map(|s| s.tag())),
                ));
            }
        };
        let mut run = Run::new(plan, journal, crash_after);
        run.last = "begin".into();
        for e in entries {
            run.observe(&e.step);
        }
        run.recovered = true;
        Ok(run)
    }

    fn observe(&mut self, step: &JournalStep) {
        match step {
            JournalStep::Apply { .. } => self.touched = true,
            JournalStep::Swap => (self.touched, self.swapped) = (true, true),
            JournalStep::Commit | JournalStep::Refuse { .. } | JournalStep::Rollback { .. } => {
                self.decision = Some(step.clone())
            }
            JournalStep::Done { record, drift, approval } => {
                self.steps.push(record.clone());
                if let Some(d) = drift {
                    self.drift = Some((**d).clone());
                }
                self.approvals.extend(approval.clone());
            }
            JournalStep::Finished { outcome } => self.finished = Some(outcome.clone()),
            _ => {}
        }
        self.last = match step {
            JournalStep::Done { record, .. } => format!("{} done", record.step),
            JournalStep::Apply { change, kind } => format!("apply changes[{change}] ({kind})"),
            JournalStep::Gate { name } => format!("gate:{name}"),
            other => other.tag().into(),
        };
    }

    fn crash_error(&self) -> Error {
        Error::backend_msg(
            "promotion",
            format!(
                "crash injected after journal line {} of promotion {}: the engine stopped as a killed process would",
                self.written, self.plan.id
            ),
        )
    }

    /// Writes a journal line (before the step it names), then stops dead if the crash point is here.
    pub(crate) async fn log(&mut self, step: JournalStep) -> Result<(), Halt> {
        if self.crashed {
            return Err(Halt::Crashed(self.crash_error()));
        }
        self.journal.append(step.clone()).await?;
        self.observe(&step);
        self.written += 1;
        if self.crash_after == Some(self.written) {
            self.crashed = true;
            tracing::warn!(promotion = %self.plan.id, line = self.written, "crash injected");
            self.abandon();
            return Err(Halt::Crashed(self.crash_error()));
        }
        Ok(())
    }

    /// Records a finished step in the journal (and so in the receipt).
    pub(crate) async fn done(
        &mut self,
        record: StepRecord,
        drift: Option<DriftReport>,
        approval: Option<Approval>,
    ) -> Result<(), Halt> {
        tracing::debug!(promotion = %self.plan.id, step = %record.step, outcome = %record.outcome, "step done");
        self.log(JournalStep::Done { record, drift: drift.map(Box::new), approval }).await
    }

    /// Whether the journal shows the production lock was taken (its `done` line).
    pub(crate) fn lock_recorded(&self) -> bool {
        self.steps.iter().any(|r| r.step == "lock")
    }

    /// Whether the last recorded step is `step` (its action finished).
    pub(crate) fn last_done_is(&self, step: &str) -> bool {
        self.steps.last().is_some_and(|r| r.step == step)
    }

    /// Holds the production lock for this run.
    pub(crate) fn hold(&mut self, lock: ProductionLock) {
        self.lock = Some(lock);
    }

    /// Whether this run holds the production lock.
    pub(crate) fn holds_lock(&self) -> bool {
        self.lock.is_some()
    }

    /// Closes journal and lock without touching them, as a dying process would: recovery takes over.
    pub(crate) fn abandon(&mut self) {
        self.journal.abandon();
        self.lock = None;
    }

    /// Discards a run that never got the lock: its journal is removed, nothing else happened.
    pub(crate) async fn discard(mut self) -> Result<()> {
        self.lock = None;
        self.journal.remove().await
    }

    /// The receipt as of now, with `outcome`.
    pub(crate) fn receipt(&self, outcome: Outcome) -> Receipt {
        let p = &self.plan;
        Receipt {
            id: p.id.clone(),
            production: p.production.clone(),
            stage: p.stage.clone(),
            strategy: p.strategy,
            policy: p.policy,
            requested_by: p.requested_by.clone(),
            change_sets: p.change_sets.clone(),
            drift: self.drift.clone(),
            approvals: self.approvals.clone(),
            steps: self.steps.clone(),
            outcome,
            started_at: p.started_at,
            finished_at: OffsetDateTime::now_utc(),
            recovered: self.recovered,
        }
    }

    /// Archives the receipt, writes `finished`, releases the lock and removes the journal.
    /// On failure the run is abandoned, so recovery redoes the finish.
    pub(crate) async fn finish(mut self, receipts: &Path, outcome: Outcome) -> Result<Receipt, Halt> {
        let receipt = self.receipt(outcome.clone());
        let result = self.finish_inner(receipts, &receipt, outcome).await;
        if let Err(Halt::Failed(reason)) = &result {
            tracing::error!(promotion = %self.plan.id, %reason, "finishing failed; recovery will redo it");
            self.abandon();
        }
        result.map(|()| receipt)
    }

    async fn finish_inner(&mut self, receipts: &Path, receipt: &Receipt, outcome: Outcome) -> Result<(), Halt> {
        archive::store(receipts, receipt).await?;
        self.log(JournalStep::Finished { outcome }).await?;
        self.close().await
    }

    /// Releases the lock (emptying it) and removes the journal: the end of a finished run.
    pub(crate) async fn close(&mut self) -> Result<(), Halt> {
        if let Some(lock) = self.lock.take() {
            blocking(move || lock.release()).await?;
        }
        self.journal.remove().await?;
        Ok(())
    }

    /// A tracing span for one step of this run.
    pub(crate) fn span(&self, step: &str) -> tracing::Span {
        tracing::info_span!(
            "promotion_step",
            step,
            promotion = %self.plan.id,
            production = %self.plan.production,
            stage = %self.plan.stage,
        )
    }
}
