//! Cross-host staging over `qemu+tcp://`: a production on libvirtd test host A, stages of its
//! baseline on host B (`LibvirtBackend::stage_from`). Both backends keep their state directory on
//! the client; the images exist only on the hosts (see [`common::RemoteGuard`]). Data moves
//! A → client → B through libvirt streams.

mod common;

use common::{RemoteGuard, virsh_at};
use stagecore::{Backend, ChangeMap, StageOptions, memory::sample_spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_on_host_b_of_a_production_on_host_a() {
    let (ga, gb) =
        (RemoteGuard::new("STAGECORE_LIBVIRT_HOST_A", "xa"), RemoteGuard::new("STAGECORE_LIBVIRT_HOST_B", "xb"));
    let (a, b) = (ga.backend().await, gb.backend().await);
    let pname = format!("p{}", ga.tag);
    let mut spec = sample_spec(&pname);
    for m in &mut spec.machines {
        m.memory_mib = 64;
        for d in &mut m.disks {
            d.size_bytes = Some(16 << 20);
        }
    }
    let prod = a.create(&spec).await.expect("create production on host A");
    let io = prod.disk_io().expect("disk io over streams");
    io.write("db", "disk0", 4096, b"rows of production").await.expect("upload into a stopped disk on A");
    io.write("web", "disk0", 9 << 20, &vec![0x5a; 200_000]).await.expect("a bigger write");
    prod.start().await.expect("start on A");
    let baseline = prod.take_baseline().await.expect("baseline on A (external snapshot libvirt makes there)");

    // Linked: the baseline layer is streamed to B once, the stage's overlays go on it there.
    let (progress, mut events) = stagecore::Progress::channel();
    let before = b.streamed_bytes();
    let sname = format!("s{}", ga.tag);
    let stage = b.stage_from(&a, &baseline, &StageOptions::linked(&sname), Some(&progress)).await.expect("stage on B");
    let first = b.streamed_bytes() - before;
    drop(progress);
    let mut evs = Vec::new();
    while let Some(e) = events.recv().await {
        evs.push(e);
    }
    assert!(evs.iter().all(|e| e.operation == "stage" && e.step == "streamed"), "{evs:?}");
    for disk in ["web/disk0", "db/disk0", "app/disk0"] {
        let last =
            evs.iter().rfind(|e| e.subject.ends_with(disk)).unwrap_or_else(|| panic!("progress for {disk}: {evs:?}"));
        assert_eq!(last.done, last.total, "{disk} streamed completely");
    }
    assert!(first >= 200_000, "the written data crossed over: {first} bytes");
    let b_domains = virsh_at(&gb.uri, &["list", "--all", "--name"]);
    assert!(b_domains.iter().any(|d| d.starts_with(&sname)), "the stage is on B: {b_domains:?}");
    assert!(!b_domains.iter().any(|d| d.starts_with(&pname)), "production is not on B");
    let sio = stage.disk_io().unwrap();
    for (m, d) in [("web", "disk0"), ("db", "disk0"), ("app", "disk0")] {
        assert_eq!(sio.digest(m, d).await.unwrap(), io.digest(m, d).await.unwrap(), "{m}/{d} reads like production");
    }
    assert_eq!(sio.read("db", "disk0", 4096, 18).await.unwrap(), b"rows of production");

    // A second linked stage of the same baseline reuses the copy on B.
    let before = b.streamed_bytes();
    let s2 = format!("t{}", ga.tag);
    b.stage_from(&a, &baseline, &StageOptions::linked(&s2), None).await.expect("second stage on B");
    let second = b.streamed_bytes() - before;
    assert!(second < first / 2, "no second copy of the layer: {second} vs {first} bytes");

    // Full: an independent copy in the stage's own pool.
    let fname = format!("f{}", ga.tag);
    let full = b.stage_from(&a, &baseline, &StageOptions::full(&fname), None).await.expect("full stage on B");
    assert_eq!(full.disk_io().unwrap().digest("web", "disk0").await.unwrap(), io.digest("web", "disk0").await.unwrap());

    // Disk drift on B over the wire: a write in the stage shows, production on A has none.
    sio.write("app", "disk0", 1 << 20, b"stage edit").await.expect("write the stopped stage on B");
    let changes = stage.disk_changes(&baseline).await.unwrap();
    let app = changes.iter().find(|c| c.machine == "app").unwrap();
    match &app.changes {
        ChangeMap::Checked { extents } => assert_eq!(extents.len(), 1, "{extents:?}"),
        other => panic!("expected a checked map, got {other:?}"),
    }
    for c in prod.disk_changes(&baseline).await.unwrap() {
        assert!(matches!(&c.changes, ChangeMap::Checked { extents } if extents.is_empty()), "{c:?}");
    }

    for n in [&sname, &s2, &fname] {
        b.destroy(n).await.expect("destroy a stage on B");
    }
    a.destroy(&pname).await.expect("destroy production on A");
    assert!(ga.domains().is_empty() && gb.domains().is_empty());
}
