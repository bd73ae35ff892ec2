//! [`LibvirtEnvironment`]: one production or stage as a set of libvirt domains.

use async_trait::async_trait;
use stagecore::{
    Baseline, BaselineLayer, Change, ChangeMap, ChangeSet, DiskChanges, DiskIo, Environment, EnvironmentInfo,
    EnvironmentSpec, Error, GuestChannel, MachineInstance, MachineStatus, Result, Role,
};
use time::OffsetDateTime;

use crate::error::NAME;
use crate::freeze::freeze;
use crate::handle::LibvirtEnvironment;
use crate::layers::make_dir;
use crate::machines::Machine;
use crate::xml::meta;

#[async_trait]
impl Environment for LibvirtEnvironment {
    fn name(&self) -> &str {
        &self.name
    }

    async fn info(&self) -> Result<EnvironmentInfo> {
        let ms = self.machines().await?;
        Ok(EnvironmentInfo {
            name: self.name.clone(),
            backend: NAME.into(),
            role: ms[0].record.role.clone(),
            machines: ms
                .iter()
                .map(|m| MachineInstance {
                    name: m.name().into(),
                    instance_name: m.instance.clone(),
                    uuid: m.uuid.clone(),
                })
                .collect(),
        })
    }

    #[tracing::instrument(skip(self), fields(environment = %self.name))]
    async fn spec(&self) -> Result<EnvironmentSpec> {
        let ms = self.machines().await?;
        self.shared.spec_of(&self.name, &ms).await
    }

    async fn status(&self) -> Result<Vec<MachineStatus>> {
        Ok(self
            .machines()
            .await?
            .iter()
            .map(|m| MachineStatus { machine: m.name().into(), power: m.power, detail: None })
            .collect())
    }

    #[tracing::instrument(skip(self), fields(environment = %self.name))]
    /// Starts the machines wave by wave ([`EnvironmentSpec::start_waves`]): before a wave starts,
    /// the guest agents of the earlier machines it starts after must answer (at most the
    /// backend's start wait, default 90 s; machines without an agent channel are not waited for,
    /// nor are machines nothing starts after).
    async fn start(&self) -> Result<()> {
        start_some(self, None).await
    }

    #[tracing::instrument(skip(self), fields(environment = %self.name))]
    async fn stop(&self) -> Result<()> {
        self.stop_domains(crate::handle::running(self.machines().await?, None)).await
    }

    #[tracing::instrument(skip(self), fields(environment = %self.name, ?machines))]
    async fn start_machines(&self, machines: &[String]) -> Result<()> {
        start_some(self, Some(machines)).await
    }

    #[tracing::instrument(skip(self), fields(environment = %self.name, ?machines))]
    async fn stop_machines(&self, machines: &[String]) -> Result<()> {
        let ms = self.machines().await?;
        let spec = self.shared.spec_of(&self.name, &ms).await?;
        stagecore::toolbox::require_machines(&spec, machines)?;
        self.stop_domains(crate::handle::running(ms, Some(machines))).await
    }

    #[tracing::instrument(skip(self), fields(environment = %self.name))]
    async fn take_baseline(&self) -> Result<Baseline> {
        let ms = self.machines().await?;
        if let Role::Stage(_) = ms[0].record.role {
            return Err(Error::Precondition(format!("{} is a stage; baselines are taken of production", self.name)));
        }
        let spec = self.shared.spec_of(&self.name, &ms).await?;
        let id = stagecore::toolbox::new_baseline_id();
        let xml_dir = self.shared.env_dir(&self.name).join("baselines").join(&id);
        make_dir(&xml_dir)?;
        for m in &ms {
            let mut tree = m.tree.clone();
            meta::strip(&mut tree);
            let path = xml_dir.join(format!("{}.xml", m.name()));
            std::fs::write(&path, tree.render()).map_err(|e| crate::error::io(&path, e))?;
        }
        // Host-side files kept with the baseline (production's NVRAM as of now).
        let saved = {
            let (work, dir): (Vec<(String, String, crate::xml::tree::Element)>, _) = (
                ms.iter().map(|m| (m.instance.clone(), m.name().to_string(), m.tree.clone())).collect(),
                xml_dir.clone(),
            );
            self.shared
                .conn
                .run(move |c, uri| {
                    let mut notes = Vec::new();
                    for (instance, machine, tree) in &work {
                        notes.extend(crate::hostfiles::save_for_baseline(c, uri, instance, machine, tree, &dir)?);
                    }
                    Ok(notes)
                })
                .await
        };
        let frozen = match saved {
            Ok(notes) => {
                for note in notes {
                    tracing::warn!(note = %note, "baseline host-side file");
                }
                freeze(self, &ms, &id).await
            }
            Err(e) => Err(e),
        };
        let (frozen, consistency) = match frozen {
            Ok(f) => f,
            Err(e) => {
                // Nothing of a failed baseline stays: production was left as it was (see freeze).
                let _ = std::fs::remove_dir_all(&xml_dir);
                return Err(e);
            }
        };
        let layers = ms
            .iter()
            .zip(frozen)
            .flat_map(|(m, disks)| {
                disks.into_iter().map(|(disk, layer)| BaselineLayer { machine: m.name().into(), disk, layer })
            })
            .collect::<Vec<BaselineLayer>>();
        let frozen_layers = layers.iter().map(|l| l.layer.clone()).collect();
        if let Err(e) = crate::seals::seal_baseline(&self.shared, &self.name, &id, frozen_layers).await {
            let _ = std::fs::remove_dir_all(&xml_dir);
            return Err(e);
        }
        Ok(Baseline {
            id,
            environment: self.name.clone(),
            taken_at: OffsetDateTime::now_utc(),
            spec,
            layers,
            consistency,
        })
    }

    #[tracing::instrument(skip(self, baseline), fields(environment = %self.name, baseline = %baseline.id))]
    async fn disk_changes(&self, baseline: &Baseline) -> Result<Vec<DiskChanges>> {
        let ms = self.machines().await?;
        crate::seals::verify(&self.shared, &self.name, baseline, crate::seals::bases(&ms, baseline)).await?;
        let spec = self.shared.spec_of(&self.name, &ms).await?;
        let mut out = Vec::new();
        for m in &ms {
            let own_baseline = matches!(&m.record.role, Role::Stage(s) if s.baseline.id == baseline.id);
            for (disk, d) in m.parsed.disks() {
                let virtual_size =
                    spec.machine(m.name()).and_then(|s| s.disk(&disk)).and_then(|d| d.size_bytes).unwrap_or(0);
                let base = if own_baseline { m.record.origins.get(&disk).cloned() } else { None }
                    .or_else(|| baseline.layer(m.name(), &disk).map(|l| l.layer.clone()));
                let mut granularity = 1;
                let changes = match (base, d.path()) {
                    (None, _) => {
                        ChangeMap::NotChecked { reason: format!("{disk} is not part of baseline {}", baseline.id) }
                    }
                    (_, None) => ChangeMap::NotChecked { reason: format!("{disk} has no file source") },
                    (Some(base), Some(top)) => {
                        // Local files, or (remote URI) qcow2 metadata over download streams.
                        let t = top.clone();
                        let found = self.images(move |s, c, uri| s.changed_since(c, uri, &t, &base)).await;
                        let found = match found {
                            // A remote disk outside every storage pool cannot be read over the wire.
                            Err(e @ Error::NotFound { .. }) if self.shared.storage.is_remote() => {
                                out.push(DiskChanges {
                                    machine: m.name().into(),
                                    disk,
                                    virtual_size,
                                    granularity,
                                    changes: ChangeMap::NotChecked {
                                        reason: format!(
                                            "{top} is not a storage volume on {} (only files in a storage pool \
                                             can be read over the connection): {e}",
                                            self.shared.conn.uri()
                                        ),
                                    },
                                });
                                continue;
                            }
                            // Any other failure to read this disk's layers: it alone is
                            // NOT_CHECKED, with the reason; the other disks are still checked.
                            Err(e) => {
                                out.push(DiskChanges {
                                    machine: m.name().into(),
                                    disk: disk.clone(),
                                    virtual_size,
                                    granularity,
                                    changes: ChangeMap::NotChecked { reason: format!("{disk} ({top}): {e}") },
                                });
                                continue;
                            }
                            Ok(found) => found,
                        };
                        match found {
                            Some((extents, g)) => {
                                granularity = g;
                                ChangeMap::Checked { extents }
                            }
                            None => ChangeMap::NotChecked {
                                reason: format!("the layer of baseline {} left the chain of {disk}", baseline.id),
                            },
                        }
                    }
                };
                out.push(DiskChanges { machine: m.name().into(), disk, virtual_size, granularity, changes });
            }
        }
        Ok(out)
    }

    async fn apply(&self, change: &Change) -> Result<()> {
        crate::apply::apply(self, change).await
    }

    async fn record_change_set(&self, change_set: &ChangeSet) -> Result<()> {
        let mut ms = self.machines().await?;
        for m in &mut ms {
            match &mut m.record.role {
                Role::Stage(s) => s.change_sets.push(change_set.clone()),
                Role::Production => return Err(Error::Precondition(format!("{} is not a stage", self.name))),
            }
        }
        self.shared.save(&self.name, &ms).await
    }

    /// Always: local files, or storage-volume streams on a remote URI.
    fn disk_io(&self) -> Option<&dyn DiskIo> {
        Some(self)
    }

    /// Always: agent commands go through libvirt, for local and remote URIs alike.
    fn guest(&self) -> Option<&dyn GuestChannel> {
        Some(self)
    }
}

/// Starts the machines of `only` (all when `None`) that do not run, wave by wave ([`EnvironmentSpec::start_waves`]): before a wave starts,
/// the guest agents of the earlier machines it starts after must answer (at most the
/// backend's start wait, default 90 s; machines without an agent channel are not waited for,
/// nor are machines nothing starts after).
async fn start_some(env: &LibvirtEnvironment, only: Option<&[String]>) -> Result<()> {
    let ms = env.machines().await?;
    let spec = env.shared.spec_of(&env.name, &ms).await?;
    if let Some(names) = only {
        stagecore::toolbox::require_machines(&spec, names)?;
    }
    let waves = spec.start_waves()?;
    let awaited: std::collections::BTreeSet<&str> =
        spec.machines.iter().flat_map(|m| m.after.iter().map(String::as_str)).collect();
    for (i, wave) in waves.iter().enumerate() {
        let members: Vec<&Machine> = ms
            .iter()
            .filter(|m| wave.iter().any(|w| w == m.name()))
            .filter(|m| only.is_none_or(|o| o.iter().any(|n| n == m.name())))
            .collect();
        let names: Vec<String> = members.iter().filter(|m| !m.active()).map(|m| m.instance.clone()).collect();
        env.start_domains(names).await?;
        if i + 1 == waves.len() {
            break;
        }
        let mut waits = tokio::task::JoinSet::new();
        for m in members {
            if !awaited.contains(m.name()) || !crate::xml::edit::has_agent_channel(&m.tree) {
                continue;
            }
            let (agent, wait) = (env.agent_of(m), env.shared.start_wait);
            waits.spawn(async move { agent.wait_ready(wait).await });
        }
        while let Some(joined) = waits.join_next().await {
            joined.map_err(|e| Error::backend_msg(NAME, format!("start wait failed: {e}")))?.map_err(|e| {
                Error::Timeout {
                    operation: format!(
                        "start of {} wave {}: waiting for a guest agent the next wave starts after ({e})",
                        env.name,
                        i + 1
                    ),
                    seconds: env.shared.start_wait.as_secs_f64(),
                }
            })?;
        }
    }
    Ok(())
}
