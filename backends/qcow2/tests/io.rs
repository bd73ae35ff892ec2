//! read_at / write_at / digest against qemu-io and qemu-img convert.

mod common;

use common::*;
use sha2::{Digest, Sha256};
use stagecore_qcow2::{Error, ImageFormat};
use stagecore_qcow2::{create_overlay, digest, read_at, write_at};

fn qemu_digest(top: &std::path::Path, d: &tempfile::TempDir) -> [u8; 32] {
    let out = p(d, "flat.raw");
    let _ = std::fs::remove_file(&out);
    qemu_img(&["convert", "-O", "raw", top.to_str().unwrap(), out.to_str().unwrap()]);
    Sha256::digest(std::fs::read(&out).unwrap()).into()
}

#[test]
fn reads_through_raw_and_qcow2_layers_with_zero_and_compressed_clusters() {
    let d = tmp();
    let (raw, mid, top) = (p(&d, "base.raw"), p(&d, "mid.qcow2"), p(&d, "top.qcow2"));
    qemu_img(&["create", "-q", "-f", "raw", raw.to_str().unwrap(), "6M"]);
    qemu_io("raw", &raw, &["write -P 0x01 0 6M"]);
    create_overlay(&mid, &raw, ImageFormat::Raw, Some(8 * M)).unwrap();
    qemu_io("qcow2", &mid, &["write -c -P 0x02 1M 64k", "write -P 0x03 7M 64k"]);
    create_overlay(&top, &mid, ImageFormat::Qcow2, None).unwrap();
    qemu_io("qcow2", &top, &["write -z 2M 64k", "write -P 0x04 3M 1000"]);

    let mut buf = vec![0u8; 64 * K as usize];
    read_at(&top, M, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 2), "compressed cluster of mid");
    read_at(&top, 2 * M, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "zero cluster hides base");
    read_at(&top, 3 * M, &mut buf).unwrap();
    assert!(buf[..1000].iter().all(|&b| b == 4) && buf[1000..].iter().all(|&b| b == 1));
    read_at(&top, 6 * M + 4096, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "beyond the raw base reads zeros");
    let e = read_at(&top, 8 * M - 10, &mut buf).unwrap_err();
    assert!(matches!(&e, Error::InvalidArgument { arg: "offset", path, .. } if path == &top), "{e}");

    assert_eq!(digest(&top).unwrap(), qemu_digest(&top, &d));
}

#[test]
fn write_at_allocates_in_top_only_and_qemu_reads_it() {
    let d = tmp();
    let (base, top) = (p(&d, "base.qcow2"), p(&d, "top.qcow2"));
    create_qcow2(&base, "3G");
    qemu_io("qcow2", &base, &["write -P 0x11 0 256k"]);
    let before = std::fs::read(&base).unwrap();
    create_overlay(&top, &base, ImageFormat::Qcow2, None).unwrap();

    write_at(&top, 1000, &[0xee; 5000]).unwrap(); // partial cluster: COW from base
    write_at(&top, 2 * 1024 * M + 65000, &vec![0x22; 200_000]).unwrap(); // new L2 table, 5 clusters
    write_at(&top, 1000, &[0xef; 10]).unwrap(); // in-place in an allocated cluster
    check(&top);
    qemu_io(
        "qcow2",
        &top,
        &[
            "read -P 0x11 0 1000",
            "read -P 0xef 1000 10",
            "read -P 0xee 1010 4990",
            "read -P 0x11 6000 250k",
            "read -P 0x22 2147548648 200000",
        ],
    );
    assert_eq!(std::fs::read(&base).unwrap(), before, "base untouched");
    let mut buf = [0u8; 16];
    read_at(&top, 995, &mut buf).unwrap();
    assert_eq!(&buf[..5], &[0x11; 5]);
    assert_eq!(&buf[5..15], &[0xef; 10]);
    let e = write_at(&top, 3 * 1024 * M - 1, &[1, 2]).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { arg: "offset", .. }), "{e}");
    assert!(matches!(e.into_core("qemu"), stagecore::Error::InvalidSpec { path, .. } if path == "offset"));
}

#[test]
fn write_at_grows_refcounts_past_one_block() {
    // 512-byte clusters: one refcount block covers only 256 clusters, so this needs new blocks.
    let d = tmp();
    let img = p(&d, "small.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img.to_str().unwrap(), "1M"]);
    let data: Vec<u8> = (0..300 * 1024u32).map(|i| (i % 253) as u8).collect();
    write_at(&img, 4096, &data).unwrap();
    check(&img);
    let mut back = vec![0u8; data.len()];
    read_at(&img, 4096, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(digest(&img).unwrap(), qemu_digest(&img, &d));
}

#[test]
fn digest_changes_with_content_only() {
    let d = tmp();
    let (base, t1, t2) = (p(&d, "base.qcow2"), p(&d, "t1.qcow2"), p(&d, "t2.qcow2"));
    create_qcow2(&base, "4M");
    qemu_io("qcow2", &base, &["write -P 0x33 64k 64k"]);
    create_overlay(&t1, &base, ImageFormat::Qcow2, None).unwrap();
    create_overlay(&t2, &base, ImageFormat::Qcow2, None).unwrap();
    assert_eq!(digest(&t1).unwrap(), digest(&base).unwrap());
    write_at(&t2, 64 * K, &[0x33; 4096]).unwrap(); // same bytes: same digest
    assert_eq!(digest(&t2).unwrap(), digest(&t1).unwrap());
    write_at(&t2, 0, &[1]).unwrap();
    assert_ne!(digest(&t2).unwrap(), digest(&t1).unwrap());
    assert_eq!(digest(&t2).unwrap(), qemu_digest(&t2, &d));
}
