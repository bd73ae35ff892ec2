//! Live tests against the project's REAL test guest (Debian 12 + qemu-guest-agent) under QEMU TCG.
//!
//! They need `qemu-system-x86_64`, `qemu-img` and the test image (`cargo xtask guest-image`, or
//! `STAGECORE_GUEST_IMAGE`); without them they fail loudly.

mod common;

use std::time::Duration;

use serde_json::json;
use stagecore::{Error, GuestExec};
use stagecore_qga::{Agent, FreezeStatus, Limits};

/// Deterministic pseudo-random bytes (xorshift), so a failure can be reproduced.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

async fn sh(agent: &Agent, script: &str) -> stagecore::GuestOutput {
    agent.exec(&GuestExec::new(["/bin/sh", "-c", script])).await.unwrap()
}

#[tokio::test]
async fn exec_files_and_osinfo_on_a_real_guest() {
    let guest = common::boot("live/exec").await;
    let agent = &guest.agent;

    let os = agent.osinfo().await.unwrap();
    assert_eq!(os.id.as_deref(), Some("debian"), "{os:?}");
    assert_eq!(os.version_id.as_deref(), Some("12"), "{os:?}");
    assert!(os.pretty_name.as_deref().unwrap_or_default().contains("Debian GNU/Linux 12"), "{os:?}");
    assert!(os.kernel_release.is_some(), "{os:?}");
    let info = agent.info().await.unwrap();
    assert!(info.version.starts_with("7.2"), "{info:?}");
    for c in ["guest-exec", "guest-file-open", "guest-fsfreeze-freeze", "guest-sync-delimited"] {
        assert!(info.commands.iter().any(|x| x == c), "{c} not enabled: {info:?}");
    }

    // stdin, stdout, stderr and a non-zero exit code.
    let req =
        GuestExec::new(["/bin/sh", "-c", "cat; echo to-stderr >&2; exit 3"]).stdin(b"hello \x00 stdin\n".to_vec());
    let out = agent.exec(&req).await.unwrap();
    assert_eq!(out.exit_code, 3);
    assert_eq!(out.stdout, b"hello \x00 stdin\n");
    assert_eq!(out.stderr, b"to-stderr\n");
    assert!(!out.truncated);
    // Environment (with the default PATH added, so programs are found).
    let req = GuestExec::new(["/bin/sh", "-c", "echo \"$GREETING\"; command -v stat"]).env("GREETING", "hi there");
    let out = agent.exec(&req).await.unwrap();
    assert!(out.success(), "{out:?}");
    let text = out.stdout_text();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("hi there"));
    assert!(lines.next().is_some_and(|l| l.ends_with("/stat")), "{text}");
    assert_eq!(agent.exec(&GuestExec::new(["/bin/true"])).await.unwrap().exit_code, 0);
    assert_eq!(agent.exec(&GuestExec::new(["/bin/false"])).await.unwrap().exit_code, 1);
    assert_eq!(sh(agent, "kill -9 $$").await.exit_code, 128 + 9);
    // A program that does not exist is the agent's error, not an exit code.
    let e = agent.exec(&GuestExec::new(["/no/such/program"])).await.unwrap_err();
    assert!(matches!(e, Error::Backend { backend: "qga", .. }) && e.to_string().contains("/no/such/program"), "{e}");

    // The output cap.
    let capped = Agent::new(agent.transport().clone(), "live/exec")
        .with_limits(Limits { max_output: 1000, ..Limits::default() });
    let out = capped.exec(&GuestExec::new(["/bin/sh", "-c", "head -c 5000 /dev/zero"])).await.unwrap();
    assert!(out.truncated);
    assert_eq!(out.stdout, vec![0u8; 1000]);

    // A 300 KiB binary file with mode 0600, read back exactly; the mode is what `stat` says in the guest.
    let data = noise(300 << 10, 0x5eed);
    agent.write_file("/root/blob.bin", &data, Some(0o600)).await.unwrap();
    assert_eq!(sh(agent, "stat -c '%a %s' /root/blob.bin").await.stdout_text().trim(), format!("600 {}", data.len()));
    assert_eq!(sh(agent, "sha256sum < /root/blob.bin").await.exit_code, 0);
    assert!(agent.read_file("/root/blob.bin").await.unwrap() == data, "read back differs");
    // Overwriting truncates and keeps the mode when none is given.
    agent.write_file("/root/blob.bin", b"short", None).await.unwrap();
    assert_eq!(sh(agent, "stat -c '%a %s' /root/blob.bin").await.stdout_text().trim(), "600 5");
    assert_eq!(agent.read_file("/root/blob.bin").await.unwrap(), b"short");
    // An empty file.
    agent.write_file("/tmp/empty", b"", Some(0o644)).await.unwrap();
    assert_eq!(agent.read_file("/tmp/empty").await.unwrap(), b"");
    assert_eq!(sh(agent, "stat -c %a /tmp/empty").await.stdout_text().trim(), "644");

    // Missing files and directories.
    match agent.read_file("/root/does-not-exist").await.unwrap_err() {
        Error::NotFound { name, .. } => assert!(name.contains("/root/does-not-exist"), "{name}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    match agent.write_file("/no/such/dir/file", b"x", None).await.unwrap_err() {
        Error::NotFound { name, .. } => assert!(name.contains("/no/such/dir/file"), "{name}"),
        other => panic!("expected NotFound, got {other:?}"),
    }

    // A command over its timeout: Timeout, and it is killed.
    let req = GuestExec::new(["/bin/sleep", "300"]).timeout(Duration::from_secs(1));
    match agent.exec(&req).await.unwrap_err() {
        Error::Timeout { operation, .. } => assert_eq!(operation, "guest command `/bin/sleep 300` in live/exec"),
        other => panic!("expected Timeout, got {other:?}"),
    }
    let find = "for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = sleep ] && echo $p; done; true";
    let mut left = String::from("never checked");
    for _ in 0..100 {
        left = sh(agent, find).await.stdout_text();
        if left.trim().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(left.trim().is_empty(), "the timed-out sleep still runs: {left}");
}

#[tokio::test]
async fn late_replies_after_timeouts_never_reach_later_calls_on_a_real_guest() {
    let guest = common::boot("live/sync").await;
    let t = guest.agent.transport();
    for _ in 0..5 {
        // The agent answers guest-exec after a few ms: a 1 ms timeout leaves its reply in flight.
        let r = t.call("guest-exec", Some(json!({"path": "/bin/true"})), Duration::from_millis(1)).await;
        if let Err(e) = &r {
            assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
        }
        assert_eq!(t.call("guest-ping", None, Duration::from_secs(30)).await.unwrap(), json!({}));
        let info = t.call("guest-info", None, Duration::from_secs(30)).await.unwrap();
        assert!(info.get("version").is_some(), "{info}");
    }
    // A reply that is surely late: 8 MiB from /dev/urandom, base64-encoded by the agent under TCG. The
    // re-sync must skip that whole ~11 MB line.
    let long = Duration::from_secs(30);
    let handle = t.call("guest-file-open", Some(json!({"path": "/dev/urandom", "mode": "r"})), long).await.unwrap();
    let read = json!({"handle": handle, "count": 8 << 20});
    let e = t.call("guest-file-read", Some(read), Duration::from_millis(1)).await.unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert_eq!(t.call("guest-ping", None, long).await.unwrap(), json!({}));
    let small = t.call("guest-file-read", Some(json!({"handle": handle, "count": 5})), long).await.unwrap();
    assert_eq!(small["count"], 5, "{small}");
    t.call("guest-file-close", Some(json!({"handle": handle})), long).await.unwrap();
    // A reset (as after a guest restart) reconnects and re-syncs.
    t.reset().await;
    guest.agent.ping(Duration::from_secs(30)).await.unwrap();
}

#[tokio::test]
async fn fsfreeze_and_shutdown_on_a_real_guest() {
    let mut guest = common::boot("live/freeze").await;
    let agent = guest.agent.clone();
    let t = Duration::from_secs(60);
    assert_eq!(agent.fsfreeze_status().await.unwrap(), FreezeStatus::Thawed);
    assert_eq!(agent.fsfreeze_thaw(t).await.unwrap(), 0, "thawing a thawed guest");
    let frozen = agent.fsfreeze_freeze(t).await.unwrap();
    assert!(frozen >= 1, "{frozen}");
    assert_eq!(agent.fsfreeze_status().await.unwrap(), FreezeStatus::Frozen);
    // While frozen the agent refuses guest-exec: an error reply, not a hang.
    let e = agent.exec(&GuestExec::new(["/bin/true"])).await.unwrap_err();
    assert!(matches!(e, Error::Backend { backend: "qga", .. }), "{e:?}");
    assert_eq!(agent.fsfreeze_thaw(t).await.unwrap(), frozen);
    assert_eq!(agent.fsfreeze_status().await.unwrap(), FreezeStatus::Thawed);
    assert_eq!(agent.fsfreeze_thaw(t).await.unwrap(), 0);
    assert_eq!(agent.exec(&GuestExec::new(["/bin/true"])).await.unwrap().exit_code, 0);

    agent.shutdown().await.unwrap();
    let status = guest.wait_exit(Duration::from_secs(120));
    assert!(status.is_some(), "QEMU still runs after guest-shutdown\nconsole:\n{}", guest.console_tail());
}
