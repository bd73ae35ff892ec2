//! An async QMP client over a tokio `UnixStream`.
//!
//! Contract:
//! - [`QmpClient::connect`] reads the greeting and negotiates `qmp_capabilities`, bounded by a timeout.
//! - [`QmpClient::execute`] sends every command with a unique `id`; a reader task matches replies to
//!   callers by id, so concurrent calls from clones of one client never get each other's replies.
//! - `{"error":{"class","desc"}}` becomes [`QmpCommandError`] (inside `stagecore::Error::Backend`;
//!   use [`command_error`] to get it back).
//! - Asynchronous events go to [`QmpClient::subscribe`] receivers and are never taken for replies.
//! - When the socket is lost (QEMU killed, `quit`), every pending and future call fails at once with
//!   `Error::Unreachable` naming the socket; every call is bounded by a timeout (`Error::Timeout`).
//!
//! QEMU serves one QMP client per socket at a time: share one `QmpClient` (it is `Clone`).

mod commands;
mod conn;
mod types;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;
use stagecore::Result;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::error;
use conn::{Reply, Shared};
pub use types::*;

/// Default bound for one QMP call.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How many unread events a subscriber may lag behind before it loses the oldest.
const EVENT_CAPACITY: usize = 256;

/// A connected, negotiated QMP session. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    socket: PathBuf,
    shared: Arc<Shared>,
    outbox: mpsc::UnboundedSender<Vec<u8>>,
    next_id: AtomicU64,
    call_timeout: Duration,
    version: QemuVersion,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("socket", &self.inner.socket)
            .field("version", &self.inner.version)
            .field("closed", &self.inner.shared.closed_reason())
            .finish()
    }
}

impl QmpClient {
    /// Connects to `socket`, reads the greeting and negotiates capabilities, all within `timeout`.
    ///
    /// Fails with `Unreachable` (no socket, refused, closed during the handshake) or `Timeout`
    /// (no greeting: QEMU still starting, frozen, or another client holds the monitor).
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<QmpClient> {
        Self::connect_with(socket, timeout, DEFAULT_CALL_TIMEOUT).await
    }

    /// Like [`QmpClient::connect`], with `call_timeout` as the default bound of later calls.
    pub async fn connect_with(socket: &Path, timeout: Duration, call_timeout: Duration) -> Result<QmpClient> {
        let span = tracing::debug_span!("qmp.connect", socket = %socket.display());
        async {
            let deadline = tokio::time::Instant::now() + timeout;
            let handshake = conn::open(socket);
            let opened = tokio::time::timeout(timeout, handshake)
                .await
                .map_err(|_| error::timeout(format!("QMP greeting on {}", socket.display()), timeout))??;
            let (outbox, rx) = mpsc::unbounded_channel();
            let shared = Arc::new(Shared::new(socket, EVENT_CAPACITY));
            let reader = tokio::spawn(conn::read_loop(opened.reader, shared.clone()));
            let writer = tokio::spawn(conn::write_loop(opened.writer, rx, shared.clone()));
            let client = QmpClient {
                inner: Arc::new(ClientInner {
                    socket: socket.to_path_buf(),
                    shared,
                    outbox,
                    next_id: AtomicU64::new(1),
                    call_timeout,
                    version: opened.version,
                    tasks: [reader, writer],
                }),
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            client.execute_with_timeout("qmp_capabilities", Value::Null, left.max(Duration::from_millis(1))).await?;
            tracing::debug!(version = %client.inner.version, "QMP negotiated");
            Ok(client)
        }
        .instrument(span)
        .await
    }

    /// The socket this client is connected to.
    pub fn socket(&self) -> &Path {
        &self.inner.socket
    }

    /// QEMU's version from the greeting.
    pub fn version(&self) -> &QemuVersion {
        &self.inner.version
    }

    /// Whether the connection is lost (all calls now fail with `Unreachable`).
    pub fn is_closed(&self) -> bool {
        self.inner.shared.closed_reason().is_some()
    }

    /// A receiver of every event QEMU sends from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.inner.shared.events.subscribe()
    }

    /// Runs `command` with `args` (`Value::Null` for none) under the default call timeout and
    /// returns the `return` member of the reply.
    pub async fn execute(&self, command: &str, args: Value) -> Result<Value> {
        self.execute_with_timeout(command, args, self.inner.call_timeout).await
    }

    /// Runs `command` with `args`, bounded by `limit`.
    pub async fn execute_with_timeout(&self, command: &str, args: Value, limit: Duration) -> Result<Value> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::debug_span!("qmp.execute", command, id, socket = %self.inner.socket.display());
        self.call(id, command, args, limit).instrument(span).await
    }

    /// Waits (bounded by `limit`) for the next event called `name` on `events` (from
    /// [`QmpClient::subscribe`]), skipping others. Fails with `Timeout`, or `Unreachable` when the
    /// connection is lost.
    pub async fn wait_for_event(
        &self,
        events: &mut broadcast::Receiver<QmpEvent>,
        name: &str,
        limit: Duration,
    ) -> Result<QmpEvent> {
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(ev) if ev.event == name => return Ok(ev),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return Err(self.inner.shared.unreachable()),
                }
            }
        };
        let operation = || format!("QMP event {name} on {}", self.inner.socket.display());
        tokio::time::timeout(limit, wait).await.map_err(|_| error::timeout(operation(), limit))?
    }

    async fn call(&self, id: u64, command: &str, args: Value, limit: Duration) -> Result<Value> {
        let shared = &self.inner.shared;
        let (tx, rx) = oneshot::channel();
        shared.register(id, tx)?;
        let mut msg = serde_json::json!({ "execute": command, "id": id });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg).map_err(|e| error::protocol(&self.inner.socket, e))?;
        line.push(b'\n');
        if self.inner.outbox.send(line).is_err() {
            shared.unregister(id);
            return Err(shared.unreachable());
        }
        match tokio::time::timeout(limit, rx).await {
            Err(_) => {
                shared.unregister(id);
                Err(error::timeout(format!("QMP `{command}` on {}", self.inner.socket.display()), limit))
            }
            Ok(Err(_)) => Err(shared.unreachable()),
            Ok(Ok(Reply::Closed)) => Err(shared.unreachable()),
            Ok(Ok(Reply::Return(value))) => Ok(value),
            Ok(Ok(Reply::Error { class, desc })) => {
                tracing::debug!(%class, %desc, "QMP error reply");
                Err(error::command(QmpCommandError { command: command.to_string(), class, desc }))
            }
        }
    }
}

/// The [`QmpCommandError`] inside `err`, if `err` is a QMP error reply.
pub fn command_error(err: &stagecore::Error) -> Option<&QmpCommandError> {
    match err {
        stagecore::Error::Backend { source, .. } => source.downcast_ref::<QmpCommandError>(),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
