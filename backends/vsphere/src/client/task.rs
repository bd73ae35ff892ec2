//! vim25 task polling: `GET /sdk/vim25/{release}/Task/{moId}/info` with backoff until the task
//! reaches `success` or `error`, the task timeout passes, or the caller cancels.
//!
//! Contract: on success the task's `result` is returned; on `error` the fault is mapped (type and
//! message kept); on timeout or cancellation the task is cancelled on the server (best effort,
//! `POST .../Task/{moId}/CancelTask`) and `Error::Timeout` / a `RequestCanceled` fault is returned.
//! Dropping the future stops polling but leaves the server task running.
//! Docs: TaskInfo — <https://developer.broadcom.com/xapis/virtual-infrastructure-json-api/8.0.3/data-structures/TaskInfo>

use super::vim::MoRef;
use super::{Api, VsphereClient, error};
use reqwest::Method;
use serde_json::Value;
use stagecore::{Error, Result};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How a finished task ended successfully: its `info.result`, if any.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskOutcome {
    /// The task.
    pub task: MoRef,
    /// `TaskInfo.result` (e.g. the new snapshot or VM reference), `None` when the method has none.
    pub result: Option<Value>,
}

impl VsphereClient {
    /// Waits for a task to finish (see module docs).
    pub async fn wait_task(&self, task: &MoRef, operation: &str, cancel: &CancellationToken) -> Result<TaskOutcome> {
        let span = tracing::info_span!("vsphere.task", task = %task.value, operation);
        async {
            let policy = self.config.task.clone();
            let context = format!("task {} ({operation})", task.value);
            let started = Instant::now();
            let mut interval = policy.initial_interval;
            let path = format!("/sdk/vim25/{}/Task/{}/info", self.vim()?.release, task.value);
            loop {
                let info = self.call(Api::Vim, Method::GET, &path, &[], None, &context).await?;
                match info["state"].as_str() {
                    Some("success") => {
                        tracing::debug!("task succeeded");
                        let result = info.get("result").filter(|r| !r.is_null()).cloned();
                        return Ok(TaskOutcome { task: task.clone(), result });
                    }
                    Some("error") => {
                        let fault = info.get("error").cloned().unwrap_or(Value::Null);
                        tracing::debug!(fault = %fault["_typeName"], "task failed");
                        return Err(error::vim_fault(&fault, &context, &self.endpoint));
                    }
                    Some("queued" | "running") => {}
                    other => return Err(error::malformed(&context, format!("unknown task state {other:?}"))),
                }
                if started.elapsed() >= policy.timeout {
                    self.cancel_task(task).await;
                    return Err(Error::Timeout { operation: context, seconds: policy.timeout.as_secs_f64() });
                }
                tokio::select! {
                    _ = cancel.cancelled() => {
                        self.cancel_task(task).await;
                        return Err(error::cancelled(&context));
                    }
                    _ = tokio::time::sleep(interval.min(policy.timeout.saturating_sub(started.elapsed()))) => {}
                }
                interval = (interval * 2).min(policy.max_interval);
            }
        }
        .instrument(span)
        .await
    }

    /// Best-effort `CancelTask`; failures are logged, not returned.
    async fn cancel_task(&self, task: &MoRef) {
        let Ok(vim) = self.vim() else { return };
        let path = format!("/sdk/vim25/{}/Task/{}/CancelTask", vim.release, task.value);
        if let Err(e) = self.call(Api::Vim, Method::POST, &path, &[], None, "cancel task").await {
            tracing::warn!(task = %task.value, error = %e, "could not cancel task");
        }
    }
}
