//! What is on disk and in /proc for one machine, never trusted: the pid file is read, the pid is
//! checked alive (zombies count as gone) and checked to be *our* QEMU (its /proc cmdline contains
//! our QMP socket path), and the socket is checked to accept connections.

use std::path::Path;
use std::time::Duration;

use stagecore::Result;

use super::QemuPaths;
use crate::cmdline::escape_opt;
use crate::error;

/// What [`inspect`] found for a machine's state files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessState {
    /// No pid file: nothing of ours runs (a leftover socket file may exist).
    NotRunning,
    /// The pid file does not hold a pid.
    CorruptPidfile {
        /// What it holds (at most 64 bytes).
        content: String,
    },
    /// The pid file names a process that is gone (QEMU was killed or crashed).
    StalePidfile {
        /// The pid in the file.
        pid: u32,
    },
    /// The pid file names a live process that is not our QEMU (the pid was reused).
    ForeignProcess {
        /// The pid in the file.
        pid: u32,
    },
    /// Our QEMU is alive but its QMP socket is missing or refuses connections.
    Unresponsive {
        /// QEMU's pid.
        pid: u32,
        /// Why the socket is unusable.
        reason: String,
    },
    /// Our QEMU is alive and its QMP socket accepts connections.
    Running {
        /// QEMU's pid.
        pid: u32,
    },
}

/// Whether a pid is alive and whether it is our QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    Gone,
    Foreign,
    Ours,
}

/// The start time (clock ticks since boot) of a live, non-zombie `pid`: with the pid, it
/// identifies one process for its whole life, so a reused pid is never taken for it.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after `(comm)`: state is field 3, starttime field 22.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?;
    if matches!(state, "Z" | "X" | "x") {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Checks `pid` against /proc: gone (or zombie, or exiting), alive but not ours, or our QEMU for
/// `socket`.
pub(crate) fn liveness(pid: u32, socket: &Path) -> Liveness {
    if start_time(pid).is_none() {
        return Liveness::Gone;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if cmdline.is_empty() {
        // An exiting process (its memory is gone) or a kernel thread: neither is a QEMU to trust.
        return Liveness::Gone;
    }
    let needle = escape_opt(socket.as_os_str());
    let needle = std::os::unix::ffi::OsStrExt::as_bytes(needle.as_os_str());
    let ours =
        !needle.is_empty() && cmdline.split(|&b| b == 0).any(|arg| arg.windows(needle.len()).any(|w| w == needle));
    if ours { Liveness::Ours } else { Liveness::Foreign }
}

/// The command lines of the processes in /proc, read once on first use and then shared by every
/// lookup made with it: an operation over many machines (status, drift, start waves) asks "does
/// any process name this machine's socket?" once per machine, and reading every process's
/// cmdline each time cost ~2 ms per machine. Make one per operation, never keep one: a process
/// that starts after the scan is not in it.
#[derive(Debug, Default)]
pub struct ProcScan {
    cmdlines: std::sync::OnceLock<Vec<(u32, Vec<u8>)>>,
}

impl ProcScan {
    /// A scan that reads /proc when first asked.
    pub fn new() -> ProcScan {
        ProcScan::default()
    }

    fn cmdlines(&self) -> &[(u32, Vec<u8>)] {
        self.cmdlines.get_or_init(|| {
            let me = std::process::id();
            std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|&pid| pid != me)
                .filter_map(|pid| Some((pid, std::fs::read(format!("/proc/{pid}/cmdline")).ok()?)))
                .filter(|(_, c)| !c.is_empty())
                .collect()
        })
    }

    /// The pids of live processes whose command line names `socket` (our QEMUs of one machine).
    pub(crate) fn pids_naming(&self, socket: &Path) -> Vec<u32> {
        let needle = escape_opt(socket.as_os_str());
        let needle = std::os::unix::ffi::OsStrExt::as_bytes(needle.as_os_str());
        if needle.is_empty() {
            return Vec::new();
        }
        self.cmdlines()
            .iter()
            .filter(|(_, c)| c.split(|&b| b == 0).any(|arg| arg.windows(needle.len()).any(|w| w == needle)))
            .map(|(pid, _)| *pid)
            .filter(|&pid| liveness(pid, socket) == Liveness::Ours)
            .collect()
    }
}

/// Reads the pid file: `Ok(None)` when absent, `Err(content)` when it holds no pid.
pub(crate) fn read_pidfile(pidfile: &Path) -> Result<Option<std::result::Result<u32, String>>> {
    match std::fs::read_to_string(pidfile) {
        Ok(s) => Ok(Some(s.trim().parse::<u32>().map_err(|_| s.chars().take(64).collect()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(error::io("reading pid file", pidfile, &e)),
    }
}

/// Whether the QMP socket accepts a connection (bounded). Connecting and closing is harmless to
/// QEMU even when another client holds the monitor (the connection waits in the backlog).
async fn socket_accepts(socket: &Path) -> std::result::Result<(), String> {
    let connect = tokio::net::UnixStream::connect(socket);
    match tokio::time::timeout(Duration::from_secs(2), connect).await {
        Ok(Ok(_)) => Ok(()),
        // Listening, with its backlog of one full: alive.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        Ok(Err(e)) => Err(format!("QMP socket {}: {e}", socket.display())),
        Err(_) => Err(format!("QMP socket {}: connect timed out", socket.display())),
    }
}

/// Inspects a machine's pid file, process and socket; every failure mode is a typed state.
pub async fn inspect(paths: &QemuPaths) -> Result<ProcessState> {
    let pid = match read_pidfile(&paths.pidfile)? {
        None => return Ok(ProcessState::NotRunning),
        Some(Err(content)) => return Ok(ProcessState::CorruptPidfile { content }),
        Some(Ok(pid)) => pid,
    };
    let state = match liveness(pid, &paths.qmp_socket) {
        Liveness::Gone => ProcessState::StalePidfile { pid },
        Liveness::Foreign => ProcessState::ForeignProcess { pid },
        Liveness::Ours => match socket_accepts(&paths.qmp_socket).await {
            Ok(()) => ProcessState::Running { pid },
            Err(reason) => ProcessState::Unresponsive { pid, reason },
        },
    };
    tracing::debug!(pidfile = %paths.pidfile.display(), ?state, "inspected qemu state");
    Ok(state)
}

/// Removes a dead machine's pid file and socket (missing files are fine).
pub(crate) fn remove_state_files(paths: &QemuPaths) -> Result<()> {
    for path in [&paths.pidfile, &paths.qmp_socket] {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(error::io("removing stale", path, &e)),
        }
    }
    Ok(())
}
