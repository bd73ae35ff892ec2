//! Fault injection for tests of recovery paths: make the Nth call of an operation fail. Any
//! backend can hold a [`FaultInjector`] and call [`FaultInjector::check`] at the start of an
//! operation (the memory backend does for every trait method).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::{Error, Result};

/// Makes chosen calls fail with an injected [`Error::Backend`], to test recovery paths.
///
/// Operation names are the trait method names: `create`, `stage`, `destroy`, `swap`, `start`,
/// `stop`, `take_baseline`, `disk_changes`, `apply`, `create_snapshot`, `revert_snapshot`,
/// `delete_snapshot`, `write`.
#[derive(Debug)]
pub struct FaultInjector {
    backend: &'static str,
    rules: Mutex<HashMap<String, (u64, u64)>>,
}

impl Default for FaultInjector {
    fn default() -> Self {
        Self::new("memory")
    }
}

impl FaultInjector {
    /// An injector without rules whose faults are errors of `backend`.
    pub fn new(backend: &'static str) -> Self {
        FaultInjector { backend, rules: Mutex::new(HashMap::new()) }
    }

    /// The `n`th call (1-based, counted from now) of `operation` fails.
    pub fn fail_nth(&self, operation: &str, n: u64) {
        self.rules.lock().expect("fault lock").insert(operation.to_string(), (n, 0));
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.rules.lock().expect("fault lock").clear();
    }

    /// Counts a call of `operation` and fails it if a rule says so (each rule fires once).
    pub fn check(&self, operation: &'static str) -> Result<()> {
        let mut rules = self.rules.lock().expect("fault lock");
        if let Some((n, seen)) = rules.get_mut(operation) {
            *seen += 1;
            if *seen == *n {
                rules.remove(operation);
                return Err(Error::backend_msg(self.backend, format!("injected fault in {operation}")));
            }
        }
        Ok(())
    }
}
