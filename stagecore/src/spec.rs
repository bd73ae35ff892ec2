//! The environment model: [`EnvironmentSpec`] and its parts.
//!
//! A spec describes an environment — machines with their disks and NICs, and the networks the NICs
//! join — as plain serde data. Backends *inspect* a running production into a spec; people write
//! specs by hand in TOML, JSON or YAML. [`EnvironmentSpec::validate`] checks a spec and names the
//! offending field (`machines[1].disks[0].source`) in [`Error::InvalidSpec`].
//!
//! Machine, disk, NIC and network names are *logical*: they are the same in production and in each
//! stage cloned from it. What a stage must differ in (the hypervisor-level instance name, UUIDs,
//! MACs, disk file locations) lives in [`MachineSpec::uuid`], [`NicSpec::mac`], [`DiskSpec::source`]
//! and the backend's own bookkeeping.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{Error, Result, name};

/// An environment: a set of machines that together form a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentSpec {
    /// The environment's name (`prod`, `stage-42`).
    pub name: String,
    /// The machines, in a stable order.
    #[serde(default)]
    pub machines: Vec<MachineSpec>,
    /// The networks the machines' NICs join.
    #[serde(default)]
    pub networks: Vec<NetworkSpec>,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// One virtual machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineSpec {
    /// Logical name, unique in the environment (`web`, `app`, `db`).
    pub name: String,
    /// The hypervisor's UUID for this machine, if known; a stage always gets new ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Virtual CPUs (at least 1).
    pub vcpus: u32,
    /// Memory in MiB (at least 1).
    pub memory_mib: u64,
    /// Firmware the machine boots with.
    #[serde(default)]
    pub firmware: Firmware,
    /// Disks, in bus order.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// Network interfaces.
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// Free-form labels (`tier = "web"`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Direct kernel boot (kernel, initrd, command line on the host), if the machine boots that way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootSpec>,
    /// Machines (logical names) this one starts after: [`crate::Environment::start`] starts them
    /// first and waits until their guest agents answer (see [`EnvironmentSpec::start_waves`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
}

/// Direct kernel boot: the hypervisor loads a kernel and initrd from the host and passes a command
/// line, while the root filesystem stays on the machine's first disk. Both files are read-only
/// inputs shared by production and its stages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSpec {
    /// The kernel image on the host (absolute path).
    pub kernel: String,
    /// The initrd on the host (absolute path), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// The kernel command line (`root=/dev/vda console=ttyS0`).
    #[serde(default)]
    pub cmdline: String,
}

/// Firmware a machine boots with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// Legacy BIOS (SeaBIOS on QEMU).
    #[default]
    Bios,
    /// UEFI (OVMF on QEMU).
    Uefi,
}

/// Image format of a disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// qcow2: copy-on-write layers, linked clones, allocation maps.
    #[default]
    Qcow2,
    /// Raw image: full clones only.
    Raw,
    /// A vSphere VMDK.
    Vmdk,
}

/// One disk of a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Logical name, unique in the machine (`disk0`, `vda`, `data`).
    pub name: String,
    /// Where the disk's data is: a file path, a volume, a datastore path (backend-specific).
    #[serde(default)]
    pub source: String,
    /// Image format.
    #[serde(default)]
    pub format: DiskFormat,
    /// Virtual size in bytes, if known (required to create a new disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Whether the guest sees the disk read-only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

/// One network interface of a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// Logical name, unique in the machine (`eth0`).
    pub name: String,
    /// The network (by [`NetworkSpec::name`]) this NIC joins.
    pub network: String,
    /// MAC address (`52:54:00:12:34:56`); a stage always gets new ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Device model (`virtio`, `e1000`, `vmxnet3`).
    #[serde(default = "default_nic_model")]
    pub model: String,
}

fn default_nic_model() -> String {
    "virtio".into()
}

/// A network (L2 segment) of the environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// Logical name, unique in the environment (`frontend`, `backend`).
    pub name: String,
    /// The addresses used on it, for documentation and fencing (`10.0.1.0/24`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
}

/// A text format a spec can be read from or written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecFormat {
    /// TOML.
    Toml,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

impl EnvironmentSpec {
    /// Parses a spec from text and validates it.
    pub fn parse(text: &str, format: SpecFormat) -> Result<Self> {
        let spec: Self = match format {
            SpecFormat::Toml => toml::from_str(text).map_err(|e| Error::invalid("<toml>", e.to_string()))?,
            SpecFormat::Json => serde_json::from_str(text).map_err(|e| Error::invalid("<json>", e.to_string()))?,
            SpecFormat::Yaml => serde_norway::from_str(text).map_err(|e| Error::invalid("<yaml>", e.to_string()))?,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Writes the spec as text.
    pub fn render(&self, format: SpecFormat) -> Result<String> {
        let bad = |e: String| Error::invalid("<spec>", e);
        match format {
            SpecFormat::Toml => toml::to_string_pretty(self).map_err(|e| bad(e.to_string())),
            SpecFormat::Json => serde_json::to_string_pretty(self).map_err(|e| bad(e.to_string())),
            SpecFormat::Yaml => serde_norway::to_string(self).map_err(|e| bad(e.to_string())),
        }
    }

    /// The machine with this logical name.
    pub fn machine(&self, name: &str) -> Option<&MachineSpec> {
        self.machines.iter().find(|m| m.name == name)
    }

    /// The machine with this logical name, mutably.
    pub fn machine_mut(&mut self, name: &str) -> Option<&mut MachineSpec> {
        self.machines.iter_mut().find(|m| m.name == name)
    }

    /// The machine with this logical name, or [`Error::NotFound`].
    pub fn require_machine(&self, name: &str) -> Result<&MachineSpec> {
        self.machine(name).ok_or_else(|| Error::not_found("machine", format!("{}/{name}", self.name)))
    }

    /// Checks every name, number and reference; the error names the field path.
    pub fn validate(&self) -> Result<()> {
        name::validate("name", &self.name)?;
        let mut networks = BTreeSet::new();
        for (i, net) in self.networks.iter().enumerate() {
            let path = format!("networks[{i}]");
            name::validate(&format!("{path}.name"), &net.name)?;
            if !networks.insert(net.name.as_str()) {
                return Err(Error::invalid(format!("{path}.name"), format!("duplicate network name {:?}", net.name)));
            }
        }
        let mut machines = BTreeSet::new();
        for (i, m) in self.machines.iter().enumerate() {
            let path = format!("machines[{i}]");
            if !machines.insert(m.name.as_str()) {
                return Err(Error::invalid(format!("{path}.name"), format!("duplicate machine name {:?}", m.name)));
            }
            m.validate(&path, &networks)?;
        }
        self.start_waves()?;
        Ok(())
    }
}

impl MachineSpec {
    /// The disk with this logical name.
    pub fn disk(&self, name: &str) -> Option<&DiskSpec> {
        self.disks.iter().find(|d| d.name == name)
    }

    /// The NIC with this logical name.
    pub fn nic(&self, name: &str) -> Option<&NicSpec> {
        self.nics.iter().find(|n| n.name == name)
    }

    fn validate(&self, path: &str, networks: &BTreeSet<&str>) -> Result<()> {
        name::validate(&format!("{path}.name"), &self.name)?;
        if self.vcpus == 0 {
            return Err(Error::invalid(format!("{path}.vcpus"), "must be at least 1"));
        }
        if self.memory_mib == 0 {
            return Err(Error::invalid(format!("{path}.memory_mib"), "must be at least 1 MiB"));
        }
        let mut disks = BTreeSet::new();
        for (j, d) in self.disks.iter().enumerate() {
            let dpath = format!("{path}.disks[{j}]");
            name::validate(&format!("{dpath}.name"), &d.name)?;
            if !disks.insert(d.name.as_str()) {
                return Err(Error::invalid(format!("{dpath}.name"), format!("duplicate disk name {:?}", d.name)));
            }
            if d.source.trim().is_empty() {
                return Err(Error::invalid(format!("{dpath}.source"), "a disk needs a source"));
            }
            if d.source.chars().any(char::is_control) {
                return Err(Error::invalid(format!("{dpath}.source"), "contains a control character"));
            }
            if d.size_bytes == Some(0) {
                return Err(Error::invalid(format!("{dpath}.size_bytes"), "must be more than 0"));
            }
        }
        let mut nics = BTreeSet::new();
        for (j, n) in self.nics.iter().enumerate() {
            let npath = format!("{path}.nics[{j}]");
            name::validate(&format!("{npath}.name"), &n.name)?;
            if !nics.insert(n.name.as_str()) {
                return Err(Error::invalid(format!("{npath}.name"), format!("duplicate NIC name {:?}", n.name)));
            }
            if !networks.contains(n.network.as_str()) {
                return Err(Error::invalid(
                    format!("{npath}.network"),
                    format!("unknown network {:?}; declare it under `networks`", n.network),
                ));
            }
            if let Some(mac) = &n.mac {
                check_mac(mac).map_err(|reason| Error::invalid(format!("{npath}.mac"), reason))?;
            }
        }
        if let Some(boot) = &self.boot {
            for (field, value) in [("kernel", Some(&boot.kernel)), ("initrd", boot.initrd.as_ref())] {
                let Some(value) = value else { continue };
                if !value.starts_with('/') || value.chars().any(char::is_control) {
                    return Err(Error::invalid(format!("{path}.boot.{field}"), "must be an absolute host path"));
                }
            }
            if boot.cmdline.chars().any(char::is_control) {
                return Err(Error::invalid(format!("{path}.boot.cmdline"), "contains a control character"));
            }
        }
        Ok(())
    }
}

/// Checks a MAC address of the form `52:54:00:12:34:56`.
pub fn check_mac(mac: &str) -> std::result::Result<(), String> {
    let parts: Vec<&str> = mac.split(':').collect();
    let ok = parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    if ok { Ok(()) } else { Err(format!("{mac:?} is not a MAC address like 52:54:00:12:34:56")) }
}

/// A new random, locally administered unicast MAC address in QEMU's `52:54:00` range.
pub fn random_mac() -> String {
    let b = uuid::Uuid::new_v4().into_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// The identities of an environment's machines — UUID and NIC MACs per logical machine name —
/// which stay with their side when a swap exchanges machines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identities(BTreeMap<String, MachineIdentity>);

/// A machine's UUID and its NICs' MACs by NIC name.
type MachineIdentity = (Option<String>, BTreeMap<String, Option<String>>);

impl Identities {
    /// The identities in `spec`.
    pub fn of(spec: &EnvironmentSpec) -> Self {
        Identities(
            spec.machines
                .iter()
                .map(|m| {
                    (m.name.clone(), (m.uuid.clone(), m.nics.iter().map(|n| (n.name.clone(), n.mac.clone())).collect()))
                })
                .collect(),
        )
    }

    /// Gives `spec`'s machines these identities; machines and NICs without one get new ones.
    pub fn apply_to(&self, spec: &mut EnvironmentSpec) {
        for m in &mut spec.machines {
            let (uuid, macs) = self.0.get(&m.name).cloned().unwrap_or_default();
            m.uuid = uuid.or_else(|| Some(uuid::Uuid::new_v4().to_string()));
            for n in &mut m.nics {
                n.mac = macs.get(&n.name).cloned().flatten().or_else(|| Some(random_mac()));
            }
        }
    }
}
