//! A small **simulated** guest behind the Automation API's guest operations
//! (`/api/vcenter/vm/{vm}/guest/processes` and `/guest/filesystem?action=create` transfers).
//!
//! Contract: it is not an operating system. Each guest holds files (path → bytes, mode), a
//! process table (pid, command, start/finish times, exit code) and a hostname. A process is
//! `/bin/sh -c SCRIPT` or a program path with arguments; the script is split into words
//! (single and double quotes, backslash), `<FILE`, `>FILE`, `2>FILE` redirect standard input,
//! output and error to guest files, and the remaining words run as one command of this set:
//! `true`, `false`, `exit N`, `echo WORDS`, `cat [FILE...]` (stdin without files), `rm [-f] FILE...`,
//! `hostname`, `env`, `sleep N` (runs N seconds of wall time, so it shows in a process list),
//! `sh -c SCRIPT`, the `stagecore-sim` commands of the memory backend's simulated guest
//! (`pkg install|upgrade|remove`, `repo set`, `service`, `port`, `file write|rm`, `exit`), and two
//! scripts recognised by their first line as `stagecore/src/memory/guest.rs` does: the inventory
//! collector (answered with the same sections: os-release, kernel, hostname, dpkg lines, services,
//! `/proc/net/tcp` lines, sha256 of watched files) and the gate probe (only to the guest itself).
//! Redirection words are recognised after quote removal, so an argument that itself starts with
//! `<` or `>` is misread: this is a simulation, not a shell. Anything else exits 127. Guest credentials are
//! [`SIM_GUEST_USER`] / [`SIM_GUEST_PASSWORD`]; a VM that is powered off has no running VMware
//! Tools (503). A clone gets the guest of its source (at the snapshot it is cloned from) with
//! the new VM's name as hostname; a revert restores the guest as it was at the snapshot.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The guest user the simulated guests accept.
pub const SIM_GUEST_USER: &str = "root";
/// The guest password the simulated guests accept.
pub const SIM_GUEST_PASSWORD: &str = "guest-Passw0rd!";

/// One process of a simulated guest.
#[derive(Clone, Debug)]
pub struct Process {
    /// Process id.
    pub pid: u64,
    /// Program name (the path's last component).
    pub name: String,
    /// Full command line.
    pub command: String,
    /// Start time (RFC 3339).
    pub started: String,
    /// When it finishes (processes such as `sleep` run for a while).
    pub(crate) finishes_at: Instant,
    /// Exit code once finished.
    pub exit_code: i64,
    /// Finish time (RFC 3339), set once `finishes_at` has passed and someone looked.
    pub finished: Option<String>,
}

/// A simulated guest (see the module docs).
#[derive(Clone, Debug)]
pub struct SimGuest {
    /// Host name.
    pub hostname: String,
    /// Files: path → (content, mode).
    pub files: BTreeMap<String, (Vec<u8>, u32)>,
    /// Processes started, by pid.
    pub processes: BTreeMap<u64, Process>,
    /// Kernel release.
    pub kernel: String,
    /// Installed packages: name → (version, architecture).
    pub packages: BTreeMap<String, (String, String)>,
    /// Services: name → (enabled, running).
    pub services: BTreeMap<String, (bool, bool)>,
    /// Listening TCP ports.
    pub ports: std::collections::BTreeSet<u16>,
    /// What `stagecore-sim pkg upgrade NAME` installs: the guest's package repository.
    pub repo: BTreeMap<String, String>,
    next_pid: u64,
}

/// A transfer URL handed out by `filesystem?action=create`, valid for one request.
#[derive(Clone, Debug)]
pub(crate) struct Transfer {
    pub(crate) vm: String,
    pub(crate) path: String,
    /// `Some((size, overwrite, mode))` for an upload (PUT), `None` for a download (GET).
    pub(crate) upload: Option<(u64, bool, Option<u32>)>,
}

impl SimGuest {
    /// A fresh guest called `hostname` with `/etc/hostname` and `/etc/os-release`.
    pub fn new(hostname: &str) -> Self {
        let packages = [
            ("base-files", "12.4+deb12u11", "amd64"),
            ("bash", "5.2.15-2+b8", "amd64"),
            ("dpkg", "1.21.22", "amd64"),
            ("open-vm-tools", "2:12.2.0-1+deb12u2", "amd64"),
            ("stagecore-demo-app", "1.0", "all"),
        ];
        let mut g = SimGuest {
            hostname: String::new(),
            files: BTreeMap::new(),
            processes: BTreeMap::new(),
            kernel: "6.1.0-sim-amd64".into(),
            packages: packages.iter().map(|(n, v, a)| (n.to_string(), (v.to_string(), a.to_string()))).collect(),
            services: [("app".to_string(), (true, true))].into(),
            ports: [8080].into(),
            repo: BTreeMap::new(),
            next_pid: 1000,
        };
        g.files.insert(
            "/etc/os-release".into(),
            (b"PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm) [simulated]\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\nID=debian\n".to_vec(), 0o644),
        );
        g.files.insert("/etc/app/app.conf".into(), (b"port=8080\ngreeting=hello\n".to_vec(), 0o644));
        g.files.insert("/opt/app/bin/app".into(), (b"#!/bin/sh\nexec httpd -f -p 8080\n".to_vec(), 0o755));
        g.cloned_as(hostname);
        g
    }

    /// What a clone's guest looks like: same files, new hostname, no processes.
    /// New hostname, machine-id and SSH host keys (as a clone that regenerates its identity).
    pub(crate) fn cloned_as(&mut self, hostname: &str) {
        self.hostname = hostname.to_string();
        let id = uuid::Uuid::new_v4().simple().to_string();
        self.files.insert("/etc/hostname".into(), (format!("{hostname}\n").into_bytes(), 0o644));
        self.files.insert("/etc/machine-id".into(), (format!("{id}\n").into_bytes(), 0o444));
        for key in ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"] {
            self.files.insert(format!("/etc/ssh/{key}"), (format!("simulated key {id}\n").into_bytes(), 0o600));
        }
        self.processes.clear();
    }

    /// Starts a program (`path` + `arguments` as the API gives them); returns its pid.
    pub(crate) fn start(&mut self, path: &str, arguments: &str, env: &BTreeMap<String, String>) -> u64 {
        let pid = self.next_pid;
        self.next_pid += 1;
        let words = if path == "/bin/sh" || path == "/usr/bin/sh" || path == "sh" {
            let mut w = vec!["sh".to_string()];
            w.extend(split_words(arguments));
            w
        } else {
            let mut w = vec![path.rsplit('/').next().unwrap_or(path).to_string()];
            w.extend(split_words(arguments));
            w
        };
        let (code, duration) = self.run(&words, env, 0);
        let name = path.rsplit('/').next().unwrap_or(path).to_string();
        self.processes.insert(
            pid,
            Process {
                pid,
                name,
                command: format!("{path} {arguments}").trim_end().to_string(),
                started: crate::now_rfc3339(),
                finishes_at: Instant::now() + duration,
                exit_code: code,
                finished: None,
            },
        );
        pid
    }

    /// Marks processes whose time is up as finished.
    pub(crate) fn settle(&mut self) {
        let now = Instant::now();
        for p in self.processes.values_mut() {
            if p.finished.is_none() && p.finishes_at <= now {
                p.finished = Some(crate::now_rfc3339());
            }
        }
    }

    /// Runs words (`sh -c SCRIPT` or a command); returns the exit code and how long it runs.
    fn run(&mut self, words: &[String], env: &BTreeMap<String, String>, depth: u32) -> (i64, Duration) {
        if words.first().map(String::as_str) == Some("sh")
            && words.get(1).map(String::as_str) == Some("-c")
            && depth < 4
        {
            let script = words.get(2).cloned().unwrap_or_default();
            return self.script(&script, env, depth + 1);
        }
        let (code, out, err, d) = self.command(words, &[], env);
        let _ = (out, err); // no redirection: output goes nowhere, as in a real guest
        (code, d)
    }

    /// One line of shell: words with redirections.
    fn script(&mut self, script: &str, env: &BTreeMap<String, String>, depth: u32) -> (i64, Duration) {
        let mut argv = Vec::new();
        let (mut stdin_file, mut out_file, mut err_file) = (None, None, None);
        for w in split_words(script) {
            if let Some(p) = w.strip_prefix("2>") {
                err_file = Some(p.to_string());
            } else if let Some(p) = w.strip_prefix('>') {
                out_file = Some(p.to_string());
            } else if let Some(p) = w.strip_prefix('<') {
                stdin_file = Some(p.to_string());
            } else {
                argv.push(w);
            }
        }
        let stdin = match stdin_file.as_deref() {
            None | Some("/dev/null") => Vec::new(),
            Some(p) => match self.files.get(p) {
                Some((c, _)) => c.clone(),
                None => {
                    self.write_out(err_file.as_deref(), format!("sh: 1: cannot open {p}: No such file\n").into_bytes());
                    return (2, Duration::ZERO);
                }
            },
        };
        let (code, out, err, d) = if argv.first().map(String::as_str) == Some("sh") && depth < 4 {
            let (c, d) = self.run(&argv, env, depth);
            (c, Vec::new(), Vec::new(), d)
        } else {
            self.command(&argv, &stdin, env)
        };
        self.write_out(out_file.as_deref(), out);
        self.write_out(err_file.as_deref(), err);
        (code, d)
    }

    fn write_out(&mut self, path: Option<&str>, data: Vec<u8>) {
        if let Some(p) = path.filter(|p| *p != "/dev/null") {
            self.files.insert(p.to_string(), (data, 0o600));
        }
    }

    /// The command set; returns (exit code, stdout, stderr, run time).
    fn command(
        &mut self,
        argv: &[String],
        stdin: &[u8],
        env: &BTreeMap<String, String>,
    ) -> (i64, Vec<u8>, Vec<u8>, Duration) {
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let ok = |out: Vec<u8>| (0, out, Vec::new(), Duration::ZERO);
        match args.as_slice() {
            [] | ["true"] => ok(Vec::new()),
            ["false"] => (1, Vec::new(), Vec::new(), Duration::ZERO),
            ["exit", n] => (n.parse().unwrap_or(2), Vec::new(), Vec::new(), Duration::ZERO),
            ["echo", rest @ ..] => ok(format!("{}\n", rest.join(" ")).into_bytes()),
            ["hostname"] => ok(format!("{}\n", self.hostname).into_bytes()),
            ["env"] => ok(env.iter().map(|(k, v)| format!("{k}={v}\n")).collect::<String>().into_bytes()),
            ["cat"] => ok(stdin.to_vec()),
            ["cat", files @ ..] => {
                let mut out = Vec::new();
                for f in files {
                    match self.files.get(*f) {
                        Some((c, _)) => out.extend_from_slice(c),
                        None => {
                            return (
                                1,
                                out,
                                format!("cat: {f}: No such file or directory\n").into_bytes(),
                                Duration::ZERO,
                            );
                        }
                    }
                }
                ok(out)
            }
            ["rm", rest @ ..] => {
                let force = rest.first() == Some(&"-f");
                let mut code = 0;
                let mut err = Vec::new();
                for f in rest.iter().filter(|f| !f.starts_with('-')) {
                    if self.files.remove(*f).is_none() && !force {
                        code = 1;
                        err.extend(format!("rm: cannot remove '{f}': No such file or directory\n").into_bytes());
                    }
                }
                (code, Vec::new(), err, Duration::ZERO)
            }
            ["sleep", n] => (0, Vec::new(), Vec::new(), Duration::from_secs_f64(n.parse().unwrap_or(0.0))),
            [sh, "-c", script, _name, rest @ ..]
                if (sh.ends_with("/sh") || *sh == "sh") && script.starts_with(INVENTORY_MARKER) =>
            {
                ok(self.inventory(rest))
            }
            [sh, "-c", script, _name, kind, host, port, ..]
                if (sh.ends_with("/sh") || *sh == "sh") && script.starts_with(PROBE_MARKER) =>
            {
                self.probe(kind, host, port)
            }
            ["stagecore-sim", rest @ ..] => self.sim(rest),
            [prog, rest @ ..] if prog.ends_with("/stagecore-sim") => self.sim(rest),
            [cmd, ..] if cmd.contains('/') && !cmd.starts_with('/') => {
                (127, Vec::new(), format!("sh: 1: {cmd}: not found\n").into_bytes(), Duration::ZERO)
            }
            [cmd, ..] => (127, Vec::new(), format!("sh: 1: {cmd}: not found\n").into_bytes(), Duration::ZERO),
        }
    }
}

/// The first line of stagecore's gate probe (`stagecore::promotion::PROBE_MARKER`).
const PROBE_MARKER: &str = "# stagecore-probe v1";

/// The first line of stagecore's inventory collector (`stagecore::inventory::SCRIPT_MARKER`).
const INVENTORY_MARKER: &str = "# stagecore-inventory v1";

fn hex_sha256(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

impl SimGuest {
    /// A gate probe from inside this guest: only to itself (`localhost`, `127.0.0.1`, its own
    /// hostname); other machines cannot be resolved from a simulated guest.
    fn probe(&self, kind: &str, host: &str, port: &str) -> (i64, Vec<u8>, Vec<u8>, Duration) {
        let reply = |code: i64, out: String, err: String| (code, out.into_bytes(), err.into_bytes(), Duration::ZERO);
        if !matches!(host, "localhost" | "127.0.0.1" | "::1" | "") && host != self.hostname {
            return reply(1, String::new(), format!("stagecore-probe: cannot resolve {host} (simulated)"));
        }
        match port.parse::<u16>() {
            Ok(p) if self.ports.contains(&p) => match kind {
                "http" => reply(0, "HTTP/1.0 200 simulated\n".into(), String::new()),
                _ => reply(0, String::new(), String::new()),
            },
            Ok(_) => reply(1, String::new(), format!("connect to {host}:{port}: connection refused (simulated)")),
            Err(_) => reply(2, String::new(), "stagecore-probe: bad port".into()),
        }
    }

    /// `stagecore-sim` commands, as the memory backend's simulated guest answers them.
    fn sim(&mut self, args: &[&str]) -> (i64, Vec<u8>, Vec<u8>, Duration) {
        let done = |code: i64, err: &str| (code, Vec::new(), err.as_bytes().to_vec(), Duration::ZERO);
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
                let mode = self.files.get(*path).map_or(0o644, |(_, m)| *m);
                self.files.insert(path.to_string(), (content.as_bytes().to_vec(), mode));
                done(0, "")
            }
            ["file", "rm", path] => {
                self.files.remove(*path);
                done(0, "")
            }
            ["exit", code] => done(code.parse().unwrap_or(2), &format!("exit {code}")),
            _ => done(127, &format!("stagecore-sim: unknown command {}", args.join(" "))),
        }
    }

    /// The inventory collector's output, in the real script's format (the same sections the
    /// memory backend's simulated guest prints, so stagecore's parser reads both).
    fn inventory(&self, args: &[&str]) -> Vec<u8> {
        use std::fmt::Write as _;
        let max: usize = args.first().and_then(|m| m.parse().ok()).unwrap_or(usize::MAX);
        let watched = args.get(2..).unwrap_or_default();
        let mut s = String::from("@@os\n");
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
                let _ = writeln!(s, "{}  {path}", hex_sha256(data));
            }
        }
        s.push_str("@@end\n");
        s.into_bytes()
    }
}

/// Splits shell words: single quotes, double quotes (with `\"` and `\\`), backslash escapes.
pub(crate) fn split_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    cur.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(n) = chars.next() {
                                cur.push(n);
                            }
                        }
                        _ => cur.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

// ---- The Automation API endpoints over the simulated guests ----

use crate::rest::error;
use crate::server::{Reply, Req};
use crate::state::PowerState;
use crate::{Shared, lock};
use serde_json::{Value, json};

/// Checks `credentials` (wrong user or password → 401, as the API documents).
fn credentials(body: &Value) -> Result<(), Reply> {
    let c = &body["credentials"];
    if c["type"] != "USERNAME_PASSWORD" {
        return Err(error(400, "INVALID_ARGUMENT", "credentials.type must be USERNAME_PASSWORD"));
    }
    if c["user_name"] != SIM_GUEST_USER || c["password"] != SIM_GUEST_PASSWORD {
        return Err(error(
            401,
            "UNAUTHENTICATED",
            "Failed to authenticate with the guest operating system using the supplied credentials.",
        ));
    }
    Ok(())
}

/// `POST /api/vcenter/vm/{vm}/guest/processes?action=create|list`,
/// `POST .../guest/processes/{pid}?action=get`, `POST .../guest/filesystem?action=create`.
pub(crate) fn handle_rest(shared: &Shared, req: &Req, vm: &str, rest: &[&str], action: Option<&str>) -> Reply {
    let body = req.body.clone().unwrap_or(Value::Null);
    let mut inv = lock(&shared.inv);
    let Some(power) = inv.vms.get(vm).map(|v| v.power) else {
        return error(404, "NOT_FOUND", format!("VM {vm} not found."));
    };
    if power != PowerState::On || !inv.guests.contains_key(vm) {
        return error(503, "SERVICE_UNAVAILABLE", format!("VMware Tools is not running in the guest of {vm}."));
    }
    if let Err(r) = credentials(&body) {
        return r;
    }
    let Some(guest) = inv.guests.get_mut(vm) else {
        return error(503, "SERVICE_UNAVAILABLE", "VMware Tools is not running.");
    };
    guest.settle();
    match (rest, action) {
        (["processes"], Some("create")) => {
            let spec = &body["spec"];
            let Some(path) = spec["path"].as_str() else {
                return error(400, "INVALID_ARGUMENT", "spec.path is required");
            };
            if !path.starts_with('/') {
                return error(400, "INVALID_ARGUMENT", "spec.path must be absolute");
            }
            let env: BTreeMap<String, String> = spec["environment_variables"]
                .as_object()
                .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
                .unwrap_or_default();
            let pid = guest.start(path, spec["arguments"].as_str().unwrap_or(""), &env);
            Reply::json(201, json!(pid))
        }
        (["processes"], Some("list")) => {
            let list: Vec<Value> = guest
                .processes
                .values()
                .filter(|p| p.finished.is_none())
                .map(|p| json!({"name": p.name, "pid": p.pid, "owner": SIM_GUEST_USER, "command": p.command, "started": p.started}))
                .collect();
            Reply::json(200, Value::Array(list))
        }
        (["processes", pid], Some("get")) => {
            let Some(p) = pid.parse::<u64>().ok().and_then(|pid| guest.processes.get(&pid)) else {
                return error(404, "NOT_FOUND", format!("process {pid} not found in the guest of {vm}"));
            };
            let mut info = json!({"name": p.name, "owner": SIM_GUEST_USER, "command": p.command, "started": p.started});
            if let Some(f) = &p.finished {
                info["finished"] = json!(f);
                info["exit_code"] = json!(p.exit_code);
            }
            Reply::json(200, info)
        }
        (["filesystem"], Some("create")) => {
            let spec = &body["spec"];
            let Some(path) = spec["path"].as_str().filter(|p| p.starts_with('/')) else {
                return error(400, "INVALID_ARGUMENT", "spec.path must be an absolute path");
            };
            let upload = match spec.get("attributes") {
                None | Some(Value::Null) => {
                    if !guest.files.contains_key(path) {
                        return error(404, "NOT_FOUND", format!("file {path} not found in the guest of {vm}"));
                    }
                    None
                }
                Some(a) => {
                    let Some(size) = a["size"].as_u64() else {
                        return error(400, "INVALID_ARGUMENT", "spec.attributes.size is required");
                    };
                    let overwrite = a["overwrite"].as_bool().unwrap_or(false);
                    if !overwrite && guest.files.contains_key(path) {
                        return error(400, "ALREADY_EXISTS", format!("file {path} exists in the guest"));
                    }
                    let mode = match a["posix"]["permissions"].as_str() {
                        None => None,
                        Some(p) => match u32::from_str_radix(p, 8) {
                            Ok(m) if m <= 0o7777 => Some(m),
                            _ => {
                                return error(400, "INVALID_ARGUMENT", format!("posix.permissions `{p}` is not octal"));
                            }
                        },
                    };
                    Some((size, overwrite, mode))
                }
            };
            drop(inv);
            let token = uuid::Uuid::new_v4().simple().to_string();
            lock(&shared.transfers)
                .insert(token.clone(), Transfer { vm: vm.to_string(), path: path.to_string(), upload });
            let host = req.headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
            let scheme = if crate::server::is_https(shared, host) { "https" } else { "http" };
            Reply::json(201, json!(format!("{scheme}://{host}/guestFile?id=1&token={token}")))
        }
        _ => error(404, "NOT_FOUND", format!("no such operation {} {}", req.method, req.path)),
    }
}

/// `PUT|GET /guestFile?token=..`: the transfer itself (no session: the token is the authority).
pub(crate) fn transfer(shared: &Shared, req: &Req, raw: &[u8]) -> Reply {
    let token = req.query("token").first().map(|t| t.to_string()).unwrap_or_default();
    let Some(t) = lock(&shared.transfers).remove(&token) else {
        return Reply::empty(404);
    };
    let mut inv = lock(&shared.inv);
    let Some(guest) = inv.guests.get_mut(&t.vm) else { return Reply::empty(404) };
    match (req.method.as_str(), t.upload) {
        ("PUT", Some((size, overwrite, mode))) => {
            if raw.len() as u64 != size {
                return Reply::empty(400);
            }
            if !overwrite && guest.files.contains_key(&t.path) {
                return Reply::empty(409);
            }
            let mode = mode.or_else(|| guest.files.get(&t.path).map(|(_, m)| *m)).unwrap_or(0o644);
            guest.files.insert(t.path, (raw.to_vec(), mode));
            Reply::empty(200)
        }
        ("GET", None) => match guest.files.get(&t.path) {
            Some((c, _)) => Reply::bytes(200, c.clone()),
            None => Reply::empty(404),
        },
        _ => Reply::empty(405),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_redirections() {
        assert_eq!(split_words(r#"-c 'echo '\''a b'\'' >/tmp/o'"#), vec!["-c", "echo 'a b' >/tmp/o"]);
        let mut g = SimGuest::new("app");
        let pid = g.start("/bin/sh", r#"-c 'echo hi '\''there'\'' </dev/null >/tmp/o 2>/tmp/e'"#, &BTreeMap::new());
        g.settle();
        assert_eq!(g.processes[&pid].exit_code, 0);
        assert_eq!(g.files["/tmp/o"].0, b"hi there\n");
        let pid = g.start("/bin/sh", "-c 'nope >/tmp/o 2>/tmp/e'", &BTreeMap::new());
        assert_eq!(g.processes[&pid].exit_code, 127);
        assert_eq!(g.files["/tmp/e"].0, b"sh: 1: nope: not found\n");
    }
}
