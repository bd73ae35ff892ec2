//! What a backend reports about an environment and its machines: [`EnvironmentInfo`], the
//! hypervisor identities ([`MachineInstance`]) and power states ([`MachineStatus`]).

use serde::{Deserialize, Serialize};

use crate::{Role, StageInfo};

/// A machine as the hypervisor knows it: logical name plus the identity it runs under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineInstance {
    /// Logical name (same in production and its stages).
    pub name: String,
    /// The hypervisor-level name (domain name, VM name), unique on the host.
    pub instance_name: String,
    /// The hypervisor UUID.
    pub uuid: String,
}

/// A summary of an environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentInfo {
    /// The environment's name.
    pub name: String,
    /// The backend that runs it.
    pub backend: String,
    /// Production or stage (with its baseline and ChangeSets).
    pub role: Role,
    /// The machines and the identities they run under.
    pub machines: Vec<MachineInstance>,
}

impl EnvironmentInfo {
    /// The stage information, if this is a stage.
    pub fn stage(&self) -> Option<&StageInfo> {
        match &self.role {
            Role::Stage(s) => Some(s),
            Role::Production => None,
        }
    }
}

/// Power state of a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    /// Running.
    Running,
    /// Paused (vCPUs stopped, process alive).
    Paused,
    /// Not running.
    Stopped,
    /// The backend could not tell (stale process, lost socket); `detail` says why.
    Unknown,
}

/// Power state of one machine, with a note when something is off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineStatus {
    /// Logical machine name.
    pub machine: String,
    /// Its power state.
    pub power: PowerState,
    /// Why the state is unknown or anything else worth telling (stale pid, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}
