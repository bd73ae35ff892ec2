//! Recovery: finishing the promotions a dead process left in the journal.
//!
//! For each journal whose flock is free (its owner is dead): a `finished` promotion is only
//! cleaned up (lock released, journal removed); one that never took the production lock touched
//! nothing and is closed as rolled back; otherwise, under the production lock, the last decision
//! line decides — `commit`: the commit is finished; `refuse`: the refusal is finished; `rollback`,
//! or no decision yet: production is rolled back to its pre-promotion state. Gates are never
//! re-run (their callers are gone), which is why an undecided promotion is rolled back rather
//! than resumed. Every action is idempotent, so a crash during recovery is recovered in turn.

use std::path::PathBuf;

use time::OffsetDateTime;
use tracing::Instrument;

use super::engine::PromotionEngine;
use super::fsutil::{blocking, hostname};
use super::journal::{Journal, JournalStep, Opened};
use super::lock::{LockHolder, ProductionLock, TryLock};
use super::run::{Halt, Run, Timer};
use super::steps;
use super::types::{Outcome, Receipt};
use crate::{Error, Result};

impl PromotionEngine {
    /// Recovers every unfinished promotion whose process is gone (see [`PromotionEngine::open`]),
    /// returning the receipts of those it finished. Promotions running elsewhere are left alone.
    /// All journals are tried; the first failure is returned after that.
    #[tracing::instrument(skip_all, fields(state_dir = %self.state_dir().display()))]
    pub async fn recover(&self) -> Result<Vec<Receipt>> {
        let mut recovered = Vec::new();
        let mut first_error = None;
        for path in self.journals().await? {
            match self.recover_one(path.clone()).await {
                Ok(Some(receipt)) => recovered.push(receipt),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(journal = %path.display(), error = %e, "recovery failed; it is retried on the next open");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(recovered),
        }
    }

    async fn recover_one(&self, path: PathBuf) -> Result<Option<Receipt>> {
        let (mut journal, entries) = match Journal::open_existing(path).await? {
            Opened::Dead(journal, entries) => (journal, entries),
            Opened::Alive | Opened::Gone => return Ok(None),
        };
        if entries.is_empty() {
            // Died while creating the journal: the promotion never began.
            journal.remove().await?;
            return Ok(None);
        }
        let run = Run::resume(journal, entries, self.crash_after())?;
        let span = tracing::info_span!("recover", promotion = %run.plan.id, production = %run.plan.production);
        self.recover_run(run).instrument(span).await
    }

    async fn recover_run(&self, mut run: Run) -> Result<Option<Receipt>> {
        let (locks, production, id) = (self.locks_dir(), run.plan.production.clone(), run.plan.id.clone());
        let holder = LockHolder {
            promotion: id.clone(),
            host: hostname(),
            pid: std::process::id(),
            since: OffsetDateTime::now_utc(),
        };
        let attempt = blocking(move || ProductionLock::try_acquire(&locks, &production, &holder)).await?;
        let never_locked = !run.lock_recorded();
        match attempt {
            TryLock::Acquired(lock, previous) if previous.as_ref().is_some_and(|h| h.promotion == id) => run.hold(lock),
            TryLock::Acquired(lock, Some(previous)) if never_locked || run.finished.is_some() => {
                // Another promotion's stale lock: leave its name for its own recovery.
                blocking(move || lock.restore(&previous)).await?;
            }
            TryLock::Acquired(lock, None) if never_locked || run.finished.is_some() => {
                blocking(move || lock.release()).await?;
            }
            TryLock::Busy(_) if never_locked || run.finished.is_some() => {}
            TryLock::Acquired(lock, _) => run.hold(lock),
            TryLock::Busy(holder) => {
                tracing::info!(?holder, "production is locked by a live promotion; recovery deferred");
                run.abandon();
                return Ok(None);
            }
        }
        if run.finished.is_some() {
            run.close().await.map_err(halt_error)?;
            return Ok(None);
        }
        let outcome = match self.settle(&mut run).await {
            Ok(outcome) => outcome,
            Err(halt) => {
                run.abandon();
                return Err(halt_error(halt));
            }
        };
        tracing::info!(promotion = %run.plan.id, ?outcome, "promotion recovered");
        run.finish(&self.receipts_dir(), outcome).await.map(Some).map_err(halt_error)
    }

    /// Decides and carries out the end of a dead promotion.
    async fn settle(&self, run: &mut Run) -> Result<Outcome, Halt> {
        if !run.holds_lock() {
            let t = Timer::start();
            let reason = "interrupted before the production lock was taken; production was not touched".to_string();
            run.done(t.record("recover", reason.clone()), None, None).await?;
            return Ok(Outcome::RolledBack { reason });
        }
        let production = self.backend().open(&run.plan.production).await?;
        match run.decision.clone() {
            Some(JournalStep::Commit) => {
                if run.last_done_is("commit") {
                    // Killed after the commit step: its power states still hold (or are restored).
                    steps::planned_power(&*production, &run.plan).await?;
                } else {
                    steps::commit(run, &*production).await?;
                }
                Ok(Outcome::Committed)
            }
            Some(JournalStep::Refuse { reason }) => Ok(Outcome::Refused { reason }),
            Some(JournalStep::Rollback { reason }) => {
                if !run.last_done_is("rollback") {
                    steps::roll_back(run, &reason, self.backend(), &*production).await?;
                }
                Ok(Outcome::RolledBack { reason })
            }
            _ => {
                let reason = format!("interrupted after `{}`; rolled back by recovery", run.last);
                steps::roll_back(run, &reason, self.backend(), &*production).await?;
                Ok(Outcome::RolledBack { reason })
            }
        }
    }
}

fn halt_error(halt: Halt) -> Error {
    match halt {
        Halt::Crashed(e) => e,
        Halt::Failed(reason) => Error::backend_msg("promotion", format!("recovery: {reason}")),
    }
}
