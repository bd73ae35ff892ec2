//! Shared helpers for the real-QEMU tests: a machine in a temp dir with small qcow2 disks and
//! fenced NICs, killed in a drop guard; `qemu-img`/`qemu-io` runners that fail loudly.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use stagecore_qemu::cmdline::{Accel, DiskConfig, Firmware, MachineConfig, NicConfig};
use stagecore_qemu::process::{Launched, Launcher};

/// A running test machine; SIGKILLed on drop, then its temp dir is removed.
pub struct Vm {
    pub launched: Launched,
    pub config: MachineConfig,
    pub spawn_to_ready: Duration,
    pub dir: tempfile::TempDir,
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.launched.process.start_kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.launched.process.is_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Runs a tool and returns stdout; panics (loudly) when it is missing or fails.
pub fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is required for this test and could not run: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A fresh 16 MiB qcow2 image.
pub fn create_disk(path: &Path) {
    run("qemu-img", &["create", "-q", "-f", "qcow2", path_str(path), "16M"]);
}

/// A machine config in `dir` with `disks` fresh qcow2 disks and two fenced NICs, TCG forced.
pub fn config_in(dir: &Path, disks: usize) -> MachineConfig {
    let name = format!("t{}", uuid::Uuid::new_v4().simple());
    let disks = (0..disks)
        .map(|i| {
            let path = dir.join(format!("disk{i}.qcow2"));
            create_disk(&path);
            DiskConfig { id: format!("disk{i}"), path, read_only: false }
        })
        .collect();
    let nics = (0..2)
        .map(|i| NicConfig {
            id: format!("nic{i}"),
            mac: format!("52:54:00:00:00:{i:02x}"),
            segment: format!("{name}/seg{i}"),
        })
        .collect();
    MachineConfig {
        name,
        uuid: uuid::Uuid::new_v4(),
        vcpus: 1,
        memory_mib: 64,
        firmware: Firmware::Bios,
        accel: Accel::Tcg,
        disks,
        nics,
        qmp_socket: dir.join("qmp.sock"),
        pidfile: dir.join("qemu.pid"),
        log: dir.join("qemu.log"),
        boot: None,
        agent_socket: None,
        console_log: None,
    }
}

/// Starts a machine with `disks` disks.
pub async fn start(disks: usize) -> Vm {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_in(dir.path(), disks);
    let t = Instant::now();
    let launched = Launcher::default().launch(&config).await.expect("qemu launches");
    let spawn_to_ready = t.elapsed();
    eprintln!("spawn to QMP ready: {:.1} ms", spawn_to_ready.as_secs_f64() * 1e3);
    Vm { launched, config, spawn_to_ready, dir }
}

/// Path of a new file in the VM's dir.
pub fn file(vm: &Vm, name: &str) -> PathBuf {
    vm.dir.path().join(name)
}

/// Signals a pid directly (for SIGSTOP/SIGCONT/SIGKILL in fault tests).
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}
