//! Typed QMP messages for the subset of the QEMU 7.2 schema the backend uses.
//!
//! Reply types deserialize leniently (unknown fields ignored, optional ones defaulted) so newer
//! QEMU versions still parse; argument types serialize exactly to the 7.2 schema's member names.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// QEMU's version, from the QMP greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct QemuVersion {
    /// Major version, e.g. 7.
    pub major: u32,
    /// Minor version, e.g. 2.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// An asynchronous QMP event such as `STOP`, `RESUME`, `SHUTDOWN`, `BLOCK_JOB_COMPLETED`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QmpEvent {
    /// The event name.
    pub event: String,
    /// The event's data (`Value::Null` when absent).
    #[serde(default)]
    pub data: Value,
    /// When QEMU emitted it.
    #[serde(default)]
    pub timestamp: Option<EventTimestamp>,
}

/// An event's timestamp (seconds and microseconds since the Unix epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct EventTimestamp {
    /// Seconds.
    pub seconds: i64,
    /// Microseconds.
    pub microseconds: i64,
}

/// The class of a QMP error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorClass {
    /// Most errors.
    GenericError,
    /// The command does not exist.
    CommandNotFound,
    /// A device has no medium.
    DeviceNotActive,
    /// A device (or node) was not found.
    DeviceNotFound,
    /// KVM lacks a capability.
    KvmMissingCap,
    /// A class this client does not know.
    Other(String),
}

impl ErrorClass {
    /// Parses the wire name.
    pub fn from_name(name: &str) -> Self {
        match name {
            "GenericError" => ErrorClass::GenericError,
            "CommandNotFound" => ErrorClass::CommandNotFound,
            "DeviceNotActive" => ErrorClass::DeviceNotActive,
            "DeviceNotFound" => ErrorClass::DeviceNotFound,
            "KVMMissingCap" => ErrorClass::KvmMissingCap,
            other => ErrorClass::Other(other.to_string()),
        }
    }

    /// The wire name.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KvmMissingCap => "KVMMissingCap",
            ErrorClass::Other(s) => s,
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// QEMU refused a command: `{"error": {"class", "desc"}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("QMP command `{command}` failed: {class}: {desc}")]
pub struct QmpCommandError {
    /// The command that failed.
    pub command: String,
    /// The error class.
    pub class: ErrorClass,
    /// QEMU's human-readable description.
    pub desc: String,
}

/// The VM run state (`query-status`'s `status`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Running.
    Running,
    /// Paused by `stop`.
    Paused,
    /// Not started yet (`-S`).
    Prelaunch,
    /// Shut down (with `-no-shutdown`).
    Shutdown,
    /// Paused on an I/O error.
    IoError,
    /// Internal error.
    InternalError,
    /// Guest panicked.
    GuestPanicked,
    /// Suspended (S3).
    Suspended,
    /// Incoming migration pending.
    Inmigrate,
    /// After outgoing migration.
    Postmigrate,
    /// Any other state (debug, save-vm, restore-vm, watchdog, colo, ...).
    #[serde(other)]
    Other,
}

/// `query-status`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// Whether vCPUs are running.
    pub running: bool,
    /// The run state.
    pub status: RunState,
}

/// One entry of `query-block`: a block device and its inserted medium.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BlockInfo {
    /// The BlockBackend name (empty for `-blockdev` + `-device`).
    #[serde(default)]
    pub device: String,
    /// The qdev id or QOM path of the device.
    #[serde(default)]
    pub qdev: Option<String>,
    /// The inserted medium: the active (top) node.
    #[serde(default)]
    pub inserted: Option<BlockDeviceInfo>,
}

impl BlockInfo {
    /// The `-device` id, from a qdev QOM path like `/machine/peripheral/disk0/virtio-backend`
    /// (or `qdev` itself when it is a plain id).
    pub fn device_id(&self) -> Option<&str> {
        let qdev = self.qdev.as_deref()?;
        match qdev.strip_prefix("/machine/peripheral/") {
            Some(rest) => rest.split('/').next(),
            None => Some(qdev),
        }
    }
}

/// A block node (`query-named-block-nodes`, or `query-block`'s `inserted`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockDeviceInfo {
    /// The node name.
    #[serde(default)]
    pub node_name: Option<String>,
    /// The image file name (or a JSON description).
    pub file: String,
    /// Read-only.
    pub ro: bool,
    /// The driver (`qcow2`, `file`, ...).
    pub drv: String,
    /// The backing file name, if any.
    #[serde(default, rename = "backing_file")]
    pub backing_file: Option<String>,
    /// Depth of the backing chain below this node.
    #[serde(default, rename = "backing_file_depth")]
    pub backing_file_depth: u64,
    /// Image details, including the backing chain.
    #[serde(default)]
    pub image: Option<ImageInfo>,
    /// Dirty bitmaps on this node.
    #[serde(default)]
    pub dirty_bitmaps: Vec<DirtyBitmapInfo>,
}

/// Image details (a chain through `backing_image`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// The file name.
    pub filename: String,
    /// The format.
    pub format: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// The backing file name as recorded in the image.
    #[serde(default)]
    pub backing_filename: Option<String>,
    /// The backing image.
    #[serde(default)]
    pub backing_image: Option<Box<ImageInfo>>,
}

/// A dirty bitmap on a node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DirtyBitmapInfo {
    /// The bitmap's name.
    #[serde(default)]
    pub name: Option<String>,
    /// Dirty bytes.
    pub count: u64,
    /// Granularity in bytes.
    pub granularity: u64,
    /// Whether it is stored in the qcow2 image on close.
    #[serde(default)]
    pub persistent: bool,
}

/// How `blockdev-snapshot-sync` gets its overlay file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NewImageMode {
    /// Use an existing file (created beforehand, e.g. with its backing set already).
    Existing,
    /// QEMU creates the file, recording the backing file as an absolute path.
    AbsolutePaths,
}

/// Arguments of `blockdev-snapshot-sync` (QEMU 7.2): a new overlay on top of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevSnapshotSync {
    /// The BlockBackend name (for `-drive` disks); use `node_name` for `-blockdev` disks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The node to snapshot (the disk's current active node).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The overlay's path.
    pub snapshot_file: String,
    /// The node name the overlay gets (it becomes the disk's active node).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_node_name: Option<String>,
    /// The overlay's format (QEMU's default: qcow2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Existing file or created by QEMU (default absolute-paths).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<NewImageMode>,
}

impl BlockdevSnapshotSync {
    /// A qcow2 overlay at `snapshot_file` on top of node `node_name`, becoming node `snapshot_node_name`.
    pub fn qcow2_on_node(node_name: &str, snapshot_file: &str, snapshot_node_name: &str, mode: NewImageMode) -> Self {
        BlockdevSnapshotSync {
            device: None,
            node_name: Some(node_name.to_string()),
            snapshot_file: snapshot_file.to_string(),
            snapshot_node_name: Some(snapshot_node_name.to_string()),
            format: Some("qcow2".to_string()),
            mode: Some(mode),
        }
    }
}

/// Arguments of `block-dirty-bitmap-add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyBitmapAdd {
    /// The node (e.g. `disk0-fmt`).
    pub node: String,
    /// The bitmap's name.
    pub name: String,
    /// Granularity in bytes (power of two; QEMU picks the cluster size by default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granularity: Option<u32>,
    /// Stored in the qcow2 image when QEMU closes it.
    pub persistent: bool,
}

/// One action of a QMP `transaction`: all actions happen atomically or none does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
pub enum TransactionAction {
    /// A new overlay on a node.
    BlockdevSnapshotSync(BlockdevSnapshotSync),
    /// A new dirty bitmap.
    BlockDirtyBitmapAdd(BlockDirtyBitmapAdd),
}
