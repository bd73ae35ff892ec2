//! qcow2 layer work in-process vs the tools users would otherwise run, side by side:
//! (a) linked-clone overlays for 3 disks, (b) disk drift on 1 GiB / 8 GiB disks with 1 % changed,
//! (c) a full copy of 512 MiB of allocated data, (d) sealing / verifying a read-only layer
//! (8 GiB virtual, 1 % allocated) against hashing the whole file.
//!
//! Run: `cargo bench --bench qcow2` (needs qemu-img / qemu-io; uses a temp dir on the local disk).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use stagecore_qcow2::{ImageFormat, changed_since, copy_allocated, create_overlay, seal, verify, write_at};

const M: u64 = 1 << 20;
const G: u64 = 1 << 30;

fn run(cmd: &mut Command) {
    let st = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(st.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&st.stderr));
}

fn qemu_img(args: &[&str]) {
    run(Command::new("qemu-img").args(args));
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Durability for tools that do not sync by themselves: fdatasync the file and its directory.
fn sync_file_and_dir(p: &Path) {
    std::fs::File::open(p).unwrap().sync_data().unwrap();
    std::fs::File::open(p.parent().unwrap()).unwrap().sync_all().unwrap();
}

/// Times `iters` rounds of `f(round)`, then runs `cleanup(round)` outside the measurement.
fn timed(iters: u64, mut f: impl FnMut(u64), mut cleanup: impl FnMut(u64)) -> Duration {
    let mut total = Duration::ZERO;
    for i in 0..iters {
        let t = Instant::now();
        f(i);
        total += t.elapsed();
        cleanup(i);
    }
    total
}

fn overlays(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let bases: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("base{i}.qcow2"))).collect();
    for b in &bases {
        qemu_img(&["create", "-q", "-f", "qcow2", s(b), "20G"]);
    }
    let top = |i: usize, round: u64| dir.path().join(format!("top{i}-{round}.qcow2"));
    let rm = |round: u64| (0..3).for_each(|i| std::fs::remove_file(top(i, round)).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut g = c.benchmark_group("overlay_create_3_disks");
    g.bench_function("in_process_fdatasync", |b| {
        b.iter_custom(|n| {
            timed(
                n,
                |r| {
                    for (i, base) in bases.iter().enumerate() {
                        create_overlay(&top(i, r), base, ImageFormat::Qcow2, None).unwrap();
                    }
                },
                rm,
            )
        })
    });
    g.bench_function("imago_0.2.6_plus_fdatasync", |b| {
        b.iter_custom(|n| {
            timed(
                n,
                |r| {
                    for (i, base) in bases.iter().enumerate() {
                        rt.block_on(imago_overlay(&top(i, r), base, 20 * G));
                        sync_file_and_dir(&top(i, r));
                    }
                },
                rm,
            )
        })
    });
    g.sample_size(20);
    g.bench_function("qemu_img_create", |b| {
        b.iter_custom(|n| {
            timed(
                n,
                |r| {
                    for (i, base) in bases.iter().enumerate() {
                        let t = top(i, r);
                        qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", s(base), s(&t)]);
                    }
                },
                rm,
            )
        })
    });
    g.finish();
}

#[allow(clippy::future_not_send)] // imago's futures are not Send; the bench runs them on one thread
async fn imago_overlay(path: &Path, base: &Path, size: u64) {
    use imago::{FormatCreateBuilder, Storage, StorageCreateOptions};
    let file = imago::file::File::create_open(StorageCreateOptions::new().filename(path)).await.unwrap();
    imago::qcow2::Qcow2::<imago::file::File>::create_builder(file)
        .backing(s(base).to_string(), "qcow2".to_string())
        .size(size)
        .create()
        .await
        .unwrap();
}

/// base (empty) ← top with one 64 KiB cluster written in every 100: 1 % changed, spread over
/// every L2 table.
fn drift_fixture(dir: &Path, size: u64) -> (PathBuf, PathBuf) {
    let base = dir.join(format!("drift-base-{size}.qcow2"));
    let top = dir.join(format!("drift-top-{size}.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), &size.to_string()]);
    create_overlay(&top, &base, ImageFormat::Qcow2, None).unwrap();
    let data = vec![0x5au8; 65536];
    for cl in (0..size / 65536).step_by(100) {
        write_at(&top, cl * 65536, &data).unwrap();
    }
    (base, top)
}

fn drift(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("disk_drift_1pct_changed");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    for size in [G, 8 * G] {
        let (base, top) = drift_fixture(dir.path(), size);
        let label = format!("{}GiB", size / G);
        g.bench_with_input(BenchmarkId::new("changed_since", &label), &size, |b, _| {
            b.iter(|| changed_since(&top, &base).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("qemu_img_compare", &label), &size, |b, _| {
            b.iter(|| {
                // Exit status 1 = "images differ", which is the expected answer here.
                let st = Command::new("qemu-img").args(["compare", "-q", s(&base), s(&top)]).status();
                assert_eq!(st.unwrap().code(), Some(1));
            })
        });
    }
    g.finish();
}

fn full_copy(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&src), "1G"]);
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x5a 0 512M", s(&src)]));
    let dest = |r: u64| dir.path().join(format!("dest-{r}.img"));
    let rm = |r: u64| std::fs::remove_file(dest(r)).unwrap();
    let mut g = c.benchmark_group("full_copy_512MiB_allocated");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("copy_allocated", |b| {
        b.iter_custom(|n| {
            timed(
                n,
                |r| {
                    copy_allocated(&src, None, &dest(r)).unwrap();
                },
                rm,
            )
        })
    });
    g.bench_function("cp_sparse_always_plus_fdatasync", |b| {
        b.iter_custom(|n| {
            timed(
                n,
                |r| {
                    run(Command::new("cp").args(["--sparse=always", s(&src), s(&dest(r))]));
                    sync_file_and_dir(&dest(r));
                },
                rm,
            )
        })
    });
    g.bench_function("qemu_img_convert_plus_fdatasync", |b| {
        b.iter_custom(|n| {
            timed(
                n,
                |r| {
                    qemu_img(&["convert", "-O", "qcow2", s(&src), s(&dest(r))]);
                    sync_file_and_dir(&dest(r));
                },
                rm,
            )
        })
    });
    g.finish();
    let _ = M;
}

/// (d) `seal` / `verify` of a layer of an 8 GiB disk with 1 % allocated (16 L2 tables, 82 MiB
/// of data), next to `changed_since` on it and `sha256sum` of the whole file (what a seal over
/// the data would cost).
fn layer_seal(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (base, layer) = drift_fixture(dir.path(), 8 * G);
    let sealed = seal(&layer).unwrap();
    let mut g = c.benchmark_group("layer_seal_8GiB_1pct_allocated");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    g.bench_function("seal", |b| b.iter(|| seal(&layer).unwrap()));
    g.bench_function("verify", |b| b.iter(|| verify(&layer, &sealed).unwrap()));
    g.bench_function("changed_since", |b| b.iter(|| changed_since(&layer, &base).unwrap()));
    g.bench_function("sha256sum_whole_file", |b| b.iter(|| run(Command::new("sha256sum").arg(&layer))));
    g.finish();
}

criterion_group!(benches, overlays, drift, full_copy, layer_seal);
criterion_main!(benches);
