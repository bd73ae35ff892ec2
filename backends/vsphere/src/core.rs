//! What the backend, its environments and its stage code share: the options, the connection
//! and registry ([`Shared`]), and the vCenter lookups they all use (folders, live specs).
//! `backend.rs`, `env.rs`, `stage.rs` and `vms.rs` depend on this module; it depends on none of
//! them, so calls go one way.

use std::path::PathBuf;

use stagecore::{EnvironmentSpec, Error, Result, Role, Secret};
use tokio::sync::Mutex;

use crate::inspect::{Fencing, environment_spec, machine_spec};
use crate::record::{MachineRecord, Registry};
use crate::{VmInfo, VsphereClient};

/// How the backend places stages and where it keeps its registry.
#[derive(Clone, Debug)]
pub struct VsphereOptions {
    /// The port group fenced stages' NICs are moved onto (an admin-made port group without
    /// uplink). Without it, fencing is not declared and fenced stages are `NotSupported`.
    pub isolated_network: Option<String>,
    /// The VM folder stages are created in (name or id, e.g. `stage` or `group-v11`); `None` puts
    /// each stage VM in the folder of the production VM it is cloned from.
    pub folder: Option<String>,
    /// The registry directory: one JSON file per environment (see the crate docs).
    pub state_dir: PathBuf,
    /// Guest OS credentials for guest operations (VMware Tools); `None`: no guest channel.
    pub guest_credentials: Option<GuestCredentials>,
}

/// A guest OS account for guest operations. The password is a [`Secret`]: never in `Debug`,
/// errors or logs.
#[derive(Clone, Debug)]
pub struct GuestCredentials {
    /// Guest user name, e.g. `root`.
    pub username: String,
    /// Guest password.
    pub password: Secret,
}

impl VsphereOptions {
    /// Options with a registry directory, no isolated network, no stage folder, no guest channel.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        VsphereOptions { isolated_network: None, folder: None, state_dir: state_dir.into(), guest_credentials: None }
    }
}

/// The connection, options and registry of one backend, shared by its environment handles.
pub(crate) struct Shared {
    pub(crate) client: VsphereClient,
    pub(crate) opts: VsphereOptions,
    pub(crate) registry: Registry,
    /// Serialises registry read-modify-write cycles within this process.
    pub(crate) lock: Mutex<()>,
}

/// A folder id from a name or id.
pub(crate) async fn resolve_folder(client: &VsphereClient, folder: &str) -> Result<String> {
    let all = client.list_folders(&[]).await?;
    let hits: Vec<_> = all.iter().filter(|f| f.name == folder || f.folder == folder).collect();
    match hits.as_slice() {
        [one] => Ok(one.folder.clone()),
        [] => Err(Error::not_found("vSphere folder", folder)),
        _ => Err(Error::invalid("vsphere.folder", format!("`{folder}` names several folders; give its id"))),
    }
}

/// The details of every machine's VM, in order.
pub(crate) async fn vm_infos(client: &VsphereClient, machines: &[MachineRecord]) -> Result<Vec<VmInfo>> {
    let mut out = Vec::new();
    for m in machines {
        out.push(client.get_vm(&m.vm).await?);
    }
    Ok(out)
}

/// The spec of environment `name` made of `machines` as vCenter reports them (`infos`); on a
/// fenced stage, NICs on the isolated network report their production network.
pub(crate) fn live_spec(
    shared: &Shared,
    name: &str,
    role: &Role,
    machines: &[MachineRecord],
    infos: &[VmInfo],
) -> EnvironmentSpec {
    let stage = match role {
        Role::Stage(s) if s.fenced => Some(s),
        _ => None,
    };
    let fencing = match (stage, shared.opts.isolated_network.as_deref()) {
        (Some(s), Some(isolated)) => Some(Fencing { isolated, baseline: &s.baseline.spec }),
        _ => None,
    };
    let machines = machines.iter().zip(infos).map(|(m, info)| machine_spec(&m.name, info, fencing.as_ref())).collect();
    environment_spec(name, machines)
}
