//! The guest channel: qemu-guest-agent commands through libvirt.
//!
//! [`LibvirtTransport`] implements [`stagecore_qga::Transport`] over
//! `virDomainQemuAgentCommand`: libvirt owns the agent's socket (QEMU serves one client only, so
//! nothing here ever connects to it) and does the `guest-sync` handshake before each command. The
//! call runs on the backend's blocking path ([`crate::conn::Conn`]) and its errors go through the
//! one error map ([`crate::error::agent`]). Because commands go through libvirt, this works for
//! remote URIs too.
//!
//! [`LibvirtEnvironment`] is a [`GuestChannel`]: one [`Agent`] per machine over that transport,
//! labelled `env/machine`; a machine that is not running gives `Precondition`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use stagecore::{Error, GuestChannel, GuestExec, GuestOutput, PowerState, Result};
use stagecore_qga::{Agent, Transport};

use crate::conn::{Conn, lv};
use crate::error::{self, NAME};
use crate::handle::LibvirtEnvironment;
use crate::machines::Machine;

/// The agent of one domain, reached through libvirt.
#[derive(Debug, Clone)]
pub(crate) struct LibvirtTransport {
    conn: Conn,
    domain: String,
    label: String,
}

impl LibvirtTransport {
    /// A transport to the agent of `domain`; `label` (`env/machine`) names it in errors.
    pub(crate) fn new(conn: Conn, domain: impl Into<String>, label: impl Into<String>) -> Self {
        LibvirtTransport { conn, domain: domain.into(), label: label.into() }
    }
}

/// libvirt takes whole seconds (0 would mean "do not wait", negative values block): round up.
fn whole_seconds(timeout: Duration) -> i32 {
    (timeout.as_secs_f64().ceil() as i64).clamp(1, i32::MAX as i64) as i32
}

#[async_trait]
impl Transport for LibvirtTransport {
    async fn call(&self, command: &str, arguments: Option<Value>, timeout: Duration) -> Result<Value> {
        let mut request = serde_json::json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let text = request.to_string();
        let seconds = whole_seconds(timeout);
        let (domain, label, cmd) = (self.domain.clone(), self.label.clone(), command.to_string());
        let reply = self
            .conn
            .run(move |c, uri| {
                let dom = lv(uri, "domain", &domain, c.lookup_domain_by_name(&domain))?;
                dom.qemu_agent_command(&text, seconds, 0).map_err(|e| {
                    error::agent(&e, error::Ctx { uri, kind: "domain", name: &domain }, &label, &cmd, seconds)
                })
            })
            .await?;
        let value: Value = serde_json::from_str(&reply).map_err(|e| {
            Error::backend_msg(NAME, format!("guest agent of {}: `{command}` answered no JSON: {e}", self.label))
        })?;
        match value {
            Value::Object(mut map) => {
                if let Some(r) = map.remove("return") {
                    return Ok(r);
                }
                if let Some(e) = map.remove("error") {
                    let field = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
                    return Err(
                        stagecore_qga::AgentFailure::new(&self.label, command, field("class"), field("desc")).into()
                    );
                }
                Ok(Value::Object(map))
            }
            other => Ok(other),
        }
    }

    /// Nothing to drop: libvirt owns the connection to the agent, notices when the guest closes
    /// and reopens its port, and syncs again before every command.
    async fn reset(&self) {}
}

impl LibvirtEnvironment {
    /// The agent of `m` (no check of its state).
    pub(crate) fn agent_of(&self, m: &Machine) -> Agent {
        let label = format!("{}/{}", self.name, m.name());
        let transport = LibvirtTransport::new(self.shared.conn.clone(), &m.instance, &label);
        Agent::new(Arc::new(transport), label)
    }

    /// The agent of a running machine; `NotFound` for an unknown machine, `Precondition` when it
    /// is not running.
    async fn running_agent(&self, machine: &str) -> Result<Agent> {
        let ms = self.machines().await?;
        let m = ms
            .iter()
            .find(|m| m.name() == machine)
            .ok_or_else(|| Error::not_found("machine", format!("{}/{machine}", self.name)))?;
        match m.power {
            PowerState::Running => Ok(self.agent_of(m)),
            other => Err(Error::Precondition(format!(
                "{}/{machine} is {other:?}, not running: its guest agent cannot answer; start it first",
                self.name
            ))),
        }
    }
}

#[async_trait]
impl GuestChannel for LibvirtEnvironment {
    #[tracing::instrument(skip(self, request), fields(environment = %self.name, command = %request.display()))]
    async fn exec(&self, machine: &str, request: &GuestExec) -> Result<GuestOutput> {
        self.running_agent(machine).await?.exec(request).await
    }

    #[tracing::instrument(skip(self, content), fields(environment = %self.name, len = content.len()))]
    async fn write_file(&self, machine: &str, path: &str, content: &[u8], mode: Option<u32>) -> Result<()> {
        self.running_agent(machine).await?.write_file(path, content, mode).await
    }

    #[tracing::instrument(skip(self), fields(environment = %self.name))]
    async fn read_file(&self, machine: &str, path: &str) -> Result<Vec<u8>> {
        self.running_agent(machine).await?.read_file(path).await
    }

    #[tracing::instrument(skip(self), fields(environment = %self.name))]
    async fn wait_ready(&self, machine: &str, timeout: Duration) -> Result<()> {
        self.running_agent(machine).await?.wait_ready(timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_round_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(60)), 60);
        assert_eq!(whole_seconds(Duration::ZERO), 1);
    }
}
