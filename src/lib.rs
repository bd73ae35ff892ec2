//! # stagekit
//!
//! The umbrella crate of stagecore: re-exports [`stagecore`] (model, traits, engines, in-memory
//! backend) and, behind features, the backends — `qemu` (default), `libvirt`, `vsphere`.
//! It owns the examples (`examples/`) and benchmarks (`benches/`).

pub use stagecore;

#[cfg(feature = "qemu")]
pub use stagecore_qemu as qemu;

#[cfg(feature = "libvirt")]
pub use stagecore_libvirt as libvirt;

#[cfg(feature = "vsphere")]
pub use stagecore_vsphere as vsphere;

/// The README's embedding example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
mod readme {}
