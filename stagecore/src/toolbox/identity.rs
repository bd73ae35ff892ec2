//! New identities: UUIDs, MACs and baseline ids, made in one place so every backend gives a
//! stage (and a new production) the same kind of fresh identity.

use crate::{EnvironmentSpec, random_mac};

/// A new random UUID (v4) as text.
pub fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A new baseline id (`bl-` and 12 hex digits).
pub fn new_baseline_id() -> String {
    format!("bl-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Fills the identities a spec leaves open — machine UUIDs and NIC MACs — with fresh ones,
/// keeping the ones given. Backends call it when they create a production from a spec.
///
/// ```
/// let mut spec = stagecore::memory::sample_spec("prod");
/// spec.machines[0].uuid = None;
/// stagecore::toolbox::fill_identities(&mut spec);
/// assert!(spec.machines.iter().all(|m| m.uuid.is_some() && m.nics.iter().all(|n| n.mac.is_some())));
/// ```
pub fn fill_identities(spec: &mut EnvironmentSpec) {
    for m in &mut spec.machines {
        m.uuid.get_or_insert_with(new_uuid);
        for n in &mut m.nics {
            n.mac.get_or_insert_with(random_mac);
        }
    }
}

/// Gives every machine a new UUID and every NIC a new MAC (a stage's identities).
pub(crate) fn renew_identities(spec: &mut EnvironmentSpec) {
    for m in &mut spec.machines {
        m.uuid = Some(new_uuid());
        for n in &mut m.nics {
            n.mac = Some(random_mac());
        }
    }
}
