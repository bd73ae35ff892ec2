//! A small **simulated** guest behind the Automation API's guest operations
//! (`/api/vcenter/vm/{vm}/guest/processes` and `/guest/filesystem?action=create` transfers).
//!
//! Contract: it is not an operating system. Each guest holds files (path → bytes, mode), a
//! process table (pid, command, start/finish times, exit code) and a hostname. A process is
//! `/bin/sh -c SCRIPT` or a program path with arguments; the script is split into words
//! (single and double quotes, backslash), `<FILE`, `>FILE`, `2>FILE` redirect standard input,
//! output and error to guest files, and the remaining words run as one command of this set:
//! `true`, `false`, `exit N`, `echo WORDS`, `cat [FILE...]` (stdin without files), `rm [-f] FILE...`,
//! `hostname`, `sleep N` (runs N seconds of wall time, so it shows in a process list), `sh -c SCRIPT`,
//! and `stagecore-sim file write PATH CONTENT`. Anything else exits 127. Guest credentials are
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
        let mut g = SimGuest { hostname: hostname.to_string(), files: BTreeMap::new(), processes: BTreeMap::new(), next_pid: 1000 };
        g.files.insert("/etc/hostname".into(), (format!("{hostname}\n").into_bytes(), 0o644));
        g.files.insert(
            "/etc/os-release".into(),
            (b"PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID=\"12\"\n".to_vec(), 0o644),
        );
        g
    }

    /// What a clone's guest looks like: same files, new hostname, no processes.
    pub(crate) fn cloned_as(&mut self, hostname: &str) {
        self.hostname = hostname.to_string();
        self.files.insert("/etc/hostname".into(), (format!("{hostname}\n").into_bytes(), 0o644));
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
        if words.first().map(String::as_str) == Some("sh") && words.get(1).map(String::as_str) == Some("-c") && depth < 4 {
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
    fn command(&mut self, argv: &[String], stdin: &[u8], env: &BTreeMap<String, String>) -> (i64, Vec<u8>, Vec<u8>, Duration) {
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
                            return (1, out, format!("cat: {f}: No such file or directory\n").into_bytes(), Duration::ZERO);
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
            ["stagecore-sim", "file", "write", path, content] => {
                let mode = self.files.get(*path).map_or(0o644, |(_, m)| *m);
                self.files.insert(path.to_string(), (content.as_bytes().to_vec(), mode));
                ok(Vec::new())
            }
            [cmd, ..] => (127, Vec::new(), format!("sh: 1: {cmd}: not found\n").into_bytes(), Duration::ZERO),
        }
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
        return Err(error(401, "UNAUTHENTICATED", "Failed to authenticate with the guest operating system using the supplied credentials."));
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
                            _ => return error(400, "INVALID_ARGUMENT", format!("posix.permissions `{p}` is not octal")),
                        },
                    };
                    Some((size, overwrite, mode))
                }
            };
            drop(inv);
            let token = uuid::Uuid::new_v4().simple().to_string();
            lock(&shared.transfers).insert(token.clone(), Transfer { vm: vm.to_string(), path: path.to_string(), upload });
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
