//! Protocol tests of our client code against a scripted peer on a unix socket.
//!
//! The peer behaves like QEMU's chardev in front of one qemu-guest-agent: one agent processes requests in
//! order, whatever connection they came on, and writes each reply to the connection that is open *when the
//! reply is written*. So a late reply to a request of an old connection reaches the new one, as it does with
//! a real guest. It does not test a guest: the live tests do that.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use stagecore::{Error, GuestExec};
use stagecore_qga::{Agent, AgentFailure, FreezeStatus, Limits, SocketTransport, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;

/// How a scripted `guest-exec` behaves.
#[derive(Clone, Default)]
struct ExecScript {
    /// `guest-exec-status` answers `exited: false` this many times first (`usize::MAX`: never exits).
    running_polls: usize,
    exitcode: Option<i64>,
    signal: Option<i64>,
    out: Vec<u8>,
    err: Vec<u8>,
    out_truncated: bool,
}

struct Handle {
    path: String,
    pos: usize,
}

#[derive(Default)]
struct State {
    files: HashMap<String, Vec<u8>>,
    dirs: Vec<String>,
    handles: HashMap<i64, Handle>,
    next_handle: i64,
    /// Every request the agent processed: (command, arguments).
    log: Vec<(String, Value)>,
    execs: HashMap<i64, (ExecScript, usize)>,
    next_pid: i64,
    script: HashMap<String, ExecScript>,
    /// Seconds to sleep before answering a command.
    delay: HashMap<String, Duration>,
    /// Bytes written to every new connection before anything else (stale replies, junk).
    junk_on_connect: Vec<u8>,
    /// Requests are dropped unanswered (the agent is "not up yet") while this is > 0; each drop counts down.
    drop_requests: usize,
    /// First byte received on each connection.
    first_bytes: Vec<u8>,
    frozen: bool,
}

struct Fake {
    _dir: tempfile::TempDir,
    path: PathBuf,
    state: Arc<StdMutex<State>>,
}

impl Fake {
    fn start() -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let state = Arc::new(StdMutex::new(State {
            dirs: vec!["/".into(), "/root".into(), "/tmp".into()],
            next_handle: 1000,
            next_pid: 500,
            ..State::default()
        }));
        let writer: Arc<tokio::sync::Mutex<Option<OwnedWriteHalf>>> = Arc::default();
        let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(agent_loop(rx, state.clone(), writer.clone()));
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (mut read, mut write) = stream.into_split();
                let junk = st.lock().unwrap().junk_on_connect.clone();
                write.write_all(&junk).await.unwrap();
                *writer.lock().await = Some(write);
                let tx = tx.clone();
                let st = st.clone();
                tokio::spawn(async move {
                    let mut first = true;
                    let mut line = Vec::new();
                    let mut buf = [0u8; 65536];
                    loop {
                        let n = match read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if first {
                            st.lock().unwrap().first_bytes.push(buf[0]);
                            first = false;
                        }
                        for &b in &buf[..n] {
                            match b {
                                0xFF => line.clear(), // the agent resets its parser
                                b'\n' => {
                                    if tx.send(std::mem::take(&mut line)).is_err() {
                                        return;
                                    }
                                }
                                _ => line.push(b),
                            }
                        }
                    }
                });
            }
        });
        Fake { _dir: dir, path, state }
    }

    fn agent(&self) -> Agent {
        Agent::new(Arc::new(SocketTransport::new(&self.path, "test/vm")), "test/vm")
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    fn commands(&self) -> Vec<String> {
        self.state().log.iter().map(|(c, _)| c.clone()).collect()
    }

    fn count(&self, command: &str) -> usize {
        self.commands().iter().filter(|c| *c == command).count()
    }
}

async fn agent_loop(
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    state: Arc<StdMutex<State>>,
    writer: Arc<tokio::sync::Mutex<Option<OwnedWriteHalf>>>,
) {
    while let Some(line) = rx.recv().await {
        let (reply, delay, close) = {
            let mut st = state.lock().unwrap();
            if st.drop_requests > 0 {
                st.drop_requests -= 1;
                continue;
            }
            let (reply, close) = answer(&mut st, &line);
            let command = serde_json::from_slice::<Value>(&line)
                .ok()
                .and_then(|v| v["execute"].as_str().map(str::to_string))
                .unwrap_or_default();
            (reply, st.delay.get(&command).copied(), close)
        };
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let mut w = writer.lock().await;
        if let Some(bytes) = reply
            && let Some(out) = w.as_mut()
        {
            let _ = out.write_all(&bytes).await;
        }
        if close {
            *w = None;
        }
    }
}

fn err(desc: &str) -> Value {
    json!({"error": {"class": "GenericError", "desc": desc}})
}

/// The reply bytes to one request line (None: no reply), and whether to close the connection.
fn answer(st: &mut State, line: &[u8]) -> (Option<Vec<u8>>, bool) {
    let Ok(req) = serde_json::from_slice::<Value>(line) else {
        let mut b = serde_json::to_vec(&err("JSON parse error, invalid literal")).unwrap();
        b.push(b'\n');
        return (Some(b), false);
    };
    let command = req["execute"].as_str().unwrap_or_default().to_string();
    let args = req.get("arguments").cloned().unwrap_or(Value::Null);
    st.log.push((command.clone(), args.clone()));
    let mut delimited = false;
    let reply = match command.as_str() {
        "guest-sync-delimited" => {
            delimited = true;
            json!({"return": args["id"]})
        }
        "guest-ping" => json!({"return": {}}),
        "guest-info" => json!({"return": {"version": "7.2.22", "supported_commands": [
            {"name": "guest-ping", "enabled": true, "success-response": true},
            {"name": "guest-get-devices", "enabled": false, "success-response": true},
            {"name": "guest-exec", "enabled": true, "success-response": true}]}}),
        "guest-get-osinfo" => json!({"return": {"id": "debian", "version-id": "12",
            "pretty-name": "Debian GNU/Linux 12 (bookworm)", "kernel-release": "6.1.0-57-cloud-amd64",
            "machine": "x86_64"}}),
        "guest-shutdown" => return (None, true),
        "guest-fsfreeze-status" => json!({"return": if st.frozen { "frozen" } else { "thawed" }}),
        "guest-fsfreeze-freeze" => {
            if st.frozen {
                err("Command guest-fsfreeze-freeze has been disabled: the agent is in frozen state")
            } else {
                st.frozen = true;
                json!({"return": 1})
            }
        }
        "guest-fsfreeze-thaw" => {
            let n = if st.frozen { 1 } else { 0 };
            st.frozen = false;
            json!({"return": n})
        }
        "guest-file-open" => {
            let path = args["path"].as_str().unwrap().to_string();
            let mode = args["mode"].as_str().unwrap_or("r");
            let parent = match path.rfind('/') {
                Some(0) => "/".to_string(),
                Some(i) => path[..i].to_string(),
                None => "/".to_string(),
            };
            if mode == "r" && !st.files.contains_key(&path) || mode == "w" && !st.dirs.contains(&parent) {
                err(&format!("failed to open file '{path}' (mode: '{mode}'): No such file or directory"))
            } else {
                if mode == "w" {
                    st.files.insert(path.clone(), Vec::new());
                }
                st.next_handle += 1;
                let h = st.next_handle;
                st.handles.insert(h, Handle { path, pos: 0 });
                json!({"return": h})
            }
        }
        "guest-file-read" => {
            let h = args["handle"].as_i64().unwrap();
            let count = args["count"].as_u64().unwrap() as usize;
            let Some(handle) = st.handles.get(&h) else {
                return (Some(line_of(&err(&format!("handle '{h}' has not been found")))), false);
            };
            let data = &st.files[&handle.path];
            let end = (handle.pos + count).min(data.len());
            let piece = data[handle.pos..end].to_vec();
            let eof = end == data.len();
            st.handles.get_mut(&h).unwrap().pos = end;
            json!({"return": {"count": piece.len(), "buf-b64": B64.encode(&piece), "eof": eof}})
        }
        "guest-file-write" => {
            let h = args["handle"].as_i64().unwrap();
            let data = B64.decode(args["buf-b64"].as_str().unwrap()).unwrap();
            let path = st.handles[&h].path.clone();
            st.files.get_mut(&path).unwrap().extend_from_slice(&data);
            json!({"return": {"count": data.len(), "eof": false}})
        }
        "guest-file-flush" => json!({"return": {}}),
        "guest-file-close" => {
            let h = args["handle"].as_i64().unwrap();
            if st.handles.remove(&h).is_some() {
                json!({"return": {}})
            } else {
                err(&format!("handle '{h}' has not been found"))
            }
        }
        "guest-exec" => {
            let path = args["path"].as_str().unwrap().to_string();
            // `sh -c "kill -9 N"` kills a scripted command.
            if let Some(pid) = args["arg"][1].as_str().and_then(|a| a.strip_prefix("kill -9 "))
                && let Some((script, _)) = st.execs.get_mut(&pid.parse::<i64>().unwrap())
            {
                *script = ExecScript { signal: Some(9), ..ExecScript::default() };
            }
            match st.script.get(&path).cloned() {
                None => err(&format!(
                    "Guest agent command failed, error was 'Failed to execute child process “{path}” (No such file or directory)'"
                )),
                Some(script) => {
                    st.next_pid += 1;
                    let pid = st.next_pid;
                    st.execs.insert(pid, (script, 0));
                    json!({"return": {"pid": pid}})
                }
            }
        }
        "guest-exec-status" => {
            let pid = args["pid"].as_i64().unwrap();
            match st.execs.get_mut(&pid) {
                None => err(&format!("Invalid parameter 'pid' {pid}")),
                Some((script, polls)) if *polls < script.running_polls => {
                    *polls += 1;
                    json!({"return": {"exited": false}})
                }
                Some((script, _)) => {
                    let mut r = json!({"exited": true});
                    if let Some(c) = script.exitcode {
                        r["exitcode"] = json!(c);
                    }
                    if let Some(s) = script.signal {
                        r["signal"] = json!(s);
                    }
                    if !script.out.is_empty() {
                        r["out-data"] = json!(B64.encode(&script.out));
                    }
                    if !script.err.is_empty() {
                        r["err-data"] = json!(B64.encode(&script.err));
                    }
                    if script.out_truncated {
                        r["out-truncated"] = json!(true);
                    }
                    st.execs.remove(&pid);
                    json!({"return": r})
                }
            }
        }
        other => {
            json!({"error": {"class": "CommandNotFound", "desc": format!("The command {other} has not been found")}})
        }
    };
    let mut bytes = if delimited { vec![0xFF] } else { Vec::new() };
    bytes.extend(line_of(&reply));
    (Some(bytes), false)
}

fn line_of(v: &Value) -> Vec<u8> {
    let mut b = serde_json::to_vec(v).unwrap();
    b.push(b'\n');
    b
}

fn ok_script(out: &[u8]) -> ExecScript {
    ExecScript { exitcode: Some(0), out: out.to_vec(), ..ExecScript::default() }
}

#[tokio::test]
async fn stale_replies_before_the_sync_answer_are_skipped() {
    let fake = Fake::start();
    // What a new client may find in the socket: the tail of an old reply, whole old replies, an old sync
    // answer with another id, and an error reply, all before the answer to its own sync.
    fake.state().junk_on_connect = [
        &b"-b64\": \"aGVsbG8=\", \"eof\": true}}\n"[..],
        b"{\"return\": {\"pid\": 7}}\n",
        b"\xff{\"return\": 4242}\n",
        b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error\"}}\n",
        b"{\"return\": {}}\n",
    ]
    .concat();
    let agent = fake.agent();
    let info = agent.info().await.unwrap();
    assert_eq!(info.version, "7.2.22");
    assert_eq!(info.commands, ["guest-ping", "guest-exec"]);
    let os = agent.osinfo().await.unwrap();
    assert_eq!(os.id.as_deref(), Some("debian"));
    assert_eq!(os.version_id.as_deref(), Some("12"));
    assert_eq!(os.kernel_release.as_deref(), Some("6.1.0-57-cloud-amd64"));
    // The first byte on the connection is 0xFF (reset the agent's parser), then exactly one sync.
    assert_eq!(fake.state().first_bytes, [0xFF]);
    assert_eq!(fake.commands(), ["guest-sync-delimited", "guest-info", "guest-get-osinfo"]);
}

#[tokio::test]
async fn a_late_reply_to_a_timed_out_call_never_answers_the_next_call() {
    let fake = Fake::start();
    fake.state().delay.insert("guest-info".into(), Duration::from_millis(600));
    let transport = SocketTransport::new(&fake.path, "test/vm");
    // Connect and sync first, so the slow call goes over an established connection.
    transport.call("guest-ping", None, Duration::from_secs(5)).await.unwrap();
    let e = transport.call("guest-info", None, Duration::from_millis(100)).await.unwrap_err();
    match &e {
        Error::Timeout { operation, .. } => {
            assert!(operation.contains("guest-info") && operation.contains("test/vm"), "{operation}")
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    // The agent answers guest-info (on whatever connection is open then) before anything sent later.
    let os = transport.call("guest-get-osinfo", None, Duration::from_secs(5)).await.unwrap();
    assert_eq!(os["id"], "debian", "got {os}");
    let ping = transport.call("guest-ping", None, Duration::from_secs(5)).await.unwrap();
    assert_eq!(ping, json!({}));
    assert_eq!(fake.count("guest-sync-delimited"), 2, "{:?}", fake.commands());
}

#[tokio::test]
async fn a_cancelled_call_leaves_no_reply_behind() {
    let fake = Fake::start();
    fake.state().delay.insert("guest-info".into(), Duration::from_millis(400));
    let agent = fake.agent();
    agent.ping(Duration::from_secs(5)).await.unwrap();
    // The caller gives up (drops the future) while the reply is outstanding.
    assert!(tokio::time::timeout(Duration::from_millis(50), agent.info()).await.is_err());
    let os = agent.osinfo().await.unwrap();
    assert_eq!(os.pretty_name.as_deref(), Some("Debian GNU/Linux 12 (bookworm)"));
}

#[tokio::test]
async fn sync_is_sent_again_until_the_agent_answers() {
    let fake = Fake::start();
    fake.state().drop_requests = 2; // the agent is not up for the first two syncs
    let transport = SocketTransport::new(&fake.path, "test/vm").with_resync_interval(Duration::from_millis(50));
    transport.call("guest-ping", None, Duration::from_secs(5)).await.unwrap();
    assert_eq!(fake.commands(), ["guest-sync-delimited", "guest-ping"]);
}

#[tokio::test]
async fn wait_ready_resets_and_retries_until_the_agent_answers() {
    let fake = Fake::start();
    fake.state().drop_requests = 3;
    let agent = fake.agent();
    agent.wait_ready(Duration::from_secs(20)).await.unwrap();
    assert_eq!(fake.count("guest-ping"), 1);
}

#[tokio::test]
async fn wait_ready_on_a_missing_socket_is_unreachable_with_tries() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::new(Arc::new(SocketTransport::new(dir.path().join("none.sock"), "prod/web")), "prod/web");
    match agent.wait_ready(Duration::from_millis(300)).await.unwrap_err() {
        Error::Unreachable { endpoint, reason } => {
            assert_eq!(endpoint, "guest agent of prod/web");
            assert!(reason.starts_with("no answer to guest-ping within 0 s ("), "{reason}");
            assert!(reason.contains("tries; last: ") && reason.contains("socket does not exist"), "{reason}");
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
}

#[tokio::test]
async fn error_replies_map_to_typed_errors() {
    let fake = Fake::start();
    let agent = fake.agent();
    match agent.read_file("/etc/missing").await.unwrap_err() {
        Error::NotFound { kind, name, .. } => {
            assert_eq!(kind, "guest file");
            assert!(name.contains("/etc/missing") && name.contains("test/vm"), "{name}");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    match agent.write_file("/no/such/dir/f", b"x", None).await.unwrap_err() {
        Error::NotFound { name, .. } => assert!(name.contains("/no/such/dir/f"), "{name}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    let e = agent.exec(&GuestExec::new(["/nonexistent", "a"])).await.unwrap_err();
    let text = e.to_string();
    let Error::Backend { backend: "qga", source, .. } = &e else { panic!("expected a qga backend error, got {e:?}") };
    let failure = source.downcast_ref::<AgentFailure>().expect("an AgentFailure inside");
    assert_eq!(failure.command, "guest-exec");
    assert_eq!(failure.class, "GenericError");
    assert!(failure.desc.contains("/nonexistent"), "{}", failure.desc);
    assert!(text.contains("guest-exec") && text.contains("test/vm"), "{text}");
    // An unknown command keeps its class.
    let e = agent.transport().call("guest-no-such", None, Duration::from_secs(5)).await.unwrap_err();
    let Error::Backend { source, .. } = &e else { panic!("{e:?}") };
    assert_eq!(source.downcast_ref::<AgentFailure>().unwrap().class, "CommandNotFound");
    // The connection stays in sync after error replies: no re-sync was needed.
    assert_eq!(fake.count("guest-sync-delimited"), 1);
}

#[tokio::test]
async fn exec_passes_stdin_env_and_maps_exit_codes_and_signals() {
    let fake = Fake::start();
    fake.state().script.insert(
        "/bin/sh".into(),
        ExecScript {
            running_polls: 3,
            exitcode: Some(3),
            out: b"out".to_vec(),
            err: b"err".to_vec(),
            ..Default::default()
        },
    );
    fake.state().script.insert("/bin/killed".into(), ExecScript { signal: Some(9), ..Default::default() });
    let agent = fake.agent();
    let req = GuestExec::new(["/bin/sh", "-c", "cat; exit 3"]).stdin(b"secret stdin".to_vec()).env("A", "1");
    let out = agent.exec(&req).await.unwrap();
    assert_eq!(
        (out.exit_code, out.stdout.as_slice(), out.stderr.as_slice(), out.truncated),
        (3, &b"out"[..], &b"err"[..], false)
    );
    let args = fake.state().log.iter().find(|(c, _)| c == "guest-exec").unwrap().1.clone();
    assert_eq!(args["path"], "/bin/sh");
    assert_eq!(args["arg"], json!(["-c", "cat; exit 3"]));
    assert_eq!(args["capture-output"], true);
    assert_eq!(B64.decode(args["input-data"].as_str().unwrap()).unwrap(), b"secret stdin");
    assert_eq!(args["env"], json!(["A=1", format!("PATH={}", stagecore_qga::DEFAULT_PATH)]));
    assert_eq!(fake.count("guest-exec-status"), 4);
    let out = agent.exec(&GuestExec::new(["/bin/killed"])).await.unwrap();
    assert_eq!(out.exit_code, 128 + 9);
    // No environment given: none sent (the agent's own environment applies).
    let args = fake.state().log.iter().rev().find(|(c, _)| c == "guest-exec").unwrap().1.clone();
    assert!(args.get("env").is_none() && args.get("input-data").is_none(), "{args}");
    assert!(matches!(agent.exec(&GuestExec::new(Vec::<String>::new())).await, Err(Error::InvalidSpec { .. })));
}

#[tokio::test]
async fn output_over_the_cap_is_cut_and_marked_truncated() {
    let fake = Fake::start();
    let big: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    fake.state().script.insert("/big".into(), ok_script(&big));
    fake.state().script.insert("/exact".into(), ok_script(&big[..1000]));
    fake.state().script.insert(
        "/agentcut".into(),
        ExecScript { exitcode: Some(0), out: b"x".to_vec(), out_truncated: true, ..Default::default() },
    );
    let agent = fake.agent().with_limits(Limits { max_output: 1000, ..Limits::default() });
    let out = agent.exec(&GuestExec::new(["/big"])).await.unwrap();
    assert!(out.truncated);
    assert_eq!(out.stdout, big[..1000]);
    let out = agent.exec(&GuestExec::new(["/exact"])).await.unwrap();
    assert!(!out.truncated);
    assert_eq!(out.stdout, big[..1000]);
    let out = agent.exec(&GuestExec::new(["/agentcut"])).await.unwrap();
    assert!(out.truncated, "the agent's own out-truncated flag is kept");
}

#[tokio::test]
async fn exec_that_never_exits_times_out_and_is_killed() {
    let fake = Fake::start();
    fake.state().script.insert("/bin/sleep".into(), ExecScript { running_polls: usize::MAX, ..Default::default() });
    fake.state().script.insert("/bin/sh".into(), ok_script(b""));
    let agent = fake.agent();
    let req = GuestExec::new(["/bin/sleep", "1000"]).timeout(Duration::from_millis(300));
    match agent.exec(&req).await.unwrap_err() {
        Error::Timeout { operation, seconds } => {
            assert_eq!(operation, "guest command `/bin/sleep 1000` in test/vm");
            assert_eq!(seconds, 0.3);
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    let kill = fake.state().log.iter().rev().find(|(c, _)| c == "guest-exec").unwrap().1.clone();
    assert_eq!(kill["arg"], json!(["-c", "kill -9 501"]));
    assert!(!fake.state().execs.contains_key(&501), "the killed command's status was collected");
}

#[tokio::test]
async fn chunked_files_reassemble_exactly() {
    let fake = Fake::start();
    let chunk = 1024;
    let agent = fake.agent().with_limits(Limits { file_chunk: chunk, ..Limits::default() });
    fake.state().script.insert("chmod".into(), ok_script(b""));
    for size in [0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk + 7] {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
        let path = format!("/root/f{size}");
        let writes_before = fake.count("guest-file-write");
        agent.write_file(&path, &data, None).await.unwrap();
        assert_eq!(fake.state().files[&path], data, "written size {size}");
        assert_eq!(fake.count("guest-file-write") - writes_before, size.div_ceil(chunk), "write calls, size {size}");
        let reads_before = fake.count("guest-file-read");
        let back = agent.read_file(&path).await.unwrap();
        assert_eq!(back, data, "read size {size}");
        let reads = fake.count("guest-file-read") - reads_before;
        assert!(reads == size.div_ceil(chunk).max(1) || reads == size / chunk + 1, "read calls {reads}, size {size}");
    }
    assert!(fake.state().handles.is_empty(), "every handle closed");
    // Overwrite truncates, and a mode runs chmod with the octal mode.
    agent.write_file("/root/f1", b"new", Some(0o600)).await.unwrap();
    assert_eq!(fake.state().files["/root/f1"], b"new");
    let chmod = fake.state().log.iter().rev().find(|(c, _)| c == "guest-exec").unwrap().1.clone();
    assert_eq!(chmod["path"], "chmod");
    assert_eq!(chmod["arg"], json!(["--", "600", "/root/f1"]));
    assert!(matches!(agent.write_file("/root/x", b"", Some(0o17777)).await, Err(Error::InvalidSpec { .. })));
}

#[tokio::test]
async fn a_failing_chmod_is_a_guest_command_error_and_a_big_file_is_refused() {
    let fake = Fake::start();
    fake.state().script.insert(
        "chmod".into(),
        ExecScript { exitcode: Some(1), err: b"chmod: Operation not permitted".to_vec(), ..Default::default() },
    );
    let agent = fake.agent().with_limits(Limits { max_file: 100, ..Limits::default() });
    match agent.write_file("/root/f", b"secret content", Some(0o644)).await.unwrap_err() {
        Error::GuestCommand { machine, command, exit_code, stderr } => {
            assert_eq!((machine.as_str(), command.as_str(), exit_code), ("test/vm", "chmod -- 644 /root/f", 1));
            assert!(stderr.contains("not permitted"));
        }
        other => panic!("expected GuestCommand, got {other:?}"),
    }
    let e = agent.write_file("/root/g", &[7u8; 101], None).await.unwrap_err();
    assert!(matches!(e, Error::InvalidSpec { .. }), "{e:?}");
    fake.state().files.insert("/root/big".into(), vec![1u8; 500]);
    let e = agent.read_file("/root/big").await.unwrap_err();
    assert!(e.to_string().contains("larger than the limit"), "{e}");
    assert!(fake.state().handles.is_empty(), "the handle is closed after an error too");
}

#[tokio::test]
async fn fsfreeze_and_shutdown() {
    let fake = Fake::start();
    let agent = fake.agent();
    let t = Duration::from_secs(5);
    assert_eq!(agent.fsfreeze_status().await.unwrap(), FreezeStatus::Thawed);
    assert_eq!(agent.fsfreeze_thaw(t).await.unwrap(), 0, "thawing a thawed guest is fine");
    assert_eq!(agent.fsfreeze_freeze(t).await.unwrap(), 1);
    assert_eq!(agent.fsfreeze_status().await.unwrap(), FreezeStatus::Frozen);
    assert_eq!(agent.fsfreeze_thaw(t).await.unwrap(), 1);
    assert_eq!(agent.fsfreeze_status().await.unwrap(), FreezeStatus::Thawed);
    // Freezing a frozen guest is the agent's error, and the other freeze stays in place.
    agent.fsfreeze_freeze(t).await.unwrap();
    let e = agent.fsfreeze_freeze(t).await.unwrap_err();
    assert!(matches!(e, Error::Backend { backend: "qga", .. }), "{e:?}");
    assert_eq!(agent.fsfreeze_status().await.unwrap(), FreezeStatus::Frozen);
    agent.fsfreeze_thaw(t).await.unwrap();
    // A freeze whose answer does not come in time may have frozen the guest: it is thawed again.
    fake.state().delay.insert("guest-fsfreeze-freeze".into(), Duration::from_millis(300));
    let e = agent.fsfreeze_freeze(Duration::from_millis(50)).await.unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert_eq!(agent.fsfreeze_status().await.unwrap(), FreezeStatus::Thawed);
    assert_eq!(fake.commands().iter().rev().nth(1).map(String::as_str), Some("guest-fsfreeze-thaw"));
    // The agent closes the connection (the guest powers off) without a reply: success.
    agent.shutdown().await.unwrap();
    assert_eq!(fake.commands().last().map(String::as_str), Some("guest-shutdown"));
}

#[tokio::test]
async fn errors_never_show_file_contents_or_stdin() {
    let fake = Fake::start();
    let agent = fake.agent();
    let e = agent.write_file("/no/dir/f", b"TOPSECRET-CONTENT", None).await.unwrap_err();
    let e2 = agent.exec(&GuestExec::new(["/nonexistent"]).stdin(b"TOPSECRET-STDIN".to_vec())).await.unwrap_err();
    for text in [format!("{e} {e:?}"), format!("{e2} {e2:?}")] {
        assert!(!text.contains("TOPSECRET") && !text.contains(&B64.encode("TOPSECRET")), "{text}");
    }
}
