//! Typed Automation REST API calls (`/api/...`, vSphere 7.0U2+ rendering).
//!
//! Contract: inventory, power, delete and full clone; identifiers are the vCenter ones (`vm-42`,
//! which is also the VI/JSON managed object id). Powering on a running VM (or off a stopped one)
//! is not an error. Endpoints follow the official OpenAPI documents (`vcenter.json`, `cis.json`
//! 7.0.3), which the test simulator checks every request and response against.

use super::{Api, VsphereClient, error};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use stagecore::{Error, Result};
use std::collections::BTreeMap;

/// One VM in a list (`VM.Summary`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct VmSummary {
    /// Identifier, e.g. `vm-42`.
    pub vm: String,
    /// Name.
    pub name: String,
    /// `POWERED_ON`, `POWERED_OFF` or `SUSPENDED`.
    pub power_state: String,
    /// vCPUs, when known.
    pub cpu_count: Option<u32>,
    /// Memory in MiB, when known.
    #[serde(rename = "memory_size_MiB")]
    pub memory_size_mib: Option<u64>,
}

/// CPU configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct CpuInfo {
    /// vCPUs.
    pub count: u32,
    /// Cores per socket.
    pub cores_per_socket: u32,
}

/// Memory configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct MemoryInfo {
    /// Size in MiB.
    #[serde(rename = "size_MiB")]
    pub size_mib: u64,
}

/// Boot configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct BootInfo {
    /// `BIOS` or `EFI`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// VM identity.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Identity {
    /// Name.
    pub name: String,
    /// BIOS UUID.
    pub bios_uuid: String,
    /// Instance UUID.
    pub instance_uuid: String,
}

/// A virtual disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Device key (`2000`).
    pub key: String,
    /// Label.
    pub label: String,
    /// Capacity in bytes, when known.
    pub capacity: Option<u64>,
    /// Datastore path of the VMDK, when file-backed.
    pub vmdk_file: Option<String>,
}

/// A virtual NIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicInfo {
    /// Device key (`4000`).
    pub key: String,
    /// Label.
    pub label: String,
    /// MAC address.
    pub mac_address: Option<String>,
    /// Network identifier.
    pub network: Option<String>,
    /// Network name.
    pub network_name: Option<String>,
    /// Adapter type (`VMXNET3`, `E1000`, ...), when reported.
    pub model: Option<String>,
}

/// Details of one VM (`VM.Info`, the parts stagecore uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmInfo {
    /// Identifier it was fetched by.
    pub vm: String,
    /// Name.
    pub name: String,
    /// Power state.
    pub power_state: String,
    /// Guest OS identifier.
    pub guest_os: String,
    /// CPU.
    pub cpu: CpuInfo,
    /// Memory.
    pub memory: MemoryInfo,
    /// Boot.
    pub boot: BootInfo,
    /// Identity (absent on old servers).
    pub identity: Option<Identity>,
    /// Disks, ordered by key.
    pub disks: Vec<DiskInfo>,
    /// NICs, ordered by key.
    pub nics: Vec<NicInfo>,
}

/// A network (`Network.Summary`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct NetworkSummary {
    /// Identifier (`network-12`, `dvportgroup-7`).
    pub network: String,
    /// Name.
    pub name: String,
    /// `STANDARD_PORTGROUP`, `DISTRIBUTED_PORTGROUP`, `OPAQUE_NETWORK`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// A folder (`Folder.Summary`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct FolderSummary {
    /// Identifier (`group-v10`).
    pub folder: String,
    /// Name.
    pub name: String,
}

#[derive(Deserialize)]
struct RawDisk {
    label: String,
    capacity: Option<u64>,
    backing: Option<Value>,
}

#[derive(Deserialize)]
struct RawNic {
    label: String,
    #[serde(rename = "type")]
    kind: Option<String>,
    mac_address: Option<String>,
    backing: Option<Value>,
}

#[derive(Deserialize)]
struct RawInfo {
    name: String,
    power_state: String,
    #[serde(rename = "guest_OS")]
    guest_os: String,
    cpu: CpuInfo,
    memory: MemoryInfo,
    boot: BootInfo,
    identity: Option<Identity>,
    #[serde(default)]
    disks: BTreeMap<String, RawDisk>,
    #[serde(default)]
    nics: BTreeMap<String, RawNic>,
}

fn parse<T: serde::de::DeserializeOwned>(v: Value, context: &str) -> Result<T> {
    serde_json::from_value(v).map_err(|e| error::malformed(context, e))
}

fn check_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 80 || name.contains('/') || name.contains("..") {
        return Err(Error::invalid(field, format!("`{name}` must be 1..80 characters without `/` or `..`")));
    }
    Ok(())
}

pub(crate) fn check_id(field: &str, id: &str) -> Result<()> {
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(Error::invalid(field, format!("`{id}` is not a vSphere identifier")));
    }
    Ok(())
}

impl VsphereClient {
    /// Lists VMs, optionally filtered by names and folders (`GET /api/vcenter/vm`).
    pub async fn list_vms(&self, names: &[&str], folders: &[&str]) -> Result<Vec<VmSummary>> {
        let mut query: Vec<(&str, String)> = names.iter().map(|n| ("names", n.to_string())).collect();
        query.extend(folders.iter().map(|f| ("folders", f.to_string())));
        let v = self.call(Api::Rest, Method::GET, "/api/vcenter/vm", &query, None, "list VMs").await?;
        parse(v, "list VMs")
    }

    /// Details of one VM (`GET /api/vcenter/vm/{vm}`).
    pub async fn get_vm(&self, vm: &str) -> Result<VmInfo> {
        check_id("vm", vm)?;
        let context = format!("get VM {vm}");
        let v = self.call(Api::Rest, Method::GET, &format!("/api/vcenter/vm/{vm}"), &[], None, &context).await?;
        let raw: RawInfo = parse(v, &context)?;
        let disks = raw
            .disks
            .into_iter()
            .map(|(key, d)| DiskInfo {
                key,
                label: d.label,
                capacity: d.capacity,
                vmdk_file: d.backing.as_ref().and_then(|b| b["vmdk_file"].as_str()).map(str::to_string),
            })
            .collect();
        let nics = raw
            .nics
            .into_iter()
            .map(|(key, n)| NicInfo {
                key,
                label: n.label,
                mac_address: n.mac_address,
                network: n.backing.as_ref().and_then(|b| b["network"].as_str()).map(str::to_string),
                network_name: n.backing.as_ref().and_then(|b| b["network_name"].as_str()).map(str::to_string),
                model: n.kind,
            })
            .collect();
        Ok(VmInfo {
            vm: vm.to_string(),
            name: raw.name,
            power_state: raw.power_state,
            guest_os: raw.guest_os,
            cpu: raw.cpu,
            memory: raw.memory,
            boot: raw.boot,
            identity: raw.identity,
            disks,
            nics,
        })
    }

    /// Powers a VM on (`POST /api/vcenter/vm/{vm}/power?action=start`); already on is fine.
    pub async fn power_on(&self, vm: &str) -> Result<()> {
        self.power(vm, "start").await
    }

    /// Powers a VM off (`POST /api/vcenter/vm/{vm}/power?action=stop`); already off is fine.
    pub async fn power_off(&self, vm: &str) -> Result<()> {
        self.power(vm, "stop").await
    }

    async fn power(&self, vm: &str, action: &str) -> Result<()> {
        check_id("vm", vm)?;
        let path = format!("/api/vcenter/vm/{vm}/power");
        let context = format!("power {action} VM {vm}");
        match self.call(Api::Rest, Method::POST, &path, &[("action", action.to_string())], None, &context).await {
            Ok(_) => Ok(()),
            Err(Error::Backend { source, .. })
                if source
                    .downcast_ref::<error::VsphereFault>()
                    .is_some_and(|f| f.fault_type == "ALREADY_IN_DESIRED_STATE") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes a (powered-off) VM (`DELETE /api/vcenter/vm/{vm}`).
    pub async fn delete_vm(&self, vm: &str) -> Result<()> {
        check_id("vm", vm)?;
        let context = format!("delete VM {vm}");
        self.call(Api::Rest, Method::DELETE, &format!("/api/vcenter/vm/{vm}"), &[], None, &context).await.map(|_| ())
    }

    /// Full clone (`POST /api/vcenter/vm?action=clone`): independent disks; returns the new VM id.
    pub async fn full_clone(&self, source: &str, name: &str, folder: Option<&str>, power_on: bool) -> Result<String> {
        check_id("source", source)?;
        check_name("name", name)?;
        let mut spec = json!({"source": source, "name": name, "power_on": power_on});
        if let Some(f) = folder {
            check_id("folder", f)?;
            spec["placement"] = json!({"folder": f});
        }
        let context = format!("full clone of {source} as {name}");
        let v = self
            .call(Api::Rest, Method::POST, "/api/vcenter/vm", &[("action", "clone".to_string())], Some(&spec), &context)
            .await?;
        parse(v, &context)
    }

    /// Networks, optionally by name (`GET /api/vcenter/network`).
    pub async fn list_networks(&self, names: &[&str]) -> Result<Vec<NetworkSummary>> {
        let query: Vec<(&str, String)> = names.iter().map(|n| ("names", n.to_string())).collect();
        let v = self.call(Api::Rest, Method::GET, "/api/vcenter/network", &query, None, "list networks").await?;
        parse(v, "list networks")
    }

    /// VM folders, optionally by name (`GET /api/vcenter/folder?type=VIRTUAL_MACHINE`).
    pub async fn list_folders(&self, names: &[&str]) -> Result<Vec<FolderSummary>> {
        let mut query: Vec<(&str, String)> = names.iter().map(|n| ("names", n.to_string())).collect();
        query.push(("type", "VIRTUAL_MACHINE".to_string()));
        let v = self.call(Api::Rest, Method::GET, "/api/vcenter/folder", &query, None, "list folders").await?;
        parse(v, "list folders")
    }
}
