//! How an [`crate::Agent`] reaches its guest agent: the [`Transport`] trait and QEMU's unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::Instrument;

use crate::error::{AgentError, AgentFailure};

/// The byte the agent resets its parser on, and puts before every `guest-sync-delimited` answer.
const SENTINEL: u8 = 0xFF;

/// One way to reach an agent.
///
/// QEMU: a unix socket ([`SocketTransport`]). libvirt: `virDomainQemuAgentCommand` (the libvirt backend
/// implements this trait; libvirt does the sync handshake itself).
#[async_trait]
pub trait Transport: Send + Sync + std::fmt::Debug {
    /// Sends `{"execute": command, "arguments": arguments}` and returns the `return` value.
    ///
    /// An agent `error` reply becomes [`AgentFailure`] turned into a [`stagecore::Error`] (`.into()`) naming the
    /// command; a call that does not finish within `timeout` is [`stagecore::Error::Timeout`]; a peer that
    /// cannot be reached or hangs up is [`stagecore::Error::Unreachable`].
    async fn call(&self, command: &str, arguments: Option<Value>, timeout: Duration) -> stagecore::Result<Value>;

    /// Drops any connection state so the next call reconnects (after the guest restarted).
    async fn reset(&self);
}

/// QEMU's `-chardev socket,path=…,server=on,wait=off` agent socket.
///
/// Connects lazily. On every (re)connect it does the `guest-sync-delimited` handshake with a fresh random id:
/// it sends `0xFF` first (the agent drops any half-read request), then skips stale replies and `0xFF` bytes
/// until the answer with its id; the sync request is sent again with a new id every second while nothing
/// answers (a guest whose agent is not up yet). One request at a time (a tokio mutex), a timeout per call.
/// After a timeout, an I/O error, a protocol error or a cancelled call the connection is dropped, so the next
/// call reconnects and re-syncs: a late reply to an earlier request never reaches a later call.
///
/// QEMU serves one client at a time on this socket: keep one `SocketTransport` per socket.
pub struct SocketTransport {
    path: PathBuf,
    label: String,
    resync_every: Duration,
    max_line: usize,
    conn: Mutex<Option<Conn>>,
}

impl std::fmt::Debug for SocketTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketTransport").field("path", &self.path).field("label", &self.label).finish_non_exhaustive()
    }
}

impl SocketTransport {
    /// A transport for the agent socket at `path`; `label` names the guest in errors and traces (e.g. `prod/web`).
    pub fn new(path: impl Into<PathBuf>, label: impl Into<String>) -> Self {
        SocketTransport {
            path: path.into(),
            label: label.into(),
            resync_every: Duration::from_secs(1),
            // The agent caps captured output at 16 MiB per stream: base64 of both streams fits.
            max_line: 64 << 20,
            conn: Mutex::new(None),
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How often an unanswered `guest-sync-delimited` is sent again with a fresh id (default 1 s).
    pub fn with_resync_interval(mut self, every: Duration) -> Self {
        self.resync_every = every.max(Duration::from_millis(1));
        self
    }

    fn io(&self, detail: impl Into<String>) -> AgentError {
        AgentError::Io { label: self.label.clone(), endpoint: self.path.display().to_string(), detail: detail.into() }
    }

    fn protocol(&self, command: &str, detail: impl Into<String>) -> AgentError {
        AgentError::Protocol { label: self.label.clone(), command: command.to_string(), detail: detail.into() }
    }

    async fn connect(&self) -> Result<Conn, AgentError> {
        let stream = UnixStream::connect(&self.path).await.map_err(|e| {
            self.io(match e.kind() {
                std::io::ErrorKind::NotFound => "socket does not exist (is QEMU running?)".to_string(),
                std::io::ErrorKind::ConnectionRefused => "connection refused (QEMU is not listening)".to_string(),
                _ => format!("connect: {e}"),
            })
        })?;
        let mut conn = Conn { stream, buf: Vec::new(), scanned: 0, clean: false };
        self.sync(&mut conn).await?;
        conn.clean = true;
        Ok(conn)
    }

    /// The `guest-sync-delimited` handshake; returns once the agent echoed our latest id.
    async fn sync(&self, conn: &mut Conn) -> Result<(), AgentError> {
        let mut tries = 0u32;
        loop {
            tries += 1;
            let id = fresh_id();
            let mut msg = vec![SENTINEL];
            serde_json::to_writer(
                &mut msg,
                &serde_json::json!({"execute": "guest-sync-delimited", "arguments": {"id": id}}),
            )
            .map_err(|e| self.protocol("guest-sync-delimited", e.to_string()))?;
            msg.push(b'\n');
            conn.write_all(&msg).await.map_err(|e| self.io(format!("write: {e}")))?;
            let until = Instant::now() + self.resync_every;
            loop {
                let line = match tokio::time::timeout_at(until, conn.read_line(self.max_line)).await {
                    Err(_) => break, // nothing (more) came: send a new id
                    Ok(line) => line.map_err(|e| self.io(e))?,
                };
                let tail = after_sentinel(&line);
                if tail.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match serde_json::from_slice::<Value>(tail) {
                    Ok(v) if v.get("return").and_then(Value::as_u64) == Some(id) => {
                        tracing::debug!(tries, "guest agent synced");
                        return Ok(());
                    }
                    _ => tracing::debug!(bytes = line.len(), "skipped a stale reply while syncing"),
                }
            }
        }
    }

    async fn exchange(&self, slot: &mut Option<Conn>, command: &str, request: &[u8]) -> Result<Value, AgentError> {
        if slot.as_ref().is_some_and(|c| !c.clean) {
            // An earlier call was cancelled or failed half-way: its reply may still come.
            *slot = None;
        }
        if slot.is_none() {
            *slot = Some(self.connect().await?);
        }
        let Some(conn) = slot.as_mut() else { unreachable!("connection was just set") };
        conn.clean = false;
        let result = self.request(conn, command, request).await;
        match &result {
            Ok(_) | Err(AgentError::Reply(_)) => conn.clean = true,
            Err(_) => *slot = None,
        }
        result
    }

    async fn request(&self, conn: &mut Conn, command: &str, request: &[u8]) -> Result<Value, AgentError> {
        conn.write_all(request).await.map_err(|e| self.io(format!("write: {e}")))?;
        loop {
            let line = conn.read_line(self.max_line).await.map_err(|e| self.io(e))?;
            if line.contains(&SENTINEL) {
                tracing::debug!(bytes = line.len(), "skipped a stale sync reply");
                continue;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let reply: Value = serde_json::from_slice(&line)
                .map_err(|e| self.protocol(command, format!("reply is not JSON ({} bytes): {e}", line.len())))?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let text = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
                return Err(AgentError::Reply(AgentFailure::new(&self.label, command, text("class"), text("desc"))));
            }
            return Err(self.protocol(command, "reply has neither `return` nor `error`"));
        }
    }
}

#[async_trait]
impl Transport for SocketTransport {
    async fn call(&self, command: &str, arguments: Option<Value>, timeout: Duration) -> stagecore::Result<Value> {
        let span = tracing::debug_span!("qga_call", label = %self.label, command);
        async {
            let mut request = match arguments {
                Some(args) => serde_json::to_vec(&serde_json::json!({"execute": command, "arguments": args})),
                None => serde_json::to_vec(&serde_json::json!({"execute": command})),
            }
            .map_err(|e| self.protocol(command, e.to_string()))?;
            request.push(b'\n');
            let work = async {
                let mut slot = self.conn.lock().await;
                self.exchange(&mut slot, command, &request).await
            };
            match tokio::time::timeout(timeout, work).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => {
                    tracing::debug!("agent call timed out; the connection will be re-synced");
                    Err(AgentError::Timeout {
                        operation: format!("guest agent command `{command}` in {}", self.label),
                        waited: timeout,
                    }
                    .into())
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn reset(&self) {
        *self.conn.lock().await = None;
    }
}

/// One connection to the socket, with the bytes read past the last returned line.
struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    /// How far `buf` has been searched for a newline.
    scanned: usize,
    /// False while a request is outstanding: a connection left unclean is never reused.
    clean: bool,
}

impl Conn {
    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(data).await?;
        self.stream.flush().await
    }

    /// The next line without its newline. Cancel-safe: bytes already read stay in the buffer.
    async fn read_line(&mut self, max: usize) -> Result<Vec<u8>, String> {
        loop {
            if let Some(i) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + i;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                self.scanned = 0;
                return Ok(line);
            }
            self.scanned = self.buf.len();
            if self.buf.len() > max {
                return Err(format!("a reply line is longer than {max} bytes"));
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk).await {
                Ok(0) => return Err("the agent socket closed the connection".to_string()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
}

/// The part of a line after its last `0xFF` (a delimited answer, or junk before it).
fn after_sentinel(line: &[u8]) -> &[u8] {
    match line.iter().rposition(|&b| b == SENTINEL) {
        Some(i) => &line[i + 1..],
        None => line,
    }
}

/// A random, positive sync id that JSON parsers keep exact (below 2^53).
fn fresh_id() -> u64 {
    let id = (uuid::Uuid::new_v4().as_u128() as u64) & ((1 << 53) - 1);
    id.max(1)
}
