//! The guest operations of the Automation API (`/api/vcenter/vm/{vm}/guest/processes` and
//! `/guest/filesystem?action=create` transfers) over **simulated** guests: each VM's guest is a
//! [`stagecore::sim_guest::SimGuest`] — the same simulated guest the memory backend uses (files,
//! packages, services, ports as maps; the inventory collector and the gate probe recognised by
//! their first lines; a small shell; `svc`, `dpkg -i` of uncompressed demo packages; see that
//! module for the exact contract). A gate probe inside a guest reaches only that guest.
//!
//! This module adds what vSphere has around it: a process table per VM (pid, command, start and
//! finish times, exit code; `sleep N` keeps a process running N seconds of wall time, `hang`
//! forever), no stdout/stderr capture (output goes only where the command line redirects it), guest
//! credentials [`SIM_GUEST_USER`] / [`SIM_GUEST_PASSWORD`], 503 while the VM is powered off or its
//! agent is off, and `/sys/class/dmi/id/product_uuid` holding the VM's BIOS UUID. A power-on boots
//! the guest (new boot id, enabled services running); a clone gets the guest of its source (at
//! the snapshot it is cloned from) with a new identity; a revert restores the guest of the snapshot.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use stagecore::sim_guest::Exec;
pub use stagecore::sim_guest::SimGuest;

/// The guest user the simulated guests accept.
pub const SIM_GUEST_USER: &str = "root";
/// The guest password the simulated guests accept.
pub const SIM_GUEST_PASSWORD: &str = "guest-Passw0rd!";

/// Where the guest reads its machine's SMBIOS UUID.
pub const PRODUCT_UUID: &str = "/sys/class/dmi/id/product_uuid";

/// One process of a simulated guest.
#[derive(Clone, Debug)]
pub(crate) struct Process {
    /// Process id.
    pub(crate) pid: u64,
    /// Program name (the path's last component).
    pub(crate) name: String,
    /// Full command line.
    pub(crate) command: String,
    /// Start time (RFC 3339).
    pub(crate) started: String,
    /// When it finishes (processes such as `sleep` run for a while).
    pub(crate) finishes_at: Instant,
    /// Exit code once finished.
    pub(crate) exit_code: i64,
    /// Finish time (RFC 3339), set once `finishes_at` has passed and someone looked.
    pub(crate) finished: Option<String>,
}

/// The processes started in one VM's guest.
#[derive(Clone, Debug)]
pub(crate) struct Processes {
    pub(crate) by_pid: BTreeMap<u64, Process>,
    next_pid: u64,
}

impl Default for Processes {
    fn default() -> Self {
        Processes { by_pid: BTreeMap::new(), next_pid: 1000 }
    }
}

impl Processes {
    /// Starts a program (`path` + `arguments` as the API gives them) in `guest`; returns its pid.
    pub(crate) fn start(
        &mut self,
        guest: &mut SimGuest,
        path: &str,
        arguments: &str,
        env: &BTreeMap<String, String>,
    ) -> u64 {
        let pid = self.next_pid;
        self.next_pid += 1;
        let mut argv = vec![path.to_string()];
        argv.extend(split_words(arguments));
        let mut req = stagecore::GuestExec::new(argv);
        for (k, v) in env {
            req = req.env(k, v);
        }
        let (code, duration) = match guest.exec_timed(&req) {
            Ok((Exec::Done(out), d)) => (i64::from(out.exit_code), d),
            Ok((Exec::Probe(p), _)) => (i64::from(guest.probe_locally(&p).exit_code), Duration::ZERO),
            // `hang`: the process never ends.
            Err(stagecore::Error::Timeout { .. }) => (0, Duration::from_secs(365 * 24 * 3600)),
            Err(_) => (1, Duration::ZERO),
        };
        let name = path.rsplit('/').next().unwrap_or(path).to_string();
        self.by_pid.insert(
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
        for p in self.by_pid.values_mut() {
            if p.finished.is_none() && p.finishes_at <= now {
                p.finished = Some(crate::now_rfc3339());
            }
        }
    }
}

/// A transfer URL handed out by `filesystem?action=create`, valid for one request.
#[derive(Clone, Debug)]
pub(crate) struct Transfer {
    pub(crate) vm: String,
    pub(crate) path: String,
    /// `Some((size, overwrite, mode))` for an upload (PUT), `None` for a download (GET).
    pub(crate) upload: Option<(u64, bool, Option<u32>)>,
}

/// A fresh guest for a vSphere VM called `name` (VMware Tools instead of the QEMU agent).
pub(crate) fn vsphere_guest(name: &str) -> SimGuest {
    let mut g = SimGuest::new(name);
    g.packages.remove("qemu-guest-agent");
    g.packages.insert("open-vm-tools".into(), ("2:12.2.0-1+deb12u2".into(), "amd64".into()));
    g
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

use crate::exchange::{Reply, Req, error};
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
    let mut guard = lock(&shared.inv);
    let inv = &mut *guard;
    let Some(power) = inv.vms.get(vm).map(|v| v.power) else {
        return error(404, "NOT_FOUND", format!("VM {vm} not found."));
    };
    if power != PowerState::On || !inv.guests.get(vm).is_some_and(|g| g.agent) {
        return error(503, "SERVICE_UNAVAILABLE", format!("VMware Tools is not running in the guest of {vm}."));
    }
    if let Err(r) = credentials(&body) {
        return r;
    }
    let bios_uuid = inv.vms.get(vm).map(|v| v.bios_uuid.clone()).unwrap_or_default();
    let (Some(guest), procs) = (inv.guests.get_mut(vm), inv.processes.entry(vm.to_string()).or_default()) else {
        return error(503, "SERVICE_UNAVAILABLE", "VMware Tools is not running.");
    };
    guest.files.insert(PRODUCT_UUID.into(), (format!("{bios_uuid}\n").into_bytes(), 0o444));
    procs.settle();
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
            let pid = procs.start(guest, path, spec["arguments"].as_str().unwrap_or(""), &env);
            Reply::json(201, json!(pid))
        }
        (["processes"], Some("list")) => {
            let list: Vec<Value> = procs
                .by_pid
                .values()
                .filter(|p| p.finished.is_none())
                .map(|p| json!({"name": p.name, "pid": p.pid, "owner": SIM_GUEST_USER, "command": p.command, "started": p.started}))
                .collect();
            Reply::json(200, Value::Array(list))
        }
        (["processes", pid], Some("get")) => {
            let Some(p) = pid.parse::<u64>().ok().and_then(|pid| procs.by_pid.get(&pid)) else {
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
            drop(guard);
            let token = uuid::Uuid::new_v4().simple().to_string();
            lock(&shared.transfers)
                .insert(token.clone(), Transfer { vm: vm.to_string(), path: path.to_string(), upload });
            let host = req.headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
            let scheme = if crate::exchange::is_https(shared, host) { "https" } else { "http" };
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
    fn words_and_processes() {
        assert_eq!(split_words(r#"-c 'echo '\''a b'\'' >/tmp/o'"#), vec!["-c", "echo 'a b' >/tmp/o"]);
        let mut g = vsphere_guest("app");
        let mut p = Processes::default();
        let pid =
            p.start(&mut g, "/bin/sh", r#"-c 'echo hi '\''there'\'' </dev/null >/tmp/o 2>/tmp/e'"#, &BTreeMap::new());
        p.settle();
        assert_eq!(p.by_pid[&pid].exit_code, 0);
        assert_eq!(g.files["/tmp/o"].0, b"hi there\n");
        let pid = p.start(&mut g, "/bin/sh", "-c 'nope >/tmp/o 2>/tmp/e'", &BTreeMap::new());
        assert_eq!(p.by_pid[&pid].exit_code, 127);
        assert_eq!(g.files["/tmp/e"].0, b"sh: 1: nope: not found\n");
    }
}
