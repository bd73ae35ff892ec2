//! [`LibvirtBackend`]: the [`Backend`] entry point over one libvirt connection.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use stagecore::{
    Backend, Baseline, Capabilities, Environment, EnvironmentInfo, EnvironmentSpec, Error, Result, Role, Selector,
    StageOptions,
};

use crate::conn::{Conn, lv};
use crate::error::NAME;
use crate::handle::LibvirtEnvironment;
use crate::layers::make_dir;
use crate::machines;
use crate::registry;
use crate::shared::Shared;
use crate::storage::Storage;
use crate::xml::meta::{self, MachineRecord};

/// The libvirt backend: one connection (`qemu:///system`, `qemu+ssh://host/system`,
/// `test:///default`) plus a local state directory for image layers and the registry of attached
/// productions. Cloning it shares the connection.
#[derive(Debug, Clone)]
pub struct LibvirtBackend {
    shared: Arc<Shared>,
}

impl LibvirtBackend {
    /// Connects to `uri`, keeping files under `state_dir` (created if needed, made traversable
    /// (0755) so QEMU, running as another user, can open the images in it). Domains created from a
    /// spec use `<domain type='qemu'>` (TCG); see [`LibvirtBackend::with_domain_type`].
    ///
    /// Errors: `Unreachable` when libvirtd cannot be reached, `Unauthenticated` when it refuses us.
    pub async fn connect(uri: &str, state_dir: impl AsRef<Path>) -> Result<Self> {
        let dir = state_dir.as_ref();
        make_dir(dir)?;
        let dir = std::fs::canonicalize(dir).map_err(|e| crate::error::io(dir, e))?;
        let conn = Conn::open(uri).await?;
        let domain_type = if uri.starts_with("test:") { "test" } else { "qemu" }.to_string();
        let start_wait = crate::shared::DEFAULT_START_WAIT;
        let storage = if crate::shared::is_local(uri) {
            Storage::Local { dir: dir.clone() }
        } else {
            Storage::Remote { root: crate::storage::DEFAULT_REMOTE_ROOT.into(), moved: Default::default() }
        };
        Ok(LibvirtBackend { shared: Arc::new(Shared { conn, dir, domain_type, start_wait, storage }) })
    }

    /// For a remote URI: the directory on the host under which each environment gets its
    /// storage pool `stagecore-<env>` (target `<root>/<env>`); default
    /// `/var/lib/libvirt/images/stagecore`. No effect on a local URI (images live in the state
    /// directory).
    pub fn with_remote_root(self, root: &str) -> Self {
        let mut shared = (*self.shared).clone();
        if let Storage::Remote { root: r, .. } = &mut shared.storage {
            *r = root.trim_end_matches('/').to_string();
        }
        LibvirtBackend { shared: Arc::new(shared) }
    }

    /// Bytes moved over libvirt streams (volume downloads and uploads) by this backend so far;
    /// always 0 on a local URI.
    pub fn streamed_bytes(&self) -> u64 {
        self.shared.storage.moved()
    }

    /// Sets `<domain type=…>` for domains created from a spec: `qemu` (TCG, the default), `kvm`.
    pub fn with_domain_type(self, domain_type: &str) -> Self {
        let mut shared = (*self.shared).clone();
        shared.domain_type = domain_type.into();
        LibvirtBackend { shared: Arc::new(shared) }
    }

    /// Sets how long [`stagecore::Environment::start`] waits for the guest agents of one start wave
    /// (machines others start [`after`](stagecore::MachineSpec::after)) before it gives up with
    /// `Timeout`; default 90 s.
    pub fn with_start_wait(self, wait: std::time::Duration) -> Self {
        let mut shared = (*self.shared).clone();
        shared.start_wait = wait;
        LibvirtBackend { shared: Arc::new(shared) }
    }

    /// Stages `baseline` of a production that lives on `source`'s host on **this** backend's
    /// host (cross-host staging). A full clone streams the allocated data of the baseline layer's
    /// chain into the stage's pool here; a linked clone streams it once per baseline into
    /// production's pool here (`stagecore-<production>`, reused by later stages of the same
    /// baseline) and puts the stage's overlays on it. Data goes through libvirt streams
    /// (download on the source, upload here), so it passes through this process; `progress`
    /// gets `stage` / `<stage>/<machine>/<disk>` / `streamed` events in bytes. The stage's
    /// domains come from production's XML as usual; networks are fenced copies (an unfenced
    /// stage needs production's networks to exist here). With `source` on the same URI this is
    /// [`Backend::stage`].
    #[tracing::instrument(skip_all, fields(stage = %options.name, baseline = %baseline.id, from = %source.uri()))]
    pub async fn stage_from(
        &self,
        source: &LibvirtBackend,
        baseline: &Baseline,
        options: &StageOptions,
        progress: Option<&stagecore::Progress>,
    ) -> Result<Arc<dyn Environment>> {
        stagecore::checked::check_stage(&self.capabilities(), options, NAME)?;
        crate::stage::stage(&self.shared, &source.shared, baseline, options, progress).await?;
        self.hand_out(&options.name)
    }

    /// Every environment leaves this backend through the capability check layer.
    fn hand_out(&self, name: &str) -> Result<Arc<dyn Environment>> {
        stagecore::checked::hand_out(Arc::new(self.handle(name)), self.capabilities(), NAME)
    }

    /// The connection URI.
    pub fn uri(&self) -> &str {
        self.shared.conn.uri()
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Opens an environment handle with its concrete type. A domain left suspended or a guest
    /// left frozen by a process that died in the middle of a freeze (its markers are in the state
    /// directory) is resumed and thawed here.
    pub async fn open_libvirt(&self, name: &str) -> Result<LibvirtEnvironment> {
        let ms = self.shared.machines(name).await?;
        let env = self.handle(name);
        crate::freeze::resume_leftovers(&env, &ms).await;
        crate::quiesce::thaw_leftovers(&env, &ms).await;
        Ok(env)
    }

    fn handle(&self, name: &str) -> LibvirtEnvironment {
        LibvirtEnvironment { name: name.into(), shared: self.shared.clone() }
    }

    /// Every domain's record, grouped by environment (metadata and registry).
    async fn all_records(&self) -> Result<BTreeMap<String, Vec<MachineRecord>>> {
        let mut out: BTreeMap<String, Vec<MachineRecord>> = BTreeMap::new();
        let recs = self
            .shared
            .conn
            .run(|c, uri| {
                let mut v = Vec::new();
                for (_, name, tree) in machines::all(c, uri)? {
                    if let Some(r) = meta::record(&tree, &name)? {
                        v.push(r);
                    }
                }
                Ok(v)
            })
            .await?;
        for r in recs {
            out.entry(r.environment.clone()).or_default().push(r);
        }
        for env in registry::names(&self.shared.dir)? {
            for e in registry::load(&self.shared.dir, &env)?.unwrap_or_default() {
                out.entry(env.clone()).or_default().push(e.record);
            }
        }
        Ok(out)
    }

    async fn register(&self, environment: &str, instances: Vec<String>) -> Result<Arc<dyn Environment>> {
        stagecore::name::validate("selector.environment", environment)?;
        if self.shared.exists(environment).await? {
            return Err(Error::already_exists("environment", environment));
        }
        let names = instances.clone();
        let (claimed, mut sources) = self
            .shared
            .conn
            .run(move |c, uri| {
                let (mut claimed, mut sources) = (Vec::new(), Vec::new());
                for n in &names {
                    let dom = lv(uri, "domain", n, c.lookup_domain_by_name(n))?;
                    let tree = machines::tree(uri, &dom, n)?;
                    if let Some(r) = meta::record(&tree, n)? {
                        claimed.push(format!("{n} (in {})", r.environment));
                    }
                    let parsed = crate::xml::domain::DomainXml::parse(&tree.render(), n)?;
                    let files: BTreeMap<String, String> =
                        parsed.disks().filter_map(|(name, d)| Some((name, d.path()?))).collect();
                    sources.push(files);
                }
                Ok((claimed, sources))
            })
            .await?;
        if !claimed.is_empty() {
            return Err(Error::Precondition(format!("domains already belong to environments: {}", claimed.join(", "))));
        }
        let mut entries = Vec::new();
        for (i, inst) in instances.iter().enumerate() {
            stagecore::name::validate(&format!("selector.names[{i}]"), inst)?;
            let record = MachineRecord {
                environment: environment.into(),
                machine: inst.clone(),
                role: Role::Production,
                networks: BTreeMap::new(),
                cidrs: BTreeMap::new(),
                env_labels: BTreeMap::new(),
                owned_networks: Vec::new(),
                origins: BTreeMap::new(),
                snapshots: Vec::new(),
                sources: std::mem::take(&mut sources[i]),
                after: Vec::new(),
                host_paths: BTreeMap::new(),
                host_notes: Vec::new(),
            };
            entries.push(registry::Entry { instance: inst.clone(), record });
        }
        registry::store(&self.shared.dir, environment, &entries)?;
        self.hand_out(environment)
    }
}

#[async_trait]
impl Backend for LibvirtBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        // Local and remote URIs alike: remote images are storage volumes (see `storage`).
        let mut c = Capabilities::default();
        c.create = true;
        c.linked_clone = true;
        c.full_clone = true;
        c.fencing = true;
        c.live_snapshot = true;
        c.atomic_snapshot = true;
        c.disk_drift = true;
        c.disk_io = true;
        // Every kind but ReplaceDiskImage (refused in `apply`: it needs a volume import).
        c.changes = stagecore::ChangeKinds::all();
        c.changes.replace_disk_image = false;
        c.persistent = true;
        c.swap = true;
        c.guest_channel = true;
        c
    }

    #[tracing::instrument(skip_all, fields(environment = %spec.name))]
    async fn create(&self, spec: &EnvironmentSpec) -> Result<Arc<dyn Environment>> {
        crate::create::create(&self.shared, spec).await?;
        self.hand_out(&spec.name)
    }

    #[tracing::instrument(skip_all, fields(environment = %selector.environment()))]
    async fn attach(&self, selector: &Selector) -> Result<Arc<dyn Environment>> {
        match selector {
            Selector::Environment { name } => self.open(name).await,
            Selector::Machines { environment, names } => {
                if names.is_empty() {
                    return Err(Error::invalid("selector.names", "name at least one domain"));
                }
                self.register(environment, names.clone()).await
            }
            Selector::Label { environment, key, value } => {
                let (k, v) = (key.clone(), value.clone());
                let found = self
                    .shared
                    .conn
                    .run(move |c, uri| {
                        let mut found = Vec::new();
                        for (_, name, tree) in machines::all(c, uri)? {
                            let unclaimed = meta::record(&tree, &name)?.is_none();
                            if unclaimed && meta::labels(&tree).get(&k) == Some(&v) {
                                found.push(name);
                            }
                        }
                        Ok(found)
                    })
                    .await?;
                if found.is_empty() {
                    return Err(Error::not_found("domains with label", format!("{key}={value}")));
                }
                self.register(environment, found).await
            }
            Selector::Folder { .. } => Err(Error::not_supported("attach by folder", NAME)),
        }
    }

    async fn stage(&self, baseline: &Baseline, options: &StageOptions) -> Result<Arc<dyn Environment>> {
        stagecore::checked::check_stage(&self.capabilities(), options, NAME)?;
        crate::stage::stage(&self.shared, &self.shared, baseline, options, None).await?;
        self.hand_out(&options.name)
    }

    async fn open(&self, name: &str) -> Result<Arc<dyn Environment>> {
        self.open_libvirt(name).await?;
        self.hand_out(name)
    }

    /// The environments of this backend's state directory: attached ones (its registry) and those
    /// whose files live there. Domains another state directory manages are left out (they can
    /// still be opened by name).
    async fn list(&self) -> Result<Vec<EnvironmentInfo>> {
        let mut out = Vec::new();
        let registered = registry::names(&self.shared.dir)?;
        for name in self.all_records().await?.into_keys() {
            if !registered.contains(&name) && !self.shared.env_dir(&name).is_dir() {
                continue;
            }
            match self.handle(&name).info().await {
                Ok(info) => out.push(info),
                Err(Error::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    #[tracing::instrument(skip(self))]
    async fn destroy(&self, name: &str) -> Result<()> {
        stagecore::name::validate("environment", name)?;
        let registered = registry::load(&self.shared.dir, name)?.is_some();
        let ms = if registered { Vec::new() } else { self.shared.machines(name).await? };
        let all = self.all_records().await?;
        let roles = all.iter().filter_map(|(env, recs)| Some((env.as_str(), &recs.first()?.role)));
        stagecore::toolbox::check_destroy(name, roles)?;
        if registered {
            // An attached production: forget it, even when its domains are gone; never touch them.
            return registry::remove(&self.shared.dir, name);
        }
        // Only what the environment owns: its NVRAM only when it is its own (hostfiles).
        let own_dir = PathBuf::from(self.shared.storage.env_dir(name));
        let names: Vec<(String, u32)> = ms
            .iter()
            .map(|m| (m.instance.clone(), crate::hostfiles::undefine_flags(&m.tree, &m.instance, &own_dir)))
            .collect();
        let networks = ms[0].record.owned_networks.clone();
        let (storage, env) = (self.shared.storage.clone(), name.to_string());
        self.shared
            .conn
            .run(move |c, uri| {
                let flags: BTreeMap<&str, u32> = names.iter().map(|(n, f)| (n.as_str(), *f)).collect();
                let domains: Vec<String> = names.iter().map(|(n, _)| n.clone()).collect();
                crate::conn::each_domain(c, uri, &domains, |n, dom| {
                    if dom.is_active().unwrap_or(false) {
                        dom.destroy()?;
                    }
                    dom.undefine_flags(flags[n]).map(drop).or_else(|e| {
                        tracing::warn!(domain = %n, error = %e, "undefine with flags failed; plain undefine");
                        dom.undefine()
                    })
                })?;
                for n in &networks {
                    if let Ok(net) = c.lookup_network_by_name(n) {
                        let _ = net.destroy();
                        lv(uri, "network", n, net.undefine())?;
                    }
                }
                storage.remove_env(c, uri, &env)
            })
            .await?;
        let dir: PathBuf = self.shared.env_dir(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| crate::error::io(&dir, e))?;
        }
        Ok(())
    }

    async fn swap(&self, production: &str, stage: &str) -> Result<()> {
        crate::swap::swap(&self.shared, production, stage).await
    }
}
