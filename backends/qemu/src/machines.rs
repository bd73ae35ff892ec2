//! Machines of an environment as QEMU processes: liveness (never trusting pid files), start,
//! stop, the argv built from the spec, and the QMP/HMP calls that touch disks of a running
//! machine (flush, `qemu-io` writes).
//!
//! Contract: a machine is [`Liveness::Live`] only when its QEMU is ours, alive and answers QMP;
//! [`Liveness::Down`] when nothing of ours runs (stale or foreign pid files included, with a
//! detail); [`Liveness::Unknown`] when a QEMU of ours is alive but unusable — callers must then
//! refuse to touch its images. Disk device ids are `d<index>` and NIC ids `n<index>` in spec
//! order, which is stable while a machine runs (disk and NIC changes restart it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use stagecore::{Error, MachineSpec, Result};
use tracing::Instrument;

use crate::cmdline::{DiskConfig, KernelBoot, MachineConfig, NicConfig};
use crate::error;
use crate::process::{ProcessState, QemuPaths, QemuProcess, inspect};
use crate::qmp::QmpClient;
use crate::shared::{EnvShared, EnvState};
use crate::store::EnvRecord;

/// How long to wait for QMP to answer a fresh connection, and for a QEMU to go away.
const CONNECT: Duration = Duration::from_secs(5);
const GRACE: Duration = Duration::from_secs(5);

/// What runs for one machine.
#[derive(Debug, Clone)]
pub(crate) enum Liveness {
    /// Our QEMU runs and answers QMP.
    Live(QmpClient),
    /// Nothing of ours runs; the detail says what stale state was found, if any.
    Down(Option<String>),
    /// Our QEMU is alive but cannot be used (or the pid file is unreadable).
    Unknown(String),
}

/// The QEMU device id of the disk at `index`.
pub(crate) fn disk_id(index: usize) -> String {
    format!("d{index}")
}

/// The files of a machine's QEMU.
pub(crate) fn qemu_paths(shared: &EnvShared, machine: &str) -> QemuPaths {
    let dir = shared.paths.machine_dir(machine);
    QemuPaths { qmp_socket: dir.join("qmp.sock"), pidfile: dir.join("pid"), log: dir.join("log") }
}

/// The guest agent socket of a machine, in its own environment's machine directory.
pub(crate) fn agent_socket(shared: &EnvShared, machine: &str) -> PathBuf {
    shared.paths.machine_dir(machine).join("qga.sock")
}

/// The serial console log of a machine (appended to by every boot).
pub(crate) fn console_log(shared: &EnvShared, machine: &str) -> PathBuf {
    shared.paths.machine_dir(machine).join("console.log")
}

/// Finds out what runs for `machine`, reusing (or opening) its QMP session.
pub(crate) async fn liveness(shared: &EnvShared, st: &mut EnvState, machine: &str) -> Result<Liveness> {
    if let Some(q) = st.qmp.get(machine) {
        if !q.is_closed() {
            return Ok(Liveness::Live(q.clone()));
        }
        st.forget(machine);
    }
    let paths = qemu_paths(shared, machine);
    let found = inspect(&paths).await?;
    if !matches!(found, ProcessState::Running { .. }) {
        st.forget_agent(machine);
    }
    Ok(match found {
        ProcessState::NotRunning => Liveness::Down(None),
        ProcessState::StalePidfile { pid } => Liveness::Down(Some(format!("stale pid file: qemu pid {pid} is gone"))),
        ProcessState::ForeignProcess { pid } => {
            Liveness::Down(Some(format!("stale pid file: pid {pid} now belongs to another program")))
        }
        ProcessState::CorruptPidfile { content } => Liveness::Unknown(format!("corrupt pid file: {content:?}")),
        ProcessState::Unresponsive { pid, reason } => {
            Liveness::Unknown(format!("qemu pid {pid} unresponsive: {reason}"))
        }
        ProcessState::Running { pid } => match QmpClient::connect(&paths.qmp_socket, CONNECT).await {
            Ok(q) => {
                st.qmp.insert(machine.to_string(), q.clone());
                Liveness::Live(q)
            }
            Err(e) => Liveness::Unknown(format!("qemu pid {pid} does not answer QMP: {e}")),
        },
    })
}

/// `Live` → the session; `Down` → `None`; `Unknown` → `Precondition` (never touch its images).
pub(crate) async fn live_or_down(shared: &EnvShared, st: &mut EnvState, machine: &str) -> Result<Option<QmpClient>> {
    match liveness(shared, st, machine).await? {
        Liveness::Live(q) => Ok(Some(q)),
        Liveness::Down(_) => Ok(None),
        Liveness::Unknown(why) => {
            Err(Error::Precondition(format!("machine {}/{machine} is in an unknown state: {why}", shared.name)))
        }
    }
}

/// A QEMU `-name`: the instance name, prefixed when it does not start with a letter.
fn qemu_name(instance: &str) -> String {
    let name = if instance.starts_with(|c: char| c.is_ascii_alphabetic()) {
        instance.to_string()
    } else {
        format!("vm-{instance}")
    };
    name.chars().take(64).collect()
}

/// The QEMU configuration of `m` from the record.
pub(crate) fn machine_config(shared: &EnvShared, rec: &EnvRecord, m: &MachineSpec) -> Result<MachineConfig> {
    let field = |f: &str| format!("{}/{}.{f}", rec.name, m.name);
    let uuid = m.uuid.as_deref().unwrap_or_default();
    let uuid = uuid::Uuid::parse_str(uuid).map_err(|e| Error::invalid(field("uuid"), format!("{uuid:?}: {e}")))?;
    let disks = m
        .disks
        .iter()
        .enumerate()
        .map(|(j, d)| Ok(DiskConfig { id: disk_id(j), path: rec.top(&m.name, &d.name)?, read_only: d.read_only }))
        .collect::<Result<Vec<_>>>()?;
    let nics = m
        .nics
        .iter()
        .enumerate()
        .map(|(j, n)| NicConfig {
            id: format!("n{j}"),
            mac: n.mac.clone().unwrap_or_default(),
            segment: format!("{}/{}", rec.segment_owner(), n.network),
        })
        .collect();
    let paths = qemu_paths(shared, &m.name);
    let firmware = match m.firmware {
        stagecore::Firmware::Bios => crate::cmdline::Firmware::Bios,
        stagecore::Firmware::Uefi => crate::cmdline::Firmware::Uefi,
    };
    Ok(MachineConfig {
        name: qemu_name(&format!("{}{}", rec.prefix, m.name)),
        uuid,
        vcpus: m.vcpus,
        memory_mib: m.memory_mib,
        firmware,
        accel: shared.ctx.accel,
        disks,
        nics,
        qmp_socket: paths.qmp_socket,
        pidfile: paths.pidfile,
        log: paths.log,
        boot: m.boot.as_ref().map(|b| KernelBoot {
            kernel: b.kernel.clone().into(),
            initrd: b.initrd.clone().map(Into::into),
            cmdline: b.cmdline.clone(),
        }),
        agent_socket: Some(agent_socket(shared, &m.name)),
        console_log: Some(console_log(shared, &m.name)),
    })
}

/// The QEMU configuration of `machine`, with its state directory created.
pub(crate) fn prepare(shared: &EnvShared, st: &EnvState, machine: &str) -> Result<MachineConfig> {
    let rec = st.rec(&shared.name)?;
    let config = machine_config(shared, rec, rec.spec.require_machine(machine)?)?;
    let dir = shared.paths.machine_dir(machine);
    std::fs::create_dir_all(&dir).map_err(|e| error::io("creating", &dir, &e))?;
    // A fresh boot is neither frozen nor paused; an old agent socket file is QEMU's to replace.
    crate::freeze::clear_markers(shared, machine);
    let _ = std::fs::remove_file(agent_socket(shared, machine));
    Ok(config)
}

/// Starts `machine` unless it runs.
pub(crate) async fn start_machine(shared: &EnvShared, st: &mut EnvState, machine: &str) -> Result<()> {
    if live_or_down(shared, st, machine).await?.is_some() {
        return Ok(());
    }
    let config = prepare(shared, st, machine)?;
    let span = tracing::info_span!("qemu.start", env = %shared.name, machine);
    let launched = shared.ctx.launcher.launch(&config).instrument(span).await?;
    st.forget_agent(machine);
    st.qmp.insert(machine.to_string(), launched.qmp);
    tracing::info!(env = %shared.name, machine, "machine started");
    Ok(())
}

/// Stops `machine` (QMP `quit`, then signals, bounded); returns whether it was running.
pub(crate) async fn stop_machine(shared: &EnvShared, st: &mut EnvState, machine: &str) -> Result<bool> {
    let paths = qemu_paths(shared, machine);
    let live = st.qmp.remove(machine);
    st.forget_agent(machine);
    let Some(process) = QemuProcess::find(&paths).await? else {
        crate::freeze::clear_markers(shared, machine);
        return Ok(false);
    };
    let span = tracing::info_span!("qemu.stop", env = %shared.name, machine, pid = process.pid());
    async {
        match live.filter(|q| !q.is_closed()) {
            Some(q) => process.shutdown(&q, GRACE).await,
            None => process.kill(GRACE).await,
        }
    }
    .instrument(span)
    .await?;
    crate::freeze::clear_markers(shared, machine);
    Ok(true)
}

/// The qdev path of every disk device of a running machine, by device id (`d0`, ...).
async fn qdevs(qmp: &QmpClient) -> Result<Vec<(String, String, Option<String>)>> {
    Ok(qmp
        .query_block()
        .await?
        .into_iter()
        .filter_map(|b| {
            let id = b.device_id()?.to_string();
            let node = b.inserted.as_ref().and_then(|i| i.node_name.clone());
            Some((id, b.qdev.clone()?, node))
        })
        .collect())
}

/// The active node name of disk device `id`.
pub(crate) async fn active_node(qmp: &QmpClient, id: &str) -> Result<String> {
    qdevs(qmp)
        .await?
        .into_iter()
        .find(|(i, _, _)| i == id)
        .and_then(|(_, _, node)| node)
        .ok_or_else(|| error::msg(format!("disk device {id} not found in query-block on {}", qmp.socket().display())))
}

async fn qdev_of(qmp: &QmpClient, id: &str) -> Result<String> {
    qdevs(qmp)
        .await?
        .into_iter()
        .find(|(i, _, _)| i == id)
        .map(|(_, q, _)| q)
        .ok_or_else(|| error::msg(format!("disk device {id} not found in query-block on {}", qmp.socket().display())))
}

/// Runs one `qemu-io` command on the block device with QOM path `qdev` through HMP. Errors QEMU
/// reports in the returned text fail the call.
async fn qemu_io(qmp: &QmpClient, qdev: &str, command: &str) -> Result<()> {
    let out = qmp.human_monitor_command(&format!(r#"qemu-io -d {qdev} "{command}""#)).await?;
    if out.to_ascii_lowercase().contains("error") || out.contains("failed") {
        return Err(error::msg(format!("qemu-io {command:?} on {qdev}: {}", out.trim())));
    }
    Ok(())
}

/// Makes QEMU write its cached metadata and data of every disk of a running machine to the
/// image files, so in-process readers see every completed write.
pub(crate) async fn flush_all(qmp: &QmpClient) -> Result<()> {
    for (_, qdev, _) in qdevs(qmp).await? {
        qemu_io(qmp, &qdev, "flush").await?;
    }
    Ok(())
}

/// Writes `data` at `offset` of disk `index` of a running machine through QEMU (`qemu-io write
/// -s <file>`), then flushes. `scratch` is a directory for the data file.
pub(crate) async fn write_running(
    qmp: &QmpClient,
    index: usize,
    scratch: &Path,
    offset: u64,
    data: &[u8],
) -> Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let id = disk_id(index);
    let file: PathBuf = scratch.join(format!(".write-{}.bin", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, data).map_err(|e| error::io("writing", &file, &e))?;
    let path = file.display().to_string();
    if path.contains('"') || path.contains(' ') {
        let _ = std::fs::remove_file(&file);
        return Err(Error::invalid(path, "a scratch path for qemu-io must not contain quotes or spaces"));
    }
    let result = async {
        let qdev = qdev_of(qmp, &id).await?;
        qemu_io(qmp, &qdev, &format!("write -q -s {path} {offset} {}", data.len())).await?;
        qemu_io(qmp, &qdev, "flush").await
    }
    .await;
    let _ = std::fs::remove_file(&file);
    result
}
