//! [`VsphereBackend`]: the [`Backend`] of vCenter VMs.
//!
//! Contract: productions are *attached* (existing VMs by name or folder; never created, never
//! modified by attaching, never deleted); stages are linked or full clones of a baseline's
//! snapshots (see `stage.rs`); environment membership lives in a local registry directory
//! (`record.rs`). Every environment is handed out through `stagecore::checked::hand_out`. Destroying a stage deletes its VMs; destroying a production only forgets it
//! (after removing the snapshots stagecore took of it, when no linked stage still needs them).
//! `create` and `swap` are `NotSupported`.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use stagecore::{
    Backend, Baseline, Capabilities, DynEnvironment, Environment, EnvironmentInfo, EnvironmentSpec, Error, Result,
    Role, Selector, StageOptions, checked::hand_out, toolbox,
};
use tokio::sync::Mutex;
use tracing::Instrument;

use crate::core::{Shared, VsphereOptions, live_spec, resolve_folder, vm_infos};
use crate::env::VsphereEnvironment;
use crate::record::{MachineRecord, Record, Registry, VsphereExtra, tops};
use crate::vms::{delete_vms, remove_snapshots};
use crate::{BACKEND, VsphereClient, VsphereConfig};

/// The vSphere backend. Cheap to clone.
#[derive(Clone)]
pub struct VsphereBackend {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for VsphereBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsphereBackend")
            .field("client", &self.shared.client)
            .field("options", &self.shared.opts)
            .finish_non_exhaustive()
    }
}

impl VsphereBackend {
    /// Connects to vCenter (logging in, so wrong credentials fail here) and opens the registry.
    /// `VsphereConfig::new(url, user, Secret::new(password))` builds the configuration.
    pub async fn connect(config: VsphereConfig, options: VsphereOptions) -> Result<Self> {
        if let Some(net) = &options.isolated_network
            && net.trim().is_empty()
        {
            return Err(Error::invalid("vsphere.isolated_network", "is empty"));
        }
        let registry = Registry::open(&options.state_dir)?;
        let client = VsphereClient::connect(config).await?;
        Ok(VsphereBackend { shared: Arc::new(Shared { client, opts: options, registry, lock: Mutex::new(()) }) })
    }

    /// Why the capabilities that need VI/JSON (snapshots, linked and full clones of a baseline,
    /// CBT drift) are false, or `None` when VI/JSON is available.
    pub fn vim_unavailable(&self) -> Option<&str> {
        self.shared.client.vim_endpoint().err()
    }

    /// The HTTP client (for inspection and tests).
    pub fn client(&self) -> &VsphereClient {
        &self.shared.client
    }

    /// A handle on environment `name`, checked against the capabilities.
    fn handle(&self, name: &str) -> Result<DynEnvironment> {
        hand_out(Arc::new(VsphereEnvironment::new(name, self.shared.clone())), self.capabilities(), BACKEND)
    }

    /// Finds the VMs a selector names, in a stable order: as listed for names, by name for folders.
    async fn select(&self, selector: &Selector) -> Result<Vec<MachineRecord>> {
        let client = &self.shared.client;
        let found = match selector {
            Selector::Machines { names, .. } => {
                if names.is_empty() {
                    return Err(Error::invalid("selector.names", "must name at least one VM"));
                }
                let mut out = Vec::new();
                for (i, n) in names.iter().enumerate() {
                    let hits = client.list_vms(&[n], &[]).await?;
                    match hits.as_slice() {
                        [one] => out.push((one.vm.clone(), one.name.clone())),
                        [] => return Err(Error::not_found("vSphere VM", n.clone())),
                        _ => {
                            return Err(Error::invalid(
                                format!("selector.names[{i}]"),
                                format!("`{n}` names several VMs"),
                            ));
                        }
                    }
                }
                out
            }
            Selector::Folder { folder, .. } => {
                let id = resolve_folder(client, folder).await?;
                let mut vms: Vec<(String, String)> =
                    client.list_vms(&[], &[&id]).await?.into_iter().map(|v| (v.vm, v.name)).collect();
                vms.sort_by(|a, b| a.1.cmp(&b.1));
                if vms.is_empty() {
                    return Err(Error::not_found("vSphere VM in folder", folder.clone()));
                }
                vms
            }
            Selector::Label { .. } => return Err(Error::not_supported("attach by label (vSphere tags)", BACKEND)),
            Selector::Environment { name } => {
                return Err(Error::invalid("selector", format!("environment `{name}` is opened, not selected")));
            }
        };
        let mut machines: Vec<MachineRecord> = Vec::new();
        for (vm, name) in found {
            let field = if matches!(selector, Selector::Folder { .. }) { "selector.folder" } else { "selector.names" };
            stagecore::name::check(&name).map_err(|reason| {
                Error::invalid(field, format!("VM name {reason}; it cannot serve as a logical machine name"))
            })?;
            if machines.iter().any(|m| m.vm == vm) {
                continue;
            }
            machines.push(MachineRecord { name: name.clone(), vm, instance_name: name });
        }
        Ok(machines)
    }
}

#[async_trait]
impl Backend for VsphereBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        // Snapshots, clones of a baseline snapshot and CBT all go through VI/JSON: without it
        // (vCenter 7.0.x) they are false; `vim_unavailable()` says why.
        let vim = self.shared.client.vim_endpoint().is_ok();
        let mut c = Capabilities::default();
        c.linked_clone = vim;
        c.full_clone = vim;
        c.fencing = vim && self.shared.opts.isolated_network.is_some();
        c.live_snapshot = vim;
        c.atomic_snapshot = false;
        c.disk_drift = vim;
        c.guest_channel = self.shared.opts.guest_credentials.is_some();
        // `apply` reconfigures memory and vCPUs and runs guest changes; NIC, disk and raw
        // disk changes are refused.
        c.changes.set_memory = true;
        c.changes.set_vcpus = true;
        c.changes.guest_command = true;
        c.changes.guest_file = true;
        c.persistent = true;
        c
    }

    async fn create(&self, _spec: &EnvironmentSpec) -> Result<DynEnvironment> {
        Err(Error::not_supported("create (attach existing VMs instead)", BACKEND))
    }

    async fn attach(&self, selector: &Selector) -> Result<DynEnvironment> {
        if let Selector::Environment { name } = selector {
            return self.open(name).await;
        }
        let env = selector.environment().to_string();
        let span = tracing::info_span!("vsphere.attach", environment = %env);
        async {
            stagecore::name::validate("environment", &env)?;
            let machines = self.select(selector).await?;
            let _guard = self.shared.lock.lock().await;
            if self.shared.registry.exists(&env)? {
                return Err(Error::already_exists("environment", &env));
            }
            for other in self.shared.registry.all()? {
                if let Some(m) = machines.iter().find(|m| other.backend.machines.iter().any(|o| o.vm == m.vm)) {
                    return Err(Error::already_exists(
                        "vSphere VM in an environment",
                        format!("{} ({}) belongs to {}", m.instance_name, m.vm, other.name),
                    ));
                }
            }
            let infos = vm_infos(&self.shared.client, &machines).await?;
            let spec = live_spec(&self.shared, &env, &Role::Production, &machines, &infos);
            let disks = tops(&spec, &machines);
            let record = Record::production(spec, disks, VsphereExtra { machines, points: BTreeMap::new() });
            self.shared.registry.save(&record)?;
            tracing::info!(machines = record.backend.machines.len(), "attached");
            self.handle(&env)
        }
        .instrument(span)
        .await
    }

    async fn stage(&self, baseline: &Baseline, options: &StageOptions) -> Result<DynEnvironment> {
        let span = tracing::info_span!("vsphere.stage", stage = %options.name, baseline = %baseline.id);
        async {
            crate::stage::stage(&self.shared, &self.capabilities(), baseline, options).await?;
            self.handle(&options.name)
        }
        .instrument(span)
        .await
    }

    async fn open(&self, name: &str) -> Result<DynEnvironment> {
        self.shared.registry.load(name)?;
        self.handle(name)
    }

    async fn list(&self) -> Result<Vec<EnvironmentInfo>> {
        let mut out = Vec::new();
        for r in self.shared.registry.all()? {
            match VsphereEnvironment::new(&r.name, self.shared.clone()).info().await {
                Ok(info) => out.push(info),
                // A VM deleted behind stagecore's back must not hide the other environments.
                Err(Error::NotFound { kind, name, .. }) => {
                    tracing::warn!(environment = %r.name, missing = %format!("{kind} {name}"), "listing from the registry only");
                    out.push(r.info(BACKEND));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    async fn destroy(&self, name: &str) -> Result<()> {
        let span = tracing::info_span!("vsphere.destroy", environment = %name);
        async {
            let _guard = self.shared.lock.lock().await;
            let record = self.shared.registry.load(name)?;
            match &record.role {
                Role::Stage(_) => delete_vms(&self.shared.client, &record.backend.machines).await?,
                Role::Production => self.forget_production(&record).await?,
            }
            self.shared.registry.remove(name)?;
            tracing::info!("destroyed");
            Ok(())
        }
        .instrument(span)
        .await
    }

    async fn swap(&self, _production: &str, _stage: &str) -> Result<()> {
        Err(Error::not_supported("swap", BACKEND))
    }
}

impl VsphereBackend {
    /// Removes the snapshots stagecore took of a production (refusing while a linked stage still
    /// stands on one of its baselines); the VMs themselves are left alone.
    async fn forget_production(&self, record: &Record) -> Result<()> {
        let others = self.shared.registry.all()?;
        toolbox::check_destroy(&record.name, others.iter().map(|o| (o.name.as_str(), &o.role)))?;
        remove_snapshots(&self.shared.client, record.backend.points.values().flatten()).await
    }
}
