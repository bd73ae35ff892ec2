//! vim25 tasks: queued → running → success | error, with an injectable delay and failures.
//!
//! Contract: [`start`] records a queued task and returns its id at once; the effect runs on the
//! inventory when the task finishes (not before), unless the task was cancelled or an injected
//! failure is pending, in which case the task ends in error and the inventory is untouched.

use crate::state::{Fault, Inventory};
use crate::{Shared, lock};
use serde_json::{Value, json};
use std::sync::Arc;

/// Task state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TaskState {
    Queued,
    Running,
    Success,
    Error,
}

/// One task.
#[derive(Clone, Debug)]
pub(crate) struct Task {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) entity: String,
    pub(crate) state: TaskState,
    pub(crate) result: Option<Value>,
    pub(crate) error: Option<Fault>,
    pub(crate) cancel_requested: bool,
    pub(crate) entity_name: String,
    pub(crate) queued: String,
    pub(crate) started: Option<String>,
    pub(crate) completed: Option<String>,
    pub(crate) progress: Option<i32>,
    pub(crate) chain_id: i32,
}

/// What a task does to the inventory when it completes; returns the task's `result`.
pub(crate) type Effect = Box<dyn FnOnce(&mut Inventory) -> Result<Option<Value>, Fault> + Send>;

/// Starts a task; returns its id.
pub(crate) fn start(shared: &Arc<Shared>, name: &str, entity: &str, effect: Effect) -> String {
    let (id, entity_name, chain_id) = {
        let mut inv = lock(&shared.inv);
        let id = inv.next("task");
        let name = inv.vms.get(entity).map(|v| v.name.clone()).unwrap_or_else(|| entity.to_string());
        let chain = id.trim_start_matches("task-").parse::<i32>().unwrap_or(1);
        (id, name, chain)
    };
    let task = Task {
        id: id.clone(),
        name: name.to_string(),
        entity: entity.to_string(),
        state: TaskState::Queued,
        result: None,
        error: None,
        cancel_requested: false,
        entity_name,
        queued: crate::now_rfc3339(),
        started: None,
        completed: None,
        progress: None,
        chain_id,
    };
    lock(&shared.tasks).insert(id.clone(), task);
    let (delay, injected) = {
        let mut f = lock(&shared.faults);
        let injected = (!f.fail_next_tasks.is_empty()).then(|| f.fail_next_tasks.remove(0));
        (f.task_delay, injected)
    };
    let shared = shared.clone();
    let task_id = id.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay / 2).await;
        set_state(&shared, &task_id, TaskState::Running);
        tokio::time::sleep(delay / 2).await;
        finish(&shared, &task_id, injected, effect);
    });
    id
}

fn set_state(shared: &Shared, id: &str, state: TaskState) {
    if let Some(t) = lock(&shared.tasks).get_mut(id)
        && t.state == TaskState::Queued
    {
        t.state = state;
        t.started = Some(crate::now_rfc3339());
        t.progress = Some(50);
    }
}

fn finish(shared: &Shared, id: &str, injected: Option<Fault>, effect: Effect) {
    let cancelled = lock(&shared.tasks).get(id).is_some_and(|t| t.cancel_requested);
    let outcome = if cancelled {
        Err(Fault::new("RequestCanceled", "the task was cancelled by a user"))
    } else if let Some(fault) = injected {
        Err(fault)
    } else {
        effect(&mut lock(&shared.inv))
    };
    if let Some(t) = lock(&shared.tasks).get_mut(id) {
        t.started.get_or_insert_with(crate::now_rfc3339);
        t.completed = Some(crate::now_rfc3339());
        match outcome {
            Ok(result) => {
                t.state = TaskState::Success;
                t.result = result;
            }
            Err(fault) => {
                t.state = TaskState::Error;
                t.error = Some(fault);
            }
        }
    }
}

/// The `TaskInfo` JSON of a task (VI/JSON renders `LocalizedMethodFault` as the fault itself),
/// with the properties the specification requires (`reason`, `queueTime`, `eventChainId`, ...)
/// and `progress` while it runs.
pub(crate) fn info_json(t: &Task) -> Value {
    let state = match t.state {
        TaskState::Queued => "queued",
        TaskState::Running => "running",
        TaskState::Success => "success",
        TaskState::Error => "error",
    };
    let mut info = json!({
        "_typeName": "TaskInfo",
        "key": t.id,
        "task": moref("Task", &t.id),
        "name": t.name,
        "descriptionId": format!("VirtualMachine.{}", t.name),
        "entity": moref("VirtualMachine", &t.entity),
        "state": state,
        "cancelled": t.cancel_requested && t.state == TaskState::Error,
        "cancelable": matches!(t.state, TaskState::Queued | TaskState::Running),
        "entityName": t.entity_name,
        "reason": {"_typeName": "TaskReasonUser", "userName": crate::SIM_USER},
        "queueTime": t.queued,
        "eventChainId": t.chain_id,
    });
    if let Some(s) = &t.started {
        info["startTime"] = json!(s);
    }
    if let Some(c) = &t.completed {
        info["completeTime"] = json!(c);
    }
    if let Some(p) = t.progress.filter(|_| t.state == TaskState::Running) {
        info["progress"] = json!(p);
    }
    if let Some(r) = &t.result {
        info["result"] = r.clone();
    }
    if let Some(e) = &t.error {
        info["error"] = e.to_json();
    }
    info
}

pub(crate) use crate::state::moref;
