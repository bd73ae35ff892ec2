//! create_overlay against real qemu-img / qemu-io.

mod common;

use common::*;
use stagecore_qcow2::{Error, ImageFormat};
use stagecore_qcow2::{create_overlay, create_overlay_unsynced, info};

#[test]
fn overlay_on_qcow2_is_valid_and_reads_through() {
    let d = tmp();
    let (base, top) = (p(&d, "base.qcow2"), p(&d, "top.qcow2"));
    create_qcow2(&base, "64M");
    create_overlay(&top, &base, ImageFormat::Qcow2, None).unwrap();
    let j = info_json(&top);
    assert_eq!(j["format"], "qcow2");
    assert_eq!(j["virtual-size"], 64 * M);
    assert_eq!(j["backing-filename"], base.to_str().unwrap());
    assert_eq!(j["backing-filename-format"], "qcow2");
    assert_eq!(j["cluster-size"], 65536);
    check(&top);
    qemu_io("qcow2", &base, &["write -P 0xab 1M 64k"]);
    qemu_io("qcow2", &top, &["read -P 0xab 1M 64k", "read -P 0 0 1M"]);
    assert_eq!(names(d.path()), vec!["base.qcow2", "top.qcow2"], "no temp files left");
    let i = info(&top).unwrap();
    assert_eq!(i.format, ImageFormat::Qcow2);
    assert_eq!(i.virtual_size, 64 * M);
    assert_eq!(i.cluster_size, Some(65536));
    assert_eq!(i.backing_file.as_deref(), Some(base.as_path()));
    assert_eq!(i.backing_format, Some(ImageFormat::Qcow2));
}

#[test]
fn overlay_on_raw_with_bigger_size_and_writes() {
    let d = tmp();
    let (base, top) = (p(&d, "base.raw"), p(&d, "top.qcow2"));
    qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "8M"]);
    qemu_io("raw", &base, &["write -P 0x11 0 64k"]);
    create_overlay(&top, &base, ImageFormat::Raw, Some(16 * M)).unwrap();
    let j = info_json(&top);
    assert_eq!(j["virtual-size"], 16 * M);
    assert_eq!(j["backing-filename-format"], "raw");
    qemu_io("qcow2", &top, &["read -P 0x11 0 64k", "write -P 0x22 12M 64k", "read -P 0 8M 4M"]);
    check(&top);
    qemu_io("qcow2", &top, &["read -P 0x22 12M 64k"]);
}

#[test]
fn overlay_chain_of_three_and_large_disk() {
    let d = tmp();
    let (base, mid, top) = (p(&d, "b.qcow2"), p(&d, "m.qcow2"), p(&d, "t.qcow2"));
    create_qcow2(&base, "2T");
    create_overlay(&mid, &base, ImageFormat::Qcow2, None).unwrap();
    create_overlay(&top, &mid, ImageFormat::Qcow2, None).unwrap();
    check(&top);
    let j = info_json(&top);
    assert_eq!(j["virtual-size"], 2u64 << 40);
    qemu_io("qcow2", &mid, &["write -P 0x5a 1T 64k"]);
    qemu_io("qcow2", &top, &["read -P 0x5a 1T 64k"]);
}

#[test]
fn refuses_to_overwrite_and_bad_arguments() {
    let d = tmp();
    let (base, top) = (p(&d, "base.qcow2"), p(&d, "top.qcow2"));
    create_qcow2(&base, "1M");
    std::fs::write(&top, b"precious").unwrap();
    let e = create_overlay(&top, &base, ImageFormat::Qcow2, None).unwrap_err();
    assert!(matches!(e, Error::AlreadyExists { .. }), "{e}");
    assert_eq!(std::fs::read(&top).unwrap(), b"precious");

    let new = p(&d, "new.qcow2");
    let missing = p(&d, "missing.qcow2");
    let e = create_overlay(&new, &missing, ImageFormat::Qcow2, None).unwrap_err();
    assert!(matches!(&e, Error::NotFound { kind: "backing file", path } if path == &missing), "{e}");

    let e = create_overlay(&new, std::path::Path::new("base.qcow2"), ImageFormat::Qcow2, None).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { arg: "backing", .. }), "{e}");

    let e = create_overlay(&new, &base, ImageFormat::Qcow2, Some(1000)).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { arg: "virtual_size", .. }), "{e}");

    let raw = p(&d, "raw.img");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();
    let e = create_overlay(&new, &raw, ImageFormat::Qcow2, None).unwrap_err();
    assert!(matches!(&e, Error::NotQcow2 { path, .. } if path == &raw), "{e}");

    let e = create_overlay(&p(&d, "nodir/x.qcow2"), &base, ImageFormat::Qcow2, None).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    assert_eq!(names(d.path()), vec!["base.qcow2", "raw.img", "top.qcow2"]);
}

/// `create_empty` writes what `qemu-img create` would: a qcow2 image without a backing file
/// that `qemu-img check` accepts and QEMU reads as zeros and writes, a 0-byte qcow2, a sparse raw
/// file; an existing path or a bad size is refused and leaves nothing.
#[test]
fn empty_images_are_valid_and_never_replace_a_file() {
    use stagecore_qcow2::create_empty;
    let d = tmp();
    let img = p(&d, "empty.qcow2");
    create_empty(&img, ImageFormat::Qcow2, 64 * M).unwrap();
    let j = info_json(&img);
    assert_eq!(j["format"], "qcow2");
    assert_eq!(j["virtual-size"], 64 * M);
    assert!(j.get("backing-filename").is_none(), "{j}");
    check(&img);
    qemu_io("qcow2", &img, &["read -P 0 0 64M", "write -P 0x33 63M 64k", "read -P 0x33 63M 64k"]);
    check(&img);

    let zero = p(&d, "zero.qcow2");
    create_empty(&zero, ImageFormat::Qcow2, 0).unwrap();
    assert_eq!(info_json(&zero)["virtual-size"], 0);
    check(&zero);

    let raw = p(&d, "disk.raw");
    create_empty(&raw, ImageFormat::Raw, 8 * M).unwrap();
    let j = info_json(&raw);
    assert_eq!((j["format"].as_str(), j["virtual-size"].as_u64()), (Some("raw"), Some(8 * M)));
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 8 * M);

    let before = std::fs::read(&raw).unwrap();
    match create_empty(&raw, ImageFormat::Qcow2, M) {
        Err(Error::AlreadyExists { path }) => assert_eq!(path, raw),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    assert_eq!(std::fs::read(&raw).unwrap(), before, "an existing file is never replaced");
    match create_empty(&p(&d, "odd.qcow2"), ImageFormat::Qcow2, 1000) {
        Err(Error::InvalidArgument { arg, .. }) => assert_eq!(arg, "virtual_size"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    assert_eq!(names(d.path()), vec!["disk.raw", "empty.qcow2", "zero.qcow2"], "nothing half-built");
}

#[test]
fn an_unsynced_overlay_is_the_same_file_and_never_replaces_one() {
    let d = tmp();
    let (base, a, b) = (p(&d, "base.qcow2"), p(&d, "a.qcow2"), p(&d, "b.qcow2"));
    create_qcow2(&base, "64M");
    create_overlay(&a, &base, ImageFormat::Qcow2, None).unwrap();
    create_overlay_unsynced(&b, &base, ImageFormat::Qcow2, None).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "same bytes as the synced create");
    check(&b);
    let before = std::fs::read(&b).unwrap();
    let err = create_overlay_unsynced(&b, &a, ImageFormat::Qcow2, None).unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
    assert_eq!(std::fs::read(&b).unwrap(), before, "the existing file is untouched");
    assert_eq!(names(d.path()), vec!["a.qcow2", "b.qcow2", "base.qcow2"], "no temp files left");
}
