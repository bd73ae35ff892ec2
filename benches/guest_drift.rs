//! The cost of guest inventory + guest drift for the demo's 3 machines, next to doing the same by
//! hand through the agent, in one run. Real guests: the project's test image (Debian 12 +
//! qemu-guest-agent) booted on the QEMU backend under TCG — a production of web/app/db, its
//! baseline with production's inventory, and a running linked stage.
//!
//! - `report`: `DriftEngine::drift(prod, stage)` — the whole report: config, disk and the guest
//!   layer (both sides' inventories of 3 machines each, one collector exec per machine, compared
//!   item by item against the recorded baseline inventory);
//! - `inventory`: the two sides' `inventory::collect` alone (what the guest layer costs in the
//!   guests);
//! - `by_hand`: the same two commands an operator would run — `dpkg-query -W` and `sha256sum`
//!   over the files under the watched paths (`/etc /opt /usr/local`) — on the same 6 machines,
//!   6 at once, through each machine's `stagecore_qga::Agent` (raw `guest-exec`, no inventory
//!   code), then a line-by-line comparison of production's and the stage's outputs.
//!
//! At the end it prints the medians of a few more timed runs of each and the ratios
//! report/by_hand and inventory/by_hand (docs/performance.md, "Guest inventory and drift").
//!
//! `cargo bench -p stagekit --bench guest_drift` (needs QEMU and the test image:
//! `cargo xtask guest-image`; fails loudly without them).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use stagecore_testkit::guest_image::GuestImage;
use stagekit::qemu::{Accel, QemuBackend, QemuConfig, QemuEnvironment};
use stagekit::stagecore::drift::{Drift, DriftEngine};
use stagekit::stagecore::inventory::{self, InventoryConfig};
use stagekit::stagecore::{Backend, DynEnvironment, Environment, GuestExec, StageOptions};
use tokio::runtime::Runtime;

/// The by-hand commands: packages, then a hash of every regular file under the watched paths.
const BY_HAND: &str = "dpkg-query -W; find /etc /opt /usr/local -xdev -type f -print0 2>/dev/null \
                       | xargs -0 sha256sum 2>/dev/null; true";

struct Setup {
    backend: Arc<QemuBackend>,
    prod: DynEnvironment,
    stage: DynEnvironment,
    machines: Vec<String>,
    _dir: tempfile::TempDir,
}

async fn wait_agents(env: &dyn Environment) {
    let guest = env.guest().expect("the QEMU backend has a guest channel");
    for m in env.spec().await.unwrap().machines {
        guest
            .wait_ready(&m.name, Duration::from_secs(180))
            .await
            .unwrap_or_else(|e| panic!("agent of {}: {e}", m.name));
    }
}

async fn setup() -> Setup {
    let image = GuestImage::locate();
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = Arc::new(QemuBackend::new(QemuConfig::new(dir.path()).with_accel(Accel::Tcg)));
    let spec = image.production_spec("gdprod", &dir.path().join("disks")).expect("production spec");
    let machines = spec.machines.iter().map(|m| m.name.clone()).collect();
    let prod = backend.create(&spec).await.expect("create production");
    prod.start().await.expect("start production");
    wait_agents(&*prod).await;
    let (baseline, inv) =
        inventory::take_baseline(&*prod, &InventoryConfig::default(), None).await.expect("baseline with inventory");
    let stage = inventory::stage(&*backend, &baseline, &inv, &StageOptions::linked("gdstage")).await.expect("stage");
    stage.start().await.expect("start stage");
    wait_agents(&*stage).await;
    Setup { backend, prod, stage, machines, _dir: dir }
}

async fn report(s: &Setup) -> usize {
    let r = DriftEngine::new().drift(&*s.prod, &*s.stage).await.expect("drift");
    assert!(r.is_clean(), "a fresh running clone must be clean:\n{r}");
    r.guest.records.len()
}

async fn inventories(s: &Setup) -> usize {
    let cfg = InventoryConfig::default();
    let (p, st) =
        tokio::join!(inventory::collect(&*s.prod, None, &cfg, None), inventory::collect(&*s.stage, None, &cfg, None));
    let (p, st) = (p.expect("production's inventory"), st.expect("the stage's inventory"));
    assert!(p.values().chain(st.values()).all(|m| m.inventory().is_some()), "an inventory failed");
    p.len() + st.len()
}

async fn by_hand_one(env: &QemuEnvironment, machine: &str) -> BTreeSet<String> {
    let agent = env.guest_agent(machine).await.expect("agent");
    let out = agent.exec(&GuestExec::new(["/bin/sh", "-c", BY_HAND])).await.expect("by-hand exec");
    assert!(out.success() && !out.truncated, "{machine}: {}", out.stderr_text());
    out.stdout_text()
        .lines()
        .filter(|l| !l.contains("/etc/hostname") && !l.contains("machine-id"))
        .map(String::from)
        .collect()
}

/// Returns the number of differing lines (0 on a fresh clone, modulo regenerated host keys).
async fn by_hand(s: &Setup, prod: &QemuEnvironment, stage: &QemuEnvironment) -> usize {
    let jobs: Vec<_> =
        [prod, stage].into_iter().flat_map(|env| s.machines.iter().map(move |m| by_hand_one(env, m))).collect();
    let outs = join_all(jobs).await;
    let (p, st) = outs.split_at(s.machines.len());
    p.iter().zip(st).map(|(p, st)| p.symmetric_difference(st).count()).sum()
}

/// `join_all` without a dependency on `futures`: every job spawned on the runtime's current task.
async fn join_all<F: std::future::Future>(jobs: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = jobs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().map(|o| o.expect("every job finished")).collect()
}

fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    let mut t: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    t.sort();
    t[runs / 2]
}

fn bench(c: &mut Criterion) {
    let rt = Runtime::new().expect("tokio runtime");
    let s = rt.block_on(setup());
    let prod = rt.block_on(s.backend.open_qemu("gdprod")).expect("open production");
    let stage = rt.block_on(s.backend.open_qemu("gdstage")).expect("open stage");
    // The first report, for the record.
    let first = rt.block_on(DriftEngine::new().drift(&*s.prod, &*s.stage)).expect("drift");
    println!("{first}");
    let machines = first.machines.len();
    println!("by hand, first run: {} differing lines", rt.block_on(by_hand(&s, &prod, &stage)));

    let mut g = c.benchmark_group("guest_drift");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(30));
    g.bench_function("report", |b| b.iter(|| rt.block_on(report(&s))));
    g.bench_function("inventory", |b| b.iter(|| rt.block_on(inventories(&s))));
    g.bench_function("by_hand", |b| b.iter(|| rt.block_on(by_hand(&s, &prod, &stage))));
    g.finish();

    const RUNS: usize = 5;
    let r = median(RUNS, || {
        let _ = rt.block_on(report(&s));
    });
    let i = median(RUNS, || {
        let _ = rt.block_on(inventories(&s));
    });
    let h = median(RUNS, || {
        let _ = rt.block_on(by_hand(&s, &prod, &stage));
    });
    println!(
        "guest_drift ({machines} machines per side, medians of {RUNS}): report {:.0} ms, inventory {:.0} ms, \
         by hand {:.0} ms; report/by_hand {:.2}, inventory/by_hand {:.2}",
        r.as_secs_f64() * 1e3,
        i.as_secs_f64() * 1e3,
        h.as_secs_f64() * 1e3,
        r.as_secs_f64() / h.as_secs_f64(),
        i.as_secs_f64() / h.as_secs_f64()
    );
    drop((prod, stage));
    rt.block_on(async {
        s.backend.destroy("gdstage").await.expect("destroy stage");
        s.backend.destroy("gdprod").await.expect("destroy production");
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
