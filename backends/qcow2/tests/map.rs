//! allocated_extents / changed_since against `qemu-img map`.

mod common;

use common::*;
use stagecore_qcow2::{Error, ImageFormat};
use stagecore_qcow2::{allocated_extents, changed_since, create_overlay, info, info_and_changed_since};

/// base ← mid ← top, each with its own writes (data, unaligned, zero, compressed).
fn three_layers(d: &tempfile::TempDir) -> [std::path::PathBuf; 3] {
    let (base, mid, top) = (p(d, "base.qcow2"), p(d, "mid.qcow2"), p(d, "top.qcow2"));
    create_qcow2(&base, "64M");
    qemu_io("qcow2", &base, &["write -P 0x01 0 8M"]);
    create_overlay(&mid, &base, ImageFormat::Qcow2, None).unwrap();
    qemu_io("qcow2", &mid, &["write -P 0xab 1M 64k", "write -P 0x02 40M 100k"]);
    create_overlay(&top, &mid, ImageFormat::Qcow2, None).unwrap();
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0xcd 1M 64k",
            "write -P 0x03 10M 300k",
            "write -z 20M 128k",
            "write -c -P 0x04 30M 64k",
            "write -P 0x05 63M 1M",
        ],
    );
    [base, mid, top]
}

#[test]
fn top_layer_allocation_matches_qemu_img_map() {
    let d = tmp();
    let [_, mid, top] = three_layers(&d);
    let got = allocated_extents(&top).unwrap();
    assert_eq!(got, qemu_map(&top, 1));
    assert_eq!(
        got,
        vec![ext(M, 64 * K), ext(10 * M, 320 * K), ext(20 * M, 128 * K), ext(30 * M, 64 * K), ext(63 * M, M)]
    );
    assert_eq!(allocated_extents(&mid).unwrap(), qemu_map(&mid, 1));
}

#[test]
fn changed_since_is_the_union_above_base() {
    let d = tmp();
    let [base, mid, top] = three_layers(&d);
    assert_eq!(changed_since(&top, &base).unwrap(), qemu_map(&top, 2));
    assert_eq!(changed_since(&top, &mid).unwrap(), qemu_map(&top, 1));
    assert!(changed_since(&top, &top).unwrap().is_empty());
    // Any path to the base file works (identity, not spelling).
    let link = p(&d, "link-to-base");
    std::os::unix::fs::symlink(&base, &link).unwrap();
    assert_eq!(changed_since(&top, &link).unwrap(), qemu_map(&top, 2));
}

#[test]
fn info_and_changed_since_answer_both_from_one_open() {
    let d = tmp();
    let [base, mid, top] = three_layers(&d);
    for b in [&base, &mid, &top] {
        let (i, changes) = info_and_changed_since(&top, b).unwrap();
        assert_eq!(i, info(&top).unwrap());
        assert_eq!(changes.unwrap(), changed_since(&top, b).unwrap());
    }
    let other = p(&d, "other.qcow2");
    create_qcow2(&other, "64M");
    let (i, changes) = info_and_changed_since(&top, &other).unwrap();
    assert_eq!(i.virtual_size, 64 * M, "the top is described even when the base is not in its chain");
    assert!(matches!(changes, Err(Error::BaseNotInChain { .. })), "{changes:?}");
    let garbage = p(&d, "garbage.qcow2");
    std::fs::write(&garbage, b"not an image").unwrap();
    assert!(matches!(info_and_changed_since(&garbage, &base), Err(Error::NotQcow2 { .. })));
}

#[test]
fn changed_since_rejects_a_base_outside_the_chain() {
    let d = tmp();
    let [_, _, top] = three_layers(&d);
    let other = p(&d, "other.qcow2");
    create_qcow2(&other, "64M");
    let e = changed_since(&top, &other).unwrap_err();
    assert!(matches!(&e, Error::BaseNotInChain { base, top: t } if base == &other && t == &top), "{e}");
    assert!(e.is_not_checked());
    // The stagecore mapping the backends have matched on so far.
    let core = e.into_core("qemu");
    assert!(
        matches!(&core, stagecore::Error::InvalidSpec { path, reason } if path == "base" && reason.contains("not in the backing chain")),
        "{core}"
    );
    let e = changed_since(&top, &p(&d, "missing")).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
}

#[test]
fn fresh_overlay_has_no_changes_and_small_clusters_work() {
    let d = tmp();
    let (base, top) = (p(&d, "base.qcow2"), p(&d, "top.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", base.to_str().unwrap(), "4M"]);
    qemu_io("qcow2", &base, &["write -P 7 1000 3000", "write -z 2M 512"]);
    assert_eq!(allocated_extents(&base).unwrap(), qemu_map(&base, 1));
    create_overlay(&top, &base, ImageFormat::Qcow2, None).unwrap();
    assert!(allocated_extents(&top).unwrap().is_empty());
    assert!(changed_since(&top, &base).unwrap().is_empty());
}
