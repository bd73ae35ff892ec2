//! A **simulated** guest for the in-memory backend, so the guest-layer engines (inventory, drift,
//! footprints, gates, rebase) are tested without VMs. It is not a guest: no processes, no shell.
//! Each machine holds maps — files (path → bytes, mode), packages (name → version, arch),
//! services (name → enabled, running), listening TCP ports — and `exec` understands exactly:
//!
//! - the inventory collector ([`crate::inventory::SCRIPT`], recognised by its first line): the
//!   simulated guest prints the same sections the real script prints (os-release, `uname -r`,
//!   dpkg-query lines, systemctl-style service lines, `/proc/net/tcp` lines, `sha256sum` lines),
//!   so the same parser reads both;
//! - the gate probe ([`crate::promotion::PROBE_SCRIPT`]): a TCP connect or HTTP GET to a machine of
//!   the *same* environment (by logical name, `localhost` or `127.0.0.1`) succeeds when that machine
//!   runs and listens on the port; HTTP answers with the machine's simulated status (200);
//! - `stagecore-sim` commands:
//!   `pkg install NAME VERSION [ARCH]`, `pkg remove NAME`, `repo set NAME VERSION` (what the
//!   guest's package repository offers), `pkg upgrade NAME` (installs the repository's version), `service start|stop|enable|disable NAME`,
//!   `port open|close PORT`, `file write PATH CONTENT`, `file rm PATH`, `http-status CODE`,
//!   `hang` (the command times out), `agent-off` (the agent stops answering until the machine
//!   is started again), `exit N`; and the programs `true` and `false`.
//!
//! Anything else exits 127. A machine that is not running does not answer. Files, packages and
//! services are not on the simulated disks: guest changes leave the disk layer unchanged. A stage
//! cloned from a baseline gets the guests as they were at the baseline, with a new hostname,
//! machine-id and SSH host keys (a stage that regenerates them — which the drift engine must
//! normalise away).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use crate::{Error, GuestExec, GuestOutput, Result};

/// One simulated guest.
#[derive(Debug, Clone)]
pub(crate) struct SimGuest {
    pub(crate) hostname: String,
    pub(crate) kernel: String,
    pub(crate) packages: BTreeMap<String, (String, String)>,
    pub(crate) services: BTreeMap<String, (bool, bool)>,
    pub(crate) ports: BTreeSet<u16>,
    pub(crate) files: BTreeMap<String, (Vec<u8>, u32)>,
    pub(crate) http_status: u16,
    pub(crate) agent: bool,
    /// What `pkg upgrade NAME` installs (name → version): the guest's package repository.
    pub(crate) repo: BTreeMap<String, String>,
}

fn out(code: i32, stdout: impl Into<Vec<u8>>, stderr: &str) -> GuestOutput {
    GuestOutput { exit_code: code, stdout: stdout.into(), stderr: stderr.as_bytes().to_vec(), truncated: false }
}

fn hex(data: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in Sha256::digest(data) {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// A probe the simulated guest cannot answer alone (it needs another machine).
#[derive(Debug)]
pub(crate) struct Probe {
    pub(crate) kind: String,
    pub(crate) host: String,
    pub(crate) port: u16,
}

/// What an exec asks of the environment.
#[derive(Debug)]
pub(crate) enum Exec {
    /// Answered by the guest alone.
    Done(GuestOutput),
    /// A probe to resolve against the environment.
    Probe(Probe),
}

impl SimGuest {
    /// A fresh Debian-like guest called `hostname`, running a demo app on port 8080.
    pub(crate) fn new(hostname: &str) -> Self {
        let mut g = SimGuest {
            hostname: String::new(),
            kernel: "6.1.0-sim-amd64".into(),
            packages: [
                ("base-files", "12.4+deb12u11", "amd64"),
                ("bash", "5.2.15-2+b8", "amd64"),
                ("busybox", "1:1.35.0-4+b3", "amd64"),
                ("dpkg", "1.21.22", "amd64"),
                ("qemu-guest-agent", "1:7.2+dfsg-7+deb12u16", "amd64"),
                ("stagecore-demo-app", "1.0", "all"),
            ]
            .into_iter()
            .map(|(n, v, a)| (n.to_string(), (v.to_string(), a.to_string())))
            .collect(),
            services: [("app".to_string(), (true, true))].into(),
            ports: [8080].into(),
            files: BTreeMap::new(),
            http_status: 200,
            agent: true,
            repo: BTreeMap::new(),
        };
        g.files.insert("/etc/os-release".into(), (OS_RELEASE.as_bytes().to_vec(), 0o644));
        g.files.insert("/etc/app/app.conf".into(), (b"port=8080\ngreeting=hello\n".to_vec(), 0o644));
        g.files.insert("/opt/app/bin/app".into(), (b"#!/bin/sh\nexec httpd -f -p 8080\n".to_vec(), 0o755));
        g.regenerate_identity(hostname);
        g
    }

    /// New hostname, machine-id and SSH host keys, as a stage that regenerates its identity.
    pub(crate) fn regenerate_identity(&mut self, hostname: &str) {
        self.hostname = hostname.into();
        let id = uuid::Uuid::new_v4().simple().to_string();
        self.files.insert("/etc/hostname".into(), (format!("{hostname}\n").into_bytes(), 0o644));
        self.files.insert("/etc/machine-id".into(), (format!("{id}\n").into_bytes(), 0o444));
        for key in ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"] {
            self.files.insert(format!("/etc/ssh/{key}"), (format!("simulated key {id}\n").into_bytes(), 0o600));
        }
    }

    /// Runs a request.
    pub(crate) fn exec(&mut self, req: &GuestExec) -> Result<Exec> {
        let argv: Vec<&str> = req.argv.iter().map(String::as_str).collect();
        if let ["/bin/sh" | "sh", "-c", script, _name, args @ ..] = argv.as_slice() {
            if script.starts_with(crate::inventory::SCRIPT_MARKER) {
                return Ok(Exec::Done(self.inventory(args)));
            }
            if script.starts_with(crate::promotion::PROBE_MARKER) {
                return Ok(match args {
                    [kind, host, port, ..] => match port.parse() {
                        Ok(port) => Exec::Probe(Probe { kind: kind.to_string(), host: host.to_string(), port }),
                        Err(_) => Exec::Done(out(2, "", "stagecore-probe: bad port")),
                    },
                    _ => Exec::Done(out(2, "", "stagecore-probe: usage")),
                });
            }
        }
        let prog = argv.first().map(|p| p.rsplit('/').next().unwrap_or(p)).unwrap_or("");
        let done = |o| Ok(Exec::Done(o));
        match (prog, argv.get(1..).unwrap_or_default()) {
            ("true", _) => done(out(0, "", "")),
            ("false", _) => done(out(1, "", "")),
            ("stagecore-sim", args) => self.sim(args, req),
            _ => done(out(127, "", &format!("simulated guest: unknown command {}", req.display()))),
        }
    }

    fn sim(&mut self, args: &[&str], req: &GuestExec) -> Result<Exec> {
        let ok = |_: &mut Self| Ok(Exec::Done(out(0, "", "")));
        match args {
            ["pkg", "install", name, version, rest @ ..] => {
                let arch = rest.first().copied().unwrap_or("amd64");
                self.packages.insert(name.to_string(), (version.to_string(), arch.to_string()));
                ok(self)
            }
            ["repo", "set", name, version] => {
                self.repo.insert(name.to_string(), version.to_string());
                ok(self)
            }
            ["pkg", "upgrade", name] => match self.repo.get(*name).cloned() {
                Some(version) => {
                    let arch = self.packages.get(*name).map_or_else(|| "amd64".to_string(), |p| p.1.clone());
                    self.packages.insert(name.to_string(), (version, arch));
                    ok(self)
                }
                None => Ok(Exec::Done(out(100, "", &format!("E: Unable to locate package {name}")))),
            },
            ["pkg", "remove", name] => match self.packages.remove(*name) {
                Some(_) => ok(self),
                None => Ok(Exec::Done(out(100, "", &format!("dpkg: package {name} is not installed")))),
            },
            ["service", action, name] => {
                let entry = self.services.entry(name.to_string()).or_insert((false, false));
                match *action {
                    "start" => entry.1 = true,
                    "stop" => entry.1 = false,
                    "enable" => entry.0 = true,
                    "disable" => entry.0 = false,
                    _ => return Ok(Exec::Done(out(2, "", "usage: service start|stop|enable|disable NAME"))),
                }
                ok(self)
            }
            ["port", action, port] => {
                let Ok(port) = port.parse::<u16>() else { return Ok(Exec::Done(out(2, "", "bad port"))) };
                if *action == "open" {
                    self.ports.insert(port);
                } else {
                    self.ports.remove(&port);
                }
                ok(self)
            }
            ["file", "write", path, content] if path.starts_with('/') => {
                self.files.insert(path.to_string(), (content.as_bytes().to_vec(), 0o644));
                ok(self)
            }
            ["file", "rm", path] => {
                self.files.remove(*path);
                ok(self)
            }
            ["http-status", code] => match code.parse() {
                Ok(c) => {
                    self.http_status = c;
                    ok(self)
                }
                Err(_) => Ok(Exec::Done(out(2, "", "bad status"))),
            },
            ["hang"] => Err(Error::Timeout {
                operation: format!("guest command `{}`", req.display()),
                seconds: req.timeout.as_secs_f64(),
            }),
            ["agent-off"] => {
                self.agent = false;
                ok(self)
            }
            ["exit", code] => Ok(Exec::Done(out(code.parse().unwrap_or(2), "", &format!("exit {code}")))),
            _ => Ok(Exec::Done(out(127, "", &format!("stagecore-sim: unknown command {}", req.display())))),
        }
    }

    /// The collector's output, section by section, in the real script's format.
    fn inventory(&self, args: &[&str]) -> GuestOutput {
        let max: usize = args.first().and_then(|m| m.parse().ok()).unwrap_or(usize::MAX);
        let watched = args.get(2..).unwrap_or_default();
        let mut s = String::new();
        s.push_str("@@os\n");
        s.push_str(&String::from_utf8_lossy(self.files.get("/etc/os-release").map(|f| &f.0[..]).unwrap_or(b"")));
        let _ = writeln!(s, "@@kernel\n{}\n@@hostname\n{}\n@@packages\nformat dpkg", self.kernel, self.hostname);
        for (name, (version, arch)) in &self.packages {
            let _ = writeln!(s, "ii \t{name}\t{version}\t{arch}");
        }
        s.push_str("@@services\nformat systemd\n");
        for (name, (enabled, _)) in &self.services {
            let state = if *enabled { "enabled" } else { "disabled" };
            let _ = writeln!(s, "F {name}.service {state} enabled");
        }
        for (name, _) in self.services.iter().filter(|(_, (_, running))| *running) {
            let _ = writeln!(s, "R {name}.service loaded active running simulated");
        }
        s.push_str("@@ports\nfile tcp\n  sl  local_address rem_address   st\n");
        for (i, port) in self.ports.iter().enumerate() {
            let _ = writeln!(s, "   {i}: 00000000:{port:04X} 00000000:0000 0A 00000000:00000000 00:00000000");
        }
        s.push_str("@@files\n");
        for p in watched {
            let prefix = format!("{}/", p.trim_end_matches('/'));
            let under: Vec<_> = self.files.iter().filter(|(f, _)| f.starts_with(&prefix) || f == p).collect();
            if under.is_empty() {
                let _ = writeln!(s, "missing {p}");
                continue;
            }
            let _ = writeln!(s, "path bulk rw,noatime {p}");
            for (path, (data, _)) in under.into_iter().take(max) {
                let _ = writeln!(s, "{}  {path}", hex(data));
            }
        }
        s.push_str("@@end\n");
        out(0, s, "")
    }
}

const OS_RELEASE: &str = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm) [simulated]\"\nNAME=\"Debian GNU/Linux\"\n\
VERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\nID=debian\n";

/// Simulated guests of one environment: machine → guest.
pub(crate) type Guests = BTreeMap<String, SimGuest>;
