//! A **simulated** guest, shared by the in-memory backend ([`crate::memory`]) and the vCenter
//! simulator (`stagecore-vsphere-sim`, behind its guest-operations endpoints), so the guest-layer
//! engines (inventory, drift, footprints, gates, rebase) and a backend's guest channel are tested
//! without VMs. It is **not** an operating system: no processes, no kernel, no real shell.
//!
//! State: files (path → bytes, mode; directories are implied by paths), packages (name →
//! version, architecture), services (name → enabled, running), listening TCP ports, the HTTP
//! status the demo app answers, whether the agent answers, and a package repository for
//! `stagecore-sim pkg upgrade`. `/proc/sys/kernel/random/boot_id` is a file that
//! [`SimGuest::boot`] renews.
//!
//! [`SimGuest::exec`] understands:
//!
//! - the inventory collector ([`crate::inventory::SCRIPT`], recognised by its first line, run as
//!   `sh -c SCRIPT NAME MAX DDMODE PATH...`): answered from the maps with the same sections the real
//!   script prints (os-release, `uname -r`, dpkg-query lines, systemctl-style service lines,
//!   `/proc/net/tcp` lines, `sha256sum` lines), so the same parser reads both;
//! - the gate probe ([`crate::promotion::PROBE_SCRIPT`], by its first line): as the whole request
//!   it is handed back as [`Exec::Probe`] for the caller to resolve against its environment; inside
//!   a script it is answered by this guest alone ([`SimGuest::probe_locally`]: only to itself);
//! - `sh -c SCRIPT [NAME ARGS...]`: a **small shell** — words with single quotes, double quotes and
//!   backslashes; `$NAME`, `${NAME}`, `$?`, `$0`..`$9` expanded (no field splitting, no globbing);
//!   `NAME=VALUE` assignments; lists with `;`, newlines, `&&`, `||`; `!`; pipes `|`; redirections
//!   `<F`, `>F`, `>>F`, `2>F`, `2>>F`, `>&2`, `2>&1` (relative paths are under `/root`). No `if`,
//!   loops, functions, subshells or command substitution;
//! - commands: `true`, `:`, `false`, `exit [N]`, `echo [-n]`, `printf FORMAT [ARG...]` (`\n`, `\t`,
//!   `\\`, `\NNN` octal, `%s`, `%d`, `%%`), `cat [FILE...]`, `cp SRC DST`, `mv SRC DST`, `rm [-f] [-r]
//!   PATH...`, `mkdir [-p] DIR...`, `touch FILE...`, `stat -c FORMAT FILE` (`%a`, `%s`, `%n`), `sync`,
//!   `grep [-q] [-i] [-v] [-F] PATTERN [FILE...]` (PATTERN as a fixed string), `hostname`, `uname
//!   [-r]`, `id -u`, `env`, `sleep N` (reported as run time, see [`SimGuest::exec_timed`]), `svc
//!   start|stop|restart|status NAME` (the test guest's supervisor, over the services map),
//!   `dpkg -i FILE.deb` (a real `ar` archive whose `control.tar` and `data.tar` are
//!   **uncompressed**: installs the files — keeping existing conffiles — records the package, and
//!   restarts `app` as the demo app's postinst does; compressed members are refused, exit 2; see
//!   [`demo_deb`]), `dpkg-query -W NAME`, and the `stagecore-sim` commands:
//!   `pkg install NAME VERSION [ARCH]`, `pkg remove NAME`, `repo set NAME VERSION`, `pkg upgrade
//!   NAME` (installs the repository's version), `service start|stop|enable|disable NAME`, `port
//!   open|close PORT`, `file write PATH CONTENT`, `file rm PATH`, `http-status CODE`, `hang` (the
//!   command times out), `agent-off` (the agent stops answering until the machine is started
//!   again), `exit N`.
//!
//! A program is found by its last path component when called by a bare name or an absolute path;
//! anything else exits 127 (`sh: 1: NAME: not found`). Files, packages and services are not on any
//! simulated disk.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::{Error, GuestExec, GuestOutput, Result};

/// Where `boot_id` lives (renewed by [`SimGuest::boot`]).
pub const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// One simulated guest (see the module docs).
#[derive(Debug, Clone)]
pub struct SimGuest {
    /// Host name.
    pub hostname: String,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// Installed packages: name → (version, architecture).
    pub packages: BTreeMap<String, (String, String)>,
    /// Services: name → (enabled, running).
    pub services: BTreeMap<String, (bool, bool)>,
    /// Listening TCP ports.
    pub ports: BTreeSet<u16>,
    /// Files: path → (content, mode).
    pub files: BTreeMap<String, (Vec<u8>, u32)>,
    /// The HTTP status an HTTP probe of a listening port gets.
    pub http_status: u16,
    /// Whether the guest agent answers.
    pub agent: bool,
    /// What `stagecore-sim pkg upgrade NAME` installs (name → version): the guest's package repository.
    pub repo: BTreeMap<String, String>,
}

/// A probe the simulated guest cannot answer alone (it needs another machine).
#[derive(Debug, Clone)]
pub struct Probe {
    /// `tcp` or `http`.
    pub kind: String,
    /// Host as given (a machine name, `localhost`, `127.0.0.1`).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// What an exec asks of the environment.
#[derive(Debug)]
pub enum Exec {
    /// Answered by the guest alone.
    Done(GuestOutput),
    /// A probe to resolve against the environment.
    Probe(Probe),
}

/// Simulated guests of one environment: machine → guest.
pub type Guests = BTreeMap<String, SimGuest>;

const OS_RELEASE: &str = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm) [simulated]\"\nNAME=\"Debian GNU/Linux\"\n\
VERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\nID=debian\n";

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

fn is_sh(prog: &str) -> bool {
    matches!(prog, "sh" | "bash" | "dash") || ["/sh", "/bash", "/dash"].iter().any(|s| prog.ends_with(s))
}

impl SimGuest {
    /// A fresh Debian-like guest called `hostname`, running the demo app (`app`) on port 8080.
    pub fn new(hostname: &str) -> Self {
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

    /// New hostname, machine-id, SSH host keys and boot id, as a clone that regenerates its identity.
    pub fn regenerate_identity(&mut self, hostname: &str) {
        self.hostname = hostname.into();
        let id = uuid::Uuid::new_v4().simple().to_string();
        self.files.insert("/etc/hostname".into(), (format!("{hostname}\n").into_bytes(), 0o644));
        self.files.insert("/etc/machine-id".into(), (format!("{id}\n").into_bytes(), 0o444));
        for key in ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"] {
            self.files.insert(format!("/etc/ssh/{key}"), (format!("simulated key {id}\n").into_bytes(), 0o600));
        }
        self.boot();
    }

    /// A (re)boot: a new boot id, enabled services running, others stopped, the agent answering.
    pub fn boot(&mut self) {
        let boot_id = uuid::Uuid::new_v4().hyphenated().to_string();
        self.files.insert(BOOT_ID.into(), (format!("{boot_id}\n").into_bytes(), 0o444));
        for (enabled, running) in self.services.values_mut() {
            *running = *enabled;
        }
        self.agent = true;
    }

    /// Runs a request (see the module docs).
    pub fn exec(&mut self, req: &GuestExec) -> Result<Exec> {
        Ok(self.exec_timed(req)?.0)
    }

    /// Runs a request and says how long it would run (the sum of its `sleep`s), for simulators
    /// that show running processes. `hang` is `Error::Timeout`.
    pub fn exec_timed(&mut self, req: &GuestExec) -> Result<(Exec, Duration)> {
        let argv: Vec<&str> = req.argv.iter().map(String::as_str).collect();
        if let [sh, "-c", script, _name, args @ ..] = argv.as_slice()
            && is_sh(sh)
            && script.starts_with(crate::guest::PROBE_MARKER)
        {
            let probe = match args {
                [kind, host, port, ..] => match port.parse() {
                    Ok(port) => {
                        return Ok((
                            Exec::Probe(Probe { kind: kind.to_string(), host: host.to_string(), port }),
                            Duration::ZERO,
                        ));
                    }
                    Err(_) => out(2, "", "stagecore-probe: bad port"),
                },
                _ => out(2, "", "stagecore-probe: usage"),
            };
            return Ok((Exec::Done(probe), Duration::ZERO));
        }
        let mut env: BTreeMap<String, String> =
            [("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"), ("HOME", "/root")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        for kv in &req.env {
            if let Some((k, v)) = kv.split_once('=') {
                env.insert(k.to_string(), v.to_string());
            }
        }
        let mut ctx = Ctx {
            env,
            positional: Vec::new(),
            stdin: req.stdin.clone().unwrap_or_default(),
            last: 0,
            exited: false,
            runs_for: Duration::ZERO,
            depth: 0,
            req,
        };
        let argv: Vec<String> = req.argv.clone();
        let (code, stdout, stderr) = self.command(&argv, &mut ctx)?;
        Ok((Exec::Done(GuestOutput { exit_code: code, stdout, stderr, truncated: false }), ctx.runs_for))
    }

    /// A gate probe answered by this guest alone: to itself (`localhost`, `127.0.0.1`, `::1`, its
    /// hostname) it connects when the port listens; any other host cannot be resolved.
    pub fn probe_locally(&self, probe: &Probe) -> GuestOutput {
        if !matches!(probe.host.as_str(), "localhost" | "127.0.0.1" | "::1" | "") && probe.host != self.hostname {
            return out(1, "", &format!("stagecore-probe: cannot resolve {} (simulated)", probe.host));
        }
        if !self.ports.contains(&probe.port) {
            return out(1, "", &format!("connect to {}:{}: connection refused (simulated)", probe.host, probe.port));
        }
        match probe.kind.as_str() {
            "http" => out(0, format!("HTTP/1.0 {} simulated\n", self.http_status), ""),
            _ => out(0, "", ""),
        }
    }

    /// The inventory collector's output, section by section, in the real script's format.
    /// `args`: the collector's arguments (`MAX DDMODE PATH...`).
    pub fn inventory(&self, args: &[&str]) -> Vec<u8> {
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
        s.into_bytes()
    }
}

// ---- the small shell ----

struct Ctx<'a> {
    env: BTreeMap<String, String>,
    positional: Vec<String>,
    stdin: Vec<u8>,
    last: i32,
    exited: bool,
    runs_for: Duration,
    depth: u32,
    req: &'a GuestExec,
}

/// A piece of a word: literal text, or a parameter to expand.
#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Lit(String),
    Var(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(Vec<Seg>),
    /// `;`, newline, `&&`, `||`, `|`.
    Op(&'static str),
    /// fd, `<` `>` `>>` `>&`, target word.
    Redir(u8, &'static str, Vec<Seg>),
}

fn lex(script: &str) -> std::result::Result<Vec<Tok>, String> {
    let chars: Vec<char> = script.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            ' ' | '\t' => i += 1,
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '\n' | ';' => {
                toks.push(Tok::Op(";"));
                i += 1;
            }
            '&' if next == Some('&') => {
                toks.push(Tok::Op("&&"));
                i += 2;
            }
            '|' if next == Some('|') => {
                toks.push(Tok::Op("||"));
                i += 2;
            }
            '|' => {
                toks.push(Tok::Op("|"));
                i += 1;
            }
            '&' => return Err("background jobs (&) are not simulated".into()),
            '<' | '>' => {
                let fd = if c == '<' { 0 } else { 1 };
                toks.push(redir(&chars, &mut i, fd)?);
            }
            d if d.is_ascii_digit() && matches!(next, Some('>' | '<')) && (i == 0 || chars[i - 1].is_whitespace()) => {
                i += 1;
                toks.push(redir(&chars, &mut i, d as u8 - b'0')?);
            }
            _ => match word(&chars, &mut i)? {
                Some(w) => toks.push(Tok::Word(w)),
                None => return Err(format!("syntax error near `{c}`")),
            },
        }
    }
    Ok(toks)
}

// Reads one word starting at `i` (stops at blanks and operators); returns None if empty.
fn word(chars: &[char], i: &mut usize) -> std::result::Result<Option<Vec<Seg>>, String> {
    let mut segs: Vec<Seg> = Vec::new();
    let mut any = false;
    let push = |segs: &mut Vec<Seg>, c: char| match segs.last_mut() {
        Some(Seg::Lit(s)) => s.push(c),
        _ => segs.push(Seg::Lit(c.to_string())),
    };
    fn var(chars: &[char], i: &mut usize, segs: &mut Vec<Seg>) -> bool {
        // at chars[*i] == '$'
        let Some(&n) = chars.get(*i + 1) else { return false };
        if n == '{' {
            if let Some(end) = chars[*i + 2..].iter().position(|&c| c == '}') {
                segs.push(Seg::Var(chars[*i + 2..*i + 2 + end].iter().collect()));
                *i += end + 3;
                return true;
            }
            return false;
        }
        if n == '?' || n == '#' || n.is_ascii_digit() {
            segs.push(Seg::Var(n.to_string()));
            *i += 2;
            return true;
        }
        if n.is_ascii_alphabetic() || n == '_' {
            let len = chars[*i + 1..].iter().take_while(|c| c.is_ascii_alphanumeric() || **c == '_').count();
            segs.push(Seg::Var(chars[*i + 1..*i + 1 + len].iter().collect()));
            *i += len + 1;
            return true;
        }
        false
    }
    while let Some(&c) = chars.get(*i) {
        match c {
            ' ' | '\t' | '\n' | ';' | '&' | '|' | '<' | '>' => break,
            '\'' => {
                any = true;
                let end = chars[*i + 1..].iter().position(|&c| c == '\'').ok_or("unterminated quote")?;
                let lit: String = chars[*i + 1..*i + 1 + end].iter().collect();
                segs.push(Seg::Lit(lit));
                *i += end + 2;
            }
            '"' => {
                any = true;
                segs.push(Seg::Lit(String::new()));
                *i += 1;
                loop {
                    match chars.get(*i) {
                        None => return Err("unterminated double quote".into()),
                        Some('"') => {
                            *i += 1;
                            break;
                        }
                        Some('\\') if matches!(chars.get(*i + 1), Some('"' | '\\' | '$' | '`')) => {
                            push(&mut segs, chars[*i + 1]);
                            *i += 2;
                        }
                        Some('$') if var(chars, i, &mut segs) => {}
                        Some(&c) => {
                            push(&mut segs, c);
                            *i += 1;
                        }
                    }
                }
            }
            '\\' => {
                any = true;
                if let Some(&n) = chars.get(*i + 1)
                    && n != '\n'
                {
                    push(&mut segs, n);
                }
                *i += 2;
            }
            '$' if var(chars, i, &mut segs) => any = true,
            c => {
                any = true;
                push(&mut segs, c);
                *i += 1;
            }
        }
    }
    Ok(any.then_some(segs))
}

fn redir(chars: &[char], i: &mut usize, fd: u8) -> std::result::Result<Tok, String> {
    let op = match (chars[*i], chars.get(*i + 1)) {
        ('>', Some('>')) => {
            *i += 2;
            ">>"
        }
        ('>', Some('&')) => {
            *i += 2;
            ">&"
        }
        ('>', _) => {
            *i += 1;
            ">"
        }
        _ => {
            *i += 1;
            "<"
        }
    };
    while matches!(chars.get(*i), Some(' ' | '\t')) {
        *i += 1;
    }
    let target = word(chars, i)?.ok_or("redirection without a target")?;
    Ok(Tok::Redir(fd, op, target))
}

/// Where an output stream goes.
#[derive(Clone, Debug)]
enum Dest {
    Out,
    Err,
    File(String, bool),
    Null,
    Pipe,
}

fn abs(path: &str) -> String {
    if path.starts_with('/') { path.to_string() } else { format!("/root/{path}") }
}

impl SimGuest {
    fn expand(&self, segs: &[Seg], ctx: &Ctx<'_>) -> String {
        let mut s = String::new();
        for seg in segs {
            match seg {
                Seg::Lit(l) => s.push_str(l),
                Seg::Var(v) => match v.as_str() {
                    "?" => s.push_str(&ctx.last.to_string()),
                    "#" => s.push_str(&ctx.positional.len().saturating_sub(1).to_string()),
                    d if d.len() == 1 && d.as_bytes()[0].is_ascii_digit() => {
                        s.push_str(ctx.positional.get(usize::from(d.as_bytes()[0] - b'0')).map_or("", String::as_str))
                    }
                    name => s.push_str(ctx.env.get(name).map_or("", String::as_str)),
                },
            }
        }
        s
    }

    /// Runs a script; returns (exit code, stdout, stderr).
    fn script(&mut self, script: &str, ctx: &mut Ctx<'_>) -> Result<(i32, Vec<u8>, Vec<u8>)> {
        let toks = match lex(script) {
            Ok(t) => t,
            Err(e) => return Ok((2, Vec::new(), format!("sh: 1: {e}\n").into_bytes())),
        };
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        // Split into and-or lists of pipelines.
        let mut i = 0;
        let mut skip = false; // the previous && / || decided not to run this pipeline
        while i < toks.len() && !ctx.exited {
            let end =
                toks[i..].iter().position(|t| matches!(t, Tok::Op(";" | "&&" | "||"))).map_or(toks.len(), |p| i + p);
            let pipeline = &toks[i..end];
            if !skip && !pipeline.is_empty() {
                let code = self.pipeline(pipeline, ctx, &mut stdout, &mut stderr)?;
                ctx.last = code;
            }
            // The status is the last pipeline that ran: `&&` runs the next one on 0, `||` on non-0.
            skip = match toks.get(end) {
                Some(Tok::Op("&&")) => ctx.last != 0,
                Some(Tok::Op("||")) => ctx.last == 0,
                _ => false,
            };
            i = end + 1;
        }
        Ok((ctx.last, stdout, stderr))
    }

    fn pipeline(&mut self, toks: &[Tok], ctx: &mut Ctx<'_>, stdout: &mut Vec<u8>, stderr: &mut Vec<u8>) -> Result<i32> {
        let (negate, toks) = match toks.first() {
            Some(Tok::Word(w)) if w.len() == 1 && w[0] == Seg::Lit("!".into()) => (true, &toks[1..]),
            _ => (false, toks),
        };
        let parts: Vec<&[Tok]> = toks.split(|t| matches!(t, Tok::Op("|"))).collect();
        let mut code = 0;
        let mut piped: Option<Vec<u8>> = None;
        for (n, part) in parts.iter().enumerate() {
            let mut words = Vec::new();
            let mut dests = [if n + 1 < parts.len() { Dest::Pipe } else { Dest::Out }, Dest::Err];
            let mut stdin_file = None;
            for t in part.iter() {
                match t {
                    Tok::Word(w) => words.push(self.expand(w, ctx)),
                    Tok::Redir(fd, op, target) => {
                        let target = self.expand(target, ctx);
                        let fd = usize::from(*fd).min(2);
                        match (*op, fd) {
                            ("<", _) => stdin_file = Some(target),
                            (">&", 1..=2) => {
                                dests[fd - 1] = match target.as_str() {
                                    "1" => dests[0].clone(),
                                    "2" => dests[1].clone(),
                                    _ => {
                                        write_err(stderr, &format!("sh: 1: {target}: bad file descriptor\n"));
                                        return Ok(2);
                                    }
                                }
                            }
                            (op, 1..=2) => {
                                dests[fd - 1] = if target == "/dev/null" {
                                    Dest::Null
                                } else {
                                    Dest::File(abs(&target), op == ">>")
                                }
                            }
                            _ => {}
                        }
                    }
                    Tok::Op(_) => {}
                }
            }
            // Truncate `>` files before the command runs, as a shell does.
            for d in &dests {
                if let Dest::File(p, false) = d {
                    let mode = self.files.get(p).map_or(0o644, |f| f.1);
                    self.files.insert(p.clone(), (Vec::new(), mode));
                }
            }
            let input = match (&stdin_file, piped.take()) {
                (Some(f), _) if f == "/dev/null" => Some(Vec::new()),
                (Some(f), _) => match self.files.get(&abs(f)) {
                    Some((c, _)) => Some(c.clone()),
                    None => {
                        write_err(stderr, &format!("sh: 1: cannot open {f}: No such file\n"));
                        code = 2;
                        continue;
                    }
                },
                (None, Some(p)) => Some(p),
                (None, None) if n > 0 => Some(Vec::new()),
                (None, None) => None,
            };
            let saved = input.map(|i| std::mem::replace(&mut ctx.stdin, i));
            let result = if words.is_empty() { Ok((0, Vec::new(), Vec::new())) } else { self.simple(&words, ctx) };
            if let Some(saved) = saved {
                ctx.stdin = saved;
            }
            let (c, o, e) = result?;
            code = c;
            let mut pipe = Vec::new();
            for (dest, data) in [(&dests[0], o), (&dests[1], e)] {
                match dest {
                    Dest::Out => stdout.extend(data),
                    Dest::Err => stderr.extend(data),
                    Dest::Null => {}
                    Dest::Pipe => pipe.extend(data),
                    Dest::File(p, _) => {
                        self.files.entry(p.clone()).or_insert_with(|| (Vec::new(), 0o644)).0.extend(data)
                    }
                }
            }
            if n + 1 < parts.len() {
                piped = Some(pipe);
            }
        }
        Ok(if negate { i32::from(code == 0) } else { code })
    }

    /// A simple command after expansion: assignments, or a command.
    fn simple(&mut self, words: &[String], ctx: &mut Ctx<'_>) -> Result<(i32, Vec<u8>, Vec<u8>)> {
        let is_assign = |w: &String| {
            w.split_once('=').is_some_and(|(k, _)| {
                !k.is_empty()
                    && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && !k.as_bytes()[0].is_ascii_digit()
            })
        };
        let n = words.iter().take_while(|w| is_assign(w)).count();
        if n == words.len() {
            for w in words {
                if let Some((k, v)) = w.split_once('=') {
                    ctx.env.insert(k.to_string(), v.to_string());
                }
            }
            return Ok((0, Vec::new(), Vec::new()));
        }
        if words[n] == "export" {
            return Ok((0, Vec::new(), Vec::new()));
        }
        if n == 0 {
            return self.command(words, ctx);
        }
        let saved = ctx.env.clone();
        for w in &words[..n] {
            if let Some((k, v)) = w.split_once('=') {
                ctx.env.insert(k.to_string(), v.to_string());
            }
        }
        let r = self.command(&words[n..], ctx);
        ctx.env = saved;
        r
    }

    /// One command (see the module docs); returns (exit code, stdout, stderr).
    fn command(&mut self, argv: &[String], ctx: &mut Ctx<'_>) -> Result<(i32, Vec<u8>, Vec<u8>)> {
        let Some(first) = argv.first() else { return Ok((0, Vec::new(), Vec::new())) };
        if first.contains('/') && !first.starts_with('/') {
            return Ok((127, Vec::new(), format!("sh: 1: {first}: not found\n").into_bytes()));
        }
        let prog = first.rsplit('/').next().unwrap_or(first);
        let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
        type R = Result<(i32, Vec<u8>, Vec<u8>)>;
        let ok = |o: Vec<u8>| -> R { Ok((0, o, Vec::new())) };
        let fail = |code: i32, e: String| -> R { Ok((code, Vec::new(), e.into_bytes())) };
        match (prog, args.as_slice()) {
            (sh, ["-c", script, rest @ ..]) if is_sh(sh) => {
                if script.starts_with(crate::inventory::SCRIPT_MARKER) {
                    return ok(self.inventory(rest.get(1..).unwrap_or_default()));
                }
                if script.starts_with(crate::guest::PROBE_MARKER) {
                    return Ok(match rest {
                        [_, kind, host, port, ..] => match port.parse() {
                            Ok(port) => {
                                let o =
                                    self.probe_locally(&Probe { kind: kind.to_string(), host: host.to_string(), port });
                                (o.exit_code, o.stdout, o.stderr)
                            }
                            Err(_) => (2, Vec::new(), b"stagecore-probe: bad port".to_vec()),
                        },
                        _ => (2, Vec::new(), b"stagecore-probe: usage".to_vec()),
                    });
                }
                if ctx.depth >= 8 {
                    return fail(2, "sh: nested too deeply (simulated)\n".into());
                }
                let mut inner = Ctx {
                    env: ctx.env.clone(),
                    positional: rest.iter().map(|s| s.to_string()).collect(),
                    stdin: std::mem::take(&mut ctx.stdin),
                    last: 0,
                    exited: false,
                    runs_for: Duration::ZERO,
                    depth: ctx.depth + 1,
                    req: ctx.req,
                };
                if inner.positional.is_empty() {
                    inner.positional.push("sh".into());
                }
                let r = self.script(script, &mut inner);
                ctx.runs_for += inner.runs_for;
                ctx.stdin = inner.stdin;
                r
            }
            (":" | "true", _) => ok(Vec::new()),
            ("false", _) => Ok((1, Vec::new(), Vec::new())),
            ("exit", a) => {
                ctx.exited = true;
                let code = a.first().map_or(Ok(ctx.last), |c| c.parse::<i32>()).unwrap_or(2);
                Ok((code & 0xff, Vec::new(), Vec::new()))
            }
            ("echo", ["-n", rest @ ..]) => ok(rest.join(" ").into_bytes()),
            ("echo", rest) => ok(format!("{}\n", rest.join(" ")).into_bytes()),
            ("printf", [format, rest @ ..]) => ok(printf(format, rest)),
            ("hostname", _) => ok(format!("{}\n", self.hostname).into_bytes()),
            ("uname", ["-r"]) => ok(format!("{}\n", self.kernel).into_bytes()),
            ("uname", ["-n"]) => ok(format!("{}\n", self.hostname).into_bytes()),
            ("uname", _) => ok(b"Linux\n".to_vec()),
            ("id", ["-u"]) => ok(b"0\n".to_vec()),
            ("env", []) => ok(ctx.env.iter().map(|(k, v)| format!("{k}={v}\n")).collect::<String>().into_bytes()),
            ("sync", _) | ("mkdir", _) => ok(Vec::new()),
            ("sleep", [n]) => match n.parse::<f64>() {
                Ok(s) if s.is_finite() && s >= 0.0 => {
                    ctx.runs_for += Duration::from_secs_f64(s);
                    ok(Vec::new())
                }
                _ => fail(1, format!("sleep: invalid time interval '{n}'\n")),
            },
            ("cat", []) => ok(std::mem::take(&mut ctx.stdin)),
            ("cat", files) => {
                let mut o = Vec::new();
                for f in files {
                    match self.files.get(&abs(f)) {
                        Some((c, _)) => o.extend_from_slice(c),
                        None => return Ok((1, o, format!("cat: {f}: No such file or directory\n").into_bytes())),
                    }
                }
                ok(o)
            }
            ("touch", files) => {
                for f in files {
                    self.files.entry(abs(f)).or_insert_with(|| (Vec::new(), 0o644));
                }
                ok(Vec::new())
            }
            ("cp" | "mv", [src, dst]) => {
                let (src, dst) = (abs(src), abs(dst));
                let Some((data, mode)) = self.files.get(&src).cloned() else {
                    return fail(1, format!("{prog}: cannot stat '{src}': No such file or directory\n"));
                };
                let mode = if prog == "cp" { self.files.get(&dst).map_or(mode, |f| f.1) } else { mode };
                if prog == "mv" {
                    self.files.remove(&src);
                }
                self.files.insert(dst, (data, mode));
                ok(Vec::new())
            }
            ("rm", rest) => {
                let flags: String = rest.iter().filter(|a| a.starts_with('-')).map(|a| &a[1..]).collect();
                let (force, recursive) = (flags.contains('f'), flags.contains('r') || flags.contains('R'));
                let mut code = 0;
                let mut err = String::new();
                for f in rest.iter().filter(|f| !f.starts_with('-')) {
                    let p = abs(f);
                    let removed = self.files.remove(&p).is_some();
                    let prefix = format!("{}/", p.trim_end_matches('/'));
                    let under = self.files.keys().any(|k| k.starts_with(&prefix));
                    if under && recursive {
                        self.files.retain(|k, _| !k.starts_with(&prefix));
                    } else if under {
                        code = 1;
                        let _ = writeln!(err, "rm: cannot remove '{f}': Is a directory");
                    } else if !removed && !force {
                        code = 1;
                        let _ = writeln!(err, "rm: cannot remove '{f}': No such file or directory");
                    }
                }
                Ok((code, Vec::new(), err.into_bytes()))
            }
            ("stat", ["-c", format, file]) => match self.files.get(&abs(file)) {
                Some((data, mode)) => {
                    let s = format
                        .replace("%a", &format!("{mode:o}"))
                        .replace("%s", &data.len().to_string())
                        .replace("%n", file);
                    ok(format!("{s}\n").into_bytes())
                }
                None => fail(1, format!("stat: cannot statx '{file}': No such file or directory\n")),
            },
            ("grep", args) => Ok(self.grep(args, ctx)),
            ("svc", args) => Ok(self.svc(args)),
            ("dpkg", ["-i", file]) => Ok(self.dpkg_install(file)),
            ("dpkg-query", ["-W", name]) => match self.packages.get(*name) {
                Some((v, _)) => ok(format!("{name}\t{v}\n").into_bytes()),
                None => fail(1, format!("dpkg-query: no packages found matching {name}\n")),
            },
            ("stagecore-sim", args) => self.sim(args, ctx.req),
            _ => fail(127, format!("sh: 1: {prog}: not found\n")),
        }
    }

    fn grep(&self, args: &[&str], ctx: &mut Ctx<'_>) -> (i32, Vec<u8>, Vec<u8>) {
        let (mut quiet, mut icase, mut invert) = (false, false, false);
        let mut rest = Vec::new();
        for a in args {
            match a.strip_prefix('-') {
                Some(flags) if !flags.is_empty() && rest.is_empty() => {
                    for f in flags.chars() {
                        match f {
                            'q' => quiet = true,
                            'i' => icase = true,
                            'v' => invert = true,
                            'F' => {}
                            _ => {
                                return (
                                    2,
                                    Vec::new(),
                                    format!("grep: unsupported option -{f} (simulated)\n").into_bytes(),
                                );
                            }
                        }
                    }
                }
                _ => rest.push(*a),
            }
        }
        let Some((pattern, files)) = rest.split_first() else {
            return (2, Vec::new(), b"usage: grep PATTERN [FILE...]\n".to_vec());
        };
        let norm = |s: &str| if icase { s.to_lowercase() } else { s.to_string() };
        let pat = norm(pattern);
        let inputs: Vec<(String, Vec<u8>)> = if files.is_empty() {
            vec![(String::new(), std::mem::take(&mut ctx.stdin))]
        } else {
            let mut v = Vec::new();
            for f in files {
                match self.files.get(&abs(f)) {
                    Some((c, _)) => v.push((f.to_string(), c.clone())),
                    None => return (2, Vec::new(), format!("grep: {f}: No such file or directory\n").into_bytes()),
                }
            }
            v
        };
        let mut o = String::new();
        let mut found = false;
        for (name, data) in &inputs {
            for line in String::from_utf8_lossy(data).lines() {
                if norm(line).contains(&pat) != invert {
                    found = true;
                    if files.len() > 1 {
                        let _ = write!(o, "{name}:");
                    }
                    let _ = writeln!(o, "{line}");
                }
            }
        }
        (if found { 0 } else { 1 }, if quiet { Vec::new() } else { o.into_bytes() }, Vec::new())
    }

    /// The test guest's `svc`: services are the services map (a file `/etc/svc/NAME` also makes one).
    fn svc(&mut self, args: &[&str]) -> (i32, Vec<u8>, Vec<u8>) {
        let reply = |code: i32, o: String, e: String| (code, o.into_bytes(), e.into_bytes());
        let [action, name] = args else {
            return reply(2, String::new(), "usage: svc start|stop|restart|status NAME\n".into());
        };
        if !self.services.contains_key(*name) {
            if !self.files.contains_key(&format!("/etc/svc/{name}")) {
                return reply(2, String::new(), format!("svc: no service '{name}' (no file /etc/svc/{name})\n"));
            }
            self.services.insert(name.to_string(), (true, false));
        }
        let entry = self.services.get_mut(*name).expect("inserted above");
        match *action {
            "start" | "restart" => {
                entry.1 = true;
                reply(0, format!("{name} started (pid 4242)\n"), String::new())
            }
            "stop" => {
                entry.1 = false;
                reply(0, format!("{name} stopped\n"), String::new())
            }
            "status" if entry.1 => reply(0, format!("{name} running (pid 4242)\n"), String::new()),
            "status" => reply(3, format!("{name} stopped\n"), String::new()),
            _ => reply(2, String::new(), "usage: svc start|stop|restart|status NAME\n".into()),
        }
    }

    /// `dpkg -i FILE`: see the module docs.
    fn dpkg_install(&mut self, file: &str) -> (i32, Vec<u8>, Vec<u8>) {
        let fail = |code: i32, e: String| {
            (code, Vec::new(), format!("dpkg: error processing archive {file}: {e}\n").into_bytes())
        };
        let Some((data, _)) = self.files.get(&abs(file)) else {
            return fail(2, "cannot access archive: No such file or directory".into());
        };
        let members = match ar_members(data) {
            Ok(m) => m,
            Err(e) => return fail(2, e),
        };
        let find = |prefix: &str| members.iter().find(|(n, _)| n.starts_with(prefix));
        let (Some(control), Some(payload)) = (find("control.tar"), find("data.tar")) else {
            return fail(2, "not a Debian package (no control.tar or data.tar member)".into());
        };
        for (name, _) in [control, payload] {
            if name != "control.tar" && name != "data.tar" {
                return fail(
                    2,
                    format!("member {name} is compressed: the simulated dpkg reads uncompressed members only"),
                );
            }
        }
        let (control, payload) = match (tar_files(&control.1), tar_files(&payload.1)) {
            (Ok(c), Ok(d)) => (c, d),
            (Err(e), _) | (_, Err(e)) => return fail(2, e),
        };
        let text = |name: &str| {
            control
                .iter()
                .find(|(n, _, _)| n.trim_start_matches('/') == name)
                .map(|(_, c, _)| String::from_utf8_lossy(c).into_owned())
        };
        let Some(fields) = text("control") else { return fail(2, "no control file".into()) };
        let field = |key: &str| {
            fields
                .lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')).map(|v| v.trim().to_string()))
        };
        let (Some(package), Some(version)) = (field("Package"), field("Version")) else {
            return fail(2, "control lacks Package or Version".into());
        };
        let arch = field("Architecture").unwrap_or_else(|| "all".into());
        let conffiles: BTreeSet<String> = text("conffiles").unwrap_or_default().lines().map(str::to_string).collect();
        for (path, content, mode) in payload {
            if conffiles.contains(&path) && self.files.contains_key(&path) {
                continue; // the installed conffile is kept (the demo packages ship the same one)
            }
            self.files.insert(path, (content, mode));
        }
        self.packages.insert(package.clone(), (version.clone(), arch));
        if text("postinst").is_some_and(|p| p.contains("svc restart app"))
            && let Some(s) = self.services.get_mut("app")
        {
            s.1 = true;
        }
        let o = format!("Unpacking {package} ({version}) ...\nSetting up {package} ({version}) ...\n");
        (0, o.into_bytes(), Vec::new())
    }

    fn sim(&mut self, args: &[&str], req: &GuestExec) -> Result<(i32, Vec<u8>, Vec<u8>)> {
        let done =
            |code: i32, e: &str| -> Result<(i32, Vec<u8>, Vec<u8>)> { Ok((code, Vec::new(), e.as_bytes().to_vec())) };
        match args {
            ["pkg", "install", name, version, rest @ ..] => {
                let arch = rest.first().copied().unwrap_or("amd64");
                self.packages.insert(name.to_string(), (version.to_string(), arch.to_string()));
                done(0, "")
            }
            ["repo", "set", name, version] => {
                self.repo.insert(name.to_string(), version.to_string());
                done(0, "")
            }
            ["pkg", "upgrade", name] => match self.repo.get(*name).cloned() {
                Some(version) => {
                    let arch = self.packages.get(*name).map_or_else(|| "amd64".to_string(), |p| p.1.clone());
                    self.packages.insert(name.to_string(), (version, arch));
                    done(0, "")
                }
                None => done(100, &format!("E: Unable to locate package {name}")),
            },
            ["pkg", "remove", name] => match self.packages.remove(*name) {
                Some(_) => done(0, ""),
                None => done(100, &format!("dpkg: package {name} is not installed")),
            },
            ["service", action, name] => {
                let entry = self.services.entry(name.to_string()).or_insert((false, false));
                match *action {
                    "start" => entry.1 = true,
                    "stop" => entry.1 = false,
                    "enable" => entry.0 = true,
                    "disable" => entry.0 = false,
                    _ => return done(2, "usage: service start|stop|enable|disable NAME"),
                }
                done(0, "")
            }
            ["port", action, port] => {
                let Ok(port) = port.parse::<u16>() else { return done(2, "bad port") };
                if *action == "open" {
                    self.ports.insert(port);
                } else {
                    self.ports.remove(&port);
                }
                done(0, "")
            }
            ["file", "write", path, content] if path.starts_with('/') => {
                let mode = self.files.get(*path).map_or(0o644, |f| f.1);
                self.files.insert(path.to_string(), (content.as_bytes().to_vec(), mode));
                done(0, "")
            }
            ["file", "rm", path] => {
                self.files.remove(*path);
                done(0, "")
            }
            ["http-status", code] => match code.parse() {
                Ok(c) => {
                    self.http_status = c;
                    done(0, "")
                }
                Err(_) => done(2, "bad status"),
            },
            ["hang"] => Err(Error::Timeout {
                operation: format!("guest command `{}`", req.display()),
                seconds: req.timeout.as_secs_f64(),
            }),
            ["agent-off"] => {
                self.agent = false;
                done(0, "")
            }
            ["exit", code] => done(code.parse().unwrap_or(2), &format!("exit {code}")),
            _ => done(127, &format!("stagecore-sim: unknown command {}", req.display())),
        }
    }
}

fn write_err(stderr: &mut Vec<u8>, s: &str) {
    stderr.extend_from_slice(s.as_bytes());
}

/// `printf FORMAT ARGS`: `\n \t \r \\ \NNN`, `%s %d %%`.
fn printf(format: &str, args: &[&str]) -> Vec<u8> {
    let mut o = Vec::new();
    let b = format.as_bytes();
    let mut args = args.iter();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if i + 1 < b.len() => {
                i += 1;
                match b[i] {
                    b'n' => o.push(b'\n'),
                    b't' => o.push(b'\t'),
                    b'r' => o.push(b'\r'),
                    b'\\' => o.push(b'\\'),
                    b'0'..=b'7' => {
                        let digits = b[i..].iter().take(3).take_while(|d| (b'0'..=b'7').contains(d)).count();
                        let v = b[i..i + digits].iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
                        o.push((v & 0xff) as u8);
                        i += digits - 1;
                    }
                    c => o.extend_from_slice(&[b'\\', c]),
                }
                i += 1;
            }
            b'%' if i + 1 < b.len() => {
                match b[i + 1] {
                    b'%' => o.push(b'%'),
                    b's' | b'd' => o.extend_from_slice(args.next().copied().unwrap_or("").as_bytes()),
                    c => o.extend_from_slice(&[b'%', c]),
                }
                i += 2;
            }
            c => {
                o.push(c);
                i += 1;
            }
        }
    }
    o
}

/// The members of an `ar` archive: (name, content).
fn ar_members(data: &[u8]) -> std::result::Result<Vec<(String, Vec<u8>)>, String> {
    let rest = data.strip_prefix(b"!<arch>\n").ok_or("not an ar archive")?;
    let mut members = Vec::new();
    let mut i = 0;
    while i + 60 <= rest.len() {
        let h = &rest[i..i + 60];
        let name = String::from_utf8_lossy(&h[..16]).trim_end().trim_end_matches('/').to_string();
        let size: usize = String::from_utf8_lossy(&h[48..58]).trim().parse().map_err(|_| "bad ar member size")?;
        let start = i + 60;
        let body = rest.get(start..start + size).ok_or("truncated ar member")?;
        members.push((name, body.to_vec()));
        i = start + size + size % 2;
    }
    Ok(members)
}

/// The regular files of an uncompressed tar: (absolute path, content, mode).
fn tar_files(data: &[u8]) -> std::result::Result<Vec<(String, Vec<u8>, u32)>, String> {
    let mut files = Vec::new();
    let mut i = 0;
    let field =
        |h: &[u8], a: usize, b: usize| String::from_utf8_lossy(&h[a..b]).trim_end_matches('\0').trim().to_string();
    while i + 512 <= data.len() {
        let h = &data[i..i + 512];
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let name = field(h, 0, 100);
        let prefix = field(h, 345, 500);
        let size = usize::from_str_radix(&field(h, 124, 136), 8).map_err(|_| "bad tar size")?;
        let mode = u32::from_str_radix(&field(h, 100, 108), 8).unwrap_or(0o644) & 0o7777;
        let body = data.get(i + 512..i + 512 + size).ok_or("truncated tar member")?;
        if matches!(h[156], b'0' | 0) {
            let full = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
            let path = format!("/{}", full.trim_start_matches("./").trim_start_matches('/'));
            files.push((path, body.to_vec(), mode));
        }
        i += 512 + size.div_ceil(512) * 512;
    }
    Ok(files)
}

fn tar(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut o = Vec::new();
    for (name, content, mode) in entries {
        let mut h = [0u8; 512];
        let put = |h: &mut [u8; 512], at: usize, s: &str| h[at..at + s.len()].copy_from_slice(s.as_bytes());
        put(&mut h, 0, &format!("./{name}"));
        put(&mut h, 100, &format!("{mode:07o}\0"));
        put(&mut h, 108, "0000000\0");
        put(&mut h, 116, "0000000\0");
        put(&mut h, 124, &format!("{:011o}\0", content.len()));
        put(&mut h, 136, &format!("{:011o}\0", 1_700_000_000u64));
        h[148..156].copy_from_slice(b"        ");
        h[156] = b'0';
        put(&mut h, 257, "ustar\0");
        put(&mut h, 263, "00");
        put(&mut h, 265, "root");
        put(&mut h, 297, "root");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        put(&mut h, 148, &format!("{sum:06o}\0 "));
        o.extend_from_slice(&h);
        o.extend_from_slice(content);
        o.resize(o.len().div_ceil(512) * 512, 0);
    }
    o.resize(o.len() + 1024, 0);
    o
}

/// The demo app `stagecore-demo-app` at `version` as a real Debian package (`ar` with
/// `debian-binary`, an **uncompressed** `control.tar` — control, conffiles, postinst — and an
/// uncompressed `data.tar`), with the files the test image's demo packages ship:
/// `/opt/app/www/index.html`, `/opt/app/VERSION`, the conffile `/etc/app/app.conf` and `/etc/svc/app`.
/// `dpkg-deb` reads it; the simulated guest's `dpkg -i` installs it.
pub fn demo_deb(version: &str) -> Vec<u8> {
    let control = format!(
        "Package: stagecore-demo-app\nVersion: {version}\nArchitecture: all\nMaintainer: stagecore <dev@stagecore.invalid>\n\
Description: stagecore demo app\n busybox httpd on port 8080 under the svc supervisor (/etc/svc/app).\n"
    );
    let postinst = "#!/bin/sh\nset -e\nif [ \"$1\" = configure ] && [ -x /usr/local/sbin/svc ] && [ -d /run/svc ]; then\n  /usr/local/sbin/svc restart app || true\nfi\n";
    let control_tar = tar(&[
        ("control", control.as_bytes(), 0o644),
        ("conffiles", b"/etc/app/app.conf\n", 0o644),
        ("postinst", postinst.as_bytes(), 0o755),
    ]);
    let index = format!("<html><body>stagecore-demo-app {version}</body></html>\n");
    let data_tar = tar(&[
        ("opt/app/www/index.html", index.as_bytes(), 0o644),
        ("opt/app/VERSION", format!("{version}\n").as_bytes(), 0o644),
        ("etc/app/app.conf", b"port=8080\n", 0o644),
        ("etc/svc/app", b"busybox httpd -f -p 8080 -h /opt/app/www\n", 0o644),
    ]);
    let mut o = b"!<arch>\n".to_vec();
    for (name, body) in [("debian-binary", &b"2.0\n"[..]), ("control.tar", &control_tar), ("data.tar", &data_tar)] {
        o.extend_from_slice(
            format!("{name:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n", 1_700_000_000u64, 0, 0, "100644", body.len())
                .as_bytes(),
        );
        o.extend_from_slice(body);
        if body.len() % 2 == 1 {
            o.push(b'\n');
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(g: &mut SimGuest, req: GuestExec) -> GuestOutput {
        match g.exec(&req).unwrap() {
            Exec::Done(o) => o,
            Exec::Probe(p) => panic!("probe {p:?}"),
        }
    }

    fn sh(g: &mut SimGuest, script: &str) -> GuestOutput {
        run(g, GuestExec::new(["/bin/sh", "-c", script]))
    }

    #[test]
    fn shell_lists_redirections_and_variables() {
        let mut g = SimGuest::new("app");
        let o = run(
            &mut g,
            GuestExec::new(["/bin/sh", "-c", "cat; echo \"to-stderr $KIT_VAR\" >&2; exit 7; echo never"])
                .stdin(b"from stdin".to_vec())
                .env("KIT_VAR", "kit-value"),
        );
        assert_eq!(
            (o.exit_code, &o.stdout[..], o.stderr_text()),
            (7, &b"from stdin"[..], "to-stderr kit-value\n".into())
        );
        let o = sh(&mut g, "echo a >/tmp/x && cat /tmp/x /tmp/none || echo failed $?");
        assert_eq!(o.stdout_text(), "a\nfailed 1\n");
        let o = sh(&mut g, "! grep -qi HELLO /etc/app/app.conf || exit 3");
        assert_eq!(o.exit_code, 3, "{o:?}");
        let o = sh(&mut g, "! grep -qi nope /etc/app/app.conf || exit 3");
        assert_eq!(o.exit_code, 0, "{o:?}");
        let o = sh(&mut g, "printf '\\150\\151\\n' > f; cat /root/f | grep h; stat -c %a /root/f");
        assert_eq!(o.stdout_text(), "hi\n644\n");
        // `'\''` ends a quote, adds a quoted `'`, reopens: the inner shell sees `echo "it's"`.
        let o = sh(&mut g, "'/bin/sh' -c 'echo \"it'\\''s\"' </dev/null >/tmp/o 2>/tmp/e");
        assert_eq!((o.exit_code, &g.files["/tmp/o"].0[..]), (0, &b"it's\n"[..]));
        assert_eq!(sh(&mut g, "nope 2>&1").stdout_text(), "sh: 1: nope: not found\n");
        assert_eq!(sh(&mut g, "svc status app; svc stop app; svc status app").exit_code, 3);
    }

    #[test]
    fn dpkg_installs_the_demo_deb_keeping_the_conffile() {
        let mut g = SimGuest::new("app");
        g.files.insert("/etc/app/app.conf".into(), (b"edited\n".to_vec(), 0o644));
        let deb = demo_deb("1.1");
        let escaped: String = deb.iter().map(|b| format!("\\{b:03o}")).collect();
        assert!(sh(&mut g, &format!("printf '{escaped}' > /root/upgrade.deb")).success());
        assert_eq!(g.files["/root/upgrade.deb"].0, deb);
        let o = sh(&mut g, "dpkg -i /root/upgrade.deb");
        assert!(o.success(), "{o:?}");
        assert_eq!(g.packages["stagecore-demo-app"].0, "1.1");
        assert_eq!(g.files["/opt/app/VERSION"].0, b"1.1\n");
        assert_eq!(g.files["/etc/app/app.conf"].0, b"edited\n");
    }
}
