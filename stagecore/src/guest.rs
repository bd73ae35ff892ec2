//! Guest changes through a [`GuestChannel`], once for every backend.
//!
//! A backend's [`crate::Environment::apply`] hands [`Change::GuestCommand`] and
//! [`Change::GuestFile`] to [`apply_guest_change`]: a command that exits non-zero fails the change
//! with [`Error::GuestCommand`] (exit code and stderr), a file is written whole with its mode.
//! Before either, the machine's agent is waited for (at most [`AGENT_READY`]): a change right
//! after a start or a config change that restarted the machine meets a guest that is booting.

use std::time::Duration;

use crate::{Change, Error, GuestChannel, GuestExec, Result};

/// First line of the promotion gates' probe script ([`crate::promotion::PROBE_SCRIPT`]); a
/// simulated guest ([`crate::sim_guest`]) recognises the probe by it. Kept here, below both, so
/// the simulated guest does not depend on the promotion engine.
pub const PROBE_MARKER: &str = "# stagecore-probe v1";

/// How long a guest change waits for the machine's agent to answer.
pub const AGENT_READY: Duration = Duration::from_secs(120);

/// Applies a guest change in `machine` of environment `env` through `guest`.
///
/// Non-guest changes are a caller bug and give [`Error::Precondition`].
pub async fn apply_guest_change(env: &str, guest: &dyn GuestChannel, change: &Change) -> Result<()> {
    if matches!(change, Change::GuestCommand { .. } | Change::GuestFile { .. }) {
        guest.wait_ready(change.machine(), AGENT_READY).await?;
    }
    match change {
        Change::GuestCommand { machine, command, timeout_secs } => {
            let mut request = GuestExec::new(command.iter().cloned());
            if let Some(secs) = timeout_secs {
                request = request.timeout(Duration::from_secs(*secs));
            }
            let output = guest.exec(machine, &request).await?;
            if output.success() {
                Ok(())
            } else {
                Err(Error::guest_command(format!("{env}/{machine}"), request.display(), &output))
            }
        }
        Change::GuestFile { machine, path, content, mode } => guest.write_file(machine, path, content, *mode).await,
        other => Err(Error::Precondition(format!("{} is not a guest change", other.kind()))),
    }
}
