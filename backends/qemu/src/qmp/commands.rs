//! Typed helpers for the QMP commands the backend needs, on top of [`QmpClient::execute`].

use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use stagecore::Result;

use super::QmpClient;
use super::types::*;
use crate::error;

impl QmpClient {
    async fn call_typed<T: DeserializeOwned>(&self, command: &str, args: Value) -> Result<T> {
        let value = self.execute(command, args).await?;
        serde_json::from_value(value)
            .map_err(|e| error::protocol(self.socket(), format!("unexpected reply to `{command}`: {e}")))
    }

    /// `query-status`: the run state.
    pub async fn query_status(&self) -> Result<StatusInfo> {
        self.call_typed("query-status", Value::Null).await
    }

    /// `stop`: pauses all vCPUs (a `STOP` event follows).
    pub async fn stop(&self) -> Result<()> {
        self.execute("stop", Value::Null).await.map(drop)
    }

    /// `cont`: resumes vCPUs (a `RESUME` event follows).
    pub async fn cont(&self) -> Result<()> {
        self.execute("cont", Value::Null).await.map(drop)
    }

    /// `quit`: QEMU exits. A connection lost right after sending counts as success.
    pub async fn quit(&self) -> Result<()> {
        match self.execute("quit", Value::Null).await {
            Ok(_) | Err(stagecore::Error::Unreachable { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `query-block`: every block device with its active node.
    pub async fn query_block(&self) -> Result<Vec<BlockInfo>> {
        self.call_typed("query-block", Value::Null).await
    }

    /// `query-named-block-nodes`; with `flat`, backing images are not nested in each node.
    pub async fn query_named_block_nodes(&self, flat: bool) -> Result<Vec<BlockDeviceInfo>> {
        self.call_typed("query-named-block-nodes", json!({ "flat": flat })).await
    }

    /// `transaction`: all `actions` atomically (all applied or none).
    pub async fn transaction(&self, actions: &[TransactionAction]) -> Result<()> {
        let args = json!({ "actions": actions });
        self.execute("transaction", args).await.map(drop)
    }

    /// One `transaction` of `blockdev-snapshot-sync` actions: every disk gets its overlay at one instant.
    pub async fn snapshot_disks(&self, snapshots: &[BlockdevSnapshotSync]) -> Result<()> {
        let actions: Vec<_> = snapshots.iter().cloned().map(TransactionAction::BlockdevSnapshotSync).collect();
        self.transaction(&actions).await
    }

    /// `block-stream` (QEMU 7.2 arguments `job-id`, `device`, `base-node`): copies into the node
    /// `device` the data of its backing chain above `base_node` (the whole chain when `None`),
    /// then makes `base_node` its backing. Returns when the job has *started*; wait for its
    /// `BLOCK_JOB_COMPLETED` event (data `device` = `job_id`) with [`QmpClient::wait_for_event`],
    /// subscribing before this call.
    pub async fn block_stream(&self, job_id: &str, device: &str, base_node: Option<&str>) -> Result<()> {
        let mut args = json!({ "job-id": job_id, "device": device });
        if let Some(base) = base_node {
            args["base-node"] = json!(base);
        }
        self.execute("block-stream", args).await.map(drop)
    }

    /// `block-dirty-bitmap-add`.
    pub async fn block_dirty_bitmap_add(&self, bitmap: &BlockDirtyBitmapAdd) -> Result<()> {
        let args = serde_json::to_value(bitmap).map_err(|e| error::protocol(self.socket(), e))?;
        self.execute("block-dirty-bitmap-add", args).await.map(drop)
    }

    /// `human-monitor-command`: runs an HMP command line and returns its output.
    ///
    /// An escape hatch (tests use `qemu-io -d <device> "write -P 0xab 0 64k"`); HMP reports many
    /// failures only in the returned text.
    pub async fn human_monitor_command(&self, command_line: &str) -> Result<String> {
        self.call_typed("human-monitor-command", json!({ "command-line": command_line })).await
    }
}
