//! Process helpers: find programs on `PATH` (plus the sbin directories, where libvirt's
//! daemons live), run commands with output passed through unchanged, capture output, and
//! run with a deadline so a hung tool cannot stall setup.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::apt::CommandSpec;

/// A failed xtask step, with a message that names the step and what went wrong.
#[derive(Debug)]
pub(crate) struct Failure(pub(crate) String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Result of an xtask step.
pub(crate) type Result<T> = std::result::Result<T, Failure>;

/// Directories searched after `PATH`: root's daemons live there and some shells omit them.
const EXTRA_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// Finds an executable file named `name` on `PATH` or in the sbin directories.
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Builds a [`Command`] from a [`CommandSpec`].
pub(crate) fn command(spec: &CommandSpec) -> Command {
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args);
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    cmd
}

/// Runs `cmd` with inherited stdio; fails naming `step` unless it exits successfully.
pub(crate) fn run(step: &str, cmd: &mut Command) -> Result<()> {
    let status = cmd.status().map_err(|e| Failure(format!("{step}: could not start {:?}: {e}", cmd.get_program())))?;
    if status.success() { Ok(()) } else { Err(Failure(format!("{step}: failed ({status})"))) }
}

/// Runs `cmd` and returns its stdout if it exits successfully, `None` otherwise.
pub(crate) fn stdout_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` silently and reports whether it succeeded within `limit`; a process still
/// running at the deadline is killed and counts as a failure.
pub(crate) fn succeeds_within(cmd: &mut Command, limit: Duration) -> bool {
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn();
    let Ok(mut child) = child else { return false };
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sh_and_not_nonsense() {
        assert!(find_program("sh").is_some());
        assert!(find_program("definitely-not-a-program-xtask").is_none());
    }

    #[test]
    fn run_reports_step_and_status() {
        assert!(run("ok-step", &mut Command::new("true")).is_ok());
        let err = run("bad-step", &mut Command::new("false")).unwrap_err();
        assert!(err.0.starts_with("bad-step: failed"), "{err}");
    }

    #[test]
    fn deadline_kills_a_hung_process() {
        let mut sleep = Command::new("sleep");
        sleep.arg("30");
        assert!(!succeeds_within(&mut sleep, Duration::from_millis(200)));
        assert!(succeeds_within(&mut Command::new("true"), Duration::from_secs(10)));
    }
}
