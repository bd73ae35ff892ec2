//! copy_allocated against `qemu-img compare`, including a destination filesystem that fills up.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use stagecore_qcow2::{Error, ImageFormat};
use stagecore_qcow2::{allocated_extents, copy_allocated, create_overlay, info};

fn compare(a: &Path, b: &Path) {
    qemu_img(&["compare", "-q", a.to_str().unwrap(), b.to_str().unwrap()]);
}

/// raw base ← mid ← top with data, compressed, zero and partial clusters.
fn source(d: &tempfile::TempDir) -> [PathBuf; 3] {
    let (raw, mid, top) = (p(d, "base.raw"), p(d, "mid.qcow2"), p(d, "top.qcow2"));
    qemu_img(&["create", "-q", "-f", "raw", raw.to_str().unwrap(), "32M"]);
    qemu_io("raw", &raw, &["write -P 0x01 0 2M", "write -P 0x09 20M 100k"]);
    create_overlay(&mid, &raw, ImageFormat::Raw, None).unwrap();
    qemu_io("qcow2", &mid, &["write -c -P 0x02 1M 64k", "write -P 0x03 5M 1M"]);
    create_overlay(&top, &mid, ImageFormat::Qcow2, None).unwrap();
    qemu_io("qcow2", &top, &["write -z 5M 64k", "write -P 0x04 7M 3000", "write -z 0 64k"]);
    [raw, mid, top]
}

#[test]
fn flattened_copy_equals_source_and_stands_alone() {
    let d = tmp();
    let [raw, _, top] = source(&d);
    let dest = p(&d, "full.qcow2");
    let stats = copy_allocated(&top, None, &dest).unwrap();
    assert_eq!(stats.layers, 3);
    check(&dest);
    compare(&top, &dest);
    let i = info(&dest).unwrap();
    assert_eq!(i.backing_file, None);
    assert_eq!(i.virtual_size, 32 * M);
    // Independent: the source chain can go away.
    std::fs::remove_file(&raw).unwrap();
    let mut buf = vec![0u8; 4096];
    stagecore_qcow2::read_at(&dest, 20 * M, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 9));
    assert!(!names(d.path()).iter().any(|n| n.ends_with(".tmp")));
}

#[test]
fn copy_above_a_layer_keeps_it_as_backing() {
    let d = tmp();
    let [raw, mid, top] = source(&d);
    let dest = p(&d, "stage.qcow2");
    let stats = copy_allocated(&top, Some(&raw), &dest).unwrap();
    assert_eq!(stats.layers, 2);
    assert!(stats.zero_bytes >= 128 * K, "zero clusters over the base are kept: {stats:?}");
    check(&dest);
    compare(&top, &dest);
    let j = info_json(&dest);
    assert_eq!(j["backing-filename"], raw.canonicalize().unwrap().to_str().unwrap());
    assert_eq!(j["backing-filename-format"], "raw");
    // Only what the two copied layers allocated is in dest.
    let got = allocated_extents(&dest).unwrap();
    assert_eq!(got, qemu_map(&dest, 1));
    assert_eq!(got, stagecore_qcow2::changed_since(&top, &raw).unwrap());

    let dest2 = p(&d, "stage2.qcow2");
    copy_allocated(&top, Some(&mid), &dest2).unwrap();
    compare(&top, &dest2);
    assert_eq!(info(&dest2).unwrap().backing_format, Some(ImageFormat::Qcow2));
}

#[test]
fn bad_arguments_leave_nothing_behind() {
    let d = tmp();
    let [_, _, top] = source(&d);
    let dest = p(&d, "x.qcow2");
    std::fs::write(&dest, b"keep").unwrap();
    let e = copy_allocated(&top, None, &dest).unwrap_err();
    assert!(matches!(e, Error::AlreadyExists { .. }), "{e}");
    assert_eq!(std::fs::read(&dest).unwrap(), b"keep");
    let other = p(&d, "other.qcow2");
    create_qcow2(&other, "1M");
    let e = copy_allocated(&top, Some(&other), &p(&d, "y.qcow2")).unwrap_err();
    assert!(matches!(&e, Error::BaseNotInChain { base, top: t } if base == &other && t == &top), "{e}");
    let e = copy_allocated(&top, Some(&top), &p(&d, "y.qcow2")).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { arg: "stop_at", .. }), "{e}");
    assert!(!p(&d, "y.qcow2").exists());
}

/// A 2 MiB tmpfs mounted for the test's lifetime; unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount() -> Tmpfs {
        let dir = tmp();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("cannot run mount");
        assert!(st.success(), "mounting a tmpfs failed (the test needs root): {st}");
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn full_filesystem_fails_cleanly() {
    let d = tmp();
    let top = p(&d, "big.qcow2");
    create_qcow2(&top, "64M");
    qemu_io("qcow2", &top, &["write -P 0x42 0 8M"]);
    let fs = Tmpfs::mount();
    let dest = fs.0.path().join("clone.qcow2");
    let e = copy_allocated(&top, None, &dest).unwrap_err();
    let text = e.to_string();
    assert!(matches!(&e, Error::Io { path, .. } if path.starts_with(fs.0.path())), "{text}");
    assert!(text.contains("No space left"), "{text}");
    let core = e.into_core("qemu");
    assert!(matches!(core, stagecore::Error::Backend { backend: "qemu", .. }), "{core}");
    assert!(core.to_string().contains("No space left"), "{core}");
    assert!(names(fs.0.path()).is_empty(), "partial output left: {:?}", names(fs.0.path()));
    // And the same for an overlay whose header cannot even be written.
    std::fs::write(fs.0.path().join("filler"), vec![1u8; 3 << 20]).unwrap_err();
    let e = create_overlay(&fs.0.path().join("o.qcow2"), &top, ImageFormat::Qcow2, None);
    assert!(e.is_err(), "overlay on a full fs must fail");
    assert_eq!(names(fs.0.path()), vec!["filler"]);
}

#[test]
fn many_copies_in_parallel_each_equal_their_source_and_failures_stay_apart() {
    let d = tmp();
    let [raw, _, top] = source(&d);
    let taken = p(&d, "taken.qcow2");
    std::fs::write(&taken, b"keep").unwrap();
    let job = |dest: &str, stop_at: Option<&Path>| stagecore_qcow2::CopyJob {
        src_top: top.clone(),
        stop_at: stop_at.map(Path::to_path_buf),
        dest: p(&d, dest),
    };
    let jobs = vec![job("a.qcow2", None), job("taken.qcow2", None), job("b.qcow2", Some(&raw)), job("c.qcow2", None)];
    let results = stagecore_qcow2::copy_allocated_many(&jobs, 2);
    assert_eq!(results.len(), 4);
    assert!(matches!(results[1], Err(Error::AlreadyExists { .. })), "{:?}", results[1]);
    assert_eq!(std::fs::read(&taken).unwrap(), b"keep");
    for (i, r) in results.iter().enumerate().filter(|(i, _)| *i != 1) {
        let stats = r.as_ref().unwrap();
        assert_eq!(stats.layers, if i == 2 { 2 } else { 3 });
        assert_eq!(stats.cloned_bytes, 0, "{} does not reflink", d.path().display());
        check(&jobs[i].dest);
        compare(&top, &jobs[i].dest);
    }
    // The stagecore-error form and a parallelism of 0 (taken as 1).
    let again = stagecore_qcow2::copy_allocated_many(&[job("d.qcow2", None)], 0);
    assert!(again[0].is_ok());
    assert!(stagecore_qcow2::copy_allocated_many(&[], 4).is_empty());
}

/// An XFS filesystem with reflink on a loop device, mounted for the test's lifetime.
struct Xfs(tempfile::TempDir);

impl Xfs {
    fn mount() -> Xfs {
        let dir = tmp();
        let img = dir.path().join("xfs.img");
        std::fs::File::create(&img).unwrap().set_len(1 << 30).unwrap();
        let st = Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1"]).arg(&img).status();
        assert!(st.is_ok_and(|s| s.success()), "mkfs.xfs failed or is missing (package xfsprogs)");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let st = Command::new("mount").args(["-o", "loop"]).arg(&img).arg(&mnt).status().expect("cannot run mount");
        assert!(st.success(), "mounting the XFS image on a loop device failed (needs root and /dev/loop*): {st}");
        Xfs(dir)
    }

    fn path(&self) -> PathBuf {
        self.0.path().join("mnt")
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.path()).status();
    }
}

/// Runs as root (every developer machine and CI run is): a missing `mkfs.xfs` (package
/// `xfsprogs`, installed by `cargo xtask setup`) or loop device fails loudly.
#[test]
fn reflink_on_xfs_shares_the_data_clusters() {
    let fs = Xfs::mount();
    let top = fs.path().join("top.qcow2");
    create_qcow2(&top, "64M");
    qemu_io("qcow2", &top, &["write -P 0x42 0 8M", "write -P 0x43 32M 4M", "write -c -P 0x44 50M 64k"]);
    let dest = fs.path().join("full.qcow2");
    let stats = copy_allocated(&top, None, &dest).unwrap();
    assert!(stats.cloned_bytes >= 12 * M, "plain clusters are shared, not copied: {stats:?}");
    assert!(stats.cloned_bytes < stats.data_bytes, "the compressed cluster is decompressed and written: {stats:?}");
    check(&dest);
    compare(&top, &dest);
    // Writing the source afterwards does not show in the copy (shared extents are copy-on-write).
    qemu_io("qcow2", &top, &["write -P 0x55 0 64k"]);
    let mut buf = vec![0u8; 4096];
    stagecore_qcow2::read_at(&dest, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x42));
    // Across filesystems the copy falls back to copy_file_range.
    let d = tmp();
    let other = p(&d, "elsewhere.qcow2");
    let stats = copy_allocated(&top, None, &other).unwrap();
    assert_eq!(stats.cloned_bytes, 0);
    compare(&top, &other);
}
