//! Restoring production's power states after a rollback (as before the promotion) or a commit
//! (as planned), from the per-machine states the plan recorded.
//!
//! The [`Environment`] trait starts and stops whole environments (`start` starts every machine
//! that does not run, in start order; `stop` stops all), so: machines that must run and do not
//! are started with `start` — unless that would also start a machine that must stay stopped, in
//! which case the note says so; machines that must be stopped and run are stopped with `stop`
//! when no machine must run. Paused or unknown machines are left to the backend's own recovery
//! (a freeze that a dead process left is resumed when the environment opens).

use std::collections::BTreeMap;

use crate::{Environment, PowerState, Result};

/// Brings production to `want` (machine → power state when the promotion started); an empty
/// map (a journal written before the states were recorded) means "start all if any ran". Machines
/// production no longer has, or that `want` does not name, are left alone. Returns a note for the
/// receipt (empty when nothing had to change).
pub(crate) async fn restore(
    production: &dyn Environment,
    want: &BTreeMap<String, PowerState>,
    any_ran: bool,
) -> Result<String> {
    if want.is_empty() {
        if any_ran {
            production.start().await?;
            return Ok("machines started (no per-machine power states recorded)".into());
        }
        return Ok(String::new());
    }
    let now: BTreeMap<String, PowerState> =
        production.status().await?.into_iter().map(|s| (s.machine, s.power)).collect();
    let wants = |m: &str, p: PowerState| want.get(m) == Some(&p);
    let to_start: Vec<&String> = now
        .iter()
        .filter(|(m, p)| wants(m, PowerState::Running) && **p == PowerState::Stopped)
        .map(|(m, _)| m)
        .collect();
    let keep_stopped: Vec<&String> = now
        .iter()
        .filter(|(m, p)| wants(m, PowerState::Stopped) && **p == PowerState::Stopped)
        .map(|(m, _)| m)
        .collect();
    let mut notes = Vec::new();
    if !to_start.is_empty() {
        production.start().await?;
        notes.push(format!("started {}", join(&to_start)));
        if !keep_stopped.is_empty() {
            notes.push(format!(
                "also started {} (stopped before the promotion): the environment API starts whole environments",
                join(&keep_stopped)
            ));
        }
    }
    let now: BTreeMap<String, PowerState> =
        production.status().await?.into_iter().map(|s| (s.machine, s.power)).collect();
    let to_stop: Vec<&String> = now
        .iter()
        .filter(|(m, p)| wants(m, PowerState::Stopped) && **p == PowerState::Running)
        .map(|(m, _)| m)
        .collect();
    if !to_stop.is_empty() {
        if want.values().all(|p| *p != PowerState::Running) {
            production.stop().await?;
            notes.push(format!("stopped {}", join(&to_stop)));
        } else {
            notes.push(format!("{} left running: the environment API stops whole environments", join(&to_stop)));
        }
    }
    Ok(notes.join("; "))
}

fn join(names: &[&String]) -> String {
    names.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
}
