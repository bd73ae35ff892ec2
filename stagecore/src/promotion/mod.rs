//! Promotion: carrying a tested ChangeSet into production safely.
//!
//! [`Promotion`] is the contract; [`PromotionEngine`] implements it for every backend with a lock
//! on production, a precondition check, a pre-promotion snapshot, the apply step (replay or swap),
//! gates, and commit or automatic rollback — each step written to a journal before it happens, so
//! a crashed promotion is resumed or rolled back when the engine is next opened. See
//! `docs/promotion.md`.
//!
//! Also here: the built-in gates ([`ProbeGate`]: a guest command, TCP or HTTP probe from inside a
//! machine, with retries), which [`test_environment`] runs against a stage before promotion, and
//! [`rebase`], which re-creates a stage on a newer baseline and re-applies its ChangeSets.

mod archive;
mod engine;
mod fsutil;
mod gates;
mod journal;
mod lock;
mod lockfile;
mod power;
mod rebase;
mod recovery;
mod run;
mod steps;
mod types;

pub use engine::{CrashPoint, PromotionEngine};
pub use gates::{PROBE_MARKER, PROBE_SCRIPT, Probe, ProbeGate, ProbeResult, TestReport, test_environment};
pub use journal::{JournalEntry, JournalStep, Plan};
pub use lockfile::{LockAttempt, LockFile, LockRecord, describe_holder, locked_error};
pub use rebase::{Conflict, ConflictReport, RebaseOptions, RebaseOutcome, rebase};
pub use types::{
    Approval, Gate, GateContext, GateVerdict, Outcome, PreconditionPolicy, Promotion, PromotionRequest, Receipt,
    StepRecord, Strategy,
};
