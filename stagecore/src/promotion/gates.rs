//! Built-in gates: health probes run *from inside a named machine* of an environment, through its
//! guest channel — a guest command that must exit 0, a TCP connect, an HTTP GET — with a timeout
//! per attempt and retries. Because the probe runs inside the environment, a fenced stage is probed
//! exactly like production (its machines reach each other at production's addresses).
//!
//! As promotion gates ([`ProbeGate`] implements [`Gate`]) they probe **production** after the
//! change; [`test_environment`] runs the same gates against any environment — a stage before it is
//! promoted — and returns a [`TestReport`].
//!
//! TCP and HTTP probes run [`PROBE_SCRIPT`] in the guest: `bash`'s `/dev/tcp` under coreutils'
//! `timeout`, so they need neither curl nor wget (the Debian test guest and systemd guests both
//! have bash; a guest without it fails the probe with exit 3 and says so).

use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::types::{Gate, GateContext, GateVerdict};
use crate::progress::{Progress, emit};
use crate::{Environment, GuestExec, Result};

pub use crate::guest::PROBE_MARKER;

/// The TCP/HTTP probe, run as `sh -c PROBE_SCRIPT stagecore-probe KIND HOST PORT PATH SECONDS`.
/// Exit 0 when connected (HTTP: the status line is printed); 124 on timeout.
pub const PROBE_SCRIPT: &str = r#"# stagecore-probe v1
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
kind=$1 host=$2 port=$3 path=$4 secs=$5
command -v bash >/dev/null 2>&1 || { echo "stagecore-probe: bash is needed for /dev/tcp" >&2; exit 3; }
case $kind in
  tcp) exec timeout "$secs" bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$host" "$port" ;;
  http) exec timeout "$secs" bash -c 'exec 3<>"/dev/tcp/$0/$1" || exit 1
        trap "" PIPE
        printf "GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n" "$2" "$0" >&3
        IFS= read -r line <&3 || exit 1
        printf "%s\n" "$line"' "$host" "$port" "$path" ;;
  *) echo "stagecore-probe: unknown kind $kind" >&2; exit 2 ;;
esac
"#;

/// What a probe checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Probe {
    /// A command in the machine must exit 0.
    Command {
        /// argv.
        argv: Vec<String>,
    },
    /// A TCP connection to `host:port` must open.
    Tcp {
        /// Address as seen from inside the machine (`127.0.0.1`, `app`, `10.0.2.5`).
        host: String,
        /// Port.
        port: u16,
    },
    /// An HTTP GET of `http://host:port/path` must answer with a status in `expect`.
    Http {
        /// Address as seen from inside the machine.
        host: String,
        /// Port.
        port: u16,
        /// Path (`/`, `/health`).
        path: String,
        /// Accepted status codes (empty: 200–399).
        #[serde(default)]
        expect: Vec<u16>,
    },
}

/// A health probe run from inside one machine of an environment, with retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeGate {
    /// The gate's name (receipts, reports).
    pub name: String,
    /// Logical machine the probe runs in.
    pub machine: String,
    /// What it checks.
    pub probe: Probe,
    /// Time per attempt.
    pub timeout: Duration,
    /// Attempts in all (at least 1).
    pub attempts: u32,
    /// Pause between attempts.
    pub interval: Duration,
}

/// One probe's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// The gate.
    pub gate: String,
    /// The machine it ran in.
    pub machine: String,
    /// Whether it passed.
    pub passed: bool,
    /// Attempts made.
    pub attempts: u32,
    /// What the last attempt saw (`HTTP/1.0 200 OK`, `exited with 3: …`, `timed out`).
    pub detail: String,
    /// Wall time of all attempts, in milliseconds.
    pub millis: u64,
}

impl ProbeGate {
    fn new(name: &str, machine: &str, probe: Probe) -> Self {
        ProbeGate {
            name: name.into(),
            machine: machine.into(),
            probe,
            timeout: Duration::from_secs(10),
            attempts: 3,
            interval: Duration::from_secs(2),
        }
    }

    /// A guest command gate: `argv` in `machine` exits 0.
    pub fn command<I, S>(name: &str, machine: &str, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::new(name, machine, Probe::Command { argv: argv.into_iter().map(Into::into).collect() })
    }

    /// A TCP gate: from inside `machine`, `host:port` accepts a connection.
    pub fn tcp(name: &str, machine: &str, host: &str, port: u16) -> Self {
        Self::new(name, machine, Probe::Tcp { host: host.into(), port })
    }

    /// An HTTP gate: from inside `machine`, `GET http://host:port{path}` answers 200–399.
    pub fn http(name: &str, machine: &str, host: &str, port: u16, path: &str) -> Self {
        Self::new(name, machine, Probe::Http { host: host.into(), port, path: path.into(), expect: Vec::new() })
    }

    /// Sets the time per attempt.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets attempts and the pause between them.
    pub fn retries(mut self, attempts: u32, interval: Duration) -> Self {
        self.attempts = attempts.max(1);
        self.interval = interval;
        self
    }

    fn request(&self) -> GuestExec {
        let secs = self.timeout.as_secs().max(1).to_string();
        let script = |kind: &str, host: &str, port: u16, path: &str| {
            GuestExec::new([
                "/bin/sh",
                "-c",
                PROBE_SCRIPT,
                "stagecore-probe",
                kind,
                host,
                &port.to_string(),
                path,
                &secs,
            ])
        };
        let req = match &self.probe {
            Probe::Command { argv } => GuestExec::new(argv.clone()),
            Probe::Tcp { host, port } => script("tcp", host, *port, ""),
            Probe::Http { host, port, path, .. } => script("http", host, *port, path),
        };
        // The channel's own timeout is a little longer, so `timeout` in the guest answers first.
        req.timeout(self.timeout + Duration::from_secs(2))
    }

    /// One attempt: passed, and what was seen.
    async fn attempt(&self, env: &dyn Environment) -> (bool, String) {
        let Some(guest) = env.guest() else {
            return (false, format!("{} offers no guest channel to probe from", env.name()));
        };
        let output = match guest.exec(&self.machine, &self.request()).await {
            Ok(o) => o,
            Err(e) => return (false, e.to_string()),
        };
        let stderr = output.stderr_text().trim().chars().take(300).collect::<String>();
        match (&self.probe, output.exit_code) {
            (Probe::Http { expect, .. }, 0) => {
                let line = output.stdout_text().lines().next().unwrap_or_default().trim().to_string();
                let status = line.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok());
                let ok = match status {
                    Some(c) if expect.is_empty() => (200..400).contains(&c),
                    Some(c) => expect.contains(&c),
                    None => false,
                };
                (ok, if line.is_empty() { "no HTTP status line".into() } else { line })
            }
            (_, 0) => (true, "ok".into()),
            (_, 124) => (false, format!("timed out after {} s", self.timeout.as_secs().max(1))),
            (_, code) => (false, format!("exited with {code}{}", if stderr.is_empty() { "" } else { ": " }) + &stderr),
        }
    }

    /// Runs the probe against `env` (attempts until one passes or all are used).
    #[tracing::instrument(skip_all, fields(gate = %self.name, environment = env.name(), machine = %self.machine))]
    pub async fn run(&self, env: &dyn Environment) -> ProbeResult {
        let started = Instant::now();
        let mut attempts = 0;
        let mut detail = String::new();
        let mut passed = false;
        for i in 0..self.attempts.max(1) {
            if i > 0 && !self.interval.is_zero() {
                tokio::time::sleep(self.interval).await;
            }
            attempts += 1;
            let (ok, seen) = self.attempt(env).await;
            tracing::debug!(attempt = attempts, ok, %seen, "probe attempt");
            detail = seen;
            if ok {
                passed = true;
                break;
            }
        }
        ProbeResult {
            gate: self.name.clone(),
            machine: self.machine.clone(),
            passed,
            attempts,
            detail,
            millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }

    fn describe(&self) -> String {
        match &self.probe {
            Probe::Command { argv } => format!("`{}` in {}", argv.join(" "), self.machine),
            Probe::Tcp { host, port } => format!("tcp {host}:{port} from {}", self.machine),
            Probe::Http { host, port, path, .. } => format!("http://{host}:{port}{path} from {}", self.machine),
        }
    }
}

#[async_trait]
impl Gate for ProbeGate {
    fn name(&self) -> &str {
        &self.name
    }

    /// Probes production (already changed); the note says what was probed, the attempts and the
    /// last answer.
    async fn check(&self, ctx: &GateContext<'_>) -> Result<GateVerdict> {
        let r = self.run(ctx.production).await;
        Ok(GateVerdict {
            passed: r.passed,
            by: None,
            note: format!(
                "{}: {} after {} attempt(s) in {} ms: {}",
                self.describe(),
                if r.passed { "passed" } else { "failed" },
                r.attempts,
                r.millis,
                r.detail
            ),
        })
    }
}

/// The gates' results on one environment (a stage before promotion).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestReport {
    /// The environment probed.
    pub environment: String,
    /// Whether every gate passed.
    pub passed: bool,
    /// Per gate, in order.
    pub results: Vec<ProbeResult>,
}

/// Runs `gates` against `env` one after another (all of them, also after a failure) — the test
/// report of a stage before it is promoted.
pub async fn test_environment(env: &dyn Environment, gates: &[ProbeGate], progress: Option<&Progress>) -> TestReport {
    let mut results = Vec::new();
    for (i, g) in gates.iter().enumerate() {
        let r = g.run(env).await;
        let step = format!("{} {}", g.name, if r.passed { "passed" } else { "failed" });
        emit(progress, "gates", env.name(), &step, i as u64 + 1, gates.len() as u64);
        results.push(r);
    }
    TestReport { environment: env.name().into(), passed: results.iter().all(|r| r.passed), results }
}

#[cfg(test)]
mod tests {
    //! The probe script runs for real here, with this host's sh, bash and coreutils, against a
    //! loopback listener.

    use std::io::{Read, Write};
    use std::process::Command;

    use super::*;

    fn probe(args: &[&str]) -> std::process::Output {
        Command::new("/bin/sh")
            .arg("-c")
            .arg(PROBE_SCRIPT)
            .arg("stagecore-probe")
            .args(args)
            .output()
            .expect("run /bin/sh")
    }

    #[test]
    fn probe_script_speaks_tcp_and_http() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                let (mut conn, _) = listener.accept().unwrap();
                let (mut request, mut buf) = (Vec::new(), [0u8; 512]);
                while !request.ends_with(b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let request = String::from_utf8_lossy(&request).to_string();
                let _ = conn.write_all(b"HTTP/1.0 204 No Content\r\n\r\n");
                if request.starts_with("GET /health HTTP/1.0") {
                    return request;
                }
            }
            String::new()
        });
        let tcp = probe(&["tcp", "127.0.0.1", &port, "", "5"]);
        assert!(tcp.status.success(), "{tcp:?}");
        let http = probe(&["http", "127.0.0.1", &port, "/health", "5"]);
        assert!(http.status.success(), "{http:?}");
        assert_eq!(String::from_utf8_lossy(&http.stdout).trim(), "HTTP/1.0 204 No Content");
        assert!(server.join().unwrap().contains("Host: 127.0.0.1"), "the request had a Host header");

        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = closed.local_addr().unwrap().port().to_string();
        drop(closed);
        let refused = probe(&["tcp", "127.0.0.1", &dead, "", "5"]);
        assert!(!refused.status.success(), "{refused:?}");
        assert_eq!(probe(&["udp", "127.0.0.1", &dead, "", "5"]).status.code(), Some(2));
    }
}
