//! [`Undo`]: what an operation did so far, undone in reverse order when a later step fails.
//!
//! Each step that changes something pushes how to undo it, with a short description of what it
//! made. On success the operation calls [`Undo::commit`]; on failure [`Undo::fail`] runs the
//! undo steps newest first and returns the original error — or, when some step could not be
//! undone, [`Error::LeftBehind`] saying exactly what is still there (invariant 4). An `Undo`
//! dropped without either (a `?` that returned early, a panic) still runs its synchronous steps
//! and logs the asynchronous ones it could not run.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use stagecore::{Error, toolbox::Undo};
//! let dir = std::env::temp_dir().join(format!("undo-doc-{}", std::process::id()));
//! let mut undo = Undo::new("make things");
//! std::fs::create_dir(&dir).unwrap();
//! let d = dir.clone();
//! undo.push(format!("directory {}", dir.display()), move || std::fs::remove_dir(&d).map_err(|e| Error::io("removing", &d, e)));
//! let err = undo.fail(Error::Precondition("a later step failed".into())).await;
//! assert!(matches!(err, Error::Precondition(_)));
//! assert!(!dir.exists());
//! # });
//! ```

use std::future::Future;
use std::pin::Pin;

use crate::{Error, Result};

type UndoFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

enum Action {
    Sync(Box<dyn FnOnce() -> Result<()> + Send>),
    Async(Box<dyn FnOnce() -> UndoFuture + Send>),
}

/// The undo steps of one operation, newest last.
pub struct Undo {
    operation: String,
    steps: Vec<(String, Action)>,
}

impl std::fmt::Debug for Undo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what: Vec<&str> = self.steps.iter().map(|(w, _)| w.as_str()).collect();
        f.debug_struct("Undo").field("operation", &self.operation).field("steps", &what).finish()
    }
}

impl Undo {
    /// No steps yet; `operation` names the operation in errors (`stage try-1`).
    pub fn new(operation: impl Into<String>) -> Self {
        Undo { operation: operation.into(), steps: Vec::new() }
    }

    /// Adds a synchronous undo step for `what` (what the step made, for the error).
    pub fn push(&mut self, what: impl Into<String>, undo: impl FnOnce() -> Result<()> + Send + 'static) {
        self.steps.push((what.into(), Action::Sync(Box::new(undo))));
    }

    /// Adds an asynchronous undo step for `what`.
    pub fn push_async<F, Fut>(&mut self, what: impl Into<String>, undo: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        self.steps.push((what.into(), Action::Async(Box::new(move || Box::pin(undo())))));
    }

    /// How many steps would be undone.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether nothing would be undone.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The operation succeeded: nothing is undone.
    pub fn commit(mut self) {
        self.steps.clear();
    }

    /// Undoes every step, newest first, and returns what could not be undone (with why).
    pub async fn rollback(mut self) -> Vec<String> {
        let mut left = Vec::new();
        while let Some((what, action)) = self.steps.pop() {
            let r = match action {
                Action::Sync(f) => f(),
                Action::Async(f) => f().await,
            };
            if let Err(e) = r {
                tracing::warn!(operation = %self.operation, step = %what, error = %e, "could not undo");
                left.push(format!("{what} ({e})"));
            }
        }
        left
    }

    /// The operation failed with `error`: undoes every step and returns `error`, or
    /// [`Error::LeftBehind`] with `error` as its source when something could not be undone.
    pub async fn fail(self, error: Error) -> Error {
        let operation = self.operation.clone();
        let left = self.rollback().await;
        if left.is_empty() { error } else { Error::LeftBehind { operation, left, source: Box::new(error) } }
    }

    /// Commits on `Ok`, fails (rolling back) on `Err`.
    pub async fn finish<T>(self, result: Result<T>) -> Result<T> {
        match result {
            Ok(v) => {
                self.commit();
                Ok(v)
            }
            Err(e) => Err(self.fail(e).await),
        }
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        while let Some((what, action)) = self.steps.pop() {
            match action {
                Action::Sync(f) => {
                    if let Err(e) = f() {
                        tracing::warn!(operation = %self.operation, step = %what, error = %e, "could not undo");
                    }
                }
                Action::Async(_) => {
                    tracing::warn!(operation = %self.operation, step = %what, "dropped without rollback: not undone");
                }
            }
        }
    }
}
