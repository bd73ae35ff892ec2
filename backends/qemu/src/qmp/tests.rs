//! Wire-shape unit tests of the typed QMP messages (the real-QEMU tests are in tests/qmp.rs).

use serde_json::json;

use super::*;

#[test]
fn snapshot_action_serializes_to_the_7_2_schema() {
    let action = TransactionAction::BlockdevSnapshotSync(BlockdevSnapshotSync::qcow2_on_node(
        "disk0-fmt",
        "/s/o.qcow2",
        "disk0-snap1",
        NewImageMode::AbsolutePaths,
    ));
    assert_eq!(
        serde_json::to_value(&action).unwrap(),
        json!({"type": "blockdev-snapshot-sync", "data": {
            "node-name": "disk0-fmt", "snapshot-file": "/s/o.qcow2", "snapshot-node-name": "disk0-snap1",
            "format": "qcow2", "mode": "absolute-paths"}})
    );
    let bitmap = BlockDirtyBitmapAdd { node: "n".into(), name: "b".into(), granularity: None, persistent: true };
    assert_eq!(
        serde_json::to_value(TransactionAction::BlockDirtyBitmapAdd(bitmap)).unwrap(),
        json!({"type": "block-dirty-bitmap-add", "data": {"node": "n", "name": "b", "persistent": true}})
    );
}

#[test]
fn replies_parse_leniently_and_name_devices() {
    let info: BlockInfo = serde_json::from_value(json!({
        "device": "", "qdev": "/machine/peripheral/disk0/virtio-backend", "locked": false,
        "inserted": {"node-name": "disk0-fmt", "file": "/a.qcow2", "ro": false, "drv": "qcow2",
                     "backing_file": "/b.qcow2", "backing_file_depth": 1, "new-member": 1}
    }))
    .unwrap();
    assert_eq!(info.device_id(), Some("disk0"));
    let inserted = info.inserted.unwrap();
    assert_eq!((inserted.backing_file.as_deref(), inserted.backing_file_depth), (Some("/b.qcow2"), 1));
    let status: StatusInfo = serde_json::from_value(json!({"running": false, "status": "colo"})).unwrap();
    assert_eq!(status.status, RunState::Other);
}

#[test]
fn error_classes_round_trip() {
    for name in ["GenericError", "CommandNotFound", "DeviceNotActive", "DeviceNotFound", "KVMMissingCap", "New"] {
        assert_eq!(ErrorClass::from_name(name).as_str(), name);
    }
    let err = crate::error::command(QmpCommandError {
        command: "x".into(),
        class: ErrorClass::DeviceNotFound,
        desc: "no such node".into(),
    });
    assert_eq!(command_error(&err).unwrap().class, ErrorClass::DeviceNotFound);
    assert!(err.to_string().contains("DeviceNotFound: no such node"), "{err}");
    assert!(command_error(&stagecore::Error::Precondition("p".into())).is_none());
}
