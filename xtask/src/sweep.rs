//! What earlier test runs left on this machine, removed before a new run: a test that nextest
//! kills on its timeout (SIGKILL) never runs its guard's cleanup, so its QEMU processes and its
//! libvirt domains outlive it — running guests that take CPU from every later test on a 2-core
//! machine, and shut-off domains and directories that pile up.
//!
//! Only what is unmistakably a test's is touched:
//! - libvirt domains on `qemu:///system` whose definition names a file under
//!   `/var/lib/libvirt/images/stagecore-test-*` (every local libvirt test keeps its state there),
//!   the networks they use (never `default`), then those directories;
//! - `qemu-system-*` processes whose command line names a path in a `tempfile` directory of the
//!   temp dir (`/tmp/.tmp…`: the QEMU backend tests' state roots).

use std::path::Path;
use std::process::Command;

use crate::run::stdout_of;

const URI: &str = "qemu:///system";
const TEST_DIRS: &str = "/var/lib/libvirt/images";
const TEST_DIR_PREFIX: &str = "stagecore-test-";

fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new("virsh");
    cmd.args(["-q", "-c", URI]).args(args);
    cmd
}

/// The non-empty output lines of a virsh call (none when it fails).
fn virsh(args: &[&str]) -> Vec<String> {
    stdout_of(&mut command(args))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// Whether a virsh call succeeded.
fn virsh_ok(args: &[&str]) -> bool {
    stdout_of(&mut command(args)).is_some()
}

/// Whether a domain definition belongs to a test (see the module docs).
fn is_test_domain(xml: &str) -> bool {
    xml.contains(&format!("{TEST_DIRS}/{TEST_DIR_PREFIX}"))
}

/// Whether a process command line (NUL-separated) is a test's QEMU (see the module docs).
fn is_test_qemu(cmdline: &[u8]) -> bool {
    let tmp = std::env::temp_dir().join(".tmp");
    let needle = tmp.to_string_lossy();
    let args: Vec<String> = cmdline.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    args.first().and_then(|a| Path::new(a).file_name()).is_some_and(|n| n.to_string_lossy().starts_with("qemu-system-"))
        && args.iter().any(|a| a.contains(needle.as_ref()))
}

/// Removes what earlier runs left (see the module docs) and says what it removed. Best effort:
/// what cannot be removed is reported, never fatal.
pub(crate) fn sweep() {
    let (mut domains, mut left) = (0, Vec::new());
    for d in virsh(&["list", "--all", "--name"]) {
        let xml = virsh(&["dumpxml", "--inactive", &d]).join("\n");
        if !is_test_domain(&xml) {
            continue;
        }
        for part in xml.split("<source network='").skip(1) {
            let net = part.split('\'').next().unwrap_or_default();
            if !net.is_empty() && net != "default" {
                virsh_ok(&["net-destroy", net]);
                virsh_ok(&["net-undefine", net]);
            }
        }
        virsh_ok(&["destroy", &d]);
        if virsh_ok(&["undefine", &d, "--snapshots-metadata", "--nvram"])
            || virsh_ok(&["undefine", &d, "--snapshots-metadata", "--keep-nvram"])
        {
            domains += 1;
        } else {
            left.push(d);
        }
    }
    let mut dirs = 0;
    for e in std::fs::read_dir(TEST_DIRS).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(TEST_DIR_PREFIX) && std::fs::remove_dir_all(e.path()).is_ok() {
            dirs += 1;
        }
    }
    let mut killed = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
        if is_test_qemu(&cmdline) {
            // SAFETY: kill(2) on a pid whose command line marks it as a test's QEMU.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed += 1;
        }
    }
    println!(
        "sweep: removed {domains} test domains and {dirs} test directories left by earlier runs, killed {killed} test QEMUs{}",
        if left.is_empty() { String::new() } else { format!("; could not remove {left:?}") }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_test_domains_and_test_qemus_are_matched() {
        assert!(is_test_domain(
            "<disk><source file='/var/lib/libvirt/images/stagecore-test-k1a2b3c4/d.qcow2'/></disk>"
        ));
        assert!(!is_test_domain("<disk><source file='/var/lib/libvirt/images/debian.qcow2'/></disk>"));
        let tmp = std::env::temp_dir().join(".tmpAbC123/envs/p/web.qmp");
        let ours = format!("/usr/bin/qemu-system-x86_64\0-name\0web\0-qmp\0unix:{},server=on", tmp.display());
        assert!(is_test_qemu(ours.as_bytes()));
        assert!(!is_test_qemu(b"/usr/bin/qemu-system-x86_64\0-drive\0file=/srv/vm/a.qcow2"));
        let editor = format!("/usr/bin/vim\0{}", tmp.display());
        assert!(!is_test_qemu(editor.as_bytes()), "only QEMU binaries are killed");
    }
}
