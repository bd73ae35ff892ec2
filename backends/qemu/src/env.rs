//! [`QemuEnvironment`]: the [`Environment`] of one QEMU-run environment — identity, power,
//! baselines and changed extents.
//!
//! Contract: every operation holds the environment's in-process lock for its whole duration
//! (the cross-process lock is held as long as any handle lives). Power state comes from the
//! process and QMP, never from the record. Changed extents are read from qcow2 allocation above
//! the baseline's layer, after QEMU flushed a running machine's disks, so no completed write is
//! missed; disks outside the baseline are `NotChecked` with the reason.

use async_trait::async_trait;
use stagecore::{
    Baseline, BaselineLayer, Change, ChangeMap, ChangeSet, DiskChanges, DiskIo, Environment, EnvironmentInfo,
    EnvironmentSpec, Error, GuestChannel, MachineStatus, PowerState, Result,
};
use time::OffsetDateTime;
use tracing::Instrument;

use crate::error::BACKEND;
use crate::machines::{self, Liveness};
use crate::shared::{EnvShared, EnvState, QemuEnvironment, blocking};
use crate::store::{QemuRecord, disk_key};

impl QemuEnvironment {
    /// The QEMU argv of `machine` as it would be started now (without the binary). For
    /// inspection and tests (e.g. proving NICs are fenced).
    pub async fn machine_argv(&self, machine: &str) -> Result<Vec<std::ffi::OsString>> {
        let st = self.shared.state.lock().await;
        let rec = st.rec(&self.shared.name)?;
        let m = rec.spec.require_machine(machine)?;
        machines::machine_config(&self.shared, rec, m)?.argv_with_accel(self.shared.ctx.accel)
    }

    /// The writable top layer file of `machine`/`disk`.
    pub async fn disk_top(&self, machine: &str, disk: &str) -> Result<std::path::PathBuf> {
        self.shared.state.lock().await.rec(&self.shared.name)?.top(machine, disk).cloned()
    }

    /// The pid of `machine`'s QEMU, when one of ours is alive.
    pub async fn machine_pid(&self, machine: &str) -> Result<Option<u32>> {
        let paths = machines::qemu_paths(&self.shared, machine);
        Ok(crate::process::QemuProcess::find(&paths).await?.map(|p| p.pid()))
    }

    /// The guest agent client of running `machine` (the one the backend uses: calls are
    /// serialised with the backend's own), e.g. for `fsfreeze_status` or `osinfo`.
    /// `Precondition` when the machine does not run.
    pub async fn guest_agent(&self, machine: &str) -> Result<stagecore_qga::Agent> {
        let mut st = self.shared.state.lock().await;
        crate::freeze::recover(&self.shared, &mut st).await;
        crate::guest::agent(&self.shared, &mut st, machine).await
    }

    /// The serial console log of `machine` (every boot appends to it).
    pub fn console_log(&self, machine: &str) -> std::path::PathBuf {
        machines::console_log(&self.shared, machine)
    }

    /// Settles what a process that died inside a baseline/snapshot left: machines it paused
    /// are resumed, guests it froze are thawed (runs by itself when the environment is opened;
    /// problems are logged and retried on the next operation).
    pub(crate) async fn recover(&self) {
        let mut st = self.shared.state.lock().await;
        crate::freeze::recover(&self.shared, &mut st).await;
    }

    /// Runs an HMP command line on `machine`'s running QEMU (through the environment's own QMP
    /// session) and returns its output. For tools and tests; `Precondition` when it does not run.
    pub async fn human_monitor_command(&self, machine: &str, command_line: &str) -> Result<String> {
        let mut st = self.shared.state.lock().await;
        st.rec(&self.shared.name)?.spec.require_machine(machine)?;
        match machines::live_or_down(&self.shared, &mut st, machine).await? {
            Some(q) => q.human_monitor_command(command_line).await,
            None => Err(Error::Precondition(format!("machine {}/{machine} is not running", self.shared.name))),
        }
    }

    /// Merges the layers of this environment's disk chains that nothing needs as separate files
    /// any more — layers of deleted snapshots, and baseline layers no existing stage was made
    /// from (those baselines are retired) — so chains do not grow with every baseline and
    /// snapshot. Guest-visible content does not change. Running machines are merged live with
    /// QMP `block-stream`, stopped ones with `qemu-img rebase`. Layers of existing snapshots,
    /// baselines in use and files other environments chain through are kept. See
    /// `docs/backends/qemu.md`, "Collapsing layers".
    pub async fn collapse_layers(&self) -> Result<crate::CollapseReport> {
        let mut st = self.shared.state.lock().await;
        crate::collapse::collapse(&self.shared, &mut st, true).instrument(self.span("collapse_layers")).await
    }
}

/// Starts every machine of the environment that does not run, in start order (see
/// [`start_some`]).
pub(crate) async fn start_all(shared: &EnvShared, st: &mut EnvState) -> Result<()> {
    start_some(shared, st, None).await
}

/// Starts the machines of `only` (all when `None`) that do not run, wave by wave
/// ([`stagecore::EnvironmentSpec::start_waves`]): before a wave is launched, every machine its
/// machines start `after` that runs must have a guest agent that answers (bounded by
/// `QemuConfig::agent_timeout`); machines nothing starts after are never waited for. Machines of
/// one wave are launched concurrently; when some fail, the others keep running, later waves are
/// not started, and the first error is returned.
pub(crate) async fn start_some(shared: &EnvShared, st: &mut EnvState, only: Option<&[String]>) -> Result<()> {
    crate::freeze::recover(shared, st).await;
    let spec = st.rec(&shared.name)?.spec.clone();
    let waves = spec.start_waves()?;
    for (i, wave) in waves.iter().enumerate() {
        let wanted: Vec<String> = wave.iter().filter(|m| only.is_none_or(|o| o.contains(m))).cloned().collect();
        let (mut launch, scan) = (Vec::new(), crate::process::ProcScan::new());
        for m in wanted {
            if machines::live_or_down_in(shared, st, &m, &scan).await?.is_none() {
                launch.push(m);
            }
        }
        if launch.is_empty() {
            continue;
        }
        wait_for_dependencies(shared, st, &spec, &launch).await?;
        launch_wave(shared, st, &launch, i).await?;
    }
    Ok(())
}

/// Waits (all at once) until the agent of every running machine that a machine of `launch`
/// starts after answers.
async fn wait_for_dependencies(
    shared: &EnvShared,
    st: &mut EnvState,
    spec: &EnvironmentSpec,
    launch: &[String],
) -> Result<()> {
    let mut deps: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for m in launch {
        for dep in spec.machine(m).map(|x| x.after.clone()).unwrap_or_default() {
            deps.entry(dep).or_default().push(m.clone());
        }
    }
    let mut waits = Vec::new();
    for (dep, dependents) in deps {
        if machines::live_or_down(shared, st, &dep).await?.is_none() {
            tracing::info!(env = %shared.name, machine = %dep, "not running: its dependents start without waiting for it");
            continue;
        }
        let agent = crate::guest::running_agent(shared, st, &dep);
        waits.push((dep, dependents, agent));
    }
    let limit = shared.ctx.agent_timeout;
    let results = futures::future::join_all(
        waits.iter().map(|(dep, _, agent)| crate::guest::wait_ready(shared, agent, dep, limit)),
    )
    .await;
    for ((dep, dependents, _), r) in waits.iter().zip(results) {
        if r.is_ok() {
            st.agentless.remove(dep);
        }
        if let Err(e) = r {
            let env = &shared.name;
            let socket = machines::agent_socket(shared, dep);
            let operation = format!(
                "starting {env}/{} after {env}/{dep}: waiting for the guest agent of {env}/{dep} (guest-ping on {}): {e}",
                dependents.join(", "),
                socket.display()
            );
            return Err(match e {
                Error::Unreachable { .. } | Error::Timeout { .. } => {
                    Error::Timeout { operation, seconds: limit.as_secs_f64() }
                }
                other => other,
            });
        }
    }
    Ok(())
}

/// Launches the machines of one wave concurrently.
async fn launch_wave(shared: &EnvShared, st: &mut EnvState, names: &[String], wave: usize) -> Result<()> {
    let mut launches = tokio::task::JoinSet::new();
    for m in names {
        let config = machines::prepare(shared, st, m)?;
        let launcher = shared.ctx.launcher.clone();
        let span = tracing::info_span!("qemu.start", env = %shared.name, machine = %m, wave);
        let m = m.clone();
        launches.spawn(async move { (m, launcher.launch(&config).await) }.instrument(span));
    }
    let mut result = Ok(());
    while let Some(joined) = launches.join_next().await {
        match joined {
            Ok((m, Ok(launched))) => {
                tracing::info!(env = %shared.name, machine = %m, wave, "machine started");
                st.forget_agent(&m);
                st.qmp.insert(m, launched.qmp);
            }
            Ok((_, Err(e))) => result = result.and(Err(e)),
            Err(e) => result = result.and(Err(crate::error::msg(format!("launch task failed: {e}")))),
        }
    }
    result
}

/// Stops every machine; returns the ones that were running.
pub(crate) async fn stop_all(shared: &EnvShared, st: &mut EnvState) -> Result<Vec<String>> {
    let names: Vec<String> = st.rec(&shared.name)?.spec.machines.iter().map(|m| m.name.clone()).collect();
    let mut was = Vec::new();
    for m in names {
        if machines::stop_machine(shared, st, &m).await? {
            was.push(m);
        }
    }
    Ok(was)
}

#[async_trait]
impl Environment for QemuEnvironment {
    fn name(&self) -> &str {
        &self.shared.name
    }

    async fn info(&self) -> Result<EnvironmentInfo> {
        Ok(self.shared.state.lock().await.rec(&self.shared.name)?.info(BACKEND))
    }

    async fn spec(&self) -> Result<EnvironmentSpec> {
        Ok(self.shared.state.lock().await.rec(&self.shared.name)?.spec.clone())
    }

    async fn status(&self) -> Result<Vec<MachineStatus>> {
        let shared = &self.shared;
        let mut st = shared.state.lock().await;
        let names: Vec<String> = st.rec(&shared.name)?.spec.machines.iter().map(|m| m.name.clone()).collect();
        let (mut out, scan) = (Vec::new(), crate::process::ProcScan::new());
        for machine in names {
            let (power, detail) = match machines::liveness(shared, &mut st, &machine, &scan).await? {
                Liveness::Live(q) => match q.query_status().await {
                    Ok(s) if s.running => (PowerState::Running, None),
                    Ok(s) => (PowerState::Paused, Some(format!("run state {:?}", s.status))),
                    Err(e) => (PowerState::Unknown, Some(format!("query-status failed: {e}"))),
                },
                Liveness::Down(None) => (PowerState::Stopped, None),
                Liveness::Down(Some(why)) | Liveness::Unknown(why) => (PowerState::Unknown, Some(why)),
            };
            out.push(MachineStatus { machine, power, detail });
        }
        Ok(out)
    }

    async fn start(&self) -> Result<()> {
        let mut st = self.shared.state.lock().await;
        start_all(&self.shared, &mut st).instrument(self.span("start")).await
    }

    async fn stop(&self) -> Result<()> {
        let mut st = self.shared.state.lock().await;
        stop_all(&self.shared, &mut st).instrument(self.span("stop")).await.map(drop)
    }

    async fn start_machines(&self, machines: &[String]) -> Result<()> {
        let mut st = self.shared.state.lock().await;
        stagecore::toolbox::require_machines(&st.rec(&self.shared.name)?.spec, machines)?;
        start_some(&self.shared, &mut st, Some(machines)).instrument(self.span("start_machines")).await
    }

    async fn stop_machines(&self, machines: &[String]) -> Result<()> {
        let shared = &self.shared;
        let mut st = shared.state.lock().await;
        stagecore::toolbox::require_machines(&st.rec(&shared.name)?.spec, machines)?;
        async {
            for m in machines {
                machines::stop_machine(shared, &mut st, m).await?;
            }
            Ok(())
        }
        .instrument(self.span("stop_machines"))
        .await
    }

    async fn take_baseline(&self) -> Result<Baseline> {
        let shared = &self.shared;
        let mut st = shared.state.lock().await;
        st.rec(&shared.name)?.require_production()?;
        let crate::freeze::Frozen { layers: frozen, consistency } =
            crate::freeze::freeze_all(shared, &mut st).instrument(self.span("take_baseline")).await?;
        let seals = crate::seals::seal_frozen(&frozen).await?;
        let rec = st.rec_mut(&shared.name)?;
        rec.backend.seals.extend(seals);
        let id = stagecore::toolbox::new_baseline_id();
        let mut layers = Vec::new();
        for m in &rec.spec.machines {
            for d in &m.disks {
                let layer = frozen.get(&disk_key(&m.name, &d.name)).expect("every disk is frozen");
                layers.push(BaselineLayer {
                    machine: m.name.clone(),
                    disk: d.name.clone(),
                    layer: layer.display().to_string(),
                });
            }
        }
        let baseline = Baseline {
            id,
            environment: shared.name.clone(),
            taken_at: OffsetDateTime::now_utc(),
            spec: rec.spec.clone(),
            layers,
            consistency,
        };
        rec.push_baseline(baseline.clone(), frozen);
        rec.save(&shared.paths)?;
        Ok(baseline)
    }

    async fn disk_changes(&self, baseline: &Baseline) -> Result<Vec<DiskChanges>> {
        let mut st = self.shared.state.lock().await;
        disk_changes(&self.shared, &mut st, baseline).instrument(self.span("disk_changes")).await
    }

    async fn apply(&self, change: &Change) -> Result<()> {
        let mut st = self.shared.state.lock().await;
        crate::apply::apply(&self.shared, &mut st, change).instrument(self.span("apply")).await
    }

    async fn record_change_set(&self, change_set: &ChangeSet) -> Result<()> {
        let shared = &self.shared;
        let mut st = shared.state.lock().await;
        let rec = st.rec_mut(&shared.name)?;
        rec.record_change_set(change_set)?;
        rec.save(&shared.paths)
    }

    fn disk_io(&self) -> Option<&dyn DiskIo> {
        Some(self)
    }

    fn guest(&self) -> Option<&dyn GuestChannel> {
        Some(self)
    }
}

/// One disk to read for [`disk_changes`].
struct DiskJob {
    machine: String,
    disk: String,
    top: std::path::PathBuf,
    origin: Option<std::path::PathBuf>,
    size_hint: u64,
}

async fn disk_changes(shared: &EnvShared, st: &mut EnvState, baseline: &Baseline) -> Result<Vec<DiskChanges>> {
    crate::seals::verify_origins(st.rec(&shared.name)?, &baseline.id).await?;
    let machines_list = st.rec(&shared.name)?.spec.machines.clone();
    let (mut jobs, scan) = (Vec::new(), crate::process::ProcScan::new());
    for m in &machines_list {
        if let Some(q) = machines::live_or_down_in(shared, st, &m.name, &scan).await? {
            machines::flush_all(&q).await?;
        }
        let rec = st.rec(&shared.name)?;
        for d in &m.disks {
            jobs.push(DiskJob {
                machine: m.name.clone(),
                disk: d.name.clone(),
                top: rec.top(&m.name, &d.name)?.clone(),
                origin: rec.origin(&baseline.id, &disk_key(&m.name, &d.name)).cloned(),
                size_hint: d.size_bytes.unwrap_or(0),
            });
        }
    }
    // Every disk in one blocking call, each top opened once for its size and its changes.
    let id = baseline.id.clone();
    blocking(move || Ok(jobs.into_iter().map(|j| read_disk(j, &id)).collect())).await
}

/// The changes of one disk above its baseline layer. A disk whose image cannot be read is
/// NOT_CHECKED alone, with the reason; the others are still checked.
fn read_disk(j: DiskJob, id: &str) -> DiskChanges {
    let label = format!("{}/{}", j.machine, j.disk);
    let (virtual_size, granularity, changes) = match &j.origin {
        None => match stagecore_qcow2::info(&j.top) {
            Ok(info) => (
                info.virtual_size,
                info.cluster_size.unwrap_or(1),
                ChangeMap::NotChecked { reason: format!("{label} is not part of baseline {id}") },
            ),
            Err(e) => (j.size_hint, 1, ChangeMap::NotChecked { reason: format!("{label}: {e}") }),
        },
        Some(origin) => match stagecore_qcow2::info_and_changed_since(&j.top, origin) {
            Err(e) => (j.size_hint, 1, ChangeMap::NotChecked { reason: format!("{label}: {e}") }),
            Ok((info, changes)) => {
                let changes = match changes {
                    Ok(extents) => ChangeMap::Checked { extents },
                    Err(stagecore_qcow2::Error::BaseNotInChain { .. }) => ChangeMap::NotChecked {
                        reason: format!("the layer of baseline {id} left the chain of {label}"),
                    },
                    // Only this disk cannot be read (an image feature the reader lacks, a layer
                    // rewritten behind our back, an I/O error): it alone is NOT_CHECKED, with the
                    // reason.
                    Err(e) => ChangeMap::NotChecked { reason: format!("{label}: {e}") },
                };
                (info.virtual_size, info.cluster_size.unwrap_or(1), changes)
            }
        },
    };
    DiskChanges { machine: j.machine, disk: j.disk, virtual_size, granularity, changes }
}
