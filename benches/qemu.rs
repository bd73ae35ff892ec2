//! The QEMU backend against the tools a user would otherwise run, side by side in one run:
//!
//! - `stage_linked`: a linked stage of a 3-machine environment (overlays, identities, state) vs
//!   three `qemu-img create -f qcow2 -F qcow2 -b <baseline layer>`;
//! - `stage_full`: a full stage (allocated data only) vs `cp --sparse=always` and
//!   `qemu-img convert -O qcow2` of the three baseline layers;
//! - `drift`: a whole drift report of one machine with a 1 GiB / 8 GiB disk (256 MiB of production
//!   data), 1 % changed on a linked or a full stage, vs `qemu-img compare` of the two images;
//! - `snapshot_running`: a crash-consistent snapshot of a running 3-machine environment (pause all,
//!   one QMP `transaction` per machine, resume);
//! - `snapshot_real_guests`: the same with 3 running real guests (the project's test image), once
//!   with `guest-fsfreeze-freeze` before the pause and thaw after it (application-consistent), once
//!   without (`QemuConfig::quiesce = false`): the pause window, and the whole freeze→thaw window.
//!
//! `cargo bench -p stagekit --bench qemu` (needs QEMU, and the test guest image for the real-guest
//! group: `cargo xtask guest-image`, or `STAGECORE_GUEST_IMAGE=<dir>`; machines run under TCG).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, criterion_group, criterion_main};
use stagekit::qemu::{Accel, QemuBackend, QemuConfig};
use stagekit::stagecore::{
    Backend, BackendExt, Baseline, BootSpec, CloneKind, ConsistencyLevel, DiskFormat, DiskSpec, DynEnvironment,
    EnvironmentSpec, MachineSpec, StageOptions, memory::sample_spec,
};
use tokio::runtime::Runtime;

mod support;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn backend(root: &Path) -> Arc<QemuBackend> {
    Arc::new(QemuBackend::new(QemuConfig::new(root).with_accel(Accel::Tcg)))
}

/// A stopped 3-machine production with `data_mib` MiB written on every disk, and its baseline.
async fn production(b: &QemuBackend, name: &str, data_mib: u64) -> (DynEnvironment, Baseline) {
    let mut spec = sample_spec(name);
    for m in &mut spec.machines {
        m.disks[0].size_bytes = Some((data_mib << 20).max(64 << 20));
    }
    let prod = b.create(&spec).await.unwrap();
    let io = prod.disk_io().unwrap();
    let chunk = vec![0x3c; 1 << 20];
    for m in ["web", "app", "db"] {
        for i in 0..data_mib {
            io.write(m, "disk0", i << 20, &chunk).await.unwrap();
        }
    }
    let baseline = prod.take_baseline().await.unwrap();
    (prod, baseline)
}

fn layers(baseline: &Baseline) -> Vec<PathBuf> {
    baseline.layers.iter().map(|l| PathBuf::from(&l.layer)).collect()
}

/// Time of `iters` stages made with `options` (each destroyed again, untimed).
fn time_stages(
    rt: &Runtime,
    b: &QemuBackend,
    baseline: &Baseline,
    iters: u64,
    options: fn(String) -> StageOptions,
) -> Duration {
    rt.block_on(async {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let name = unique("st");
            let t = Instant::now();
            b.stage(baseline, &options(name.clone())).await.unwrap();
            total += t.elapsed();
            b.destroy(&name).await.unwrap();
        }
        total
    })
}

/// Time of `iters` rounds of running `tool(layer, output)` once per baseline layer (plus `sync` of
/// the outputs when `durable`); the outputs are removed again, untimed.
fn time_tool(
    iters: u64,
    baseline: &Baseline,
    scratch: &Path,
    durable: bool,
    tool: impl Fn(&Path, &Path) -> Command,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let t = Instant::now();
        let outs: Vec<PathBuf> = layers(baseline)
            .iter()
            .map(|layer| {
                let out = scratch.join(unique("o"));
                run(&mut tool(layer, &out));
                out
            })
            .collect();
        if durable {
            run(Command::new("sync").args(outs.iter().map(|o| o.as_os_str())));
        }
        total += t.elapsed();
        outs.iter().for_each(|o| std::fs::remove_file(o).unwrap());
    }
    total
}

/// Allocated MiB per disk of the full-stage group.
const FULL_MIB: u64 = 512;

fn stage_benches(c: &mut Criterion, rt: &Runtime, root: &Path) {
    let b = backend(root);
    let (_prod, baseline) = rt.block_on(production(&b, "prod", FULL_MIB));
    let scratch = root.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();

    let mut group = c.benchmark_group("qemu/stage_linked");
    group.sample_size(20);
    group.bench_function("stagecore", |bench| {
        bench.iter_custom(|iters| time_stages(rt, &b, &baseline, iters, StageOptions::linked))
    });
    group.bench_function("qemu-img create -b (x3)", |bench| {
        bench.iter_custom(|iters| {
            time_tool(iters, &baseline, &scratch, false, |layer, out| {
                let mut cmd = Command::new("qemu-img");
                cmd.args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]).arg(layer).arg(out);
                cmd
            })
        })
    });
    group.finish();

    let mut group = c.benchmark_group(format!("qemu/stage_full_3x{FULL_MIB}MiB"));
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    group.bench_function("stagecore", |bench| {
        bench.iter_custom(|iters| time_stages(rt, &b, &baseline, iters, StageOptions::full))
    });
    // The copies alone, in parallel, through the API the stage code can call (durable too).
    group.bench_function("copy_allocated_many (x3, 3 at a time)", |bench| {
        bench.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let jobs: Vec<stagecore_qcow2::CopyJob> = layers(&baseline)
                    .into_iter()
                    .map(|l| stagecore_qcow2::CopyJob { src_top: l, stop_at: None, dest: scratch.join(unique("c")) })
                    .collect();
                let t = Instant::now();
                for r in stagecore_qcow2::copy_allocated_many(&jobs, 3) {
                    r.unwrap();
                }
                total += t.elapsed();
                jobs.iter().for_each(|j| std::fs::remove_file(&j.dest).unwrap());
            }
            total
        })
    });
    // stagecore's copies are durable; the tools' copies are synced too (`durable = true`).
    group.bench_function("cp --sparse=always (x3)", |bench| {
        bench.iter_custom(|iters| {
            time_tool(iters, &baseline, &scratch, true, |layer, out| {
                let mut cmd = Command::new("cp");
                cmd.arg("--sparse=always").arg(layer).arg(out);
                cmd
            })
        })
    });
    group.bench_function("qemu-img convert (x3)", |bench| {
        bench.iter_custom(|iters| {
            time_tool(iters, &baseline, &scratch, true, |layer, out| {
                let mut cmd = Command::new("qemu-img");
                cmd.args(["convert", "-O", "qcow2"]).arg(layer).arg(out);
                cmd
            })
        })
    });
    group.finish();
}

fn one_disk_spec(name: &str, size: u64) -> EnvironmentSpec {
    let mut spec = sample_spec(name);
    spec.machines.truncate(1);
    spec.machines[0] = MachineSpec {
        disks: vec![DiskSpec {
            name: "disk0".into(),
            source: format!("{name}/disk0.qcow2"),
            format: DiskFormat::Qcow2,
            size_bytes: Some(size),
            read_only: false,
        }],
        ..spec.machines[0].clone()
    };
    spec
}

fn drift_benches(c: &mut Criterion, rt: &Runtime, root: &Path) {
    for kind in [CloneKind::Linked, CloneKind::Full] {
        drift_group(c, rt, &root.join(format!("{kind:?}")), kind);
    }
}

fn drift_group(c: &mut Criterion, rt: &Runtime, root: &Path, kind: CloneKind) {
    let b = backend(root);
    let mut group = c.benchmark_group(format!("qemu/drift_1pct_{kind:?}_stage").to_lowercase());
    group.sample_size(20);
    for (label, size) in [("1GiB", 1u64 << 30), ("8GiB", 8 << 30)] {
        let (prod, stage, layer) = rt.block_on(async {
            let prod = b.create(&one_disk_spec(&format!("d{label}"), size)).await.unwrap();
            // Production holds data, as production does: 256 MiB allocated under the baseline.
            let pio = prod.disk_io().unwrap();
            let chunk = vec![0x11; 4 << 20];
            for i in 0..64u64 {
                pio.write("web", "disk0", i * (size / 64), &chunk).await.unwrap();
            }
            let baseline = prod.take_baseline().await.unwrap();
            let opts = StageOptions { clone: kind, ..StageOptions::linked(format!("s{label}")) };
            let stage = b.stage(&baseline, &opts).await.unwrap();
            let io = stage.disk_io().unwrap();
            let block = vec![0x7e; 64 << 10];
            for i in 0..(size / 100 / (64 << 10)) {
                io.write("web", "disk0", i * 100 * (64 << 10), &block).await.unwrap();
            }
            (prod, stage, PathBuf::from(&baseline.layers[0].layer))
        });
        group.bench_function(BenchmarkId::new("stagecore", label), |bench| {
            bench.to_async(rt).iter(|| async { b.drift(&*prod, &*stage).await.unwrap() })
        });
        let tops = rt.block_on(async {
            let p = b.open_qemu(prod.name()).await.unwrap().disk_top("web", "disk0").await.unwrap();
            let s = b.open_qemu(stage.name()).await.unwrap().disk_top("web", "disk0").await.unwrap();
            (p, s)
        });
        // The floor of a drift report: the allocation maps of both sides above the baseline layer
        // (a full stage's chain does not contain that layer; its floor is its own copy).
        if kind == CloneKind::Linked {
            group.bench_function(BenchmarkId::new("allocation read x2", label), |bench| {
                bench.iter(|| {
                    let p = stagecore_qcow2::changed_since(&tops.0, &layer).unwrap();
                    let s = stagecore_qcow2::changed_since(&tops.1, &layer).unwrap();
                    (p, s)
                })
            });
        }
        group.bench_function(BenchmarkId::new("qemu-img map x2", label), |bench| {
            bench.iter(|| {
                for top in [&tops.0, &tops.1] {
                    run(Command::new("qemu-img").args(["map", "--output=json"]).arg(top));
                }
            })
        });
        group.bench_function(BenchmarkId::new("qemu-img compare", label), |bench| {
            bench.iter(|| {
                let out = Command::new("qemu-img").args(["compare", "-q"]).arg(&tops.0).arg(&tops.1).output().unwrap();
                assert_eq!(out.status.code(), Some(1), "the images differ");
            })
        });
    }
    group.finish();
}

fn snapshot_benches(c: &mut Criterion, rt: &Runtime, root: &Path) {
    let b = backend(root);
    let mut group = c.benchmark_group("qemu/snapshot_running");
    group.sample_size(20);
    for (n, spec) in [(3, sample_spec("running")), (20, support::grid_spec("running20", 20, 1, 64 << 20))] {
        let prod = rt.block_on(async {
            let prod = b.create(&spec).await.unwrap();
            prod.start().await.unwrap();
            prod
        });
        // The freeze window: how long the machines stay paused, as the backend reports it
        // (`freeze_ms`).
        group.bench_function(BenchmarkId::new("freeze_window", format!("{n}_machines")), |bench| {
            bench.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let name = unique("snap");
                        FREEZES.lock().unwrap().clear();
                        prod.create_snapshot(&name).await.unwrap();
                        let ms: f64 = FREEZES.lock().unwrap().iter().sum();
                        total += Duration::from_secs_f64(ms / 1e3);
                        prod.delete_snapshot(&name).await.unwrap();
                    }
                    total
                })
            })
        });
        group.bench_function(BenchmarkId::new("create_snapshot", format!("{n}_machines")), |bench| {
            bench.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let name = unique("snap");
                        let t = Instant::now();
                        prod.create_snapshot(&name).await.unwrap();
                        total += t.elapsed();
                        prod.delete_snapshot(&name).await.unwrap();
                    }
                    total
                })
            })
        });
        rt.block_on(prod.stop()).unwrap();
    }
    group.finish();
}

/// Machines and disks per machine of the scale groups (1 GiB disks).
const GRID: (usize, usize) = (100, 4);

/// The tops of every disk of `env`, in spec order.
async fn all_tops(b: &QemuBackend, env: &DynEnvironment) -> Vec<PathBuf> {
    let q = b.open_qemu(env.name()).await.unwrap();
    let mut out = Vec::new();
    for m in env.spec().await.unwrap().machines {
        for d in &m.disks {
            out.push(q.disk_top(&m.name, &d.name).await.unwrap());
        }
    }
    out
}

/// 100 machines × 4 disks of 1 GiB, stopped: a linked stage against 400 `qemu-img create -b` +
/// sync, and a drift report with 1 % of every stage disk changed against `qemu-img map` of both
/// sides of every disk.
fn scale_benches(c: &mut Criterion, rt: &Runtime, root: &Path, with_drift: bool) {
    let b = backend(root);
    let (machines, disks) = GRID;
    let total = machines * disks;
    let (prod, baseline) = rt.block_on(async {
        let prod = b.create(&support::grid_spec("big", machines, disks, 1 << 30)).await.unwrap();
        let baseline = prod.take_baseline().await.unwrap();
        (prod, baseline)
    });
    let scratch = root.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();

    let mut group = c.benchmark_group(format!("qemu/stage_linked_{machines}x{disks}"));
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    group.bench_function("stagecore", |bench| {
        bench.iter_custom(|iters| time_stages(rt, &b, &baseline, iters, StageOptions::linked))
    });
    group.bench_function(format!("qemu-img create -b (x{total}) + sync"), |bench| {
        bench.iter_custom(|iters| {
            time_tool(iters, &baseline, &scratch, true, |layer, out| {
                let mut cmd = Command::new("qemu-img");
                cmd.args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]).arg(layer).arg(out);
                cmd
            })
        })
    });
    group.finish();

    if !with_drift {
        return;
    }
    // 1 % of each 1 GiB stage disk: 16 runs of 640 KiB spread over the disk.
    let stage = rt.block_on(async {
        let stage = b.stage(&baseline, &StageOptions::linked("bigstage")).await.unwrap();
        let q = b.open_qemu(stage.name()).await.unwrap();
        let chunk = vec![0x5a; 640 << 10];
        let mut jobs = Vec::new();
        for m in &baseline.spec.machines {
            for d in &m.disks {
                jobs.push(q.disk_top(&m.name, &d.name).await.unwrap());
            }
        }
        tokio::task::spawn_blocking(move || {
            for top in jobs {
                for k in 0..16u64 {
                    stagecore_qcow2::write_at(&top, k * (64 << 20), &chunk).unwrap();
                }
            }
        })
        .await
        .unwrap();
        stage
    });
    let report = rt.block_on(b.drift(&*prod, &*stage)).unwrap();
    assert_eq!(report.disk.records.iter().filter(|r| r.drifted_bytes > 0).count(), total, "every disk drifted");
    let tops: Vec<PathBuf> = rt.block_on(async {
        let mut t = all_tops(&b, &prod).await;
        t.extend(all_tops(&b, &stage).await);
        t
    });
    // The baseline layer of each disk, in the order of `tops` (spec order, production then stage).
    let floors: Vec<PathBuf> = baseline
        .spec
        .machines
        .iter()
        .flat_map(|m| m.disks.iter().map(|d| PathBuf::from(&baseline.layer(&m.name, &d.name).unwrap().layer)))
        .collect();
    let mut group = c.benchmark_group(format!("qemu/drift_{machines}x{disks}_1pct"));
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    group.bench_function("stagecore", |bench| {
        bench.to_async(rt).iter(|| async { b.drift(&*prod, &*stage).await.unwrap() })
    });
    // The floor: the allocation maps of both sides of every disk above its baseline layer.
    group.bench_function(format!("allocation read (x{})", tops.len()), |bench| {
        bench.iter(|| {
            for (i, top) in tops.iter().enumerate() {
                stagecore_qcow2::changed_since(top, &floors[i % total]).unwrap();
            }
        })
    });
    group.bench_function(format!("qemu-img map --output=json (x{})", tops.len()), |bench| {
        bench.iter(|| {
            for top in &tops {
                run(Command::new("qemu-img").args(["map", "--output=json"]).arg(top));
            }
        })
    });
    group.finish();
    rt.block_on(b.destroy(stage.name())).unwrap();
}

/// What bounds a durable linked stage on this disk: making `n` new overlays durable, by the
/// stage's own way (`DurableBatch`, concurrent `fdatasync` + one directory `fsync`), by one
/// `syncfs`, and one file's `fdatasync` + directory `fsync` (what each disk cost before the batch).
fn durability_benches(c: &mut Criterion, root: &Path, layer: &Path) {
    use stagekit::stagecore::toolbox::{Durability, DurableBatch};
    let n = GRID.0 * GRID.1;
    std::fs::create_dir_all(root).unwrap();
    let mut group = c.benchmark_group(format!("qemu/durability_{n}"));
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    let overlays = |count: usize, mode: Durability, iters: u64| {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let dir = root.join(unique("batch"));
            std::fs::create_dir(&dir).unwrap();
            let t = Instant::now();
            let mut batch = DurableBatch::with_mode(mode);
            for i in 0..count {
                let top = dir.join(format!("{i}.qcow2"));
                stagecore_qcow2::create_overlay_unsynced(&top, layer, stagecore_qcow2::ImageFormat::Qcow2, None)
                    .unwrap();
                batch.file(top);
            }
            batch.sync().unwrap();
            total += t.elapsed();
            std::fs::remove_dir_all(&dir).unwrap();
        }
        total
    };
    group.bench_function(format!("{n} overlays + DurableBatch (fdatasync each, concurrent)"), |bench| {
        bench.iter_custom(|iters| overlays(n, Durability::Files, iters))
    });
    group.bench_function(format!("{n} overlays + DurableBatch (one syncfs)"), |bench| {
        bench.iter_custom(|iters| overlays(n, Durability::Filesystem, iters))
    });
    group.bench_function("1 overlay + fdatasync + directory fsync", |bench| {
        bench.iter_custom(|iters| overlays(1, Durability::Files, iters))
    });
    group.finish();
}

/// The test guest image directory; panics with instructions when it is missing.
fn guest_image() -> PathBuf {
    let dir = std::env::var_os("STAGECORE_GUEST_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/stagecore/guest-image/current"));
    assert!(
        dir.join("base.qcow2").is_file(),
        "the real-guest benches need the test guest image at {}: run `cargo xtask guest-image` or set \
         STAGECORE_GUEST_IMAGE",
        dir.display()
    );
    dir
}

/// `sample_spec` with every machine a real guest on its own overlay of the test image, web after
/// app after db.
fn real_guest_spec(name: &str, dir: &Path) -> EnvironmentSpec {
    let image = guest_image();
    std::fs::create_dir_all(dir).unwrap();
    let cmdline = std::fs::read_to_string(image.join("cmdline")).unwrap().trim().to_string();
    let mut spec = sample_spec(name);
    for m in &mut spec.machines {
        let overlay = dir.join(format!("{name}-{}.qcow2", m.name));
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(image.join("base.qcow2"))
            .arg(&overlay));
        m.memory_mib = 384;
        m.disks[0].source = overlay.display().to_string();
        m.disks[0].size_bytes = None;
        m.boot = Some(BootSpec {
            kernel: image.join("vmlinuz").display().to_string(),
            initrd: Some(image.join("initrd.img").display().to_string()),
            cmdline: cmdline.clone(),
        });
    }
    spec.machines[0].after = vec!["app".into()];
    spec.machines[1].after = vec!["db".into()];
    spec
}

fn real_guest_benches(c: &mut Criterion, rt: &Runtime, root: &Path) {
    let mut group = c.benchmark_group("qemu/snapshot_3_real_guests");
    group.sample_size(10);
    for (label, quiesce) in [("fsfreeze", true), ("no_fsfreeze", false)] {
        let dir = root.join(label);
        let b = Arc::new(QemuBackend::new(QemuConfig { quiesce, ..QemuConfig::new(&dir).with_accel(Accel::Tcg) }));
        let prod = rt.block_on(async {
            let prod = b.create(&real_guest_spec("guests", &dir.join("images"))).await.unwrap();
            prod.start().await.unwrap();
            let guest = prod.guest().unwrap();
            for m in ["web", "app", "db"] {
                guest.wait_ready(m, Duration::from_secs(180)).await.unwrap();
            }
            prod
        });
        for (what, values) in [("pause_window", &FREEZES), ("freeze_to_thaw", &QUIESCES)] {
            group.bench_function(BenchmarkId::new(what, label), |bench| {
                bench.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let name = unique("snap");
                            values.lock().unwrap().clear();
                            let info = prod.create_snapshot(&name).await.unwrap();
                            let want = if quiesce { ConsistencyLevel::Application } else { ConsistencyLevel::Crash };
                            assert!(info.machines.values().all(|m| m.level == want), "{:?}", info.machines);
                            let ms: f64 = values.lock().unwrap().iter().sum();
                            total += Duration::from_secs_f64(ms / 1e3);
                            prod.delete_snapshot(&name).await.unwrap();
                        }
                        total
                    })
                })
            });
        }
        rt.block_on(prod.stop()).unwrap();
    }
    group.finish();
}

/// `freeze_ms` values of the backend's "disks frozen" events.
static FREEZES: std::sync::Mutex<Vec<f64>> = std::sync::Mutex::new(Vec::new());
/// `quiesce_ms` values of the backend's "guests quiesced and thawed" events.
static QUIESCES: std::sync::Mutex<Vec<f64>> = std::sync::Mutex::new(Vec::new());

/// A tracing layer that records `freeze_ms` fields into [`FREEZES`].
struct FreezeRecorder;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for FreezeRecorder {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Visit;
        impl tracing::field::Visit for Visit {
            fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
                if field.name() == "freeze_ms" {
                    FREEZES.lock().unwrap().push(value);
                }
                if field.name() == "quiesce_ms" {
                    QUIESCES.lock().unwrap().push(value);
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        event.record(&mut Visit);
    }
}

fn benches(c: &mut Criterion) {
    use tracing_subscriber::layer::SubscriberExt;
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(FreezeRecorder)).unwrap();
    let rt = Runtime::new().unwrap();
    let dir =
        tempfile::tempdir_in(std::env::var_os("STAGECORE_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into())).unwrap();
    // A filter on the command line (`cargo bench --bench qemu -- real_guests`) also skips the setup
    // of the groups it does not select.
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wanted = |groups: &str| {
        filters.is_empty() || groups.split(' ').any(|g| filters.iter().any(|f| g.contains(f.as_str()) || f.contains(g)))
    };
    if wanted("qemu/stage_linked qemu/stage_full") {
        stage_benches(c, &rt, &dir.path().join("stage"));
    }
    if wanted("qemu/drift_1pct") {
        drift_benches(c, &rt, &dir.path().join("drift"));
    }
    if wanted("qemu/stage_linked_100x4 qemu/drift_100x4_1pct") {
        scale_benches(c, &rt, &dir.path().join("scale"), wanted("qemu/drift_100x4_1pct"));
    }
    if wanted("qemu/durability") {
        let b = backend(&dir.path().join("durable-src"));
        let (_prod, baseline) = rt.block_on(production(&b, "durable", 0));
        durability_benches(c, &dir.path().join("durable"), &layers(&baseline)[0]);
    }
    if wanted("qemu/snapshot_running") {
        snapshot_benches(c, &rt, &dir.path().join("snap"));
    }
    if wanted("qemu/snapshot_3_real_guests") {
        real_guest_benches(c, &rt, &dir.path().join("guests"));
    }
}

criterion_group!(qemu, benches);
criterion_main!(qemu);
