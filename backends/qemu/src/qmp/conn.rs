//! The QMP connection machinery: greeting, the reader task that routes replies by id and events to
//! subscribers, the writer task, and the shared pending-call table that is failed all at once when
//! the socket is lost.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::Value;
use stagecore::Result;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::types::{QemuVersion, QmpEvent};
use crate::error;

/// What a pending call receives.
pub(super) enum Reply {
    Return(Value),
    Error { class: super::ErrorClass, desc: String },
    Closed,
}

/// State shared by the client handles and its two tasks.
pub(super) struct Shared {
    socket: PathBuf,
    state: Mutex<State>,
    pub(super) events: EventHub,
}

struct State {
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    closed: Option<String>,
}

/// The broadcast side of events; dropped when the connection closes so subscribers see `Closed`.
pub(super) struct EventHub(Mutex<Option<broadcast::Sender<QmpEvent>>>);

impl EventHub {
    pub(super) fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        match &*lock(&self.0) {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    fn send(&self, ev: QmpEvent) {
        if let Some(tx) = &*lock(&self.0) {
            // No subscriber is fine: events are then dropped.
            let _ = tx.send(ev);
        }
    }

    fn close(&self) {
        lock(&self.0).take();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    pub(super) fn new(socket: &Path, capacity: usize) -> Self {
        Shared {
            socket: socket.to_path_buf(),
            state: Mutex::new(State { pending: HashMap::new(), closed: None }),
            events: EventHub(Mutex::new(Some(broadcast::channel(capacity).0))),
        }
    }

    /// Registers a pending call, or fails at once when the connection is already lost.
    pub(super) fn register(&self, id: u64, tx: oneshot::Sender<Reply>) -> Result<()> {
        let mut st = lock(&self.state);
        if let Some(reason) = &st.closed {
            return Err(error::unreachable(&self.socket, reason.clone()));
        }
        st.pending.insert(id, tx);
        Ok(())
    }

    pub(super) fn unregister(&self, id: u64) {
        lock(&self.state).pending.remove(&id);
    }

    pub(super) fn closed_reason(&self) -> Option<String> {
        lock(&self.state).closed.clone()
    }

    /// The error every call gets once the connection is lost.
    pub(super) fn unreachable(&self) -> stagecore::Error {
        let reason = self.closed_reason().unwrap_or_else(|| "QMP connection lost".to_string());
        error::unreachable(&self.socket, reason)
    }

    /// Marks the connection lost and fails every pending call.
    fn close(&self, reason: String) {
        let pending = {
            let mut st = lock(&self.state);
            if st.closed.is_none() {
                tracing::debug!(socket = %self.socket.display(), %reason, "QMP connection closed");
                st.closed = Some(reason);
            }
            std::mem::take(&mut st.pending)
        };
        for (_, tx) in pending {
            let _ = tx.send(Reply::Closed);
        }
        self.events.close();
    }

    /// Routes one message from QEMU: an event to subscribers, a reply to its caller by id.
    fn dispatch(&self, line: &str) {
        let msg: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(socket = %self.socket.display(), %e, "unparseable QMP message");
                return;
            }
        };
        if msg.get("event").is_some() {
            match serde_json::from_value::<QmpEvent>(msg) {
                Ok(ev) => self.events.send(ev),
                Err(e) => tracing::warn!(%e, "malformed QMP event"),
            }
            return;
        }
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            tracing::warn!(socket = %self.socket.display(), %line, "QMP reply without our id");
            return;
        };
        let reply = if let Some(ret) = msg.get("return") {
            Reply::Return(ret.clone())
        } else if let Some(err) = msg.get("error") {
            let class = err.get("class").and_then(Value::as_str).unwrap_or("GenericError");
            let desc = err.get("desc").and_then(Value::as_str).unwrap_or_default();
            Reply::Error { class: super::ErrorClass::from_name(class), desc: desc.to_string() }
        } else {
            tracing::warn!(%line, "QMP reply with neither return nor error");
            return;
        };
        match lock(&self.state).pending.remove(&id) {
            Some(tx) => {
                let _ = tx.send(reply);
            }
            None => tracing::debug!(id, "QMP reply for a call that gave up (timeout)"),
        }
    }
}

/// A connected socket after the greeting.
pub(super) struct Opened {
    pub(super) reader: Lines<BufReader<OwnedReadHalf>>,
    pub(super) writer: OwnedWriteHalf,
    pub(super) version: QemuVersion,
}

/// Connects, retrying while the listen backlog is full (QEMU listens with a backlog of 1 and
/// accepts one client at a time, so probes and reconnects can briefly fill it).
async fn connect(socket: &Path) -> Result<UnixStream> {
    loop {
        match UnixStream::connect(socket).await {
            Ok(stream) => return Ok(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Err(e) => return Err(error::unreachable(socket, e.to_string())),
        }
    }
}

/// Connects and reads the greeting (the caller bounds it with a timeout).
pub(super) async fn open(socket: &Path) -> Result<Opened> {
    let stream = connect(socket).await?;
    let (read, writer) = stream.into_split();
    let mut reader = BufReader::new(read).lines();
    let line = reader
        .next_line()
        .await
        .map_err(|e| error::unreachable(socket, format!("reading QMP greeting: {e}")))?
        .ok_or_else(|| error::unreachable(socket, "closed before the QMP greeting"))?;
    let greeting: Value = serde_json::from_str(&line).map_err(|e| error::protocol(socket, e))?;
    let version = greeting
        .pointer("/QMP/version/qemu")
        .and_then(|v| serde_json::from_value::<QemuVersion>(v.clone()).ok())
        .ok_or_else(|| error::protocol(socket, format!("not a QMP greeting: {line}")))?;
    Ok(Opened { reader, writer, version })
}

/// Reads messages until the socket closes, then fails everything pending.
pub(super) async fn read_loop(mut lines: Lines<BufReader<OwnedReadHalf>>, shared: std::sync::Arc<Shared>) {
    let reason = loop {
        match lines.next_line().await {
            Ok(Some(line)) if line.trim().is_empty() => continue,
            Ok(Some(line)) => shared.dispatch(&line),
            Ok(None) => break "QMP connection closed by QEMU (QEMU exited or was killed)".to_string(),
            Err(e) => break format!("QMP connection closed: read failed ({e}); QEMU exited or was killed?"),
        }
    };
    shared.close(reason);
}

/// Writes queued messages in order; a write failure closes the connection for everyone.
pub(super) async fn write_loop(
    mut writer: OwnedWriteHalf,
    mut outbox: mpsc::UnboundedReceiver<Vec<u8>>,
    shared: std::sync::Arc<Shared>,
) {
    while let Some(line) = outbox.recv().await {
        if let Err(e) = writer.write_all(&line).await {
            shared.close(format!("QMP connection closed: write failed ({e})"));
            return;
        }
    }
}
