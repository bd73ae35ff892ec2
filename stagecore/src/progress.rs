//! Progress of long operations (inventories of many machines, rebases, promotions), reported to
//! the embedding program.
//!
//! An operation that takes a [`Progress`] calls it once per step with a [`ProgressEvent`]: what
//! runs (`inventory`, `rebase`, `promotion`), on what (`prod`, `prod/web`), the step, and how
//! far it is (`done` of `total`, when known). Every event is also a `tracing` event at INFO with
//! target `stagecore::progress`, so a subscriber sees progress even without a callback.
//!
//! Subscribe with a callback ([`Progress::new`]) or as a stream ([`Progress::channel`]):
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let (progress, mut events) = stagecore::Progress::channel();
//! progress.emit("inventory", "prod/web", "collected", 1, 3);
//! let ev = events.recv().await.unwrap();
//! assert_eq!((ev.operation.as_str(), ev.done, ev.total), ("inventory", 1, 3));
//! # });
//! ```
//!
//! A callback runs on the task doing the work: keep it short and never block in it.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// One step of a long operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressEvent {
    /// The operation (`inventory`, `rebase`, `promotion`, `gates`).
    pub operation: String,
    /// What it works on (`prod`, `prod/web`, `try-2`).
    pub subject: String,
    /// The step just reached (`collected`, `applied cs-1`, `verify`).
    pub step: String,
    /// Units done so far (machines, ChangeSets, steps).
    pub done: u64,
    /// Units in all (0 when unknown).
    pub total: u64,
}

type Callback = dyn Fn(&ProgressEvent) + Send + Sync;

/// Where progress goes: a callback, shared and cheap to clone.
#[derive(Clone)]
pub struct Progress(Arc<Callback>);

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Progress(..)")
    }
}

impl Progress {
    /// Progress delivered to `callback`.
    pub fn new(callback: impl Fn(&ProgressEvent) + Send + Sync + 'static) -> Self {
        Progress(Arc::new(callback))
    }

    /// Progress delivered as a stream of events (the receiver ends when every clone of the
    /// [`Progress`] is dropped).
    pub fn channel() -> (Self, tokio::sync::mpsc::UnboundedReceiver<ProgressEvent>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Progress::new(move |ev| drop(tx.send(ev.clone()))), rx)
    }

    /// Reports one step (and emits it as a tracing event).
    pub fn emit(&self, operation: &str, subject: &str, step: &str, done: u64, total: u64) {
        emit(Some(self), operation, subject, step, done, total);
    }
}

/// Reports a step to `progress`, if any, and always as a tracing event.
pub(crate) fn emit(progress: Option<&Progress>, operation: &str, subject: &str, step: &str, done: u64, total: u64) {
    tracing::info!(target: "stagecore::progress", operation, subject, step, done, total, "progress");
    if let Some(p) = progress {
        (p.0)(&ProgressEvent { operation: operation.into(), subject: subject.into(), step: step.into(), done, total });
    }
}
