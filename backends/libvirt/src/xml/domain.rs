//! Typed reading of libvirt domain XML with serde (quick-xml), and turning it into a
//! [`MachineSpec`].
//!
//! Only what the spec models is read: name, uuid, vCPUs, memory, firmware, direct kernel boot, disks (`device='disk'`:
//! target, source file, driver type, read-only, `ua-` alias) and interfaces (MAC, source
//! network/bridge, model, `ua-` alias). Everything else stays in the original XML, which is kept
//! and edited ([`super::edit`]), never rebuilt.

use serde::Deserialize;
use stagecore::{BootSpec, DiskFormat, DiskSpec, Error, Firmware, MachineSpec, NicSpec, Result};

/// The parts of `<domain>` the spec needs.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct DomainXml {
    /// `<uuid>`.
    #[serde(default)]
    pub(crate) uuid: Option<String>,
    /// `<memory unit=…>`.
    pub(crate) memory: Sized_,
    /// `<vcpu>`.
    pub(crate) vcpu: Count,
    /// `<os>`.
    #[serde(default)]
    pub(crate) os: Option<Os>,
    /// `<devices>`.
    #[serde(default)]
    pub(crate) devices: Devices,
}

/// A number with a unit attribute.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Sized_ {
    #[serde(rename = "@unit", default)]
    unit: Option<String>,
    #[serde(rename = "$text")]
    value: u64,
}

/// A plain count.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Count {
    #[serde(rename = "$text")]
    pub(crate) value: u32,
}

/// `<os>`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Os {
    #[serde(rename = "@firmware", default)]
    firmware: Option<String>,
    #[serde(default)]
    loader: Option<Loader>,
    /// `<kernel>` (direct kernel boot).
    #[serde(default)]
    kernel: Option<String>,
    /// `<initrd>`.
    #[serde(default)]
    initrd: Option<String>,
    /// `<cmdline>`.
    #[serde(default)]
    cmdline: Option<String>,
}

/// `<os><loader>`.
#[derive(Debug, Clone, Deserialize)]
struct Loader {
    #[serde(rename = "@type", default)]
    kind: Option<String>,
}

/// `<devices>`.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct Devices {
    #[serde(rename = "disk", default)]
    pub(crate) disks: Vec<Disk>,
    #[serde(rename = "interface", default)]
    pub(crate) interfaces: Vec<Interface>,
}

/// `<disk>`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Disk {
    #[serde(rename = "@device", default)]
    pub(crate) device: Option<String>,
    #[serde(default)]
    pub(crate) driver: Option<Driver>,
    #[serde(default)]
    pub(crate) source: Option<Source>,
    pub(crate) target: Target,
    #[serde(default)]
    readonly: Option<Empty>,
    #[serde(default)]
    pub(crate) alias: Option<Alias>,
}

/// `<driver>`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Driver {
    #[serde(rename = "@type", default)]
    pub(crate) kind: Option<String>,
}

/// `<source>` of a disk or interface.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct Source {
    #[serde(rename = "@file", default)]
    pub(crate) file: Option<String>,
    #[serde(rename = "@dev", default)]
    pub(crate) dev: Option<String>,
    #[serde(rename = "@network", default)]
    pub(crate) network: Option<String>,
    #[serde(rename = "@bridge", default)]
    pub(crate) bridge: Option<String>,
}

/// `<target dev=…>`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Target {
    #[serde(rename = "@dev")]
    pub(crate) dev: String,
}

/// An element with no content we read.
#[derive(Debug, Clone, Deserialize)]
struct Empty {}

/// `<alias name=…>`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Alias {
    #[serde(rename = "@name")]
    pub(crate) name: String,
}

/// `<interface>`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Interface {
    /// `type=` (`network`, `bridge`, `user`, `direct`, …).
    #[serde(rename = "@type", default)]
    pub(crate) kind: Option<String>,
    #[serde(default)]
    pub(crate) mac: Option<Mac>,
    #[serde(default)]
    pub(crate) source: Option<Source>,
    #[serde(default)]
    pub(crate) model: Option<Model>,
    #[serde(default)]
    pub(crate) alias: Option<Alias>,
}

/// `<mac address=…>`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Mac {
    #[serde(rename = "@address")]
    pub(crate) address: String,
}

/// `<model type=…>`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Model {
    #[serde(rename = "@type")]
    pub(crate) kind: String,
}

/// The prefix of user aliases, which carry logical disk and NIC names.
pub(crate) const ALIAS_PREFIX: &str = "ua-";

impl DomainXml {
    /// Parses domain XML; `what` names the domain in errors.
    pub(crate) fn parse(xml: &str, what: &str) -> Result<Self> {
        quick_xml::de::from_str(xml).map_err(|e| Error::invalid(format!("domain {what}"), format!("domain XML: {e}")))
    }

    /// Memory in MiB.
    pub(crate) fn memory_mib(&self) -> u64 {
        let kib = match self.memory.unit.as_deref().unwrap_or("KiB") {
            "b" | "bytes" => self.memory.value / 1024,
            "KB" => self.memory.value * 1000 / 1024,
            "MiB" | "M" => self.memory.value * 1024,
            "MB" => self.memory.value * 1_000_000 / 1024,
            "GiB" | "G" => self.memory.value * 1024 * 1024,
            "GB" => self.memory.value * 1_000_000_000 / 1024,
            _ => self.memory.value,
        };
        (kib / 1024).max(1)
    }

    /// The firmware.
    pub(crate) fn firmware(&self) -> Firmware {
        let efi = self.os.as_ref().is_some_and(|os| {
            os.firmware.as_deref() == Some("efi")
                || os.loader.as_ref().and_then(|l| l.kind.as_deref()) == Some("pflash")
        });
        if efi { Firmware::Uefi } else { Firmware::Bios }
    }

    /// Direct kernel boot, when `<os>` names a kernel.
    pub(crate) fn boot(&self) -> Option<BootSpec> {
        let os = self.os.as_ref()?;
        let kernel = os.kernel.clone().filter(|k| !k.is_empty())?;
        Some(BootSpec {
            kernel,
            initrd: os.initrd.clone().filter(|i| !i.is_empty()),
            cmdline: os.cmdline.clone().unwrap_or_default(),
        })
    }

    /// The disks the spec models (`device='disk'`), with their logical names.
    pub(crate) fn disks(&self) -> impl Iterator<Item = (String, &Disk)> {
        self.devices.disks.iter().filter(|d| d.device.as_deref().unwrap_or("disk") == "disk").map(|d| (d.logical(), d))
    }

    /// The interfaces with their logical names (`ua-` alias, else `eth<i>`).
    pub(crate) fn nics(&self) -> impl Iterator<Item = (String, &Interface)> {
        self.devices.interfaces.iter().enumerate().map(|(i, n)| {
            let name = n.alias.as_ref().and_then(|a| a.name.strip_prefix(ALIAS_PREFIX)).map(str::to_string);
            (name.unwrap_or_else(|| format!("eth{i}")), n)
        })
    }

    /// The spec of this machine. `logical` is its logical name, `network_name` maps a libvirt
    /// network (or bridge) to the logical network name, `size` gives a disk's virtual size.
    pub(crate) fn machine_spec(
        &self,
        logical: &str,
        network_name: impl Fn(&str) -> String,
        size: impl Fn(&Disk) -> Option<u64>,
    ) -> MachineSpec {
        let disks = self
            .disks()
            .map(|(name, d)| DiskSpec {
                name,
                source: d.path().unwrap_or_default(),
                format: d.format(),
                size_bytes: size(d),
                read_only: d.readonly.is_some(),
            })
            .collect();
        let nics = self
            .nics()
            .map(|(name, n)| NicSpec {
                name,
                network: network_name(&n.network().unwrap_or_default()),
                mac: n.mac.as_ref().map(|m| m.address.to_ascii_lowercase()),
                model: n.model.as_ref().map(|m| m.kind.clone()).unwrap_or_else(|| "virtio".into()),
            })
            .collect();
        MachineSpec {
            name: logical.into(),
            uuid: self.uuid.clone(),
            vcpus: self.vcpu.value,
            memory_mib: self.memory_mib(),
            firmware: self.firmware(),
            disks,
            nics,
            labels: Default::default(),
            boot: self.boot(),
            after: Vec::new(),
        }
    }
}

impl Disk {
    /// Logical name: the `ua-` alias, else the target device.
    pub(crate) fn logical(&self) -> String {
        self.alias
            .as_ref()
            .and_then(|a| a.name.strip_prefix(ALIAS_PREFIX))
            .map(str::to_string)
            .unwrap_or_else(|| self.target.dev.clone())
    }

    /// The local path of the disk's data, if it is a file or block device.
    pub(crate) fn path(&self) -> Option<String> {
        self.source.as_ref().and_then(|s| s.file.clone().or_else(|| s.dev.clone()))
    }

    /// The image format (`driver type`).
    pub(crate) fn format(&self) -> DiskFormat {
        match self.driver.as_ref().and_then(|d| d.kind.as_deref()) {
            Some("raw") => DiskFormat::Raw,
            Some("vmdk") => DiskFormat::Vmdk,
            _ => DiskFormat::Qcow2,
        }
    }
}

impl Interface {
    /// The libvirt network or bridge the interface joins; for an interface with neither (a
    /// user-mode NIC, `type='user'`, say) the host device it uses, else its type, so every NIC
    /// names a network a spec can declare (`user`).
    pub(crate) fn network(&self) -> Option<String> {
        let source = self.source.as_ref();
        source
            .and_then(|s| s.network.clone().or_else(|| s.bridge.clone()).or_else(|| s.dev.clone()))
            .or_else(|| self.kind.clone())
    }
}
