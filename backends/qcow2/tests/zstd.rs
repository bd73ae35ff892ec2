//! zstd-compressed clusters (`compression_type=zstd`) made by `qemu-img convert -c`, read byte
//! for byte like `qemu-img convert -O raw` reads them.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use sha2::{Digest, Sha256};
use stagecore_qcow2::{Error, Feature, ImageFormat};
use stagecore_qcow2::{allocated_extents, copy_allocated, create_overlay, digest, read_at};

/// A raw disk of `size` bytes mixing compressible text, pseudo-random (incompressible) runs,
/// zeros and short patterns, so the converted image holds compressed, plain and absent clusters.
fn source_raw(path: &Path, size: usize) {
    let mut v = vec![0u8; size];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for (i, chunk) in v.chunks_mut(48 * 1024).enumerate() {
        match i % 5 {
            0 => {
                let text = format!("cluster {i}: the quick brown fox jumps over the lazy dog. ");
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = text.as_bytes()[j % text.len()];
                }
            }
            1 => {
                for b in chunk.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
            2 => {} // zeros
            3 => {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = (j / 512) as u8 ^ i as u8;
                }
            }
            _ => {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = if j % 4096 < 100 { 0xa5 } else { 0 };
                }
            }
        }
    }
    std::fs::write(path, v).unwrap();
}

fn convert_zstd(src: &Path, dst: &Path, opts: &str) {
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        &format!("compression_type=zstd,{opts}"),
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ]);
    let j = info_json(dst);
    assert_eq!(j["format-specific"]["data"]["compression-type"], "zstd", "{j}");
}

fn qemu_raw(img: &Path, d: &tempfile::TempDir, name: &str) -> Vec<u8> {
    let out = p(d, name);
    qemu_img(&["convert", "-O", "raw", img.to_str().unwrap(), out.to_str().unwrap()]);
    std::fs::read(out).unwrap()
}

fn read_all(img: &Path, size: usize) -> Vec<u8> {
    let mut buf = vec![0u8; size];
    // Odd-sized reads across cluster boundaries.
    let mut off = 0;
    while off < size {
        let n = 1_000_003.min(size - off);
        read_at(img, off as u64, &mut buf[off..off + n]).unwrap();
        off += n;
    }
    buf
}

fn compressed_clusters(img: &Path) -> usize {
    // qemu-img map reports compressed clusters without an "offset".
    let out = qemu_img(&["map", "--output=json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().unwrap().iter().filter(|e| e["data"] == true && e.get("offset").is_none()).count()
}

fn case(opts: &str) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let d = tmp();
    let (raw, img) = (p(&d, "src.raw"), p(&d, "z.qcow2"));
    source_raw(&raw, 6 * M as usize + 12345 * 512);
    convert_zstd(&raw, &img, opts);
    assert!(compressed_clusters(&img) > 0, "the image must hold compressed clusters");
    let want = qemu_raw(&img, &d, "flat.raw");
    assert_eq!(want, std::fs::read(&raw).unwrap(), "qemu itself round-trips");
    (d, img, want)
}

#[test]
fn zstd_clusters_read_like_qemu_img_convert() {
    for opts in ["cluster_size=65536", "cluster_size=4096", "cluster_size=2M", "cluster_size=65536,extended_l2=on"] {
        let (_d, img, want) = case(opts);
        let got = read_all(&img, want.len());
        assert!(got == want, "{opts}: read_at differs from qemu-img convert -O raw");
        let sha: [u8; 32] = Sha256::digest(&want).into();
        assert_eq!(digest(&img).unwrap(), sha, "{opts}");
        assert_eq!(allocated_extents(&img).unwrap(), qemu_map(&img, 1), "{opts}");
    }
}

#[test]
fn zstd_layer_below_an_overlay_and_in_a_full_copy() {
    let (d, img, want) = case("cluster_size=65536");
    let top = p(&d, "top.qcow2");
    create_overlay(&top, &img, ImageFormat::Qcow2, None).unwrap();
    qemu_io("qcow2", &top, &["write -P 0x77 100k 3000"]);
    let mut expect = want.clone();
    expect[100 * 1024..100 * 1024 + 3000].fill(0x77);
    assert!(read_all(&top, want.len()) == expect);
    assert_eq!(qemu_raw(&top, &d, "top.raw"), expect);

    let full = p(&d, "full.qcow2");
    copy_allocated(&top, None, &full).unwrap();
    check(&full);
    qemu_img(&["compare", "-q", top.to_str().unwrap(), full.to_str().unwrap()]);
}

#[test]
fn unknown_compression_type_is_an_unsupported_feature_naming_the_file() {
    let (d, img, _) = case("cluster_size=65536");
    let mut bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes[104], 1, "compression_type byte of a zstd image");
    bytes[104] = 7;
    let bad = p(&d, "bad.qcow2");
    std::fs::write(&bad, bytes).unwrap();
    // Metadata still reads (allocation maps need no decompression) ...
    assert_eq!(allocated_extents(&bad).unwrap(), allocated_extents(&img).unwrap());
    // ... data of a compressed cluster does not.
    let e = digest(&bad).unwrap_err();
    assert!(
        matches!(&e, Error::UnsupportedFeature { path, feature: Feature::CompressionType(7) } if path == &bad),
        "{e}"
    );
    assert!(e.is_not_checked());
    let core = e.into_core("qemu");
    assert!(matches!(core, stagecore::Error::NotSupported { backend: "qemu", .. }), "{core}");
}

#[test]
fn damaged_zstd_cluster_is_corrupt_not_garbage() {
    let (d, img, _) = case("cluster_size=65536");
    // Find one compressed cluster through our own reader's view: corrupt the file region of the
    // first compressed cluster qemu reports (qemu-img map gives no offset; use the L2 entry).
    let bytes = std::fs::read(&img).unwrap();
    let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let l1_off = be64(40) as usize;
    let l2_off = (be64(l1_off) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = (0..8192).map(|i| be64(l2_off + 8 * i)).find(|e| e & (1 << 62) != 0).expect("a compressed entry");
    let host = (entry & ((1u64 << 54) - 1)) as usize; // 64 KiB clusters: x = 62 - (16 - 8) = 54
    let mut bad = bytes.clone();
    bad[host..host + 4].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]); // break the zstd magic
    let badp = p(&d, "damaged.qcow2");
    std::fs::write(&badp, bad).unwrap();
    let e = digest(&badp).unwrap_err();
    assert!(matches!(&e, Error::Corrupt { path, what } if path == &badp && what.contains("zstd")), "{e}");
}

#[test]
fn write_at_into_a_zstd_image_copies_on_write_from_compressed_clusters() {
    let (d, img, want) = case("cluster_size=65536");
    // Offset 0 lies in a compressible text run: a compressed cluster; a partial write must
    // decompress it (zstd) for the untouched bytes.
    let out = qemu_img(&["map", "--output=json", img.to_str().unwrap()]);
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let first = &map[0];
    assert!(first["start"] == 0 && first["data"] == true && first.get("offset").is_none(), "{first}");
    stagecore_qcow2::write_at(&img, 1000, &[0xee; 300]).unwrap();
    let mut expect = want.clone();
    expect[1000..1300].fill(0xee);
    assert!(read_all(&img, want.len()) == expect);
    assert_eq!(qemu_raw(&img, &d, "after.raw"), expect, "qemu reads what we wrote");
}
