//! Drift on the in-memory backend: 100 machines × 4 disks.
//!
//! Two groups, side by side:
//! - `same_changes`: every disk has the same 10 changed blocks, disks of 64 MiB, 1 GiB and 8 GiB —
//!   the cost must stay flat as disks grow (it follows changed extents, not disk size);
//! - `one_percent`: 1 % of every disk changed, 64 MiB and 512 MiB disks — the cost grows with the
//!   changed extents.
//! - `guest`: the same environment with the guest layer on — every machine running a simulated
//!   guest with 500 watched files; `in_sync` (fresh clone) and `10_changed` (10 items changed on
//!   every stage machine); plus `inventory/collect` of the 100 machines alone. This measures the
//!   engine and the parser (about 60 KiB of collector output per machine), not a guest: real
//!   guests pay one exec round trip per machine and the script's own run time (measured by the
//!   QEMU/libvirt benches).
//!
//! `cargo bench -p stagekit --bench drift`

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use stagekit::stagecore::inventory::{self, InventoryConfig};
use stagekit::stagecore::memory::{BLOCK, MemoryBackend};
use stagekit::stagecore::{Backend, BackendExt, DynEnvironment, EnvironmentSpec, GuestExec, StageOptions};
use tokio::runtime::Runtime;

mod support;

const MACHINES: usize = 100;
const DISKS: usize = 4;

fn spec(disk_size: u64) -> EnvironmentSpec {
    support::grid_spec("prod", MACHINES, DISKS, disk_size)
}

/// Production and a stage with `changed_blocks` blocks written on every stage disk.
async fn setup(disk_size: u64, changed_blocks: u64) -> (Arc<dyn Backend>, DynEnvironment, DynEnvironment) {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let prod = backend.create(&spec(disk_size)).await.unwrap();
    let baseline = prod.take_baseline().await.unwrap();
    let stage = backend.stage(&baseline, &StageOptions::linked("stage")).await.unwrap();
    let io = stage.disk_io().unwrap();
    let stride = (disk_size / BLOCK / changed_blocks).max(1);
    let block = vec![0x5a; BLOCK as usize];
    for i in 0..MACHINES {
        for d in 0..DISKS {
            for b in 0..changed_blocks {
                io.write(&format!("m{i}"), &format!("d{d}"), b * stride * BLOCK, &block).await.unwrap();
            }
        }
    }
    (backend, prod, stage)
}

/// Running production and stage with simulated guests: 500 files under /etc/bench per machine;
/// `changed` items changed on every stage machine.
async fn guest_setup(changed: usize) -> (Arc<dyn Backend>, DynEnvironment, DynEnvironment) {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let prod = backend.create(&spec(64 << 20)).await.unwrap();
    prod.start().await.unwrap();
    let guest = prod.guest().unwrap();
    for i in 0..MACHINES {
        for f in 0..500 {
            let path = format!("/etc/bench/dir{}/file-{f}.conf", f % 20);
            guest.write_file(&format!("m{i}"), &path, format!("setting={f}\n").as_bytes(), None).await.unwrap();
        }
    }
    let (baseline, inv) = inventory::take_baseline(&*prod, &InventoryConfig::default(), None).await.unwrap();
    let stage = inventory::stage(&*backend, &baseline, &inv, &StageOptions::linked("stage")).await.unwrap();
    stage.start().await.unwrap();
    let guest = stage.guest().unwrap();
    for i in 0..MACHINES {
        for c in 0..changed {
            let argv = ["stagecore-sim", "pkg", "install", &format!("pkg-{c}"), "1.0"];
            guest.exec(&format!("m{i}"), &GuestExec::new(argv)).await.unwrap();
        }
    }
    (backend, prod, stage)
}

fn bench(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let mut group = c.benchmark_group("drift_memory/same_changes");
    group.sample_size(10);
    for (label, size) in [("64MiB", 64u64 << 20), ("1GiB", 1 << 30), ("8GiB", 8 << 30)] {
        let (backend, prod, stage) = rt.block_on(setup(size, 10));
        group.bench_function(BenchmarkId::from_parameter(label), |b| {
            b.to_async(&rt).iter(|| async { backend.drift(&*prod, &*stage).await.unwrap() })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("drift_memory/one_percent");
    group.sample_size(10);
    for (label, size) in [("64MiB", 64u64 << 20), ("512MiB", 512 << 20)] {
        let blocks = (size / BLOCK / 100).max(1);
        let (backend, prod, stage) = rt.block_on(setup(size, blocks));
        group.bench_function(BenchmarkId::from_parameter(label), |b| {
            b.to_async(&rt).iter(|| async { backend.drift(&*prod, &*stage).await.unwrap() })
        });
    }
    group.finish();
}

fn bench_guest(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let mut group = c.benchmark_group("drift_memory/guest");
    group.sample_size(10);
    for (label, changed) in [("in_sync", 0usize), ("10_changed", 10)] {
        let (backend, prod, stage) = rt.block_on(guest_setup(changed));
        let r = rt.block_on(backend.drift(&*prod, &*stage)).unwrap();
        assert_eq!(r.guest.records.len(), MACHINES * changed, "{r}");
        group.bench_function(BenchmarkId::from_parameter(label), |b| {
            b.to_async(&rt).iter(|| async { backend.drift(&*prod, &*stage).await.unwrap() })
        });
    }
    let (_, prod, _) = rt.block_on(guest_setup(0));
    group.bench_function("inventory_collect_100", |b| {
        b.to_async(&rt)
            .iter(|| async { inventory::collect(&*prod, None, &InventoryConfig::default(), None).await.unwrap() })
    });
    group.finish();
}

criterion_group!(benches, bench, bench_guest);
criterion_main!(benches);
