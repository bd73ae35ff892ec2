//! `cargo xtask setup`: make sure QEMU, libvirt, the guest-image tools (mmdebstrap, e2fsprogs)
//! and xfsprogs are installed (installing them with apt when root on Debian), that `qemu-img`
//! and the system emulator are the same version, and that `virtlogd` and `libvirtd` are
//! running and answering. Idempotent: on a ready machine it only reports.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::apt;
use crate::run::{Failure, Result, command, find_program, run, stdout_of, succeeds_within};

/// Programs the tests and examples need.
const PROGRAMS: &[&str] = &[
    "qemu-system-x86_64",
    "qemu-img",
    "qemu-io",
    "virsh",
    "libvirtd",
    "virtlogd",
    "pkg-config",
    // the guest image build (`cargo xtask guest-image`)
    "mmdebstrap",
    "mke2fs",
    // the reflink test of full copies (an XFS loop image)
    "mkfs.xfs",
];

/// How long to wait for `virsh -c qemu:///system version` after starting the daemons.
const DAEMON_WAIT: Duration = Duration::from_secs(10);

/// Runs the whole setup step.
pub(crate) fn setup() -> Result<()> {
    let found = problems();
    if found.is_empty() {
        println!("setup: QEMU and libvirt present");
    } else {
        for p in &found {
            println!("setup: {p}");
        }
        install()?;
        let left = problems();
        if !left.is_empty() {
            return Err(Failure(format!("setup: still not ready after installing: {}", left.join("; "))));
        }
    }
    kvm_permissions()?;
    start_daemons()
}

/// Gives `/dev/kvm` the group and mode Debian's udev rule would (`kvm`, 0660). Machines without
/// udev leave it `root:root 0600`, and then libvirt re-probes QEMU on every define or snapshot
/// (30–75 s each, measured here). Does nothing without `/dev/kvm`, when the group already has
/// access, or when not root.
fn kvm_permissions() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata("/dev/kvm") else { return Ok(()) };
    if meta.permissions().mode() & 0o060 == 0o060 || !is_root() {
        return Ok(());
    }
    println!("setup: giving /dev/kvm group kvm, mode 0660 (as udev would)");
    run("setup: chgrp kvm /dev/kvm", Command::new("chgrp").args(["kvm", "/dev/kvm"]))?;
    run("setup: chmod 0660 /dev/kvm", Command::new("chmod").args(["0660", "/dev/kvm"]))
}

/// The OVMF firmware file the libvirt UEFI tests boot (Debian package `ovmf`).
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";

/// Everything that is missing or inconsistent, as human-readable lines; empty when ready.
fn problems() -> Vec<String> {
    let mut found: Vec<String> =
        PROGRAMS.iter().filter(|p| find_program(p).is_none()).map(|p| format!("missing program {p}")).collect();
    if find_program("pkg-config").is_some() && !libvirt_pc_exists() {
        found.push("missing pkg-config file libvirt.pc (libvirt-dev)".to_string());
    }
    if !std::path::Path::new(OVMF_CODE).exists() {
        found.push(format!("missing UEFI firmware {OVMF_CODE} (ovmf)"));
    }
    if let Some(mismatch) = version_mismatch() {
        found.push(mismatch);
    }
    found
}

fn libvirt_pc_exists() -> bool {
    Command::new("pkg-config").args(["--exists", "libvirt"]).status().is_ok_and(|s| s.success())
}

/// Reports when `qemu-img` and `qemu-system-x86_64` differ in major.minor version.
fn version_mismatch() -> Option<String> {
    let version = |program: &str| {
        let path = find_program(program)?;
        apt::parse_qemu_version(&stdout_of(Command::new(path).arg("--version"))?)
    };
    let (img, system) = (version("qemu-img")?, version("qemu-system-x86_64")?);
    (img != system)
        .then(|| format!("qemu-img {}.{} does not match qemu-system-x86_64 {}.{}", img.0, img.1, system.0, system.1))
}

fn is_root_on_debian() -> bool {
    std::path::Path::new("/etc/debian_version").exists() && is_root()
}

/// Whether this process runs as root.
pub(crate) fn is_root() -> bool {
    stdout_of(Command::new("id").arg("-u")).is_some_and(|u| u.trim() == "0")
}

/// Installs the packages with one apt call, or explains what to install and fails.
fn install() -> Result<()> {
    if !is_root_on_debian() {
        return Err(Failure(format!(
            "setup: QEMU/libvirt need installing (see above), but this is not root on Debian, so \
             setup cannot do it. Install these Debian packages (or your distribution's \
             equivalents), with qemu-utils at the same version as qemu-system-x86, and run \
             again: {}",
            apt::PACKAGES.join(" ")
        )));
    }
    let update = apt::update_command();
    println!("setup: running {}", update.display());
    run("setup: apt-get update", &mut command(&update))?;
    let policy = stdout_of(Command::new("apt-cache").args(["policy", "qemu-system-x86"])).unwrap_or_default();
    let candidate = apt::parse_candidate(&policy)
        .ok_or_else(|| Failure("setup: apt has no installable version of qemu-system-x86".to_string()))?;
    let install = apt::install_command(&candidate);
    println!("setup: installing: {}", install.display());
    run("setup: apt-get install", &mut command(&install))
}

/// Starts `virtlogd` and `libvirtd` unless running, then waits until libvirt answers.
fn start_daemons() -> Result<()> {
    for dir in ["/var/log/libvirt", "/var/run/libvirt", "/var/lib/libvirt/images"] {
        // Best effort: without root these may be unwritable, and then a running daemon is
        // all that matters; the virsh check below fails loudly if it is not there.
        let _ = std::fs::create_dir_all(dir);
    }
    for daemon in ["virtlogd", "libvirtd"] {
        if is_running(daemon) {
            println!("setup: {daemon} already running");
            continue;
        }
        println!("setup: starting {daemon}");
        let path = find_program(daemon).ok_or_else(|| Failure(format!("setup: {daemon} not found")))?;
        run(&format!("setup: start {daemon}"), Command::new(path).arg("-d"))?;
    }
    wait_for_libvirt()
}

/// Whether a process with exactly this name runs (`pgrep -x`, or a `/proc` scan without it).
fn is_running(name: &str) -> bool {
    if let Some(pgrep) = find_program("pgrep") {
        return stdout_of(Command::new(pgrep).args(["-x", name])).is_some();
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|comm| comm.trim_end() == name))
}

fn wait_for_libvirt() -> Result<()> {
    let virsh = find_program("virsh").ok_or_else(|| Failure("setup: virsh not found".into()))?;
    let deadline = Instant::now() + DAEMON_WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut version = Command::new(&virsh);
        version.args(["-c", "qemu:///system", "version"]);
        if succeeds_within(&mut version, left.max(Duration::from_secs(1))) {
            println!("setup: libvirt answers on qemu:///system");
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Failure(format!(
                "setup: `virsh -c qemu:///system version` still fails after {}s; \
                 check /var/log/libvirt and that libvirtd and virtlogd run",
                DAEMON_WAIT.as_secs()
            )));
        }
        thread::sleep(Duration::from_millis(250));
    }
}
