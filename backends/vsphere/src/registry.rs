//! The local registry: which vSphere VMs form which stagecore environment.
//!
//! Contract: one JSON file per environment (`{dir}/{name}.json`) holding its role (with the stage
//! information), its machines (logical name → VM id and name), the baselines taken of it (per VM
//! the snapshot moref and the disks' CBT change ids), a stage's origin snapshots, and the
//! environment snapshots. Names are validated before they become paths; files are written to a
//! temporary name and renamed, so a crash never leaves half a record. vCenter holds no stagecore
//! state: forgetting the directory forgets the environments, never the VMs.

use serde::{Deserialize, Serialize};
use stagecore::{Baseline, Error, Result, Role, SnapshotInfo};
use std::path::{Path, PathBuf};

use crate::BACKEND;

/// A disk of a VM at a point in time: logical name, device key, CBT change id when tracking was on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DiskPoint {
    pub(crate) disk: String,
    pub(crate) key: i32,
    pub(crate) change_id: Option<String>,
}

/// One VM's snapshot belonging to a baseline, an origin or an environment snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct VmPoint {
    /// Logical machine name.
    pub(crate) machine: String,
    /// VM id (`vm-42`).
    pub(crate) vm: String,
    /// Snapshot moref value (`snapshot-7`).
    pub(crate) snapshot: String,
    /// Disks at that snapshot.
    #[serde(default)]
    pub(crate) disks: Vec<DiskPoint>,
}

/// A machine of an environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MachineRecord {
    /// Logical name.
    pub(crate) name: String,
    /// VM id.
    pub(crate) vm: String,
    /// VM name in vCenter.
    pub(crate) instance_name: String,
}

/// A baseline: the public value plus the snapshot per VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BaselineRecord {
    pub(crate) baseline: Baseline,
    pub(crate) points: Vec<VmPoint>,
}

/// An environment snapshot: the public value plus the snapshot per VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SnapshotRecord {
    pub(crate) info: SnapshotInfo,
    pub(crate) points: Vec<VmPoint>,
}

/// Everything stagecore knows about one environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EnvRecord {
    pub(crate) name: String,
    pub(crate) role: Role,
    pub(crate) machines: Vec<MachineRecord>,
    #[serde(default)]
    pub(crate) baselines: Vec<BaselineRecord>,
    /// A stage's snapshot taken right after cloning: the point its disk changes are measured from.
    #[serde(default)]
    pub(crate) origin: Vec<VmPoint>,
    #[serde(default)]
    pub(crate) snapshots: Vec<SnapshotRecord>,
}

impl EnvRecord {
    pub(crate) fn machine(&self, name: &str) -> Result<&MachineRecord> {
        self.machines
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| Error::not_found("machine", format!("{}/{name}", self.name)))
    }
}

/// The registry directory.
#[derive(Clone, Debug)]
pub(crate) struct Registry {
    dir: PathBuf,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::backend_msg(BACKEND, format!("registry: cannot {what} {}: {e}", path.display()))
}

impl Registry {
    /// Opens (creating) the directory.
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::invalid("vsphere.state_dir", format!("cannot create {}: {e}", dir.display())))?;
        Ok(Registry { dir: dir.to_path_buf() })
    }

    fn path(&self, name: &str) -> Result<PathBuf> {
        stagecore::name::validate("environment", name)?;
        Ok(self.dir.join(format!("{name}.json")))
    }

    pub(crate) fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.path(name)?.exists())
    }

    /// The record, or `NotFound`.
    pub(crate) fn load(&self, name: &str) -> Result<EnvRecord> {
        let path = self.path(name)?;
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::not_found("environment", name));
            }
            Err(e) => return Err(io("read", &path, e)),
        };
        serde_json::from_slice(&text)
            .map_err(|e| Error::backend_msg(BACKEND, format!("registry: {} is corrupt: {e}", path.display())))
    }

    /// Writes the record atomically.
    pub(crate) fn save(&self, record: &EnvRecord) -> Result<()> {
        let path = self.path(&record.name)?;
        let tmp = self.dir.join(format!(".{}.json.tmp", record.name));
        let text = serde_json::to_vec_pretty(record).map_err(|e| Error::backend(BACKEND, e))?;
        std::fs::write(&tmp, text).map_err(|e| io("write", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io("rename", &tmp, e))
    }

    pub(crate) fn remove(&self, name: &str) -> Result<()> {
        let path = self.path(name)?;
        std::fs::remove_file(&path).map_err(|e| io("remove", &path, e))
    }

    /// Every record, by name.
    pub(crate) fn all(&self) -> Result<Vec<EnvRecord>> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| io("list", &self.dir, e))?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".json")).map(str::to_string))
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names.iter().map(|n| self.load(n)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        let rec = EnvRecord {
            name: "prod".into(),
            role: Role::Production,
            machines: vec![MachineRecord { name: "web".into(), vm: "vm-1".into(), instance_name: "web".into() }],
            baselines: Vec::new(),
            origin: Vec::new(),
            snapshots: Vec::new(),
        };
        reg.save(&rec).unwrap();
        assert_eq!(reg.load("prod").unwrap(), rec);
        assert_eq!(reg.all().unwrap().len(), 1);
        assert!(matches!(reg.load("nope"), Err(Error::NotFound { .. })));
        assert!(matches!(reg.load("../x"), Err(Error::InvalidSpec { .. })));
        reg.remove("prod").unwrap();
        assert!(reg.all().unwrap().is_empty());
    }
}
