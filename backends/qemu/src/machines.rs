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
use crate::process::{ProcScan, ProcessState, QemuPaths, QemuProcess, inspect};
use crate::qmp::QmpClient;
use crate::shared::{EnvShared, EnvState};
use crate::store::{EnvRecord, QemuRecord};

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
    shared.paths.agent_socket(machine)
}

/// The serial console log of a machine (appended to by every boot).
pub(crate) fn console_log(shared: &EnvShared, machine: &str) -> PathBuf {
    shared.paths.machine_dir(machine).join("console.log")
}

/// Finds out what runs for `machine`, reusing (or opening) its QMP session.
///
/// What runs is identified by what it is, not by the pid file alone: a QEMU of ours (its command
/// line names the machine's QMP socket) that no pid file names — one a killed process was
/// starting — is stopped; one that stays unresponsive is stopped; and before a new QMP session is
/// trusted, the QEMU must run this machine's configuration (its command line, disk files aside,
/// equals the one built from the record now) on the record's disk tops (`query-block`). A top that
/// is a newer overlay of ours over the record's top — a freeze whose process died before it
/// saved the record — is adopted into the record; any other mismatch (a stage's disks or config
/// under this machine's socket) is stopped. The caller holds the environment's lock, so no live
/// process of ours can be starting these QEMUs. Processes are looked for in `scan` (one scan for
/// all machines of an operation).
pub(crate) async fn liveness(
    shared: &EnvShared,
    st: &mut EnvState,
    machine: &str,
    scan: &ProcScan,
) -> Result<Liveness> {
    if let Some(q) = st.qmp.get(machine) {
        if !q.is_closed() {
            return Ok(Liveness::Live(q.clone()));
        }
        st.forget(machine);
    }
    let paths = qemu_paths(shared, machine);
    let mut found = inspect(&paths).await?;
    if let ProcessState::Unresponsive { .. } = found {
        // A QEMU that is still starting answers within moments.
        let deadline = std::time::Instant::now() + UNRESPONSIVE_WAIT;
        while matches!(found, ProcessState::Unresponsive { .. }) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            found = inspect(&paths).await?;
        }
        if let ProcessState::Unresponsive { pid, reason } = &found {
            let why = format!("qemu pid {pid} stayed unresponsive ({reason})");
            return stop_stray(shared, st, machine, &why).await;
        }
    }
    if !matches!(found, ProcessState::Running { .. }) {
        st.forget_agent(machine);
    }
    let detail = match found {
        ProcessState::NotRunning => None,
        ProcessState::StalePidfile { pid } => Some(format!("stale pid file: qemu pid {pid} is gone")),
        ProcessState::ForeignProcess { pid } => {
            Some(format!("stale pid file: pid {pid} now belongs to another program"))
        }
        ProcessState::CorruptPidfile { content } => {
            return Ok(Liveness::Unknown(format!("corrupt pid file: {content:?}")));
        }
        ProcessState::Unresponsive { pid, reason } => {
            return Ok(Liveness::Unknown(format!("qemu pid {pid} unresponsive: {reason}")));
        }
        ProcessState::Running { pid } => {
            let q = match QmpClient::connect(&paths.qmp_socket, CONNECT).await {
                Ok(q) => q,
                Err(e) => return Ok(Liveness::Unknown(format!("qemu pid {pid} does not answer QMP: {e}"))),
            };
            return match verify(shared, st, machine, pid, &q).await? {
                None => {
                    st.qmp.insert(machine.to_string(), q.clone());
                    Ok(Liveness::Live(q))
                }
                Some(why) => {
                    drop(q);
                    stop_stray(shared, st, machine, &why).await
                }
            };
        }
    };
    // Nothing of ours per the pid file: a QEMU that names this machine's socket anyway is one a
    // dead process was starting.
    if !QemuProcess::by_cmdline_in(&paths, scan).is_empty() {
        return stop_stray(shared, st, machine, "a qemu no pid file names (its starter died)").await;
    }
    Ok(Liveness::Down(detail))
}

/// How long an unresponsive QEMU of ours is given to open its QMP socket before it is stopped.
const UNRESPONSIVE_WAIT: Duration = Duration::from_secs(5);

/// Kills every QEMU of `machine` (by pid file and by command line) that runs what it must not,
/// and reports the machine down with `why`.
async fn stop_stray(shared: &EnvShared, st: &mut EnvState, machine: &str, why: &str) -> Result<Liveness> {
    tracing::warn!(env = %shared.name, machine, why, "stopping a qemu that does not run this machine as recorded");
    st.forget(machine);
    kill_all(shared, machine).await?;
    crate::markers::clear_markers(shared, machine);
    Ok(Liveness::Down(Some(format!("stopped a stray qemu: {why}"))))
}

/// SIGKILLs every QEMU of ours for `machine` — the one its pid file names and any other whose
/// command line names its QMP socket — and removes its state files.
async fn kill_all(shared: &EnvShared, machine: &str) -> Result<()> {
    let paths = qemu_paths(shared, machine);
    let mut procs = QemuProcess::by_cmdline(&paths);
    if let Some(p) = QemuProcess::find(&paths).await?
        && !procs.iter().any(|x| x.pid() == p.pid())
    {
        procs.push(p);
    }
    for p in &procs {
        p.kill(GRACE).await?;
    }
    crate::process::remove_state_files_of(&paths)
}

/// `None` when the QEMU `pid` answering on `q` runs `machine` as the record says (adopting a
/// newer overlay of ours, see [`liveness`]); else why not.
async fn verify(
    shared: &EnvShared,
    st: &mut EnvState,
    machine: &str,
    pid: u32,
    q: &QmpClient,
) -> Result<Option<String>> {
    let rec = st.rec(&shared.name)?;
    let Some(m) = rec.spec.machine(machine) else {
        return Ok(Some(format!("qemu pid {pid} runs for {machine}, which the record no longer has")));
    };
    let expected = machine_config(shared, rec, m)?.argv()?;
    let paths = qemu_paths(shared, machine);
    let actual = match QemuProcess::find(&paths).await?.and_then(|p| p.cmdline()) {
        Some(a) => a,
        None => return Ok(Some(format!("qemu pid {pid} went away"))),
    };
    if normalise(&actual[1.min(actual.len())..]) != normalise(&expected) {
        return Ok(Some(format!(
            "qemu pid {pid} was started with another configuration than the record's for {}/{machine}",
            shared.name
        )));
    }
    let blocks = match q.query_block().await {
        Ok(b) => b,
        Err(e) => return Ok(Some(format!("query-block on qemu pid {pid} failed: {e}"))),
    };
    let disks: Vec<(String, std::path::PathBuf)> =
        m.disks.iter().map(|d| Ok((d.name.clone(), rec.top(machine, &d.name)?.clone()))).collect::<Result<_>>()?;
    let mut adopt = Vec::new();
    for (j, (disk, top)) in disks.iter().enumerate() {
        let id = disk_id(j);
        let Some(file) = blocks.iter().find(|b| b.device_id() == Some(id.as_str())).and_then(|b| b.inserted.as_ref())
        else {
            return Ok(Some(format!("qemu pid {pid} has no disk device {id} ({disk})")));
        };
        let running = std::path::PathBuf::from(&file.file);
        if crate::gc::canonical(&running) == crate::gc::canonical(top) {
            continue;
        }
        if newer_overlay_of_ours(shared, &running, top).await {
            adopt.push((disk.clone(), running));
            continue;
        }
        return Ok(Some(format!(
            "qemu pid {pid} runs {}/{machine}/{disk} on {}, the record's top is {}",
            shared.name,
            running.display(),
            top.display()
        )));
    }
    if !adopt.is_empty() {
        let rec = st.rec_mut(&shared.name)?;
        for (disk, file) in adopt {
            tracing::warn!(env = %shared.name, machine, disk = %disk, top = %file.display(),
                "adopting the overlay a dead process's freeze switched to before it saved the record");
            if let Some(n) = layer_number(&file) {
                rec.backend.next_layer = rec.backend.next_layer.max(n + 1);
            }
            rec.disks.insert(crate::store::disk_key(machine, &disk), file);
        }
        rec.save(&shared.paths)?;
    }
    Ok(None)
}

/// Whether `running` is a layer file in this environment's `disks/` whose backing chain goes
/// through `top`.
async fn newer_overlay_of_ours(shared: &EnvShared, running: &Path, top: &Path) -> bool {
    let dir = crate::gc::canonical(&shared.paths.disks());
    let (running, top) = (crate::gc::canonical(running), crate::gc::canonical(top));
    if running.parent() != Some(dir.as_path()) {
        return false;
    }
    let r = running.clone();
    let chain = crate::shared::blocking(move || stagecore_qcow2::chain(&r).map_err(error::qcow2)).await;
    matches!(chain, Ok(c) if c.iter().skip(1).any(|i| crate::gc::canonical(&i.path) == top))
}

/// The `n` of a layer file named `<machine>.<disk>.<n>.qcow2` (or `m<k>-` prefixed).
fn layer_number(file: &Path) -> Option<u64> {
    let name = file.file_name()?.to_str()?.strip_suffix(".qcow2")?;
    name.rsplit('.').next()?.parse().ok()
}

/// An argv with the disk file names left out (QEMU's command line keeps the files it booted on;
/// live snapshots move its tops since).
fn normalise(argv: &[std::ffi::OsString]) -> Vec<std::ffi::OsString> {
    argv.iter()
        .map(|a| {
            let text = a.to_string_lossy();
            match text.strip_prefix("driver=file,filename=") {
                Some(rest) => {
                    let tail = rest.find(",node-name=").map_or("", |i| &rest[i..]);
                    std::ffi::OsString::from(format!("driver=file,{tail}"))
                }
                None => a.clone(),
            }
        })
        .collect()
}

/// `Live` → the session; `Down` → `None`; `Unknown` → `Precondition` (never touch its images).
pub(crate) async fn live_or_down(shared: &EnvShared, st: &mut EnvState, machine: &str) -> Result<Option<QmpClient>> {
    live_or_down_in(shared, st, machine, &ProcScan::new()).await
}

/// [`live_or_down`], looking for processes in `scan`.
pub(crate) async fn live_or_down_in(
    shared: &EnvShared,
    st: &mut EnvState,
    machine: &str,
    scan: &ProcScan,
) -> Result<Option<QmpClient>> {
    match liveness(shared, st, machine, scan).await? {
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
        .map(|(j, d)| {
            Ok(DiskConfig { id: disk_id(j), path: rec.top(&m.name, &d.name)?.clone(), read_only: d.read_only })
        })
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
    crate::markers::clear_markers(shared, machine);
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
        // No pid file names one, but a QEMU a dead process was starting may run all the same.
        let strays = !QemuProcess::by_cmdline(&paths).is_empty();
        if strays {
            tracing::warn!(env = %shared.name, machine, "stopping a qemu no pid file names (its starter died)");
            kill_all(shared, machine).await?;
        }
        crate::markers::clear_markers(shared, machine);
        return Ok(strays);
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
    // And any other QEMU that names this machine's socket (one a dead process was starting).
    if !QemuProcess::by_cmdline(&paths).is_empty() {
        kill_all(shared, machine).await?;
    }
    crate::markers::clear_markers(shared, machine);
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
