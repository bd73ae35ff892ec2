//! Proof of the test guest image: boot it with plain QEMU (TCG) on an overlay, talk to its agent
//! with a minimal inline guest-sync-delimited + guest-exec exchange, and check the demo app, the
//! `svc` supervisor and `guest-shutdown`. Fails loudly when the image or QEMU is missing
//! (`cargo xtask test` builds the image first).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stagecore_testkit::guest_image::{DEMO_APP_INSTALLED, DEMO_APP_PACKAGE, GuestImage};

/// Upper bound for the boot (not a timing assertion: the test fails instead of hanging).
const BOOT_DEADLINE: Duration = Duration::from_secs(180);

/// Kills QEMU when the test ends, however it ends.
struct Qemu {
    child: Child,
    dir: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }
}

fn boot(image: &GuestImage, dir: &Path) -> Qemu {
    let overlay = dir.join("overlay.qcow2");
    image.overlay(&overlay).expect("create the overlay");
    let qga = dir.join("qga.sock");
    let child = Command::new("qemu-system-x86_64")
        .args(["-machine", "pc", "-accel", "tcg", "-smp", "1", "-m", "256"])
        .args(["-display", "none", "-nodefaults", "-no-user-config", "-no-reboot"])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", &image.cmdline])
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=qcow2,cache=writeback", overlay.display()))
        .arg("-chardev")
        .arg(format!("socket,path={},server=on,wait=off,id=qga0", qga.display()))
        .args(["-device", "virtio-serial", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display()))
        .arg("-serial")
        .arg(format!("file:{}", dir.join("console.log").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-system-x86_64 must be installed (cargo xtask setup installs it)");
    Qemu { child, dir: dir.to_path_buf() }
}

/// The smallest agent client that works: newline-delimited JSON, 0xFF-prefixed sync answers.
struct Agent {
    sock: UnixStream,
    buf: Vec<u8>,
}

impl Agent {
    fn connect(path: &Path, qemu: &mut Qemu, deadline: Instant) -> Agent {
        loop {
            if let Ok(sock) = UnixStream::connect(path) {
                sock.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                return Agent { sock, buf: Vec::new() };
            }
            if let Some(status) = qemu.child.try_wait().unwrap() {
                panic!("QEMU exited ({status}) before the agent socket appeared");
            }
            assert!(Instant::now() < deadline, "agent socket {} never appeared", path.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn send(&mut self, msg: &Value, delimited: bool) {
        let mut data = if delimited { vec![0xff] } else { Vec::new() };
        data.extend_from_slice(msg.to_string().as_bytes());
        data.push(b'\n');
        self.sock.write_all(&data).expect("write to the agent socket");
    }

    /// One JSON line, or `None` when nothing arrived within `timeout`.
    fn recv(&mut self, timeout: Duration) -> Option<Value> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_start_matches('\u{fffd}').trim();
                if text.is_empty() {
                    continue;
                }
                return Some(
                    serde_json::from_str(text).unwrap_or_else(|e| panic!("agent sent bad JSON {text:?}: {e}")),
                );
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.sock.read(&mut chunk) {
                Ok(0) => panic!("agent socket closed"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return None;
                }
                Err(e) => panic!("read from the agent socket: {e}"),
            }
        }
    }

    /// guest-sync-delimited with a fresh id every second until the matching answer arrives.
    fn sync(&mut self, deadline: Instant, qemu: &mut Qemu) {
        let mut id: u64 = 4_000_000 + u64::from(std::process::id());
        loop {
            id += 1;
            self.send(&json!({"execute": "guest-sync-delimited", "arguments": {"id": id}}), true);
            let round = Instant::now() + Duration::from_secs(1);
            while let Some(answer) = self.recv(round.saturating_duration_since(Instant::now())) {
                if answer["return"] == json!(id) {
                    return;
                }
            }
            if let Some(status) = qemu.child.try_wait().unwrap() {
                panic!("QEMU exited ({status}) before the agent answered; console:\n{}", qemu.console());
            }
            assert!(Instant::now() < deadline, "agent not ready in {BOOT_DEADLINE:?}; console:\n{}", qemu.console());
        }
    }

    fn call(&mut self, execute: &str, arguments: Value) -> Value {
        self.send(&json!({"execute": execute, "arguments": arguments}), false);
        let answer = self.recv(Duration::from_secs(60)).unwrap_or_else(|| panic!("no answer to {execute}"));
        assert!(answer.get("error").is_none(), "{execute} failed: {answer}");
        answer["return"].clone()
    }

    /// Runs `argv` in the guest; returns (exit code, stdout, stderr).
    fn exec(&mut self, argv: &[&str]) -> (i64, String, String) {
        let args = json!({"path": argv[0], "arg": &argv[1..], "capture-output": true});
        let pid = self.call("guest-exec", args)["pid"].as_i64().expect("guest-exec returns a pid");
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.call("guest-exec-status", json!({"pid": pid}));
            if status["exited"] == json!(true) {
                let text = |k: &str| status[k].as_str().map(|s| String::from_utf8_lossy(&base64(s)).into_owned());
                return (
                    status["exitcode"].as_i64().unwrap_or(-1),
                    text("out-data").unwrap_or_default(),
                    text("err-data").unwrap_or_default(),
                );
            }
            assert!(Instant::now() < end, "{argv:?} still running after 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Standard base64 (the agent's out-data/err-data), decoded.
fn base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("bad base64 byte {c}"),
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|c| *c != b'=' && !c.is_ascii_whitespace()) {
        acc = (acc << 6) | u32::from(value(c));
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[test]
fn base64_decodes() {
    assert_eq!(base64("aGVsbG8gd29ybGQ="), b"hello world");
    assert_eq!(base64("YQ=="), b"a");
    assert_eq!(base64(""), b"");
}

#[test]
fn boots_under_tcg_and_serves_the_demo_app() {
    let image = GuestImage::locate();
    let base_before = std::fs::metadata(&image.base).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let deadline = started + BOOT_DEADLINE;
    let mut qemu = boot(&image, tmp.path());
    let mut agent = Agent::connect(&tmp.path().join("qga.sock"), &mut qemu, deadline);
    agent.sync(deadline, &mut qemu);
    eprintln!("guest image: agent ready {:.2} s after spawning QEMU", started.elapsed().as_secs_f64());

    let (code, out, err) = agent.exec(&["/usr/bin/dpkg-query", "-W", DEMO_APP_PACKAGE]);
    assert_eq!((code, out.as_str()), (0, format!("{DEMO_APP_PACKAGE}\t{DEMO_APP_INSTALLED}\n").as_str()), "{err}");
    let (code, out, err) = agent.exec(&["/usr/local/sbin/svc", "status", "app"]);
    assert_eq!(code, 0, "svc status app: {out}{err}");
    let (code, page, err) = agent.exec(&["/bin/busybox", "wget", "-qO-", "http://127.0.0.1:8080/"]);
    assert_eq!(code, 0, "wget: {err}");
    assert!(page.contains(&format!("stagecore-demo-app {DEMO_APP_INSTALLED}")), "page: {page}");

    // svc's contract: stop → status 3, start → status 0, list names the service.
    assert_eq!(agent.exec(&["/usr/local/sbin/svc", "stop", "app"]).0, 0);
    assert_eq!(agent.exec(&["/usr/local/sbin/svc", "status", "app"]).0, 3);
    assert_eq!(agent.exec(&["/usr/local/sbin/svc", "start", "app"]).0, 0);
    let (code, list, _) = agent.exec(&["/usr/local/sbin/svc", "list"]);
    assert_eq!((code, list.as_str()), (0, "app running\n"));
    let (_, mounts, _) = agent.exec(&["/bin/cat", "/proc/mounts"]);
    let root = mounts.lines().find(|l| l.split(' ').nth(1) == Some("/")).expect("/ in /proc/mounts");
    assert!(root.contains("noatime") && root.contains("rw"), "root mount: {root}");

    // guest-shutdown runs guestinit as /sbin/shutdown: QEMU must exit by itself.
    agent.send(&json!({"execute": "guest-shutdown"}), false);
    let end = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = qemu.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < end, "guest did not power off after guest-shutdown; console:\n{}", qemu.console());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "QEMU exit status after poweroff: {status}");
    let base_after = std::fs::metadata(&image.base).unwrap();
    assert_eq!(
        (base_before.len(), base_before.modified().unwrap()),
        (base_after.len(), base_after.modified().unwrap()),
        "booting an overlay must not touch the base"
    );
    drop(qemu);
    tmp.close().unwrap();
}

#[test]
fn production_spec_has_three_overlays_on_the_base() {
    let image = GuestImage::locate();
    assert!(image.app_debs.contains_key("1.0") && image.app_debs.contains_key("1.1"), "{:?}", image.app_debs);
    let tmp = tempfile::tempdir().unwrap();
    let spec = image.production_spec("prod", &tmp.path().join("disks")).unwrap();
    spec.validate().unwrap();
    let names: Vec<_> = spec.machines.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["web", "app", "db"]);
    assert_eq!(spec.start_waves().unwrap(), [vec!["db".to_string()], vec!["app".to_string()], vec!["web".to_string()]]);
    for m in &spec.machines {
        assert_eq!((m.vcpus, m.memory_mib), (1, 256));
        assert_eq!(m.boot.as_ref(), Some(&image.boot_spec()));
        let disk = Path::new(&m.disks[0].source);
        assert!(disk.is_absolute(), "{}", disk.display());
        let info = Command::new("qemu-img").args(["info", "--output=json", "-U"]).arg(disk).output().unwrap();
        let info: Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["backing-filename"], json!(image.base.display().to_string()), "{info}");
        assert_eq!(info["virtual-size"], json!(512u64 << 20));
    }
    let err = image.overlay(Path::new(&spec.machines[0].disks[0].source)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
}

#[test]
fn open_names_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let err = GuestImage::open(tmp.path()).unwrap_err();
    assert!(err.contains("base.qcow2 is missing"), "{err}");
    let err = GuestImage::open(&tmp.path().join("absent")).unwrap_err();
    assert!(err.contains("cannot open the directory"), "{err}");
    let image = GuestImage::locate();
    let copy = tmp.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for f in ["base.qcow2", "vmlinuz", "initrd.img", "manifest.json", "cmdline"] {
        std::os::unix::fs::symlink(image.dir.join(f), copy.join(f)).unwrap();
    }
    std::fs::create_dir(copy.join("debs")).unwrap();
    let err = GuestImage::open(&copy).unwrap_err();
    assert!(err.contains("stagecore-demo-app_1.0_all.deb"), "{err}");
    std::os::unix::fs::symlink(&image.app_debs["1.0"], copy.join("debs/stagecore-demo-app_1.0_all.deb")).unwrap();
    let opened = GuestImage::open(&copy).unwrap();
    assert_eq!((opened.cmdline, opened.app_debs.len()), (image.cmdline, 1));
}
