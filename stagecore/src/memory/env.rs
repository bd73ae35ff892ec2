//! [`MemoryEnvironment`]: the [`Environment`], [`Snapshot`] and [`DiskIo`] of one in-memory
//! environment.

use std::sync::{Arc, MutexGuard};

use async_trait::async_trait;
use time::OffsetDateTime;

use super::state::{self, DiskState, EnvState, State};
use super::{NAME, Shared};
use crate::{
    Baseline, Change, ChangeMap, ChangeSet, Consistency, DiskChanges, DiskIo, Environment, EnvironmentInfo,
    EnvironmentSpec, Error, GuestChannel, GuestOutput, MachineStatus, PowerState, Result, Snapshot, SnapshotInfo,
    toolbox::{SnapshotRecord, check_range, disk_key},
};

/// A handle on one in-memory environment. Cheap to clone; all handles share the backend's state.
#[derive(Debug, Clone)]
pub struct MemoryEnvironment {
    name: String,
    shared: Arc<Shared>,
}

impl MemoryEnvironment {
    pub(crate) fn new(name: &str, shared: Arc<Shared>) -> Self {
        MemoryEnvironment { name: name.into(), shared }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().expect("state lock")
    }

    fn with<T>(&self, f: impl FnOnce(&mut EnvState, &mut super::disk::LayerStore) -> Result<T>) -> Result<T> {
        let mut guard = self.lock();
        let State { layers, envs } = &mut *guard;
        let env = envs.get_mut(&self.name).ok_or_else(|| Error::not_found("environment", &self.name))?;
        f(env, layers)
    }
}

#[async_trait]
impl Environment for MemoryEnvironment {
    fn name(&self) -> &str {
        &self.name
    }

    async fn info(&self) -> Result<EnvironmentInfo> {
        self.with(|env, _| Ok(env.info(NAME)))
    }

    async fn spec(&self) -> Result<EnvironmentSpec> {
        self.with(|env, _| Ok(env.spec.clone()))
    }

    async fn status(&self) -> Result<Vec<MachineStatus>> {
        self.with(|env, _| {
            Ok(env
                .backend
                .power
                .iter()
                .map(|(m, p)| MachineStatus { machine: m.clone(), power: *p, detail: None })
                .collect())
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(environment = %self.name))]
    async fn start(&self) -> Result<()> {
        self.shared.faults.check("start")?;
        self.with(|env, _| {
            state::set_power_all(env, PowerState::Running);
            for g in env.backend.guests.values_mut() {
                g.agent = true;
            }
            Ok(())
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(environment = %self.name))]
    async fn stop(&self) -> Result<()> {
        self.shared.faults.check("stop")?;
        self.with(|env, _| {
            state::set_power_all(env, PowerState::Stopped);
            Ok(())
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(environment = %self.name, ?machines))]
    async fn start_machines(&self, machines: &[String]) -> Result<()> {
        self.shared.faults.check("start")?;
        self.with(|env, _| {
            crate::toolbox::require_machines(&env.spec, machines)?;
            for m in machines {
                state::set_power(env, m, PowerState::Running);
                if let Some(g) = env.backend.guests.get_mut(m) {
                    g.agent = true;
                }
            }
            Ok(())
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(environment = %self.name, ?machines))]
    async fn stop_machines(&self, machines: &[String]) -> Result<()> {
        self.shared.faults.check("stop")?;
        self.with(|env, _| {
            crate::toolbox::require_machines(&env.spec, machines)?;
            for m in machines {
                state::set_power(env, m, PowerState::Stopped);
            }
            Ok(())
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(environment = %self.name))]
    async fn take_baseline(&self) -> Result<Baseline> {
        self.shared.faults.check("take_baseline")?;
        self.with(state::take_baseline)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(environment = %self.name))]
    async fn disk_changes(&self, baseline: &Baseline) -> Result<Vec<DiskChanges>> {
        self.shared.faults.check("disk_changes")?;
        self.with(|env, layers| {
            let mut out = Vec::new();
            for (machine, disk) in env.spec.machines.iter().flat_map(|m| m.disks.iter().map(|d| (&m.name, &d.name))) {
                let key = disk_key(machine, disk);
                let Some(d) = env.disks.get(&key) else { continue };
                let base = env.origin(&baseline.id, &key).map(|o| o.top);
                let changes = match base.and_then(|b| layers.changed_since(d.top, b, d.size)) {
                    Some(extents) => ChangeMap::Checked { extents },
                    None if base.is_none() => ChangeMap::NotChecked {
                        reason: format!("{machine}/{disk} is not part of baseline {}", baseline.id),
                    },
                    None => ChangeMap::NotChecked {
                        reason: format!("baseline {} layer left the chain of {machine}/{disk}", baseline.id),
                    },
                };
                out.push(DiskChanges {
                    machine: machine.clone(),
                    disk: disk.clone(),
                    virtual_size: d.size,
                    granularity: super::BLOCK,
                    changes,
                });
            }
            Ok(out)
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(environment = %self.name))]
    async fn apply(&self, change: &Change) -> Result<()> {
        self.shared.faults.check("apply")?;
        let env_name = self.name.clone();
        if matches!(change, Change::GuestCommand { .. } | Change::GuestFile { .. }) {
            self.with(|env, _| change.apply_to_spec(&mut env.spec.clone(), 0))?;
            return crate::guest::apply_guest_change(&env_name, self, change).await;
        }
        self.with(|env, layers| {
            let mut spec = env.spec.clone();
            change.apply_to_spec(&mut spec, 0)?;
            let key = |d: &str| disk_key(change.machine(), d);
            match change {
                Change::AddDisk { disk, .. } => {
                    let size = disk.size_bytes.unwrap_or(0);
                    let m = spec.machine_mut(change.machine()).expect("checked by apply_to_spec");
                    let d = m.disks.last_mut().expect("just added");
                    d.source = format!("memory:{env_name}/{}/{}", change.machine(), disk.name);
                    env.disks.insert(key(&disk.name), DiskState { top: layers.overlay(None), size });
                }
                Change::RemoveDisk { disk, .. } => {
                    env.disks.remove(&key(disk));
                }
                Change::AddNic { nic, .. } => {
                    let m = spec.machine_mut(change.machine()).expect("checked by apply_to_spec");
                    let n = m.nics.iter_mut().find(|n| n.name == nic.name).expect("just added");
                    n.mac.get_or_insert_with(crate::random_mac);
                }
                Change::WriteDisk { disk, offset, data, .. } => {
                    let d = state::disk(env, change.machine(), disk)?;
                    check_range(&env_name, change.machine(), disk, d.size, *offset, data.len() as u64)?;
                    layers.write(d.top, *offset, data);
                }
                Change::ReplaceDiskImage { disk, image, .. } => {
                    let top: usize = image
                        .strip_prefix("layer:")
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| Error::invalid("image", format!("{image:?} is not a memory layer (layer:N)")))?;
                    let copy = layers.flatten(top);
                    let d = state::disk(env, change.machine(), disk)?;
                    env.disks.insert(key(disk), DiskState { top: layers.overlay(Some(copy)), size: d.size });
                }
                Change::GuestCommand { .. } | Change::GuestFile { .. } => {
                    return Err(Error::Precondition("guest changes go through the simulated guest".into()));
                }
                Change::SetMemory { .. } | Change::SetVcpus { .. } | Change::RemoveNic { .. } => {}
            }
            env.spec = spec;
            Ok(())
        })
    }

    async fn record_change_set(&self, change_set: &ChangeSet) -> Result<()> {
        self.with(|env, _| env.record_change_set(change_set))
    }

    fn disk_io(&self) -> Option<&dyn DiskIo> {
        Some(self)
    }

    fn guest(&self) -> Option<&dyn GuestChannel> {
        Some(self)
    }
}

#[async_trait]
impl Snapshot for MemoryEnvironment {
    #[tracing::instrument(level = "debug", skip_all, fields(environment = %self.name))]
    async fn create_snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        self.shared.faults.check("create_snapshot")?;
        self.with(|env, layers| {
            env.require_new_snapshot(name)?;
            let frozen = state::freeze_all(env, layers);
            let info = SnapshotInfo {
                name: name.into(),
                environment: env.name.clone(),
                created_at: OffsetDateTime::now_utc(),
                spec: env.spec.clone(),
                consistency: Consistency::CrashConsistent,
                memory: false,
                machines: Default::default(),
            };
            env.backend.snapshot_guests.insert(name.to_string(), env.backend.guests.clone());
            env.snapshots.push(SnapshotRecord { info: info.clone(), layers: frozen });
            Ok(info)
        })
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.with(|env, _| Ok(env.snapshot_infos()))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(environment = %self.name))]
    async fn revert_snapshot(&self, name: &str) -> Result<()> {
        self.shared.faults.check("revert_snapshot")?;
        self.with(|env, layers| {
            let snap = env.snapshot(name)?;
            let disks = snap
                .layers
                .iter()
                .map(|(k, d)| (k.clone(), DiskState { top: layers.overlay(Some(d.top)), size: d.size }))
                .collect();
            env.spec = snap.info.spec.clone();
            env.disks = disks;
            env.backend.guests = env.backend.snapshot_guests.get(name).cloned().unwrap_or_default();
            let running: Vec<String> = env.backend.power.keys().cloned().collect();
            let spec = &env.spec;
            env.backend.power.retain(|m, _| spec.machine(m).is_some());
            for m in &env.spec.machines {
                if !running.contains(&m.name) {
                    env.backend.power.insert(m.name.clone(), PowerState::Stopped);
                }
            }
            Ok(())
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(environment = %self.name))]
    async fn delete_snapshot(&self, name: &str) -> Result<()> {
        self.shared.faults.check("delete_snapshot")?;
        self.with(|env, _| {
            env.remove_snapshot(name)?;
            env.backend.snapshot_guests.remove(name);
            Ok(())
        })
    }
}

#[async_trait]
impl DiskIo for MemoryEnvironment {
    async fn read(&self, machine: &str, disk: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        self.with(|env, layers| {
            let d = state::disk(env, machine, disk)?;
            check_range(&env.name, machine, disk, d.size, offset, length)?;
            Ok(layers.read(d.top, offset, length))
        })
    }

    async fn write(&self, machine: &str, disk: &str, offset: u64, data: &[u8]) -> Result<()> {
        self.shared.faults.check("write")?;
        self.with(|env, layers| {
            let d = state::disk(env, machine, disk)?;
            check_range(&env.name, machine, disk, d.size, offset, data.len() as u64)?;
            layers.write(d.top, offset, data);
            Ok(())
        })
    }

    async fn digest(&self, machine: &str, disk: &str) -> Result<[u8; 32]> {
        self.with(|env, layers| {
            let d = state::disk(env, machine, disk)?;
            Ok(layers.digest(d.top, d.size))
        })
    }
}

impl MemoryEnvironment {
    /// The simulated guest of a running machine whose agent answers, or the error a real channel
    /// would give.
    fn sim<T>(&self, machine: &str, f: impl FnOnce(&mut EnvState, &str) -> Result<T>) -> Result<T> {
        self.with(|env, _| {
            let endpoint = || format!("{NAME}:{}/{machine} guest agent", env.name);
            let power = *env
                .backend
                .power
                .get(machine)
                .ok_or_else(|| Error::not_found("machine", format!("{}/{machine}", env.name)))?;
            if power != PowerState::Running {
                return Err(Error::Unreachable { endpoint: endpoint(), reason: format!("the machine is {power:?}") });
            }
            match env.backend.guests.get(machine) {
                Some(g) if g.agent => f(env, machine),
                Some(_) => Err(Error::Unreachable { endpoint: endpoint(), reason: "the agent does not answer".into() }),
                None => Err(Error::Unreachable { endpoint: endpoint(), reason: "the machine has no guest".into() }),
            }
        })
    }
}

fn probe_answer(env: &EnvState, from: &str, probe: &super::guest::Probe) -> GuestOutput {
    let target = match probe.host.as_str() {
        "localhost" | "127.0.0.1" | "::1" | "" => Some(from),
        host => env.backend.guests.contains_key(host).then_some(host),
    };
    let reply = |code: i32, stdout: String, stderr: &str| GuestOutput {
        exit_code: code,
        stdout: stdout.into_bytes(),
        stderr: stderr.as_bytes().to_vec(),
        truncated: false,
    };
    let Some(target) = target else {
        return reply(1, String::new(), &format!("stagecore-probe: cannot resolve {} (simulated)", probe.host));
    };
    let running = env.backend.power.get(target) == Some(&PowerState::Running);
    let guest = env.backend.guests.get(target);
    match guest {
        Some(g) if running && g.ports.contains(&probe.port) => match probe.kind.as_str() {
            "http" => reply(0, format!("HTTP/1.0 {} simulated\n", g.http_status), ""),
            _ => reply(0, String::new(), ""),
        },
        _ => reply(
            1,
            String::new(),
            &format!("connect to {}:{}: connection refused (simulated)", probe.host, probe.port),
        ),
    }
}

#[async_trait]
impl GuestChannel for MemoryEnvironment {
    async fn exec(&self, machine: &str, request: &crate::GuestExec) -> Result<GuestOutput> {
        self.sim(machine, |env, machine| {
            let guest = env.backend.guests.get_mut(machine).expect("checked by sim");
            match guest.exec(request)? {
                super::guest::Exec::Done(out) => Ok(out),
                super::guest::Exec::Probe(p) => Ok(probe_answer(env, machine, &p)),
            }
        })
    }

    async fn write_file(&self, machine: &str, path: &str, content: &[u8], mode: Option<u32>) -> Result<()> {
        self.sim(machine, |env, machine| {
            let guest = env.backend.guests.get_mut(machine).expect("checked by sim");
            let mode = mode.or_else(|| guest.files.get(path).map(|f| f.1)).unwrap_or(0o644);
            guest.files.insert(path.to_string(), (content.to_vec(), mode));
            Ok(())
        })
    }

    async fn read_file(&self, machine: &str, path: &str) -> Result<Vec<u8>> {
        self.sim(machine, |env, machine| {
            let guest = env.backend.guests.get(machine).expect("checked by sim");
            guest
                .files
                .get(path)
                .map(|f| f.0.clone())
                .ok_or_else(|| Error::not_found("guest file", format!("{}/{machine}:{path}", env.name)))
        })
    }

    async fn wait_ready(&self, machine: &str, _timeout: std::time::Duration) -> Result<()> {
        self.sim(machine, |_, _| Ok(()))
    }
}
