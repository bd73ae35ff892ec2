//! info() and chain() on valid, corrupt and non-qcow2 files.

mod common;

use common::*;
use stagecore_qcow2::{Error, ImageFormat};
use stagecore_qcow2::{chain, create_overlay, info};

/// `info(path)` fails naming the file; `not_qcow2` says which variant. The stagecore mapping is
/// `InvalidSpec { path: <file> }` for both.
fn assert_invalid(path: &std::path::Path, needle: &str) {
    let e = info(path).unwrap_err();
    match &e {
        Error::NotQcow2 { path: p, what } | Error::Corrupt { path: p, what } => {
            assert_eq!(p, path);
            assert!(what.contains(needle) || e.to_string().contains(needle), "`{e}` lacks `{needle}`");
        }
        other => panic!("expected NotQcow2/Corrupt for {}, got {other:?}", path.display()),
    }
    match e.into_core("qemu") {
        stagecore::Error::InvalidSpec { path: p, reason } => {
            assert_eq!(p, path.display().to_string());
            assert!(reason.contains(needle), "reason `{reason}` lacks `{needle}`");
        }
        other => panic!("expected InvalidSpec for {}, got {other:?}", path.display()),
    }
}

#[test]
fn corrupt_and_foreign_files_are_invalid_spec_naming_the_file() {
    let d = tmp();
    let good = p(&d, "good.qcow2");
    create_qcow2(&good, "64M");
    let bytes = std::fs::read(&good).unwrap();

    let short = p(&d, "short.qcow2");
    std::fs::write(&short, &bytes[..40]).unwrap();
    assert_invalid(&short, "72");

    let cut = p(&d, "cut.qcow2");
    std::fs::write(&cut, &bytes[..4096]).unwrap();
    assert_invalid(&cut, "truncated");

    let garbage = p(&d, "garbage.bin");
    std::fs::write(&garbage, (0..70000u32).map(|i| (i * 7919 % 251) as u8).collect::<Vec<_>>()).unwrap();
    assert_invalid(&garbage, "not a qcow2");

    let raw = p(&d, "disk.raw");
    qemu_img(&["create", "-q", "-f", "raw", raw.to_str().unwrap(), "1M"]);
    assert_invalid(&raw, "not a qcow2");

    let mut bad_version = bytes.clone();
    bad_version[7] = 9;
    let bv = p(&d, "v9.qcow2");
    std::fs::write(&bv, bad_version).unwrap();
    assert_invalid(&bv, "version 9");

    let mut bad_cluster = bytes.clone();
    bad_cluster[23] = 30;
    let bc = p(&d, "cb.qcow2");
    std::fs::write(&bc, bad_cluster).unwrap();
    assert_invalid(&bc, "cluster_bits");

    let e = info(&p(&d, "nope.qcow2")).unwrap_err();
    assert!(matches!(&e, Error::NotFound { path, .. } if path.ends_with("nope.qcow2")), "{e}");
}

#[test]
fn info_matches_qemu_img_for_qemu_made_images() {
    let d = tmp();
    let (base, top) = (p(&d, "base.qcow2"), p(&d, "top.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base.to_str().unwrap(), "10M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", top.to_str().unwrap()]);
    let i = info(&top).unwrap();
    let j = info_json(&top);
    assert_eq!(i.virtual_size, j["virtual-size"].as_u64().unwrap());
    assert_eq!(i.cluster_size, j["cluster-size"].as_u64());
    // A relative backing name is resolved against the image's directory, as qemu does.
    assert_eq!(i.backing_file.as_deref(), Some(base.as_path()));
    let c = chain(&top).unwrap();
    assert_eq!(c.len(), 2);
    assert_eq!(c[1].path, base);
    assert_eq!(c[1].cluster_size, Some(4096));
    assert_eq!(c[1].backing_file, None);
}

#[test]
fn chain_walks_to_raw_base() {
    let d = tmp();
    let (raw, mid, top) = (p(&d, "base.raw"), p(&d, "mid.qcow2"), p(&d, "top.qcow2"));
    qemu_img(&["create", "-q", "-f", "raw", raw.to_str().unwrap(), "4M"]);
    create_overlay(&mid, &raw, ImageFormat::Raw, None).unwrap();
    create_overlay(&top, &mid, ImageFormat::Qcow2, None).unwrap();
    let c = chain(&top).unwrap();
    let formats: Vec<_> = c.iter().map(|i| i.format).collect();
    assert_eq!(formats, vec![ImageFormat::Qcow2, ImageFormat::Qcow2, ImageFormat::Raw]);
    assert_eq!(c[2].virtual_size, 4 * M);
    assert_eq!(c[2].cluster_size, None);
}

#[test]
fn missing_backing_is_not_found_naming_it_and_loops_are_detected() {
    let d = tmp();
    let (base, top) = (p(&d, "base.qcow2"), p(&d, "top.qcow2"));
    create_qcow2(&base, "1M");
    create_overlay(&top, &base, ImageFormat::Qcow2, None).unwrap();
    std::fs::remove_file(&base).unwrap();
    let e = chain(&top).unwrap_err();
    assert!(matches!(&e, Error::NotFound { kind: "backing file", path } if path == &base), "{e}");
    let core = e.into_core("qemu");
    assert!(
        matches!(&core, stagecore::Error::NotFound { kind: "backing file", name, .. } if name.contains("base.qcow2"))
    );

    let (a, b) = (p(&d, "a.qcow2"), p(&d, "b.qcow2"));
    create_qcow2(&a, "1M");
    create_overlay(&b, &a, ImageFormat::Qcow2, None).unwrap();
    qemu_img(&["rebase", "-u", "-F", "qcow2", "-b", b.to_str().unwrap(), a.to_str().unwrap()]);
    let e = chain(&b).unwrap_err();
    assert!(matches!(&e, Error::Corrupt { what, .. } if what.contains("loop")), "{e}");
}
