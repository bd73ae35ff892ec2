//! Promotion: carrying a tested ChangeSet into production safely.
//!
//! [`Promotion`] is the contract; [`PromotionEngine`] implements it for every backend with a lock
//! on production, a precondition check, a pre-promotion snapshot, the apply step (replay or swap),
//! gates, and commit or automatic rollback — each step written to a journal before it happens, so
//! a crashed promotion is resumed or rolled back when the engine is next opened. See
//! `docs/promotion.md`.

mod archive;
mod engine;
mod fsutil;
mod journal;
mod lock;
mod recovery;
mod run;
mod steps;
mod types;

pub use engine::{CrashPoint, PromotionEngine};
pub use journal::{JournalEntry, JournalStep, Plan};
pub use types::{
    Approval, Gate, GateContext, GateVerdict, Outcome, PreconditionPolicy, Promotion, PromotionRequest, Receipt,
    StepRecord, Strategy,
};
