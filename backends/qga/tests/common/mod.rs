//! Boots the project's real test guest under plain QEMU (TCG) with its agent on a unix socket, for live
//! tests and benches. QEMU is killed when the [`Guest`] is dropped, also when a test panics.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use stagecore_qga::{Agent, SocketTransport};

/// How long a booting guest's agent is waited for (boots take ~4 s alone, far more on a loaded machine).
pub const READY: Duration = Duration::from_secs(180);

/// A running test guest: QEMU, its overlay and sockets in a tempdir, and an [`Agent`] on its socket.
pub struct Guest {
    /// The client on the guest's agent socket.
    pub agent: Agent,
    /// The agent socket (`<tmp>/qga.sock`).
    pub socket: PathBuf,
    /// QEMU; killed on drop.
    pub qemu: Child,
    /// The serial console log.
    pub console: PathBuf,
    dir: tempfile::TempDir,
}

impl Guest {
    /// The tempdir holding the overlay, sockets and console log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of the serial console, for failure messages.
    pub fn console_tail(&self) -> String {
        console_tail(&self.console)
    }

    /// Waits (bounded) for QEMU to exit by itself, e.g. after a guest shutdown.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let end = std::time::Instant::now() + within;
        while std::time::Instant::now() < end {
            if let Some(status) = self.qemu.try_wait().expect("wait for QEMU") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.qemu.try_wait() {
            let _ = self.qemu.kill();
        }
        let _ = self.qemu.wait();
    }
}

fn console_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Boots a fresh overlay of the test image and waits until its agent answers (panics with the console
/// tail when it does not).
pub async fn boot(label: &str) -> Guest {
    let image = stagecore_testkit::guest_image::GuestImage::locate();
    let dir = tempfile::Builder::new().prefix("qga-live").tempdir().expect("tempdir");
    let overlay = dir.path().join("disk.qcow2");
    image.overlay(&overlay).expect("create an overlay on the test image");
    let socket = dir.path().join("qga.sock");
    let console = dir.path().join("console.log");
    let qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "pc", "-accel", "tcg", "-smp", "1", "-m", "512"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .arg("-append")
        .arg(&image.cmdline)
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=qcow2,cache=writeback", overlay.display()))
        .arg("-chardev")
        .arg(format!("socket,path={},server=on,wait=off,id=qga0", socket.display()))
        .args(["-device", "virtio-serial", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-system-x86_64 must be installed to run the live guest tests");
    let agent = Agent::new(Arc::new(SocketTransport::new(&socket, label)), label);
    let mut guest = Guest { agent, socket, qemu, console, dir };
    if let Err(e) = guest.agent.wait_ready(READY).await {
        let exited = guest.qemu.try_wait().ok().flatten();
        panic!(
            "the test guest's agent did not answer: {e}; QEMU exited: {exited:?}\nconsole:\n{}",
            guest.console_tail()
        );
    }
    guest
}
