//! The local registry: which vSphere VMs form which stagecore environment.
//!
//! Contract: one JSON file per environment (`{dir}/{name}.json`) holding a
//! [`stagecore::toolbox::EnvRecord`] whose layer locator is a vSphere moref value (`snapshot-7`
//! for baseline, origin and snapshot layers; the VM id `vm-42` for a disk's writable top), with
//! [`VsphereExtra`] flattened in: the machines (logical name → VM id and name) and, per set of
//! VM snapshots stagecore took (`baseline:<id>`, `snapshot:<name>`), the snapshot of every VM
//! with its disks' CBT change ids. A stage's origin snapshots are kept under its baseline's key.
//! Files are written durably by [`RecordFile`] (temporary file, fsync, rename, directory fsync).
//! Records in the format before the toolbox (`origin`, `baselines[].points`) are migrated when
//! the registry is opened. vCenter holds no stagecore state: forgetting the directory forgets
//! the environments, never the VMs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stagecore::toolbox::{EnvRecord, RecordFile, SnapshotRecord, disk_key};
use stagecore::{Baseline, EnvironmentSpec, Error, MachineSpec, Result, Role, SnapshotInfo};

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

/// What only the vSphere backend keeps in an environment record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct VsphereExtra {
    /// The VMs, in environment order.
    pub(crate) machines: Vec<MachineRecord>,
    /// Set key ([`baseline_set`], [`snapshot_set`]) → the snapshot of every VM, with its disks.
    #[serde(default)]
    pub(crate) points: BTreeMap<String, Vec<VmPoint>>,
}

/// The vSphere environment record.
pub(crate) type Record = EnvRecord<String, VsphereExtra>;

/// The key of a baseline's VM snapshots (a production's baseline, or a stage's origin).
pub(crate) fn baseline_set(id: &str) -> String {
    format!("baseline:{id}")
}

/// The key of an environment snapshot's VM snapshots.
pub(crate) fn snapshot_set(name: &str) -> String {
    format!("snapshot:{name}")
}

/// The per-disk layers (`machine/disk` → snapshot moref) of a set of VM snapshots.
pub(crate) fn layers(points: &[VmPoint]) -> BTreeMap<String, String> {
    points
        .iter()
        .flat_map(|p| p.disks.iter().map(move |d| (disk_key(&p.machine, &d.disk), p.snapshot.clone())))
        .collect()
}

/// The per-disk writable tops (`machine/disk` → VM id) of a spec whose machines are `machines`.
pub(crate) fn tops(spec: &EnvironmentSpec, machines: &[MachineRecord]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for m in machines {
        for d in spec.machine(&m.name).map(|s| s.disks.as_slice()).unwrap_or_default() {
            out.insert(disk_key(&m.name, &d.name), m.vm.clone());
        }
    }
    out
}

/// The machine called `name` of `record`, or `NotFound` naming `environment/machine`.
pub(crate) fn machine<'a>(record: &'a Record, name: &str) -> Result<&'a MachineRecord> {
    record
        .backend
        .machines
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| Error::not_found("machine", format!("{}/{name}", record.name)))
}

/// The registry directory.
#[derive(Clone, Debug)]
pub(crate) struct Registry {
    dir: PathBuf,
}

impl Registry {
    /// Opens (creating) the directory and migrates records written before the toolbox.
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::invalid("vsphere.state_dir", format!("cannot create {}: {e}", dir.display())))?;
        let registry = Registry { dir: dir.to_path_buf() };
        for name in registry.names()? {
            let file = registry.file(&name)?;
            let value: serde_json::Value = file.load(&name)?;
            if value.get("spec").is_none() {
                let old: legacy::EnvRecord = file.load(&name)?;
                file.save(&old.migrate())?;
                tracing::info!(environment = %name, "migrated a registry record to the toolbox format");
            }
        }
        Ok(registry)
    }

    fn file(&self, name: &str) -> Result<RecordFile> {
        stagecore::name::validate("environment", name)?;
        Ok(RecordFile::new("environment", self.dir.join(format!("{name}.json"))))
    }

    pub(crate) fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.file(name)?.exists())
    }

    /// The record, or `NotFound`.
    pub(crate) fn load(&self, name: &str) -> Result<Record> {
        self.file(name)?.load(name)
    }

    /// Writes the record durably.
    pub(crate) fn save(&self, record: &Record) -> Result<()> {
        self.file(&record.name)?.save(record)
    }

    pub(crate) fn remove(&self, name: &str) -> Result<()> {
        let file = self.file(name)?;
        std::fs::remove_file(file.path()).map_err(|e| Error::io("removing", file.path(), e))
    }

    fn names(&self) -> Result<Vec<String>> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| Error::io("listing", &self.dir, e))?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".json")).map(str::to_string))
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Every record, by name.
    pub(crate) fn all(&self) -> Result<Vec<Record>> {
        self.names()?.iter().map(|n| self.load(n)).collect()
    }
}

/// The record format before the toolbox, read only to migrate it.
mod legacy {
    use super::*;

    #[derive(Deserialize)]
    pub(super) struct BaselineRecord {
        baseline: Baseline,
        points: Vec<VmPoint>,
    }

    #[derive(Deserialize)]
    pub(super) struct SnapshotRec {
        info: SnapshotInfo,
        points: Vec<VmPoint>,
    }

    #[derive(Deserialize)]
    pub(super) struct EnvRecord {
        name: String,
        role: Role,
        machines: Vec<MachineRecord>,
        #[serde(default)]
        baselines: Vec<BaselineRecord>,
        #[serde(default)]
        origin: Vec<VmPoint>,
        #[serde(default)]
        snapshots: Vec<SnapshotRec>,
    }

    impl EnvRecord {
        /// The same environment as a toolbox record. The spec (vSphere reads it live; the record
        /// keeps it as at attach or stage time) comes from the newest spec the old record knew:
        /// a snapshot's, a baseline's, or the stage's baseline's; else the machines' names only.
        pub(super) fn migrate(self) -> Record {
            let known = self
                .snapshots
                .last()
                .map(|s| s.info.spec.clone())
                .or_else(|| self.baselines.last().map(|b| b.baseline.spec.clone()))
                .or_else(|| match &self.role {
                    Role::Stage(s) => Some(s.baseline.spec.clone()),
                    Role::Production => None,
                });
            let mut spec = known.unwrap_or_else(|| EnvironmentSpec {
                name: self.name.clone(),
                machines: self.machines.iter().map(|m| bare_machine(&m.name)).collect(),
                networks: Vec::new(),
                labels: Default::default(),
            });
            spec.name = self.name.clone();
            let prefix = match &self.role {
                Role::Stage(_) => self
                    .machines
                    .first()
                    .and_then(|m| m.instance_name.strip_suffix(m.name.as_str()))
                    .unwrap_or_default()
                    .to_string(),
                Role::Production => String::new(),
            };
            let fenced = matches!(&self.role, Role::Stage(s) if s.fenced);
            let mut points = BTreeMap::new();
            let mut origins = BTreeMap::new();
            let mut baselines = Vec::new();
            for b in self.baselines {
                origins.insert(b.baseline.id.clone(), layers(&b.points));
                points.insert(baseline_set(&b.baseline.id), b.points);
                baselines.push(b.baseline);
            }
            if let Role::Stage(s) = &self.role {
                origins.insert(s.baseline.id.clone(), layers(&self.origin));
                points.insert(baseline_set(&s.baseline.id), self.origin);
            }
            let snapshots = self
                .snapshots
                .into_iter()
                .map(|s| {
                    let layers = layers(&s.points);
                    points.insert(snapshot_set(&s.info.name), s.points);
                    SnapshotRecord { info: s.info, layers }
                })
                .collect();
            let disks = tops(&spec, &self.machines);
            Record {
                name: self.name,
                role: self.role,
                spec,
                prefix,
                fenced,
                segment_id: String::new(),
                baselines,
                origins,
                snapshots,
                disks,
                backend: VsphereExtra { machines: self.machines, points },
            }
        }
    }

    fn bare_machine(name: &str) -> MachineSpec {
        MachineSpec {
            name: name.to_string(),
            uuid: None,
            vcpus: 1,
            memory_mib: 0,
            firmware: Default::default(),
            disks: Vec::new(),
            nics: Vec::new(),
            labels: Default::default(),
            boot: None,
            after: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prod() -> Record {
        let machines = vec![MachineRecord { name: "web".into(), vm: "vm-1".into(), instance_name: "web".into() }];
        let spec = EnvironmentSpec {
            name: "prod".into(),
            machines: vec![legacy_bare("web")],
            networks: Vec::new(),
            labels: Default::default(),
        };
        Record::production(spec, BTreeMap::new(), VsphereExtra { machines, points: BTreeMap::new() })
    }

    fn legacy_bare(name: &str) -> MachineSpec {
        serde_json::from_value(serde_json::json!({"name": name, "vcpus": 1, "memory_mib": 512})).unwrap()
    }

    #[test]
    fn save_load_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        let rec = prod();
        reg.save(&rec).unwrap();
        assert_eq!(reg.load("prod").unwrap(), rec);
        assert_eq!(reg.all().unwrap().len(), 1);
        assert!(matches!(reg.load("nope"), Err(Error::NotFound { .. })));
        assert!(matches!(reg.load("../x"), Err(Error::InvalidSpec { .. })));
        reg.remove("prod").unwrap();
        assert!(reg.all().unwrap().is_empty());
    }

    #[test]
    fn legacy_records_are_migrated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let old = serde_json::json!({
            "name": "prod",
            "role": serde_json::to_value(Role::Production).unwrap(),
            "machines": [{"name": "web", "vm": "vm-1", "instance_name": "web"}],
            "baselines": [],
            "origin": [],
            "snapshots": []
        });
        std::fs::write(dir.path().join("prod.json"), serde_json::to_vec(&old).unwrap()).unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        let rec = reg.load("prod").unwrap();
        assert_eq!(rec.role, Role::Production);
        assert_eq!(rec.backend.machines[0].vm, "vm-1");
        assert_eq!(rec.spec.machines[0].name, "web");
        let text = std::fs::read_to_string(dir.path().join("prod.json")).unwrap();
        assert!(text.contains("\"spec\"") && !text.contains("\"origin\""), "not rewritten: {text}");
    }
}
