//! The guest agent client against a hand-written minimal client, side by side on ONE booted test guest
//! (real Debian 12 + qemu-guest-agent under QEMU TCG, agent on a unix socket):
//!
//! - `guest_exec_true`: a `guest-exec /bin/true` round trip (exec, then poll `guest-exec-status` until it
//!   exited) through `Agent::exec`, vs raw JSON lines over the same socket polling with the same backoff
//!   (5 ms doubling up to 100 ms), vs raw JSON polling with no pause at all (the lower bound);
//! - `guest_ping`: `Agent::ping` vs one raw `guest-ping` line and its reply.
//!
//! QEMU serves one client at a time, so the two clients take turns on the socket (the agent's connection
//! is reset before the raw client connects, and the raw client disconnects before the agent runs again).
//!
//! `cargo bench -p stagekit --bench guest` (needs QEMU and the test image: `cargo xtask guest-image`).

#[path = "../backends/qga/tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use serde_json::{Value, json};
use stagecore::GuestExec;

/// The minimal client: blocking socket, one JSON line out, lines in until a reply.
struct Raw {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).expect("connect to the agent socket");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut raw = Raw { writer: s.try_clone().unwrap(), reader: BufReader::new(s) };
        let id = u64::from(std::process::id()) * 1000 + 17;
        let mut sync = vec![0xFF];
        sync.extend(format!("{{\"execute\":\"guest-sync-delimited\",\"arguments\":{{\"id\":{id}}}}}\n").bytes());
        raw.writer.write_all(&sync).unwrap();
        loop {
            let line = raw.line();
            let tail = match line.iter().rposition(|&b| b == 0xFF) {
                Some(i) => &line[i + 1..],
                None => &line[..],
            };
            if serde_json::from_slice::<Value>(tail).is_ok_and(|v| v["return"] == json!(id)) {
                return raw;
            }
        }
    }

    fn line(&mut self) -> Vec<u8> {
        let mut line = Vec::new();
        self.reader.read_until(b'\n', &mut line).expect("read a reply");
        assert!(line.ends_with(b"\n"), "the agent closed the socket");
        line
    }

    fn call(&mut self, request: &str) -> Value {
        self.writer.write_all(request.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
        loop {
            let line = self.line();
            if line.contains(&0xFF) {
                continue; // a sync answer
            }
            let v: Value = serde_json::from_slice(&line).expect("JSON reply");
            return v.get("return").cloned().unwrap_or_else(|| panic!("agent error: {v}"));
        }
    }

    /// `guest-exec /bin/true` and poll its status; `backoff` as (first pause, longest pause), or none.
    fn exec_true(&mut self, backoff: Option<(Duration, Duration)>) {
        let pid =
            self.call(r#"{"execute":"guest-exec","arguments":{"path":"/bin/true","capture-output":true}}"#)["pid"]
                .as_i64()
                .expect("pid");
        let status = format!(r#"{{"execute":"guest-exec-status","arguments":{{"pid":{pid}}}}}"#);
        let mut pause = backoff.map(|b| b.0);
        loop {
            let st = self.call(&status);
            if st["exited"] == json!(true) {
                assert_eq!(st["exitcode"], json!(0));
                return;
            }
            if let (Some(p), Some((_, max))) = (pause, backoff) {
                std::thread::sleep(p);
                pause = Some((p * 2).min(max));
            }
        }
    }
}

/// Load on the machine moves the absolute numbers a lot, so also measure in pairs: each round runs one
/// `Agent::exec` and then one raw round trip (same backoff) right after it (both on a fresh, synced connection), and medians of both and of the
/// per-round ratio are printed.
fn paired(rt: &tokio::runtime::Runtime, guest: &common::Guest, backoff: Option<(Duration, Duration)>) {
    const ROUNDS: usize = 40;
    let exec = GuestExec::new(["/bin/true"]);
    let (mut agent_ms, mut raw_ms, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        // Reconnect and sync untimed, as the raw client does in `Raw::connect`.
        rt.block_on(guest.agent.ping(Duration::from_secs(30))).unwrap();
        let t = Instant::now();
        rt.block_on(guest.agent.exec(&exec)).unwrap();
        let a = t.elapsed().as_secs_f64() * 1e3;
        rt.block_on(guest.agent.transport().reset());
        let mut raw = Raw::connect(&guest.socket);
        let t = Instant::now();
        raw.exec_true(backoff);
        let r = t.elapsed().as_secs_f64() * 1e3;
        drop(raw);
        agent_ms.push(a);
        raw_ms.push(r);
        ratio.push(a / r);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    eprintln!(
        "paired guest-exec /bin/true, {ROUNDS} rounds: Agent::exec median {:.1} ms, raw JSON median {:.1} ms, \
         median ratio agent/raw {:.2}",
        median(&mut agent_ms),
        median(&mut raw_ms),
        median(&mut ratio)
    );
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let guest = rt.block_on(common::boot("bench/guest"));
    let agent = guest.agent.clone();
    let limits = agent.limits().clone();
    let backoff = Some((limits.poll_min, limits.poll_max));
    let exec = GuestExec::new(["/bin/true"]);
    // Warm the guest's page cache for /bin/true and the agent's connection.
    rt.block_on(agent.exec(&exec)).unwrap();

    paired(&rt, &guest, backoff);

    let mut g = c.benchmark_group("guest_exec_true");
    g.sampling_mode(SamplingMode::Flat).sample_size(20).warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(6));
    g.bench_function("agent_exec", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                let out = rt.block_on(agent.exec(&exec)).unwrap();
                assert_eq!(out.exit_code, 0);
            }
            t.elapsed()
        })
    });
    rt.block_on(agent.transport().reset());
    let mut raw = Raw::connect(&guest.socket);
    g.bench_function("raw_json_same_backoff", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                raw.exec_true(backoff);
            }
            t.elapsed()
        })
    });
    g.bench_function("raw_json_busy_poll", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                raw.exec_true(None);
            }
            t.elapsed()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("guest_ping");
    g.sample_size(50).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    g.bench_function("raw_json", |b| {
        b.iter(|| {
            assert_eq!(raw.call(r#"{"execute":"guest-ping"}"#), json!({}));
        })
    });
    drop(raw);
    g.bench_function("agent_ping", |b| {
        b.iter(|| rt.block_on(agent.ping(Duration::from_secs(30))).unwrap());
    });
    g.finish();
    drop(guest);
}

criterion_group!(benches, bench);
criterion_main!(benches);
