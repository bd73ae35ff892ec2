//! Sealed baseline layers on remote storage (issue #11) over `qemu+tcp://` to libvirtd test
//! host A (`cargo xtask hosts`; FAILS without it): the layers are storage volumes on the host,
//! sealed and checked over libvirt streams. A baseline layer rewritten on the host behind
//! stagecore's back (`qemu-img snapshot -c` run inside the host's mount namespace) makes
//! `disk_changes` and `stage` fail with `Error::Precondition` naming the file; before the rewrite
//! both work. [`common::RemoteGuard`] removes domains, networks and pools afterwards.

mod common;

use std::path::Path;
use std::process::Command;

use stagecore::{Backend, Baseline, ChangeMap, DynEnvironment, Error, StageOptions, memory::sample_spec};

use common::{RemoteGuard, assert_changed, small};

/// The pid of the libvirtd whose mount namespace holds `path` (the host that made the volume;
/// the path is under the guard's unique root, which no other daemon and not the client has).
fn daemon_holding(path: &str) -> u32 {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "libvirtd" && Path::new(&format!("/proc/{pid}/root{path}")).is_file() {
            found.push(pid);
        }
    }
    assert_eq!(found.len(), 1, "exactly one libvirtd (the test host) holds {path}: {found:?}");
    found[0]
}

/// Runs `args` inside the mount namespace of host daemon `pid`: as a shell on that host would.
fn on_host(pid: u32, args: &[&str]) {
    let out = Command::new("nsenter")
        .arg("-t")
        .arg(pid.to_string())
        .arg("-m")
        .arg("--")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("nsenter is required: {e}"));
    assert!(out.status.success(), "on the host: {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

async fn check(env: &DynEnvironment, b: &Baseline, what: &str) {
    let changes = env.disk_changes(b).await.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(changes.len(), 3, "{what}: {changes:?}");
    assert!(changes.iter().all(|c| matches!(c.changes, ChangeMap::Checked { .. })), "{what}: {changes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_baseline_layer_rewritten_on_the_remote_host_is_refused_by_drift_and_staging() {
    let g = RemoteGuard::new("STAGECORE_LIBVIRT_HOST_A", "rs");
    let backend = g.backend().await;
    let pname = format!("p{}", g.tag);
    let prod = backend.create(&small(sample_spec(&pname))).await.expect("create production on host A");
    let io = prod.disk_io().expect("disk io over streams");
    io.write("web", "disk0", 0, &[0x11; 65536]).await.expect("upload into production's web disk");

    let b = prod.take_baseline().await.expect("baseline on host A");
    let layer = b.layers.iter().find(|l| l.machine == "web").expect("web in the baseline").layer.clone();
    assert!(layer.starts_with(&g.root), "the layer is a volume under the host's root: {layer}");
    assert!(!Path::new(&layer).exists(), "and not a file of the client");
    let seals_file = g.state.path().join(&pname).join("baselines").join(&b.id).join("seals.json");
    let seals: stagecore_qcow2::Seals =
        serde_json::from_slice(&std::fs::read(&seals_file).expect("the baseline's seals on the client")).unwrap();
    assert!(b.layers.iter().all(|l| seals.contains(Path::new(&l.layer))), "every layer sealed: {seals:?}");
    assert!(seals.iter().all(|(_, s)| s.mtime_ns.is_none()), "remote seals are metadata-only: {seals:?}");

    // Before the rewrite: drift and staging work.
    let sname = format!("s{}", g.tag);
    let stage = backend.stage(&b, &StageOptions::linked(&sname)).await.expect("linked stage on host A");
    assert!(g.state.path().join(&sname).join("seals.json").is_file(), "the stage keeps its base's seals");
    check(&prod, &b, "production before the rewrite").await;
    check(&stage, &b, "the stage before the rewrite").await;

    // The operator's internal snapshot of the baseline layer, on the host.
    let host = daemon_holding(&layer);
    on_host(host, &["qemu-img", "snapshot", "-c", "x", &layer]);

    assert_changed(prod.disk_changes(&b).await, &layer, "production's disk_changes");
    assert_changed(stage.disk_changes(&b).await, &layer, "the stage's disk_changes");
    let again = format!("a{}", g.tag);
    assert_changed(backend.stage(&b, &StageOptions::linked(&again)).await.map(drop), &layer, "stage");
    assert!(matches!(backend.open(&again).await, Err(Error::NotFound { .. })), "no record of the refused stage");
    assert!(!g.domains().iter().any(|d| d.contains(&again)), "a refused stage defines no domain");

    backend.destroy(&sname).await.expect("destroy the stage");
    backend.destroy(&pname).await.expect("destroy production");
}
