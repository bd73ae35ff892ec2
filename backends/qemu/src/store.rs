//! The on-disk state of one environment: `root/envs/<env>/env.json` — the toolbox's
//! [`stagecore::toolbox::EnvRecord`] with the QEMU-only fields ([`QemuExtra`], flattened, so
//! existing `env.json` files read unchanged) — and the layout of its directory ([`EnvPaths`]).
//!
//! Contract: the record is written through [`RecordFile`] (temporary file, fsync, rename,
//! directory fsync), so a reader sees the old or the new record, never a torn one. Nothing here
//! takes locks: callers hold the environment's lock before writing.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stagecore::Result;
use stagecore::toolbox::RecordFile;
pub(crate) use stagecore::toolbox::{disk_key, write_atomic};
use stagecore_qcow2::Seals;

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

    pub(crate) fn record_file(&self) -> RecordFile {
        RecordFile::new("environment", self.record())
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

    /// The guest agent socket of `machine`.
    pub(crate) fn agent_socket(&self, machine: &str) -> PathBuf {
        self.machine_dir(machine).join("qga.sock")
    }
}

/// What only the QEMU backend keeps in an environment record.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct QemuExtra {
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
    /// Seals of the read-only layers the baselines (production) or the origins (stage) stand on:
    /// every file of each frozen layer's chain (see [`crate::seals`]). Records from before seals
    /// existed have none, and their layers are not checked.
    #[serde(default, skip_serializing_if = "Seals::is_empty")]
    pub(crate) seals: Seals,
}

/// Everything the backend knows about one environment; layers are qcow2 files.
pub(crate) type EnvRecord = stagecore::toolbox::EnvRecord<PathBuf, QemuExtra>;

/// A snapshot: its public info plus the frozen layer of every disk.
pub(crate) type SnapshotRecord = stagecore::toolbox::SnapshotRecord<PathBuf>;

/// The QEMU mechanisms on a record: where it is stored and how layer files are named.
pub(crate) trait QemuRecord: Sized {
    /// Reads the record of `env`; `NotFound` naming the environment when there is none.
    fn load(paths: &EnvPaths, env: &str) -> Result<Self>;
    /// Writes the record durably.
    fn save(&self, paths: &EnvPaths) -> Result<()>;
    /// A fresh layer file path for `machine`/`disk` in `disks_dir`, and its number.
    fn new_layer_path(&mut self, disks_dir: &Path, machine: &str, disk: &str) -> (PathBuf, u64);
    /// Whether `path` is a disk top, a snapshot layer, a baseline layer or an origin.
    fn is_referenced(&self, path: &Path) -> bool;
}

impl QemuRecord for EnvRecord {
    fn load(paths: &EnvPaths, env: &str) -> Result<Self> {
        paths.record_file().load(env)
    }

    fn save(&self, paths: &EnvPaths) -> Result<()> {
        paths.record_file().save(self)
    }

    /// Numbers whose file exists are skipped: a process that died before saving the record may
    /// have left one (garbage collection removes it later).
    fn new_layer_path(&mut self, disks_dir: &Path, machine: &str, disk: &str) -> (PathBuf, u64) {
        loop {
            let n = self.backend.next_layer;
            self.backend.next_layer += 1;
            let path = disks_dir.join(format!("{machine}.{disk}.{n}.qcow2"));
            if path.symlink_metadata().is_err() {
                return (path, n);
            }
            tracing::warn!(file = %path.display(), "skipping a layer file left by an earlier process");
        }
    }

    fn is_referenced(&self, path: &Path) -> bool {
        self.references(&path.to_path_buf())
            || self.baselines.iter().any(|b| b.layers.iter().any(|l| Path::new(&l.layer) == path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record in the layout the QEMU backend wrote before the toolbox (its own struct with
    /// `next_layer`, `owned_files` and `last_swap` at the top level) reads unchanged, and the
    /// toolbox record writes the same top-level keys back.
    #[test]
    fn env_json_layout_is_unchanged() {
        let spec = stagecore::memory::sample_spec("prod");
        let old = serde_json::json!({
            "name": "prod",
            "role": "Production",
            "spec": spec,
            "prefix": "",
            "fenced": false,
            "segment_id": "7c0e",
            "baselines": [],
            "origins": {},
            "snapshots": [],
            "disks": { "web/disk0": "/r/envs/prod/disks/web.disk0.1.qcow2" },
            "next_layer": 4,
            "owned_files": ["/r/images/web.qcow2"],
            "last_swap": "swap-1",
        });
        let role = serde_json::to_value(stagecore::Role::Production).unwrap();
        let mut old = old;
        old["role"] = role;
        let rec: EnvRecord = serde_json::from_value(old.clone()).expect("old record reads");
        assert_eq!(rec.backend.next_layer, 4);
        assert_eq!(rec.backend.owned_files, vec![PathBuf::from("/r/images/web.qcow2")]);
        assert_eq!(rec.backend.last_swap.as_deref(), Some("swap-1"));
        assert_eq!(rec.disks["web/disk0"], PathBuf::from("/r/envs/prod/disks/web.disk0.1.qcow2"));
        let back = serde_json::to_value(&rec).unwrap();
        let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&back), keys(&old));
        assert_eq!(back, old);
    }

    #[test]
    fn a_missing_record_is_not_found_naming_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let paths = EnvPaths::new(dir.path(), "nope");
        match EnvRecord::load(&paths, "nope") {
            Err(stagecore::Error::NotFound { kind, name, .. }) => {
                assert_eq!((kind, name.as_str()), ("environment", "nope"))
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
    }
}
