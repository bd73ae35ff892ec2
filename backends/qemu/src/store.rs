//! The on-disk state of one environment: `root/envs/<env>/env.json` ([`EnvRecord`]) and the
//! layout of its directory ([`EnvPaths`]).
//!
//! Contract: the record is written atomically (temporary file, fsync, rename, directory fsync),
//! so a reader sees the old or the new record, never a torn one. Nothing here takes locks: callers
//! hold the environment's lock before writing.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stagecore::{Baseline, EnvironmentInfo, EnvironmentSpec, Error, MachineInstance, Result, Role, SnapshotInfo};

use crate::error;

/// The record's file name inside the environment directory.
const RECORD: &str = "env.json";

/// Where one environment keeps its files.
#[derive(Debug, Clone)]
pub(crate) struct EnvPaths {
    pub(crate) dir: PathBuf,
}

impl EnvPaths {
    pub(crate) fn new(root: &Path, env: &str) -> Self {
        EnvPaths { dir: root.join("envs").join(env) }
    }

    pub(crate) fn record(&self) -> PathBuf {
        self.dir.join(RECORD)
    }

    pub(crate) fn lock(&self) -> PathBuf {
        self.dir.join("lock")
    }

    pub(crate) fn disks(&self) -> PathBuf {
        self.dir.join("disks")
    }

    pub(crate) fn machine_dir(&self, machine: &str) -> PathBuf {
        self.dir.join("machines").join(machine)
    }
}

/// A key for one disk in the record's maps: `machine/disk` (names never contain `/`).
pub(crate) fn disk_key(machine: &str, disk: &str) -> String {
    format!("{machine}/{disk}")
}

/// A snapshot: its public info plus the frozen layer of every disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SnapshotRecord {
    pub(crate) info: SnapshotInfo,
    /// `machine/disk` → the frozen layer.
    pub(crate) layers: BTreeMap<String, PathBuf>,
}

/// Everything the backend knows about one environment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct EnvRecord {
    pub(crate) name: String,
    pub(crate) role: Role,
    pub(crate) spec: EnvironmentSpec,
    /// Prefix of hypervisor-level instance names (`""` for production).
    pub(crate) prefix: String,
    pub(crate) fenced: bool,
    /// The id of the environment's private network segments (fenced stages).
    pub(crate) segment_id: String,
    /// Baselines taken of this environment.
    #[serde(default)]
    pub(crate) baselines: Vec<Baseline>,
    /// Baseline id → `machine/disk` → the layer holding the baseline's content in this
    /// environment's chains.
    #[serde(default)]
    pub(crate) origins: BTreeMap<String, BTreeMap<String, PathBuf>>,
    /// Snapshots, oldest first.
    #[serde(default)]
    pub(crate) snapshots: Vec<SnapshotRecord>,
    /// `machine/disk` → the writable top of the disk's chain.
    pub(crate) disks: BTreeMap<String, PathBuf>,
    /// Counter for unique layer file names and node names.
    pub(crate) next_layer: u64,
    /// Files outside the environment directory that the backend created (empty source images);
    /// removed with the environment.
    #[serde(default)]
    pub(crate) owned_files: Vec<PathBuf>,
    /// The id of the last swap that made this (production) record: the decision mark of
    /// [`crate::swap`]'s intent file.
    #[serde(default)]
    pub(crate) last_swap: Option<String>,
}

impl EnvRecord {
    /// The hypervisor-level identities, from the spec.
    pub(crate) fn instances(&self) -> Vec<MachineInstance> {
        self.spec
            .machines
            .iter()
            .map(|m| MachineInstance {
                name: m.name.clone(),
                instance_name: format!("{}{}", self.prefix, m.name),
                uuid: m.uuid.clone().unwrap_or_default(),
            })
            .collect()
    }

    pub(crate) fn info(&self) -> EnvironmentInfo {
        EnvironmentInfo {
            name: self.name.clone(),
            backend: error::BACKEND.into(),
            role: self.role.clone(),
            machines: self.instances(),
        }
    }

    /// The writable top of `machine`/`disk`, or `NotFound`.
    pub(crate) fn top(&self, machine: &str, disk: &str) -> Result<PathBuf> {
        self.spec.require_machine(machine)?;
        self.disks
            .get(&disk_key(machine, disk))
            .cloned()
            .ok_or_else(|| Error::not_found("disk", format!("{}/{machine}/{disk}", self.name)))
    }

    /// A fresh layer file path for `machine`/`disk` in `disks_dir`, and its number. Numbers whose
    /// file exists are skipped: a process that died before saving the record may have left one
    /// (garbage collection removes it later).
    pub(crate) fn new_layer_path(&mut self, disks_dir: &Path, machine: &str, disk: &str) -> (PathBuf, u64) {
        loop {
            let n = self.next_layer;
            self.next_layer += 1;
            let path = disks_dir.join(format!("{machine}.{disk}.{n}.qcow2"));
            if path.symlink_metadata().is_err() {
                return (path, n);
            }
            tracing::warn!(file = %path.display(), "skipping a layer file left by an earlier process");
        }
    }

    /// Whether `path` is a disk top, a snapshot layer, a baseline layer or an origin.
    pub(crate) fn is_referenced(&self, path: &Path) -> bool {
        self.disks.values().any(|p| p == path)
            || self.snapshots.iter().any(|s| s.layers.values().any(|p| p == path))
            || self.origins.values().any(|o| o.values().any(|p| p == path))
            || self.baselines.iter().any(|b| b.layers.iter().any(|l| Path::new(&l.layer) == path))
    }

    /// Which environment's name the segments of an unfenced environment are named after.
    pub(crate) fn segment_owner(&self) -> String {
        match &self.role {
            _ if self.fenced => self.segment_id.clone(),
            Role::Stage(s) => s.source.clone(),
            Role::Production => self.name.clone(),
        }
    }

    /// Reads a record; `NotFound` naming the environment when there is none.
    pub(crate) fn load(paths: &EnvPaths, env: &str) -> Result<EnvRecord> {
        let file = paths.record();
        let text = match std::fs::read(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::not_found("environment", env)),
            Err(e) => return Err(error::io("reading", &file, &e)),
        };
        serde_json::from_slice(&text).map_err(|e| error::msg(format!("corrupt state file {}: {e}", file.display())))
    }

    /// Writes the record atomically.
    pub(crate) fn save(&self, paths: &EnvPaths) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).map_err(|e| error::msg(format!("serialising state: {e}")))?;
        write_atomic(&paths.record(), &text)
    }
}

/// Writes `data` to `path` through a temporary file, fsync and rename, then fsyncs the directory.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().ok_or_else(|| error::msg(format!("{} has no parent", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("state")));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        error::io("writing", path, &e)
    })
}
