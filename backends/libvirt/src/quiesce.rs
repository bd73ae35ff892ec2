//! Application-consistent captures: freeze the guests' filesystems around a disk capture.
//!
//! For every running domain with the agent's channel, a short probe (`guest-ping`, at most
//! [`PROBE`], all machines in parallel) says whether a guest agent answers. Domains without a
//! guest OS (an empty disk) fail the probe at once ("agent is not connected"), so they never wait
//! longer than that. Answering guests are frozen with `guest-fsfreeze-freeze` through the agent
//! (the `virt` crate has no safe `virDomainFSFreeze`), the capture runs, and every guest that was
//! asked to freeze is thawed again — on every path, errors included (thaw is idempotent).
//!
//! Crash safety: before a guest is frozen, a durable marker ([`crate::markers`],
//! `<state dir>/frozen/<domain>.json`) records it; the marker is removed once the guest is
//! thawed. The next open of the environment ([`thaw_leftovers`]) thaws every domain that still
//! has one whose writer is gone — so a process killed between freeze and thaw leaves no frozen
//! guest behind after the next open.
//!
//! Per machine the result is [`ConsistencyLevel::Application`] (frozen around the capture),
//! [`ConsistencyLevel::Crash`] with the reason (no agent channel, no answer, freeze failed,
//! paused), or [`ConsistencyLevel::Stopped`] (shut off: disks at rest).

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use stagecore::{ConsistencyLevel, Error, MachineConsistency, PowerState, Result};
use stagecore_qga::Agent;
use tokio::task::JoinSet;

use crate::error::NAME;
use crate::handle::LibvirtEnvironment;
use crate::machines::Machine;
use crate::markers::{self, Kind};
use crate::xml::edit;

/// Logical machine → the consistency its layers reached.
pub(crate) type Consistencies = BTreeMap<String, MachineConsistency>;

/// How long the probe of one guest agent may take.
pub(crate) const PROBE: Duration = Duration::from_millis(1500);
/// How long `guest-fsfreeze-freeze` may take (it syncs and freezes every filesystem).
const FREEZE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one `guest-fsfreeze-thaw` may take.
const THAW_TIMEOUT: Duration = Duration::from_secs(10);
/// Thaw attempts before giving up (the marker then stays for the next open).
const THAW_TRIES: u32 = 3;

/// The environment variable that names a fault point to stop at (tests only; see
/// [`fault_point`]).
pub(crate) const FAULT_ENV: &str = "STAGECORE_LIBVIRT_FAULT";

/// A named point where a test can stop this process: when [`FAULT_ENV`] equals `name`, prints
/// `STAGECORE_LIBVIRT_FAULT <name> reached` on stdout and waits forever (the test kills it).
/// Points: `frozen` (guests frozen, capture not started).
async fn fault_point(name: &str) {
    if std::env::var(FAULT_ENV).as_deref() == Ok(name) {
        println!("{FAULT_ENV} {name} reached");
        let _ = std::io::stdout().flush();
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }
}

fn marker_path(env: &LibvirtEnvironment, domain: &str) -> PathBuf {
    markers::path(&env.shared.dir, Kind::Frozen, domain)
}

fn write_marker(env: &LibvirtEnvironment, m: &Machine) -> Result<()> {
    markers::write(&env.shared.dir, Kind::Frozen, &env.name, m.name(), &m.instance)
}

/// Thaws `agent` (a few tries); true when it answered.
async fn thaw(agent: &Agent) -> bool {
    for attempt in 1..=THAW_TRIES {
        match agent.fsfreeze_thaw(THAW_TIMEOUT).await {
            Ok(_) => return true,
            Err(e) => tracing::warn!(guest = agent.label(), attempt, error = %e, "guest-fsfreeze-thaw failed"),
        }
    }
    false
}

/// Runs `capture` with the guests of `ms` frozen where their agent answers; see the module docs.
#[tracing::instrument(skip_all, fields(environment = %env.name))]
pub(crate) async fn around<T, F, Fut>(
    env: &LibvirtEnvironment,
    ms: &[Machine],
    capture: F,
) -> Result<(T, Consistencies)>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut levels = Consistencies::new();
    let mut probes = JoinSet::new();
    for m in ms {
        let level = match m.power {
            PowerState::Running if edit::has_agent_channel(&m.tree) => {
                let (agent, m) = (env.agent_of(m), m.clone());
                probes.spawn(async move {
                    let r = match tokio::time::timeout(PROBE * 2, agent.ping(PROBE)).await {
                        Ok(r) => r,
                        Err(_) => Err(Error::Timeout { operation: "guest-ping".into(), seconds: PROBE.as_secs_f64() }),
                    };
                    (m, agent, r)
                });
                continue;
            }
            PowerState::Running => {
                MachineConsistency::with_detail(ConsistencyLevel::Crash, "no guest agent channel in its definition")
            }
            PowerState::Paused => {
                MachineConsistency::with_detail(ConsistencyLevel::Crash, "paused: its guest agent cannot answer")
            }
            PowerState::Stopped => MachineConsistency::new(ConsistencyLevel::Stopped),
            PowerState::Unknown => MachineConsistency::with_detail(ConsistencyLevel::Crash, "power state unknown"),
        };
        levels.insert(m.name().to_string(), level);
    }
    let mut answering = Vec::new();
    while let Some(joined) = probes.join_next().await {
        let (m, agent, r) = joined.map_err(|e| Error::backend_msg(NAME, format!("agent probe failed: {e}")))?;
        match r {
            Ok(()) => answering.push((m, agent)),
            Err(e) => {
                let detail = format!("guest agent did not answer a {:.1} s probe: {e}", PROBE.as_secs_f64());
                levels.insert(m.name().to_string(), MachineConsistency::with_detail(ConsistencyLevel::Crash, detail));
            }
        }
    }

    // Markers first, all of them, before any guest is frozen.
    for (m, _) in &answering {
        if let Err(e) = write_marker(env, m) {
            for (m, _) in &answering {
                markers::remove(&marker_path(env, &m.instance));
            }
            return Err(e);
        }
    }
    // Every guest asked to freeze is thawed below, whatever its freeze answered.
    let asked = answering.clone();
    let mut freezes = JoinSet::new();
    for (m, agent) in answering {
        freezes.spawn(async move {
            let r = agent.fsfreeze_freeze(FREEZE_TIMEOUT).await;
            (m, agent, r)
        });
    }
    while let Some(joined) = freezes.join_next().await {
        let Ok((m, agent, r)) = joined else { continue };
        let level = match r {
            Ok(n) => {
                tracing::debug!(guest = agent.label(), filesystems = n, "guest frozen");
                MachineConsistency::new(ConsistencyLevel::Application)
            }
            Err(e) => MachineConsistency::with_detail(ConsistencyLevel::Crash, format!("fsfreeze failed: {e}")),
        };
        levels.insert(m.name().to_string(), level);
    }
    for (m, _) in &asked {
        levels
            .entry(m.name().to_string())
            .or_insert_with(|| MachineConsistency::with_detail(ConsistencyLevel::Crash, "the freeze task failed"));
    }

    fault_point("frozen").await;
    let captured = capture().await;

    // Thaw every guest that was asked to freeze, whatever the capture did.
    let mut thaws = JoinSet::new();
    for (m, agent) in asked {
        let path = marker_path(env, &m.instance);
        thaws.spawn(async move {
            if thaw(&agent).await {
                markers::remove(&path);
            } else {
                tracing::error!(
                    guest = agent.label(),
                    marker = %path.display(),
                    "guest could not be thawed; the next open of the environment tries again"
                );
            }
        });
    }
    while thaws.join_next().await.is_some() {}
    captured.map(|t| (t, levels))
}

/// Thaws every machine of `env` that a freeze marker names (left by a process that died between
/// freeze and thaw): a paused domain is resumed first, a shut-off one needs nothing. Failures are
/// logged and the marker stays, so a later open tries again.
pub(crate) async fn thaw_leftovers(env: &LibvirtEnvironment, ms: &[Machine]) {
    for m in ms {
        let path = marker_path(env, &m.instance);
        if !markers::orphaned(&path) {
            continue;
        }
        tracing::warn!(domain = %m.instance, "found a freeze marker: thawing the guest a dead process froze");
        match m.power {
            PowerState::Stopped => markers::remove(&path),
            PowerState::Running | PowerState::Paused | PowerState::Unknown => {
                if m.power == PowerState::Paused
                    && let Err(e) = env.resume_domain(&m.instance).await
                {
                    tracing::warn!(domain = %m.instance, error = %e, "could not resume before thawing");
                }
                if thaw(&env.agent_of(m)).await {
                    markers::remove(&path);
                }
            }
        }
    }
}
