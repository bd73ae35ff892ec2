//! The guest channel of QEMU environments: one `stagecore_qga::Agent` per running machine, on the
//! machine's own agent socket (`machines/<m>/qga.sock` of *its* environment — a stage never
//! reaches production's guests).
//!
//! Contract: an agent client is made on first use and kept in the environment's shared state
//! with the machine's QMP session; it is dropped when the machine stops, restarts or is found
//! gone. Operations on a machine that does not run fail with `Precondition("machine env/m is not
//! running")`; unknown machines are `NotFound`. Errors of the agent name `env/machine` (the
//! agent's label). The environment lock is held only to find the agent, not while a command
//! runs.

use std::time::Duration;

use async_trait::async_trait;
use stagecore::{Error, GuestChannel, GuestExec, GuestOutput, Result};
use stagecore_qga::Agent;
use tracing::Instrument;

use crate::machines;
use crate::shared::{EnvShared, EnvState, QemuEnvironment};

pub(crate) use crate::shared::running_agent;

/// The agent client of `machine` if it runs; `NotFound` for an unknown machine, `Precondition`
/// when it does not run.
pub(crate) async fn agent(shared: &EnvShared, st: &mut EnvState, machine: &str) -> Result<Agent> {
    st.rec(&shared.name)?.spec.require_machine(machine)?;
    match machines::live_or_down(shared, st, machine).await? {
        Some(_) => Ok(running_agent(shared, st, machine)),
        None => Err(not_running(shared, machine)),
    }
}

pub(crate) fn not_running(shared: &EnvShared, machine: &str) -> Error {
    Error::Precondition(format!("machine {}/{machine} is not running", shared.name))
}

/// Waits until the agent of running `machine` answers, at most `timeout`. Takes no lock: the
/// caller then removes `machine` from [`EnvState::agentless`].
pub(crate) async fn wait_ready(shared: &EnvShared, agent: &Agent, machine: &str, timeout: Duration) -> Result<()> {
    agent.wait_ready(timeout).await?;
    tracing::info!(env = %shared.name, machine, "guest agent answered");
    Ok(())
}

impl QemuEnvironment {
    /// Settles leftovers of a dead process, then finds the agent of `machine`.
    async fn agent_of(&self, machine: &str) -> Result<Agent> {
        let mut st = self.shared.state.lock().await;
        crate::freeze::recover(&self.shared, &mut st).await;
        agent(&self.shared, &mut st, machine).await
    }

    fn guest_span(&self, op: &'static str, machine: &str) -> tracing::Span {
        tracing::info_span!("qemu.guest", env = %self.shared.name, machine, op)
    }
}

#[async_trait]
impl GuestChannel for QemuEnvironment {
    async fn exec(&self, machine: &str, request: &GuestExec) -> Result<GuestOutput> {
        let span = self.guest_span("exec", machine);
        async { self.agent_of(machine).await?.exec(request).await }.instrument(span).await
    }

    async fn write_file(&self, machine: &str, path: &str, content: &[u8], mode: Option<u32>) -> Result<()> {
        let span = self.guest_span("write_file", machine);
        async { self.agent_of(machine).await?.write_file(path, content, mode).await }.instrument(span).await
    }

    async fn read_file(&self, machine: &str, path: &str) -> Result<Vec<u8>> {
        let span = self.guest_span("read_file", machine);
        async { self.agent_of(machine).await?.read_file(path).await }.instrument(span).await
    }

    async fn wait_ready(&self, machine: &str, timeout: Duration) -> Result<()> {
        let span = self.guest_span("wait_ready", machine);
        async {
            let agent = self.agent_of(machine).await?;
            wait_ready(&self.shared, &agent, machine, timeout).await?;
            self.shared.state.lock().await.agentless.remove(machine);
            Ok(())
        }
        .instrument(span)
        .await
    }
}

/// The guest channel of one machine whose agent was found under the environment lock (for
/// `apply`, which holds the lock for the whole change).
#[derive(Debug)]
pub(crate) struct Resolved {
    pub(crate) env: String,
    pub(crate) machine: String,
    pub(crate) agent: Agent,
}

impl Resolved {
    fn check(&self, machine: &str) -> Result<()> {
        if machine == self.machine {
            Ok(())
        } else {
            Err(Error::Precondition(format!(
                "guest channel of {}/{} asked for machine {machine}",
                self.env, self.machine
            )))
        }
    }
}

#[async_trait]
impl GuestChannel for Resolved {
    async fn exec(&self, machine: &str, request: &GuestExec) -> Result<GuestOutput> {
        self.check(machine)?;
        self.agent.exec(request).await
    }

    async fn write_file(&self, machine: &str, path: &str, content: &[u8], mode: Option<u32>) -> Result<()> {
        self.check(machine)?;
        self.agent.write_file(path, content, mode).await
    }

    async fn read_file(&self, machine: &str, path: &str) -> Result<Vec<u8>> {
        self.check(machine)?;
        self.agent.read_file(path).await
    }

    async fn wait_ready(&self, machine: &str, timeout: Duration) -> Result<()> {
        self.check(machine)?;
        self.agent.wait_ready(timeout).await
    }
}
