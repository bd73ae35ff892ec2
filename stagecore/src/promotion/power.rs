//! Restoring production's power states after a rollback (as before the promotion) or a commit
//! (as planned), from the per-machine states the plan recorded.
//!
//! Machines that must run and do not are started with [`Environment::start_machines`] (in start
//! order), machines that must be stopped and run are stopped with
//! [`Environment::stop_machines`]; the others are not touched. Paused or unknown machines are
//! left to the backend's own recovery (a freeze that a dead process left is resumed when the
//! environment opens).

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
    let pick = |should: PowerState, is: PowerState| -> Vec<String> {
        now.iter().filter(|(m, p)| wants(m, should) && **p == is).map(|(m, _)| m.clone()).collect()
    };
    let (to_start, to_stop) =
        (pick(PowerState::Running, PowerState::Stopped), pick(PowerState::Stopped, PowerState::Running));
    let mut notes = Vec::new();
    if !to_start.is_empty() {
        production.start_machines(&to_start).await?;
        notes.push(format!("started {}", to_start.join(", ")));
    }
    if !to_stop.is_empty() {
        production.stop_machines(&to_stop).await?;
        notes.push(format!("stopped {}", to_stop.join(", ")));
    }
    Ok(notes.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Backend as _;
    use crate::memory::{MemoryBackend, sample_spec};

    async fn powers(env: &dyn Environment) -> BTreeMap<String, PowerState> {
        env.status().await.unwrap().into_iter().map(|s| (s.machine, s.power)).collect()
    }

    #[tokio::test]
    async fn restore_starts_and_stops_exactly_the_machines_that_differ() {
        let backend = MemoryBackend::new();
        let prod = backend.create(&sample_spec("p")).await.unwrap();
        let names: Vec<String> = powers(&*prod).await.into_keys().collect();
        let (kept_off, rest) = (names[0].clone(), names[1..].to_vec());
        let mut want: BTreeMap<String, PowerState> = rest.iter().map(|m| (m.clone(), PowerState::Running)).collect();
        want.insert(kept_off.clone(), PowerState::Stopped);

        prod.start().await.unwrap();
        let note = restore(&*prod, &want, true).await.unwrap();
        assert_eq!(powers(&*prod).await, want, "{note}");
        assert_eq!(note, format!("stopped {kept_off}"));

        prod.stop().await.unwrap();
        let note = restore(&*prod, &want, true).await.unwrap();
        assert_eq!(powers(&*prod).await, want, "{note}");
        assert_eq!(note, format!("started {}", rest.join(", ")));

        assert_eq!(restore(&*prod, &want, true).await.unwrap(), "", "nothing to change");
        assert_eq!(powers(&*prod).await, want);
    }
}
