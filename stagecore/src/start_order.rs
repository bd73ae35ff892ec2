//! Start order of an environment's machines (an application group): each machine may name the
//! machines it starts [`after`](crate::MachineSpec::after). [`EnvironmentSpec::start_waves`]
//! turns that into waves — machines in one wave start together, a wave starts once every
//! machine of the waves before it is running and its guest agent answered (or is known to have
//! none). Backends use the same waves on productions, stages and after promotions.

use std::collections::BTreeSet;

use crate::{EnvironmentSpec, Error, Result};

impl EnvironmentSpec {
    /// The machines in start order, grouped in waves; within a wave, spec order.
    ///
    /// Errors: [`Error::InvalidSpec`] at `machines[i].after[j]` for an unknown machine, the
    /// machine itself, or a cycle.
    ///
    /// ```
    /// let mut spec = stagecore::memory::sample_spec("prod");
    /// spec.machines[0].after = vec!["app".into()]; // web after app
    /// spec.machines[1].after = vec!["db".into()]; // app after db
    /// assert_eq!(spec.start_waves().unwrap(), vec![vec!["db".to_string()], vec!["app".into()], vec!["web".into()]]);
    /// ```
    pub fn start_waves(&self) -> Result<Vec<Vec<String>>> {
        let names: BTreeSet<&str> = self.machines.iter().map(|m| m.name.as_str()).collect();
        for (i, m) in self.machines.iter().enumerate() {
            for (j, dep) in m.after.iter().enumerate() {
                let path = format!("machines[{i}].after[{j}]");
                if dep == &m.name {
                    return Err(Error::invalid(path, "a machine cannot start after itself"));
                }
                if !names.contains(dep.as_str()) {
                    return Err(Error::invalid(path, format!("unknown machine {dep:?}")));
                }
            }
        }
        let mut started: BTreeSet<&str> = BTreeSet::new();
        let mut waves = Vec::new();
        while started.len() < self.machines.len() {
            let wave: Vec<&str> = self
                .machines
                .iter()
                .filter(|m| !started.contains(m.name.as_str()))
                .filter(|m| m.after.iter().all(|d| started.contains(d.as_str())))
                .map(|m| m.name.as_str())
                .collect();
            if wave.is_empty() {
                let (i, m) = self
                    .machines
                    .iter()
                    .enumerate()
                    .find(|(_, m)| !started.contains(m.name.as_str()))
                    .expect("some machine is left");
                return Err(Error::invalid(
                    format!("machines[{i}].after"),
                    format!("{} is part of a start-order cycle", m.name),
                ));
            }
            started.extend(wave.iter().copied());
            waves.push(wave.into_iter().map(str::to_string).collect());
        }
        Ok(waves)
    }
}

#[cfg(test)]
mod tests {
    use crate::memory::sample_spec;

    #[test]
    fn no_order_is_one_wave() {
        let spec = sample_spec("p");
        assert_eq!(spec.start_waves().unwrap(), vec![vec!["web".to_string(), "app".into(), "db".into()]]);
    }

    #[test]
    fn cycle_and_unknown_are_typed() {
        let mut spec = sample_spec("p");
        spec.machines[1].after = vec!["web".into()];
        spec.machines[0].after = vec!["app".into()];
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("machines[0].after") && err.contains("cycle"), "{err}");
        spec.machines[0].after = vec!["nope".into()];
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("machines[0].after[0]") && err.contains("nope"), "{err}");
        spec.machines[0].after = vec!["web".into()];
        assert!(spec.validate().unwrap_err().to_string().contains("itself"));
    }

    #[test]
    fn parallel_branches_share_a_wave() {
        let mut spec = sample_spec("p");
        spec.machines[0].after = vec!["db".into()];
        spec.machines[1].after = vec!["db".into()];
        assert_eq!(spec.start_waves().unwrap(), vec![vec!["db".to_string()], vec!["web".into(), "app".into()]]);
    }
}
