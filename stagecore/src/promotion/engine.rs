//! [`PromotionEngine`]: the [`Promotion`] implementation for every backend — lock, precondition,
//! pre-promotion snapshot, apply (replay or swap), verify, gates, commit or automatic rollback,
//! each step journalled before it happens in a state directory the caller chooses.
//!
//! Layout of the state directory: `journal/<id>.jsonl` (promotions in flight),
//! `locks/<production>.lock` (one flock'd file per production), `receipts/<id>.json` (the audit
//! archive). All engines that promote a given production must share one state directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;
use tracing::Instrument;

use super::archive;
use super::fsutil::{ENGINE, blocking, ensure_dir, hostname};
use super::journal::{Journal, JournalStep, Plan};
use super::lock::{LockHolder, ProductionLock, TryLock, locked};
use super::run::{Halt, Run, Timer};
use super::steps;
use super::types::{Approval, GateContext, Outcome, Promotion, PromotionRequest, Receipt, Strategy};
use crate::drift::DriftEngine;
use crate::inventory::InventoryConfig;
use crate::{Backend, Error, PowerState, Progress, Result};

/// Where a test makes the engine stop dead, as if its process were killed.
///
/// The engine counts the journal lines one promotion (or one recovery of a promotion) writes;
/// right after line `k` is fsync'd it returns an error *without any cleanup*: the lock file keeps
/// naming the promotion, the journal stays, production stays as it is. Reopening the engine
/// ([`PromotionEngine::open`]) must then finish the promotion. For tests only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CrashPoint {
    /// Never crash (the default).
    #[default]
    Never,
    /// Stop dead right after the `k`th journal line (1-based) of each promotion.
    AfterLine(u64),
}

/// The promotion engine. Cheap to share (`Arc`); promotions of different productions run
/// concurrently, promotions of one production are exclusive (the second gets [`Error::Locked`]).
#[derive(Debug)]
pub struct PromotionEngine {
    dir: PathBuf,
    backend: Arc<dyn Backend>,
    crash: CrashPoint,
    inventory: InventoryConfig,
    progress: Option<Progress>,
}

enum Started {
    Run(Box<Run>),
    /// The production lock was left by a dead promotion whose journal is still here.
    Stale(LockHolder),
}

impl PromotionEngine {
    /// An engine over `state_dir` (created if missing) without recovering anything; call
    /// [`PromotionEngine::recover`] before promoting, or use [`PromotionEngine::open`].
    pub fn new(state_dir: impl Into<PathBuf>, backend: Arc<dyn Backend>) -> Result<Self> {
        let dir = ensure_dir(state_dir.into())?;
        for sub in ["journal", "locks", "receipts"] {
            ensure_dir(dir.join(sub))?;
        }
        Ok(PromotionEngine {
            dir,
            // Every backend call of a promotion goes through the capability check layer.
            backend: crate::checked::checked(backend),
            crash: CrashPoint::Never,
            inventory: InventoryConfig::default(),
            progress: None,
        })
    }

    /// Opens the engine over `state_dir` (created if missing) and recovers every unfinished
    /// promotion found in its journal — finishing a decided commit, rolling back everything else —
    /// returning the receipts of the recovered ones. Promotions still running in another process
    /// are left alone. Fails if an unfinished promotion cannot be recovered now (the backend is
    /// unreachable, say); nothing is lost, and opening again retries.
    pub async fn open(state_dir: impl Into<PathBuf>, backend: Arc<dyn Backend>) -> Result<(Self, Vec<Receipt>)> {
        let engine = Self::new(state_dir, backend)?;
        let recovered = engine.recover().await?;
        Ok((engine, recovered))
    }

    /// Makes the engine stop dead at `crash` (tests only; see [`CrashPoint`]).
    pub fn with_crash(mut self, crash: CrashPoint) -> Self {
        self.crash = crash;
        self
    }

    /// Collects guest inventories (precondition drift report, footprint verify) with `config`.
    pub fn with_inventory(mut self, config: InventoryConfig) -> Self {
        self.inventory = config;
        self
    }

    /// Reports each promotion step (and inventory progress) to `progress`.
    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.progress = Some(progress);
        self
    }

    fn step(&self, run: &Run, step: &str, done: u64) {
        crate::progress::emit(self.progress.as_ref(), "promotion", &run.plan.production, step, done, 0);
    }

    /// Shorthand for `with_crash(CrashPoint::AfterLine(k))` (tests only).
    pub fn with_crash_after(self, k: u64) -> Self {
        self.with_crash(CrashPoint::AfterLine(k))
    }

    fn drift_engine(&self) -> DriftEngine {
        let engine = DriftEngine::new().with_inventory(self.inventory.clone());
        match &self.progress {
            Some(p) => engine.with_progress(p.clone()),
            None => engine,
        }
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// Ids of the promotions whose journal is still present (running, or waiting for recovery).
    pub async fn unfinished(&self) -> Result<Vec<String>> {
        Ok(self.journals().await?.iter().filter_map(|p| p.file_stem()?.to_str().map(String::from)).collect())
    }

    pub(crate) fn journal_dir(&self) -> PathBuf {
        self.dir.join("journal")
    }

    pub(crate) fn locks_dir(&self) -> PathBuf {
        self.dir.join("locks")
    }

    pub(crate) fn receipts_dir(&self) -> PathBuf {
        self.dir.join("receipts")
    }

    pub(crate) fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    pub(crate) fn crash_after(&self) -> Option<u64> {
        match self.crash {
            CrashPoint::Never => None,
            CrashPoint::AfterLine(k) => Some(k),
        }
    }

    /// The journal files present, sorted by name.
    pub(crate) async fn journals(&self) -> Result<Vec<PathBuf>> {
        let dir = self.journal_dir();
        blocking(move || {
            let read = std::fs::read_dir(&dir).map_err(|e| super::fsutil::io_err(&dir, "list", e))?;
            let mut out: Vec<PathBuf> = read
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
                .collect();
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn plan(&self, req: &PromotionRequest) -> Result<Plan> {
        let (production, stage) = (req.production.name().to_string(), req.stage.name().to_string());
        crate::name::validate("request.production", &production)?;
        crate::name::validate("request.stage", &stage)?;
        if req.requested_by.trim().is_empty() {
            return Err(Error::invalid("request.requested_by", "must name who asks for the promotion"));
        }
        let info = req.stage.info().await?;
        let staged = info.stage().ok_or_else(|| Error::Precondition(format!("{stage} is not a stage")))?;
        if staged.source != production {
            return Err(Error::Precondition(format!(
                "stage {stage} was cloned from {}, not from {production}",
                staged.source
            )));
        }
        if req.strategy == Strategy::Swap && !self.backend.capabilities().swap {
            return Err(Error::not_supported("swap promotion", self.backend.name()));
        }
        let change_sets = staged.change_sets.clone();
        if req.strategy == Strategy::Replay && change_sets.iter().all(|cs| cs.changes.is_empty()) {
            return Err(Error::Precondition(format!("stage {stage} has no recorded changes: nothing to replay")));
        }
        // Recovery reopens production by name, so the engine's backend must know it.
        self.backend.open(&production).await?;
        let id = format!("pr-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let power: std::collections::BTreeMap<String, PowerState> =
            req.production.status().await?.into_iter().map(|m| (m.machine, m.power)).collect();
        Ok(Plan {
            snapshot: format!("pre-promotion-{id}"),
            id,
            production,
            stage,
            strategy: req.strategy,
            policy: req.policy,
            requested_by: req.requested_by.clone(),
            change_sets,
            gates: req.gates.iter().map(|g| g.name().to_string()).collect(),
            production_spec: req.production.spec().await?,
            stage_spec: req.stage.spec().await?,
            production_running: power.values().any(|p| *p == PowerState::Running),
            production_power: power,
            host: hostname(),
            pid: std::process::id(),
            started_at: OffsetDateTime::now_utc(),
        })
    }

    /// Journals the plan and takes the production lock.
    async fn start(&self, plan: Plan) -> Result<Started> {
        let journal = Journal::create(&self.journal_dir(), &plan.id).await?;
        let (id, production) = (plan.id.clone(), plan.production.clone());
        let mut run = Run::new(plan, journal, self.crash_after());
        let t = Timer::start();
        let begin = JournalStep::Begin { plan: Box::new(run.plan.clone()) };
        if let Err(halt) = run.log(begin).await {
            return Err(self.halted(run, halt, false).await);
        }
        let locks = self.locks_dir();
        let prod = production.clone();
        let holder = LockHolder {
            promotion: id.clone(),
            host: run.plan.host.clone(),
            pid: run.plan.pid,
            since: OffsetDateTime::now_utc(),
        };
        let attempt = blocking(move || ProductionLock::try_acquire(&locks, &prod, &holder)).await;
        let (lock, previous) = match attempt {
            Ok(TryLock::Acquired(lock, previous)) => (lock, previous),
            Ok(TryLock::Busy(holder)) => {
                run.discard().await?;
                return Err(locked(&production, holder.as_ref(), ""));
            }
            Err(e) => {
                run.discard().await?;
                return Err(e);
            }
        };
        if let Some(prev) = previous.filter(|p| p.promotion != id) {
            if self.journal_dir().join(format!("{}.jsonl", prev.promotion)).exists() {
                // Not ours to take over: put the dead holder's name back for its recovery.
                let p = prev.clone();
                let restored = blocking(move || lock.restore(&p)).await;
                run.discard().await?;
                restored?;
                return Ok(Started::Stale(prev));
            }
            tracing::warn!(%production, stale = %prev, "overwriting a stale lock whose promotion left no journal");
        }
        run.hold(lock);
        if let Err(halt) = run.done(t.record("lock", "ok"), None, None).await {
            return Err(self.halted(run, halt, true).await);
        }
        Ok(Started::Run(Box::new(run)))
    }

    /// Turns a halt before production was touched into the error to return. A crash leaves
    /// everything as it is; a failure releases the lock and removes the journal.
    async fn halted(&self, mut run: Run, halt: Halt, locked: bool) -> Error {
        match halt {
            Halt::Crashed(e) => e,
            Halt::Failed(reason) => {
                let id = run.plan.id.clone();
                let cleanup = if locked { run.close().await.err() } else { run.discard().await.err().map(Halt::from) };
                if let Some(Halt::Failed(c)) = cleanup {
                    tracing::error!(promotion = %id, cleanup = %c, "cleanup after a failed start failed");
                }
                Error::backend_msg(ENGINE, format!("promotion {id} could not start: {reason}"))
            }
        }
    }

    /// Runs the steps after the lock and finishes the receipt.
    async fn drive(&self, mut run: Run, req: &PromotionRequest) -> Result<Receipt> {
        let outcome = match self.steps(&mut run, req).await {
            Ok(outcome) => outcome,
            Err(Halt::Crashed(e)) => return Err(e),
            Err(Halt::Failed(reason)) => {
                run.abandon();
                return Err(Error::backend_msg(
                    ENGINE,
                    format!(
                        "promotion {} stopped: {reason}; its journal is kept and recovery \
                         (PromotionEngine::open or recover) finishes it",
                        run.plan.id
                    ),
                ));
            }
        };
        tracing::info!(promotion = %run.plan.id, ?outcome, "promotion finished");
        let id = run.plan.id.clone();
        run.finish(&self.receipts_dir(), outcome).await.map_err(|halt| match halt {
            Halt::Crashed(e) => e,
            Halt::Failed(r) => Error::backend_msg(ENGINE, format!("promotion {id}: finishing failed: {r}")),
        })
    }

    async fn steps(&self, run: &mut Run, req: &PromotionRequest) -> Result<Outcome, Halt> {
        let t = Timer::start();
        run.log(JournalStep::Precondition).await?;
        let span = run.span("precondition");
        self.step(run, "precondition", 1);
        let drift = self.drift_engine();
        let checked = steps::precondition(&run.plan, &drift, &*req.production, &*req.stage).instrument(span).await;
        let (report, note) = match checked {
            Ok(checked) => checked,
            Err(refusal) => {
                run.done(t.record("precondition", format!("refused: {}", refusal.reason)), refusal.drift, None).await?;
                run.log(JournalStep::Refuse { reason: refusal.reason.clone() }).await?;
                return Ok(Outcome::Refused { reason: refusal.reason });
            }
        };
        run.done(t.record("precondition", note), Some(report), None).await?;
        match self.forward(run, req).await {
            Ok(()) => {}
            Err(Halt::Failed(reason)) => {
                tracing::warn!(promotion = %run.plan.id, %reason, "rolling back");
                let span = run.span("rollback");
                steps::roll_back(run, &reason, &*self.backend, &*req.production).instrument(span).await?;
                return Ok(Outcome::RolledBack { reason });
            }
            Err(crashed) => return Err(crashed),
        }
        let span = run.span("commit");
        self.step(run, "commit", 6);
        steps::commit(run, &*req.production).instrument(span).await?;
        Ok(Outcome::Committed)
    }

    /// Snapshot, apply, verify, gates. A `Failed` halt means: roll back.
    async fn forward(&self, run: &mut Run, req: &PromotionRequest) -> Result<(), Halt> {
        let production = &*req.production;
        let t = Timer::start();
        let name = run.plan.snapshot.clone();
        self.step(run, "snapshot", 2);
        run.log(JournalStep::Snapshot { name: name.clone() }).await?;
        let taken = production.create_snapshot(&name).instrument(run.span("snapshot")).await;
        let taken = taken.map(|_| "ok".to_string()).map_err(|e| Halt::Failed(format!("pre-promotion snapshot: {e}")));
        settle(run, t, "snapshot", taken).await?;

        let t = Timer::start();
        self.step(run, "apply", 3);
        let span = run.span("apply");
        let applied = match run.plan.strategy {
            Strategy::Replay => steps::replay(run, production).instrument(span).await,
            Strategy::Swap => steps::swap(run, &*self.backend, production).instrument(span).await,
        };
        settle(run, t, "apply", applied.map(|()| "ok".to_string())).await?;

        let t = Timer::start();
        run.log(JournalStep::Verify).await?;
        self.step(run, "verify", 4);
        let verified = steps::verify(&run.plan, run.drift.as_ref(), production, &self.inventory)
            .instrument(run.span("verify"))
            .await;
        settle(run, t, "verify", verified).await?;

        self.gates(run, req).await
    }

    async fn gates(&self, run: &mut Run, req: &PromotionRequest) -> Result<(), Halt> {
        let drift = run.drift.clone().ok_or_else(|| Halt::Failed("no drift report was accepted".into()))?;
        let change_sets = run.plan.change_sets.clone();
        let ctx =
            GateContext { production: &*req.production, stage: &*req.stage, drift: &drift, change_sets: &change_sets };
        for gate in &req.gates {
            let (t, name) = (Timer::start(), gate.name().to_string());
            self.step(run, &format!("gate:{name}"), 5);
            let step = format!("gate:{name}");
            run.log(JournalStep::Gate { name: name.clone() }).await?;
            let verdict = gate.check(&ctx).instrument(run.span(&step)).await;
            match verdict {
                Ok(v) if v.passed => {
                    let approval = Approval { gate: name, by: v.by, at: OffsetDateTime::now_utc(), note: v.note };
                    run.done(t.record(&step, "passed"), None, Some(approval)).await?;
                }
                Ok(v) => {
                    let by = v.by.map(|b| format!(" by {b}")).unwrap_or_default();
                    let reason = format!("gate {name} refused{by}: {}", v.note);
                    return settle(run, t, &step, Err(Halt::Failed(reason))).await;
                }
                Err(e) => return settle(run, t, &step, Err(Halt::Failed(format!("gate {name} failed: {e}")))).await,
            }
        }
        Ok(())
    }
}

/// Records a step's end in the journal: its note, or its failure (which is passed on).
async fn settle(run: &mut Run, t: Timer, step: &str, result: Result<String, Halt>) -> Result<(), Halt> {
    match result {
        Ok(note) => run.done(t.record(step, note), None, None).await,
        Err(Halt::Failed(reason)) => {
            run.done(t.record(step, format!("failed: {reason}")), None, None).await?;
            Err(Halt::Failed(reason))
        }
        Err(crashed) => Err(crashed),
    }
}

#[async_trait]
impl Promotion for PromotionEngine {
    #[tracing::instrument(skip_all, fields(
        production = %request.production.name(),
        stage = %request.stage.name(),
        strategy = ?request.strategy,
        promotion = tracing::field::Empty,
    ))]
    async fn promote(&self, request: PromotionRequest) -> Result<Receipt> {
        let mut recovered_once = false;
        loop {
            let plan = self.plan(&request).await?;
            tracing::Span::current().record("promotion", plan.id.as_str());
            match self.start(plan).await? {
                Started::Run(run) => return self.drive(*run, &request).await,
                Started::Stale(holder) if !recovered_once => {
                    tracing::warn!(stale = %holder, "production lock left by a dead promotion; recovering it first");
                    recovered_once = true;
                    self.recover().await?;
                }
                Started::Stale(holder) => {
                    return Err(locked(
                        request.production.name(),
                        Some(&holder),
                        " (stale: its process is gone and recovery could not finish it yet)",
                    ));
                }
            }
        }
    }

    async fn receipts(&self) -> Result<Vec<Receipt>> {
        archive::list(self.receipts_dir()).await
    }
}
