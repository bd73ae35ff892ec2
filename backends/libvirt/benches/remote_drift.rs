//! Remote disk drift vs reading the disk, over the same `qemu+tcp://` connection to libvirtd test
//! host A (`cargo xtask hosts start`; URI in `STAGECORE_LIBVIRT_HOST_A`).
//!
//! Fixture: one machine with an 8 GiB qcow2 disk (a storage volume on the host), a baseline, then
//! 1 % of the disk (82 runs of 1 MiB spread evenly over the whole disk) written into the
//! top layer through `DiskIo::write` (uploads). Measured, median of several rounds, with the
//! bytes moved over libvirt streams:
//! * `disk_changes` — the allocation map of the layers above the baseline, from qcow2 metadata
//!   read with `virStorageVolDownload` (offset + length);
//! * downloading the top volume whole (one stream) — the least a content comparison must move;
//! * `DiskIo::digest` — reading all guest-visible content through the chain over the wire.
//!
//! Run: `STAGECORE_LIBVIRT_HOST_A=… cargo bench -p stagecore-libvirt --bench remote_drift`.

use std::time::{Duration, Instant};

use stagecore::{Backend, ChangeMap, DiskFormat, DiskSpec, EnvironmentSpec, MachineSpec};
use stagecore_libvirt::LibvirtBackend;

const SIZE: u64 = 8 << 30;
const CLUSTER: u64 = 64 << 10;
const RUN: u64 = 1 << 20;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn virsh(uri: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("virsh").arg("-c").arg(uri).args(args).output().expect("virsh");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn main() {
    let uri = std::env::var("STAGECORE_LIBVIRT_HOST_A")
        .expect("STAGECORE_LIBVIRT_HOST_A: run `cargo xtask hosts start` and export what it prints");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tag = format!("bd{:08x}", std::process::id());
    let state = tempfile::tempdir().unwrap();
    let root = format!("/var/lib/libvirt/images/stagecore-bench-{tag}");
    let backend =
        rt.block_on(LibvirtBackend::connect(&uri, state.path())).expect("host A answers").with_remote_root(&root);
    let name = format!("{tag}-p");
    let spec = EnvironmentSpec {
        name: name.clone(),
        machines: vec![MachineSpec {
            name: "db".into(),
            uuid: None,
            vcpus: 1,
            memory_mib: 64,
            firmware: Default::default(),
            disks: vec![DiskSpec {
                name: "disk0".into(),
                source: "db.disk0.qcow2".into(),
                format: DiskFormat::Qcow2,
                size_bytes: Some(SIZE),
                read_only: false,
            }],
            nics: vec![],
            labels: Default::default(),
            boot: None,
            after: vec![],
        }],
        networks: vec![],
        labels: Default::default(),
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            let prod = backend.create(&spec).await.expect("create");
            let baseline = prod.take_baseline().await.expect("baseline");
            let io = prod.disk_io().unwrap();
            // 1 % of the disk in 1 MiB runs spread evenly over it (82 runs of 16 clusters).
            let runs = SIZE / 100 / RUN + 1;
            let stride = (SIZE / runs) / CLUSTER * CLUSTER;
            let changed = runs * RUN;
            let t = Instant::now();
            let data = vec![0xa5u8; RUN as usize];
            for i in 0..runs {
                io.write("db", "disk0", i * stride, &data).await.expect("write");
            }
            println!(
                "setup: {runs} runs of 1 MiB ({} MiB, {:.2} % of 8 GiB) written over uploads in {:.1} s",
                changed >> 20,
                100.0 * changed as f64 / SIZE as f64,
                t.elapsed().as_secs_f64()
            );

            let mut times = Vec::new();
            let mut bytes = 0;
            for _ in 0..9 {
                let before = backend.streamed_bytes();
                let t = Instant::now();
                let ch = prod.disk_changes(&baseline).await.expect("drift");
                times.push(t.elapsed());
                bytes = backend.streamed_bytes() - before;
                match &ch[0].changes {
                    ChangeMap::Checked { extents } => {
                        assert_eq!(stagecore::extent::total(extents), changed, "every changed cluster found")
                    }
                    other => panic!("{other:?}"),
                }
            }
            let drift = median(times);
            println!(
                "remote disk drift (disk_changes):      {:>9.1} ms, {:>11} bytes streamed",
                drift.as_secs_f64() * 1e3,
                bytes
            );

            let vols = virsh(&uri, &["vol-list", &format!("stagecore-{name}")]);
            let top_vol = vols
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .find(|v| v.contains(&baseline.id))
                .expect("top volume")
                .to_string();
            let mut times = Vec::new();
            let mut size = 0;
            for _ in 0..3 {
                let (u, p, v) = (uri.clone(), format!("stagecore-{name}"), top_vol.clone());
                let t = Instant::now();
                size = tokio::task::spawn_blocking(move || download_whole(&u, &p, &v)).await.unwrap();
                times.push(t.elapsed());
            }
            let whole = median(times);
            println!(
                "download the top volume whole:         {:>9.1} ms, {:>11} bytes streamed",
                whole.as_secs_f64() * 1e3,
                size
            );

            let before = backend.streamed_bytes();
            let t = Instant::now();
            io.digest("db", "disk0").await.expect("digest");
            let digest = t.elapsed();
            println!(
                "read the whole disk (DiskIo::digest):  {:>9.1} ms, {:>11} bytes streamed",
                digest.as_secs_f64() * 1e3,
                backend.streamed_bytes() - before
            );
            println!(
                "ratio: download / drift = {:.0}x, digest / drift = {:.0}x, bytes: {:.0}x fewer",
                whole.as_secs_f64() / drift.as_secs_f64(),
                digest.as_secs_f64() / drift.as_secs_f64(),
                size as f64 / bytes.max(1) as f64
            );
        })
    }));
    rt.block_on(backend.destroy(&name)).ok();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

/// Downloads a whole volume through one stream and returns its length.
fn download_whole(uri: &str, pool: &str, vol: &str) -> u64 {
    let c = virt::connect::Connect::open(Some(uri)).unwrap();
    let p = c.lookup_storage_pool_by_name(pool).unwrap();
    let v = p.lookup_storage_vol_by_name(vol).unwrap();
    let s = virt::stream::Stream::new(&c, 0).unwrap();
    v.download(&s, 0, 0, 0).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match s.recv(&mut buf).unwrap() {
            0 => break,
            k => n += k as u64,
        }
    }
    s.finish().unwrap();
    n
}
