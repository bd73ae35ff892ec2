//! The client: typed qemu-guest-agent commands over any [`Transport`].

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use serde_json::{Value, json};
use stagecore::{Error, GuestExec, GuestOutput, Result};
use tokio::time::Instant;
use tracing::Instrument;

use crate::error::{AgentError, BACKEND, is_no_such_file};
use crate::transport::Transport;

/// The `PATH` a command gets when the caller sets other variables but no `PATH` (the agent replaces the whole
/// environment when any variable is given).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Limits of an [`Agent`].
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bytes kept per stream (stdout, stderr) of `guest-exec`; more sets [`GuestOutput::truncated`]. Default 1 MiB.
    pub max_output: usize,
    /// Bytes per `guest-file-read` / `guest-file-write` call. Default 48 KiB.
    pub file_chunk: usize,
    /// Largest file read or written. Default 64 MiB.
    pub max_file: usize,
    /// Timeout of one agent call. Default 10 s.
    pub call_timeout: Duration,
    /// First wait between `guest-exec-status` polls (doubles each time). Default 5 ms.
    pub poll_min: Duration,
    /// Longest wait between `guest-exec-status` polls. Default 100 ms.
    pub poll_max: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_output: 1 << 20,
            file_chunk: 48 << 10,
            max_file: 64 << 20,
            call_timeout: Duration::from_secs(10),
            poll_min: Duration::from_millis(5),
            poll_max: Duration::from_millis(100),
        }
    }
}

/// What `guest-info` says: the agent's version and its enabled commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// The agent's version, e.g. `7.2.22`.
    pub version: String,
    /// The enabled commands, e.g. `guest-exec`.
    pub commands: Vec<String>,
}

/// What `guest-get-osinfo` says (fields the guest does not report are `None`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct OsInfo {
    /// e.g. `debian`.
    pub id: Option<String>,
    /// e.g. `12`.
    pub version_id: Option<String>,
    /// e.g. `Debian GNU/Linux 12 (bookworm)`.
    pub pretty_name: Option<String>,
    /// e.g. `6.1.0-57-cloud-amd64`.
    pub kernel_release: Option<String>,
}

/// Whether the guest's filesystems are frozen (`guest-fsfreeze-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeStatus {
    /// Filesystems accept writes.
    Thawed,
    /// Filesystems are frozen (writes block until thawed).
    Frozen,
}

/// A qemu-guest-agent client.
///
/// `label` is what errors and tracing name (e.g. `prod/web`), never anything secret. Cheap to clone (the
/// transport is shared). File contents and stdin never appear in errors or logs.
#[derive(Debug, Clone)]
pub struct Agent {
    transport: Arc<dyn Transport>,
    label: Arc<str>,
    limits: Limits,
}

#[derive(Deserialize)]
struct ExecStatus {
    exited: bool,
    exitcode: Option<i64>,
    signal: Option<i64>,
    #[serde(rename = "out-data")]
    out_data: Option<String>,
    #[serde(rename = "err-data")]
    err_data: Option<String>,
    #[serde(rename = "out-truncated", default)]
    out_truncated: bool,
    #[serde(rename = "err-truncated", default)]
    err_truncated: bool,
}

#[derive(Deserialize)]
struct FileRead {
    count: usize,
    #[serde(rename = "buf-b64")]
    buf_b64: String,
    eof: bool,
}

#[derive(Deserialize)]
struct FileWrite {
    count: usize,
}

impl Agent {
    /// A client over `transport`; `label` names the guest in errors and traces.
    pub fn new(transport: Arc<dyn Transport>, label: impl Into<String>) -> Self {
        Agent { transport, label: Arc::from(label.into()), limits: Limits::default() }
    }

    /// Replaces the limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The label errors and traces use.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The limits in use.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The transport (e.g. for [`Transport::reset`] after the guest restarted).
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    fn protocol(&self, command: &str, detail: impl Into<String>) -> Error {
        AgentError::Protocol { label: self.label.to_string(), command: command.to_string(), detail: detail.into() }
            .into()
    }

    async fn call(&self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.transport.call(command, arguments, self.limits.call_timeout).await
    }

    async fn call_as<T: for<'de> Deserialize<'de>>(&self, command: &str, arguments: Option<Value>) -> Result<T> {
        let v = self.call(command, arguments).await?;
        serde_json::from_value(v).map_err(|e| self.protocol(command, format!("unexpected reply: {e}")))
    }

    /// `guest-ping`.
    pub async fn ping(&self, timeout: Duration) -> Result<()> {
        self.transport.call("guest-ping", None, timeout).await.map(drop)
    }

    /// Retries [`Agent::ping`] (with a transport reset between tries) until it answers or `timeout` passes.
    ///
    /// Then [`Error::Unreachable`] with endpoint `guest agent of <label>` and the number of tries and the last
    /// error as the reason.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let span = tracing::debug_span!("qga_wait_ready", label = %self.label);
        async {
            let start = Instant::now();
            let deadline = start + timeout;
            let mut tries = 0u32;
            let mut last = String::from("no try made");
            loop {
                let now = Instant::now();
                if now >= deadline && tries > 0 {
                    break;
                }
                tries += 1;
                let try_timeout = (deadline - now).clamp(Duration::from_millis(10), Duration::from_secs(2));
                match self.ping(try_timeout).await {
                    Ok(()) => {
                        tracing::debug!(tries, waited_ms = start.elapsed().as_millis() as u64, "guest agent ready");
                        return Ok(());
                    }
                    Err(e) => last = e.to_string(),
                }
                self.transport.reset().await;
                // A missing or refusing socket fails at once: do not spin on it.
                let pause = Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now()));
                tokio::time::sleep(pause).await;
            }
            Err(Error::Unreachable {
                endpoint: format!("guest agent of {}", self.label),
                reason: format!(
                    "no answer to guest-ping within {:.0} s ({tries} tries; last: {last})",
                    timeout.as_secs_f64()
                ),
            })
        }
        .instrument(span)
        .await
    }

    /// `guest-info`: the agent's version and enabled commands.
    pub async fn info(&self) -> Result<AgentInfo> {
        #[derive(Deserialize)]
        struct Cmd {
            name: String,
            enabled: bool,
        }
        #[derive(Deserialize)]
        struct Info {
            version: String,
            supported_commands: Vec<Cmd>,
        }
        let info: Info = self.call_as("guest-info", None).await?;
        Ok(AgentInfo {
            version: info.version,
            commands: info.supported_commands.into_iter().filter(|c| c.enabled).map(|c| c.name).collect(),
        })
    }

    /// `guest-get-osinfo`.
    pub async fn osinfo(&self) -> Result<OsInfo> {
        self.call_as("guest-get-osinfo", None).await
    }

    /// Runs a command: `guest-exec` with captured output, stdin (`input-data`) and environment, then
    /// `guest-exec-status` with backoff until it exited or `request.timeout` passed.
    ///
    /// A timeout gives [`Error::Timeout`] (`guest command `…` in <label>`) and the command is sent `SIGKILL`
    /// (best effort, through `sh -c kill`). A command killed by a signal reports `128 + signal`. When `env`
    /// is not empty and sets no `PATH`, [`DEFAULT_PATH`] is added (the agent would otherwise run the command
    /// with no `PATH` at all).
    pub async fn exec(&self, request: &GuestExec) -> Result<GuestOutput> {
        let shown = request.display();
        let span = tracing::debug_span!("qga_exec", label = %self.label, command = %shown);
        async {
            let Some((path, args)) = request.argv.split_first() else {
                return Err(Error::invalid("argv", "a guest command needs at least the program"));
            };
            let deadline = Instant::now() + request.timeout;
            let mut arguments = json!({"path": path, "arg": args, "capture-output": true});
            if !request.env.is_empty() {
                let mut env = request.env.clone();
                if !env.iter().any(|kv| kv.starts_with("PATH=")) {
                    env.push(format!("PATH={DEFAULT_PATH}"));
                }
                arguments["env"] = json!(env);
            }
            if let Some(stdin) = &request.stdin {
                arguments["input-data"] = json!(B64.encode(stdin));
            }
            #[derive(Deserialize)]
            struct Pid {
                pid: i64,
            }
            let Pid { pid } = self.call_as("guest-exec", Some(arguments)).await?;
            let mut delay = self.limits.poll_min;
            loop {
                let status: ExecStatus = self.call_as("guest-exec-status", Some(json!({"pid": pid}))).await?;
                if status.exited {
                    return self.output(status);
                }
                let now = Instant::now();
                if now >= deadline {
                    self.kill(pid).await;
                    return Err(Error::Timeout {
                        operation: format!("guest command `{shown}` in {}", self.label),
                        seconds: request.timeout.as_secs_f64(),
                    });
                }
                tokio::time::sleep(delay.min(deadline - now)).await;
                delay = (delay * 2).min(self.limits.poll_max);
            }
        }
        .instrument(span)
        .await
    }

    fn output(&self, status: ExecStatus) -> Result<GuestOutput> {
        let exit_code = match (status.exitcode, status.signal) {
            (Some(code), _) => code as i32,
            (None, Some(sig)) => 128 + sig as i32,
            (None, None) => return Err(self.protocol("guest-exec-status", "exited without exitcode or signal")),
        };
        let mut truncated = status.out_truncated || status.err_truncated;
        let mut stream = |data: Option<String>, name: &str| -> Result<Vec<u8>> {
            let mut bytes = match data {
                Some(d) => B64
                    .decode(d.as_bytes())
                    .map_err(|e| self.protocol("guest-exec-status", format!("{name} is not base64: {e}")))?,
                None => Vec::new(),
            };
            if bytes.len() > self.limits.max_output {
                bytes.truncate(self.limits.max_output);
                truncated = true;
            }
            Ok(bytes)
        };
        let stdout = stream(status.out_data, "out-data")?;
        let stderr = stream(status.err_data, "err-data")?;
        Ok(GuestOutput { exit_code, stdout, stderr, truncated })
    }

    /// Best effort: `SIGKILL` to a command that ran out of time, and collect its status.
    async fn kill(&self, pid: i64) {
        let args = json!({"path": "/bin/sh", "arg": ["-c", format!("kill -9 {pid}")], "capture-output": false});
        if let Err(e) = self.call("guest-exec", Some(args)).await {
            tracing::debug!(pid, error = %e, "could not kill a timed-out guest command");
            return;
        }
        // The agent keeps an exited command's status until it is asked once: ask (a few tries).
        let mut delay = self.limits.poll_min;
        for _ in 0..6 {
            tokio::time::sleep(delay).await;
            match self.call_as::<ExecStatus>("guest-exec-status", Some(json!({"pid": pid}))).await {
                Ok(status) if !status.exited => delay = (delay * 2).min(self.limits.poll_max),
                _ => return,
            }
        }
    }

    async fn open(&self, path: &str, mode: &str, kind: &'static str) -> Result<i64> {
        match self.call("guest-file-open", Some(json!({"path": path, "mode": mode}))).await {
            Ok(v) => v.as_i64().ok_or_else(|| self.protocol("guest-file-open", "handle is not an integer")),
            Err(e) if is_no_such_file(&e) => Err(Error::not_found(kind, format!("{path} in {}", self.label))),
            Err(e) => Err(e),
        }
    }

    async fn close(&self, handle: i64) -> Result<()> {
        self.call("guest-file-close", Some(json!({"handle": handle}))).await.map(drop)
    }

    /// Reads a whole file: `guest-file-open` `r`, `guest-file-read` in chunks until eof, `guest-file-close`
    /// (also after an error). A missing file is [`Error::NotFound`] naming the path.
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let span = tracing::debug_span!("qga_read_file", label = %self.label, path);
        async {
            let handle = self.open(path, "r", "guest file").await?;
            let result = self.read_all(path, handle).await;
            let closed = self.close(handle).await;
            let content = result?;
            closed?;
            tracing::debug!(bytes = content.len(), "read guest file");
            Ok(content)
        }
        .instrument(span)
        .await
    }

    async fn read_all(&self, path: &str, handle: i64) -> Result<Vec<u8>> {
        let chunk = self.limits.file_chunk.max(1);
        let mut content = Vec::new();
        loop {
            let r: FileRead = self.call_as("guest-file-read", Some(json!({"handle": handle, "count": chunk}))).await?;
            let bytes = B64
                .decode(r.buf_b64.as_bytes())
                .map_err(|e| self.protocol("guest-file-read", format!("buf-b64 is not base64: {e}")))?;
            if bytes.len() != r.count {
                return Err(
                    self.protocol("guest-file-read", format!("count says {} bytes, data has {}", r.count, bytes.len()))
                );
            }
            content.extend_from_slice(&bytes);
            if content.len() > self.limits.max_file {
                return Err(Error::backend_msg(
                    BACKEND,
                    format!("{path} in {} is larger than the limit of {} bytes", self.label, self.limits.max_file),
                ));
            }
            if r.eof || r.count == 0 {
                return Ok(content);
            }
        }
    }

    /// Writes a whole file: `guest-file-open` `w` (truncates; an existing file keeps its mode), chunked
    /// `guest-file-write`, `guest-file-flush`, `guest-file-close`; then, when `mode` is set,
    /// `chmod <octal> <path>` through `guest-exec` (its exit code checked). A missing directory gives
    /// [`Error::NotFound`] naming the path.
    pub async fn write_file(&self, path: &str, content: &[u8], mode: Option<u32>) -> Result<()> {
        let span = tracing::debug_span!("qga_write_file", label = %self.label, path, bytes = content.len());
        async {
            if content.len() > self.limits.max_file {
                return Err(Error::invalid(
                    "content",
                    format!("{} bytes is over the limit of {} bytes", content.len(), self.limits.max_file),
                ));
            }
            if let Some(m) = mode
                && m > 0o7777
            {
                return Err(Error::invalid("mode", format!("{m:o} is not a permission mode (at most 7777)")));
            }
            let handle = self.open(path, "w", "guest file").await?;
            let result = self.write_all(handle, content).await;
            let closed = self.close(handle).await;
            result?;
            closed?;
            if let Some(m) = mode {
                let chmod = GuestExec::new(["chmod".to_string(), "--".to_string(), format!("{m:o}"), path.to_string()])
                    .timeout(self.limits.call_timeout);
                let out = self.exec(&chmod).await?;
                if !out.success() {
                    return Err(Error::guest_command(self.label.to_string(), chmod.display(), &out));
                }
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    async fn write_all(&self, handle: i64, content: &[u8]) -> Result<()> {
        let chunk = self.limits.file_chunk.max(1);
        let mut offset = 0;
        while offset < content.len() {
            let end = (offset + chunk).min(content.len());
            let piece = &content[offset..end];
            let w: FileWrite =
                self.call_as("guest-file-write", Some(json!({"handle": handle, "buf-b64": B64.encode(piece)}))).await?;
            if w.count == 0 || w.count > piece.len() {
                return Err(self.protocol("guest-file-write", format!("wrote {} of {} bytes", w.count, piece.len())));
            }
            offset += w.count;
        }
        self.call("guest-file-flush", Some(json!({"handle": handle}))).await.map(drop)
    }

    /// `guest-fsfreeze-freeze`: the number of filesystems frozen.
    ///
    /// When the call times out or the connection is lost the guest may still be frozen: a best-effort thaw
    /// follows. (After an error reply the agent has thawed a partial freeze itself.)
    pub async fn fsfreeze_freeze(&self, timeout: Duration) -> Result<u32> {
        let span = tracing::debug_span!("qga_fsfreeze_freeze", label = %self.label);
        async {
            match self.transport.call("guest-fsfreeze-freeze", None, timeout).await {
                Ok(v) => self.count("guest-fsfreeze-freeze", v),
                // An error reply means the agent did not freeze (it thaws a partial freeze itself); after a
                // timeout or a lost connection nobody knows, and a guest left frozen blocks every writer.
                Err(e @ (Error::Timeout { .. } | Error::Unreachable { .. })) => {
                    if let Err(thaw) = self.fsfreeze_thaw(self.limits.call_timeout).await {
                        tracing::warn!(error = %thaw, "thaw after a failed freeze failed too");
                    }
                    Err(e)
                }
                Err(e) => Err(e),
            }
        }
        .instrument(span)
        .await
    }

    /// `guest-fsfreeze-thaw`: the number of filesystems thawed (0 when nothing was frozen).
    pub async fn fsfreeze_thaw(&self, timeout: Duration) -> Result<u32> {
        let v = self.transport.call("guest-fsfreeze-thaw", None, timeout).await?;
        self.count("guest-fsfreeze-thaw", v)
    }

    fn count(&self, command: &str, v: Value) -> Result<u32> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.protocol(command, "reply is not a filesystem count"))
    }

    /// `guest-fsfreeze-status`.
    pub async fn fsfreeze_status(&self) -> Result<FreezeStatus> {
        match self.call("guest-fsfreeze-status", None).await?.as_str() {
            Some("thawed") => Ok(FreezeStatus::Thawed),
            Some("frozen") => Ok(FreezeStatus::Frozen),
            other => Err(self.protocol("guest-fsfreeze-status", format!("unknown status {other:?}"))),
        }
    }

    /// `guest-shutdown` (power off). The agent sends no reply on success: after a ping proves the agent is
    /// reachable, a closed connection or no answer within the call timeout counts as success; an error reply
    /// is an error.
    pub async fn shutdown(&self) -> Result<()> {
        let span = tracing::debug_span!("qga_shutdown", label = %self.label);
        async {
            self.ping(self.limits.call_timeout).await?;
            match self.call("guest-shutdown", Some(json!({"mode": "powerdown"}))).await {
                Ok(_) => Ok(()),
                Err(Error::Unreachable { .. } | Error::Timeout { .. }) => {
                    self.transport.reset().await;
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        .instrument(span)
        .await
    }
}
