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
