//! Extended L2 entries (`extended_l2=on`, subclusters of 1/32 cluster): allocation maps against
//! `qemu-img map --output=json`, reads against `qemu-img convert -O raw`, writes refused by name.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use sha2::{Digest, Sha256};
use stagecore_qcow2::{Error, Feature, ImageFormat};
use stagecore_qcow2::{allocated_extents, changed_since, copy_allocated, create_overlay, digest, read_at, write_at};

fn create_ext(path: &Path, cluster: &str, size: &str, backing: Option<&Path>) {
    let opts = format!("extended_l2=on,cluster_size={cluster}");
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
    let b;
    if let Some(back) = backing {
        b = back.to_str().unwrap().to_string();
        args.extend(["-F", "qcow2", "-b", &b]);
    }
    args.extend([path.to_str().unwrap(), size]);
    qemu_img(&args);
    assert_eq!(info_json(path)["format-specific"]["data"]["extended-l2"], true);
}

fn qemu_raw(img: &Path, d: &tempfile::TempDir) -> Vec<u8> {
    let out = p(d, "flat.raw");
    let _ = std::fs::remove_file(&out);
    qemu_img(&["convert", "-O", "raw", img.to_str().unwrap(), out.to_str().unwrap()]);
    std::fs::read(out).unwrap()
}

/// Every byte through `read_at`, in reads that start and end inside subclusters (odd length).
fn read_all(img: &Path, size: usize) -> Vec<u8> {
    let mut buf = vec![0u8; size];
    let mut off = 0;
    while off < size {
        let n = 262_147.min(size - off);
        read_at(img, off as u64, &mut buf[off..off + n]).unwrap();
        off += n;
    }
    buf
}

/// base (standard L2, patterned everywhere) ← top (extended L2, sub-cluster writes).
fn chain(d: &tempfile::TempDir, cluster: u64) -> (PathBuf, PathBuf) {
    let (base, top) = (p(d, "base.qcow2"), p(d, "top.qcow2"));
    let size = (8 * cluster).to_string();
    create_qcow2(&base, &size);
    qemu_io("qcow2", &base, &[&format!("write -P 0x01 0 {size}")]);
    create_ext(&top, &cluster.to_string(), &size, Some(&base));
    let sc = cluster / 32;
    let cmds = [
        format!("write -P 0xab {} {}", sc, sc),                     // exactly subcluster 1
        format!("write -P 0xac {} {}", 3 * sc + 5, 2 * sc - 10),    // unaligned, two subclusters touched
        format!("write -P 0xad {} {}", cluster + 31 * sc, 2 * sc),  // spans a cluster boundary
        format!("write -z {} {}", 2 * cluster + 4 * sc, 3 * sc),    // zero subclusters hide the base
        format!("write -P 0xae {} {}", 3 * cluster, cluster),       // a whole cluster
        format!("write -z {} {}", 5 * cluster, cluster),            // a whole zero cluster
        format!("write -P 0xaf {} 512", 6 * cluster + 17 * sc + 3), // tiny, unaligned
    ];
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io("qcow2", &top, &cmds);
    (base, top)
}

#[test]
fn subcluster_allocation_matches_qemu_img_map() {
    for cluster in [16 * K, 64 * K, 2 * M] {
        let d = tmp();
        let (base, top) = chain(&d, cluster);
        let got = allocated_extents(&top).unwrap();
        assert_eq!(got, qemu_map(&top, 1), "cluster {cluster}");
        assert_eq!(changed_since(&top, &base).unwrap(), got, "cluster {cluster}");
        // Subcluster granularity, not cluster granularity: the first write is one subcluster.
        let sc = cluster / 32;
        assert_eq!(got[0], ext(sc, sc), "cluster {cluster}");
    }
}

#[test]
fn subcluster_reads_match_qemu_img_convert() {
    for cluster in [16 * K, 64 * K, 2 * M] {
        let d = tmp();
        let (_, top) = chain(&d, cluster);
        let want = qemu_raw(&top, &d);
        let got = read_all(&top, want.len());
        assert!(got == want, "cluster {cluster}: read_at differs from qemu-img convert -O raw");
        let sha: [u8; 32] = Sha256::digest(&want).into();
        assert_eq!(digest(&top).unwrap(), sha, "cluster {cluster}");
        // Spot checks of the semantics, independent of qemu-img convert.
        let sc = cluster as usize / 32;
        assert!(got[..sc].iter().all(|&b| b == 1), "unallocated subcluster reads the base");
        assert!(got[sc..2 * sc].iter().all(|&b| b == 0xab));
        assert!(got[2 * cluster as usize + 4 * sc..2 * cluster as usize + 7 * sc].iter().all(|&b| b == 0));
    }
}

#[test]
fn extended_l2_base_without_backing_and_full_copy() {
    let d = tmp();
    let img = p(&d, "solo.qcow2");
    create_ext(&img, "64k", "8M", None);
    qemu_io("qcow2", &img, &["write -P 0x42 1000 3000", "write -P 0x43 70000 100000", "write -z 5M 10k"]);
    assert_eq!(allocated_extents(&img).unwrap(), qemu_map(&img, 1));
    let want = qemu_raw(&img, &d);
    assert!(read_all(&img, want.len()) == want);

    // An overlay over the extended-L2 layer, and full copies of both (the copy uses standard L2).
    let top = p(&d, "top.qcow2");
    create_overlay(&top, &img, ImageFormat::Qcow2, None).unwrap();
    qemu_io("qcow2", &top, &["write -P 0x44 2000 10"]);
    let full = p(&d, "full.qcow2");
    copy_allocated(&top, None, &full).unwrap();
    check(&full);
    qemu_img(&["compare", "-q", top.to_str().unwrap(), full.to_str().unwrap()]);
    let above = p(&d, "above.qcow2");
    copy_allocated(&top, Some(&img), &above).unwrap();
    qemu_img(&["compare", "-q", top.to_str().unwrap(), above.to_str().unwrap()]);
}

#[test]
fn writing_into_extended_l2_is_refused_by_name() {
    let d = tmp();
    let (_, top) = chain(&d, 64 * K);
    let before = std::fs::read(&top).unwrap();
    let e = write_at(&top, 0, &[1, 2, 3]).unwrap_err();
    assert!(matches!(&e, Error::UnsupportedFeature { path, feature: Feature::ExtendedL2Write } if path == &top), "{e}");
    assert!(e.to_string().contains("extended L2"), "{e}");
    let core = e.into_core("qemu");
    assert!(
        matches!(core, stagecore::Error::NotSupported { backend: "qemu", operation } if operation.contains("extended L2")),
    );
    assert_eq!(std::fs::read(&top).unwrap(), before, "nothing written");
}

#[test]
fn inconsistent_subcluster_bitmap_is_corrupt() {
    let d = tmp();
    let img = p(&d, "e.qcow2");
    create_ext(&img, "64k", "1M", None);
    qemu_io("qcow2", &img, &["write -P 0x42 0 2k"]);
    let mut bytes = std::fs::read(&img).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1_off = be64(&bytes, 40) as usize;
    let l2_off = (be64(&bytes, l1_off) & 0x00ff_ffff_ffff_fe00) as usize;
    let bitmap = be64(&bytes, l2_off + 8);
    assert_eq!(bitmap & 1, 1, "subcluster 0 allocated");
    // Mark subcluster 0 zero as well as allocated: invalid per the qcow2 spec.
    bytes[l2_off + 8..l2_off + 16].copy_from_slice(&(bitmap | 1 << 32).to_be_bytes());
    std::fs::write(&img, bytes).unwrap();
    let e = allocated_extents(&img).unwrap_err();
    assert!(matches!(&e, Error::Corrupt { path, what } if path == &img && what.contains("subcluster")), "{e}");
    let mut buf = [0u8; 16];
    assert!(matches!(read_at(&img, 0, &mut buf), Err(Error::Corrupt { .. })));
}
