//! LayerSeal: a read-only layer rewritten behind our back (internal-snapshot revert with
//! qemu-img, plain writes with qemu-io) fails `verify` with `LayerChanged` naming the file.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use stagecore_qcow2::{Error, ImageFormat, LayerSeal};
use stagecore_qcow2::{changed_since, create_overlay, seal, verify};

fn snapshot(args: &[&str], img: &Path) {
    let mut a = vec!["snapshot"];
    a.extend_from_slice(args);
    a.push(img.to_str().unwrap());
    qemu_img(&a);
}

/// base (data) ← top (overlay: the stage), as after a baseline.
fn layered(d: &tempfile::TempDir) -> (PathBuf, PathBuf) {
    let (base, top) = (p(d, "base.qcow2"), p(d, "top.qcow2"));
    create_qcow2(&base, "64M");
    qemu_io("qcow2", &base, &["write -P 0x11 0 4M", "write -P 0x12 10M 64k"]);
    create_overlay(&top, &base, ImageFormat::Qcow2, None).unwrap();
    (base, top)
}

fn changed(base: &Path, s: &LayerSeal) -> String {
    match verify(base, s) {
        Err(Error::LayerChanged { path, what }) => {
            assert_eq!(path, base);
            what
        }
        other => panic!("expected LayerChanged for {}, got {other:?}", base.display()),
    }
}

#[test]
fn seal_is_stable_and_round_trips_through_json() {
    let d = tmp();
    let (base, top) = layered(&d);
    let s = seal(&base).unwrap();
    assert_eq!(s.format, ImageFormat::Qcow2);
    assert_eq!(s.size, std::fs::metadata(&base).unwrap().len());
    assert!(s.header_sha256.is_some() && s.l1_sha256.is_some() && s.l2_sha256.is_some());
    assert!(s.refcount_table_sha256.is_some() && s.mtime_ns.is_some());
    assert_eq!(seal(&base).unwrap(), s, "sealing twice gives the same seal");
    // Reading the layer (qemu-io read, our own reads, the overlay above it being written) does
    // not change it.
    qemu_io("qcow2", &base, &["read -P 0x11 0 4M"]);
    qemu_io("qcow2", &top, &["write -P 0x99 0 1M"]);
    verify(&base, &s).unwrap();
    let json = serde_json::to_string(&s).unwrap();
    let back: LayerSeal = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
    verify(&base, &back).unwrap();
    // A raw layer gets a weaker seal: size and mtime.
    let raw = p(&d, "r.raw");
    std::fs::write(&raw, vec![3u8; 8192]).unwrap();
    let rs = seal(&raw).unwrap();
    assert_eq!((rs.format, rs.size, rs.l1_sha256.clone()), (ImageFormat::Raw, 8192, None));
    verify(&raw, &rs).unwrap();
}

#[test]
fn internal_snapshot_revert_of_a_sealed_layer_is_detected() {
    // The operator's sequence on production's layer: snapshot, write, revert to the snapshot.
    // Sealed after the write (the layer at baseline time), the revert changes what the layer
    // reads, and the overlays above it still allocate nothing: changed_since alone is blind.
    let d = tmp();
    let (base, top) = layered(&d);
    snapshot(&["-c", "s"], &base);
    qemu_io("qcow2", &base, &["write -P 0x22 0 1M"]);
    let s = seal(&base).unwrap();
    snapshot(&["-a", "s"], &base);
    qemu_io("qcow2", &top, &["read -P 0x11 0 1M"]); // the stage now reads the old content
    assert!(changed_since(&top, &base).unwrap().is_empty(), "the chain itself shows no change");
    let what = changed(&base, &s);
    assert!(what.contains("L1") || what.contains("header") || what.contains("L2"), "{what}");
    let core = verify(&base, &s).unwrap_err().into_core("qemu");
    assert!(matches!(&core, stagecore::Error::Precondition(m) if m.contains("base.qcow2")), "{core}");
}

#[test]
fn snapshot_create_write_revert_after_sealing_is_detected() {
    // Sealed before the whole sequence: content ends as it was, but the file was rewritten
    // (clusters now shared with a snapshot, header names it): not the sealed layer any more.
    let d = tmp();
    let (base, _) = layered(&d);
    let s = seal(&base).unwrap();
    snapshot(&["-c", "s"], &base);
    qemu_io("qcow2", &base, &["write -P 0x22 0 1M"]);
    snapshot(&["-a", "s"], &base);
    let what = changed(&base, &s);
    assert!(!what.is_empty());
    // Even with the snapshot deleted again, the metadata is not what was sealed.
    snapshot(&["-d", "s"], &base);
    changed(&base, &s);
}

#[test]
fn plain_writes_are_detected() {
    let d = tmp();
    let (base, _) = layered(&d);

    // A write that allocates new clusters: L2 tables, refcounts and the file size change.
    let s = seal(&base).unwrap();
    qemu_io("qcow2", &base, &["write -P 0x33 20M 64k"]);
    let what = changed(&base, &s);
    assert!(what.contains("size") || what.contains("L2"), "{what}");

    // A write in place into an already allocated cluster: metadata identical, data not; only
    // the modification time tells, and the seal records it.
    std::thread::sleep(std::time::Duration::from_millis(20)); // the next write gets a later mtime tick
    let s = seal(&base).unwrap();
    qemu_io("qcow2", &base, &["write -P 0x44 0 4k"]);
    let what = changed(&base, &s);
    assert!(what.contains("modification time"), "{what}");
    // The metadata-only seal (no mtime) cannot see that write: documented, and tested here.
    verify(&base, &s.clone().without_mtime()).unwrap();

    // A zero write that only flips L2 flags.
    let s = seal(&base).unwrap();
    qemu_io("qcow2", &base, &["write -z 10M 64k"]);
    let what = changed(&base, &s.without_mtime());
    assert!(what.contains("L2"), "{what}");
}

#[test]
fn verify_of_a_missing_or_replaced_layer() {
    let d = tmp();
    let (base, _) = layered(&d);
    let s = seal(&base).unwrap();
    let copy = p(&d, "copy.qcow2");
    std::fs::copy(&base, &copy).unwrap();
    // A byte-identical copy has the same metadata; only its mtime differs.
    verify(&copy, &s.clone().without_mtime()).unwrap();
    std::fs::remove_file(&base).unwrap();
    let e = verify(&base, &s).unwrap_err();
    assert!(matches!(&e, Error::NotFound { path, .. } if path == &base), "{e}");
    // Replaced by a different image under the same name.
    create_qcow2(&base, "64M");
    let what = changed(&base, &s);
    assert!(!what.is_empty());
}

#[test]
fn seals_of_chains_verify_and_name_the_rewritten_file() {
    use stagecore_qcow2::Seals;
    let d = tmp();
    let (base, top) = layered(&d);
    let mid = p(&d, "mid.qcow2");
    create_overlay(&mid, &base, ImageFormat::Qcow2, None).unwrap();
    qemu_io("qcow2", &mid, &["write -P 0x21 1M 64k"]);
    let stage = p(&d, "stage.qcow2");
    create_overlay(&stage, &mid, ImageFormat::Qcow2, None).unwrap();
    let mut seals = Seals::new();
    seals.seal_chains([&mid], "test").unwrap();
    assert_eq!(seals.len(), 2, "mid and base are sealed");
    assert!(seals.contains(&base) && seals.contains(&mid) && !seals.contains(&top));
    seals.verify_chains([&mid], "test").unwrap();
    // Writing the stage above does not touch a sealed file.
    qemu_io("qcow2", &stage, &["write -P 0x77 0 1M"]);
    seals.verify_chains([&mid], "test").unwrap();
    // A copy of the seals of a chain, and a round trip through JSON.
    let copied = seals.of_chains([&mid], "test").unwrap();
    assert_eq!(copied, seals);
    let back: Seals = serde_json::from_str(&serde_json::to_string(&seals).unwrap()).unwrap();
    assert_eq!(back, seals);
    // The file below the baseline layer rewritten behind our back: named, Precondition.
    snapshot(&["-c", "x"], &base);
    snapshot(&["-a", "x"], &base);
    match seals.verify_chains([&mid], "test") {
        Err(stagecore::Error::Precondition(m)) => {
            assert!(m.contains(base.to_str().unwrap()) && m.contains("layer changed"), "{m}")
        }
        other => panic!("expected Precondition naming {}, got {other:?}", base.display()),
    }
    // Resealing after a rewrite we made ourselves makes it valid again; an unsealed file is
    // not resealed.
    assert!(seals.reseal(&base, "test").unwrap());
    seals.verify_chains([&mid], "test").unwrap();
    assert!(!seals.reseal(&top, "test").unwrap());
    // A file without a seal is not checked (records from before seals existed).
    let mut partial = seals.clone();
    partial.remove(&base);
    qemu_io("qcow2", &base, &["write -P 0x55 0 64k"]);
    partial.verify_chains([&mid], "test").unwrap();
    assert!(matches!(seals.verify_chains([&mid], "test"), Err(stagecore::Error::Precondition(_))));
    // A raw layer is a chain of itself (raw production disks are baselined too).
    let raw = p(&d, "disk.raw");
    std::fs::write(&raw, vec![7u8; 65536]).unwrap();
    let mut rs = Seals::new();
    rs.seal_chains([&raw], "test").unwrap();
    assert_eq!(rs.len(), 1);
    rs.verify_chains([&raw], "test").unwrap();
    std::fs::write(&raw, vec![8u8; 65536 + 512]).unwrap();
    assert!(matches!(rs.verify_chains([&raw], "test"), Err(stagecore::Error::Precondition(_))));
    // A sealed layer that is gone: NotFound.
    std::fs::remove_file(&mid).unwrap();
    let e = seals.verify_chains([&mid], "test").unwrap_err();
    assert!(matches!(e, stagecore::Error::NotFound { .. }), "{e}");
}

/// A "remote host": opens `/<path>` as `<root>/<path>`, so the paths it serves exist nowhere on
/// the local filesystem (a local open of one fails) — like a remote host's storage volumes.
struct Host {
    root: PathBuf,
}

impl stagecore_qcow2::Resolver for Host {
    fn open(&self, path: &Path, write: bool) -> std::io::Result<Box<dyn stagecore_qcow2::ReadAt>> {
        let local = self.root.join(path.strip_prefix("/").map_err(|_| std::io::ErrorKind::NotFound)?);
        Ok(Box::new(std::fs::OpenOptions::new().read(true).write(write).open(local)?))
    }
}

#[test]
fn seals_over_a_resolver_are_the_same_hashes_without_mtime_and_catch_a_rewrite() {
    use stagecore_qcow2::{Seals, seal_in, verify_in};
    let d = tmp();
    let host = Host { root: d.path().to_path_buf() };
    std::fs::create_dir(d.path().join("vol")).unwrap();
    let (local_base, local_mid) = (p(&d, "vol/base.qcow2"), p(&d, "vol/mid.qcow2"));
    create_qcow2(&local_base, "64M");
    qemu_io("qcow2", &local_base, &["write -P 0x11 0 4M", "write -P 0x12 10M 64k"]);
    // The overlay names its backing file by the host's path (`-u`: not opened here).
    let mid_s = local_mid.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", "/vol/base.qcow2", "-F", "qcow2", mid_s, "64M"]);
    let (base, mid) = (Path::new("/vol/base.qcow2"), Path::new("/vol/mid.qcow2"));
    assert!(!base.exists(), "the host's paths are not local files");

    // The same hashing as a local seal, without the modification time.
    let s = seal_in(&host, base).unwrap();
    assert_eq!(s.mtime_ns, None, "a resolver has no mtime: metadata-only seal");
    assert_eq!(s, seal(&local_base).unwrap().without_mtime(), "same hashes as the local seal");
    assert!(s.header_sha256.is_some() && s.l2_sha256.is_some() && s.refcount_table_sha256.is_some());
    verify_in(&host, base, &s).unwrap();
    assert!(!serde_json::to_string(&s).unwrap().contains("mtime"), "no mtime in the record");

    // Seals of a chain through the resolver, keyed by the paths as given.
    let mut seals = Seals::new();
    seals.seal_chains_in(&host, [mid], "test").unwrap();
    let keys: Vec<&Path> = seals.iter().map(|(p, _)| p).collect();
    assert_eq!(keys, [base, mid], "both files, keyed by the host's paths");
    seals.verify_chains_in(&host, [mid], "test").unwrap();
    assert_eq!(seals.of_chains_in(&host, [mid], "test").unwrap(), seals);
    assert!(seals.seal_chains([mid], "test").is_err(), "the local variant does not see the host's files");

    // A rewrite on the host (an internal snapshot taken behind our back): named, Precondition.
    snapshot(&["-c", "x"], &local_base);
    match verify_in(&host, base, &s) {
        Err(Error::LayerChanged { path, what }) => {
            assert_eq!(path, base);
            assert!(what.contains("header") || what.contains("size") || what.contains("refcount"), "{what}");
        }
        other => panic!("a rewritten layer passed over the resolver: {other:?}"),
    }
    match seals.verify_chains_in(&host, [mid], "test") {
        Err(stagecore::Error::Precondition(m)) => {
            assert!(m.contains("/vol/base.qcow2") && m.contains("layer changed since it was sealed"), "{m}")
        }
        other => panic!("expected Precondition naming /vol/base.qcow2, got {other:?}"),
    }

    // An allocating write is caught; an in-place overwrite of an allocated cluster is not (no
    // mtime over a resolver: the documented limit of a metadata-only seal).
    let s = seal_in(&host, base).unwrap();
    qemu_io("qcow2", &local_base, &["write -P 0x33 20M 64k"]);
    assert!(matches!(verify_in(&host, base, &s), Err(Error::LayerChanged { .. })));
    let s = seal_in(&host, base).unwrap();
    qemu_io("qcow2", &local_base, &["write -P 0x44 20M 4k"]); // in place: refcount 1, no COW
    verify_in(&host, base, &s).unwrap();

    // A raw layer over the resolver: size only.
    std::fs::write(d.path().join("vol/disk.raw"), vec![7u8; 65536]).unwrap();
    let raw = Path::new("/vol/disk.raw");
    let rs = seal_in(&host, raw).unwrap();
    assert_eq!((rs.format, rs.size, rs.mtime_ns, rs.l1_sha256.clone()), (ImageFormat::Raw, 65536, None, None));
    let mut rseals = Seals::new();
    rseals.seal_chains_in(&host, [raw], "test").unwrap();
    rseals.verify_chains_in(&host, [raw], "test").unwrap();
    std::fs::write(d.path().join("vol/disk.raw"), vec![7u8; 65536 + 512]).unwrap();
    assert!(matches!(rseals.verify_chains_in(&host, [raw], "test"), Err(stagecore::Error::Precondition(_))));
    // A missing volume: NotFound naming it.
    assert!(matches!(verify_in(&host, Path::new("/vol/gone.qcow2"), &s), Err(Error::NotFound { .. })));
}
