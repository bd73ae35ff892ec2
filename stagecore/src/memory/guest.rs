//! The memory backend's simulated guest is [`crate::sim_guest`] (shared with the vCenter
//! simulator): files, packages, services and ports as maps, the inventory collector and the gate
//! probe recognised by their first lines, a small shell and the `stagecore-sim` commands. A probe
//! given as the whole request comes back as [`Exec::Probe`] and is resolved against the
//! environment (`env.rs`), so probes between machines work here.

pub(crate) use crate::sim_guest::{Exec, Guests, Probe, SimGuest};
