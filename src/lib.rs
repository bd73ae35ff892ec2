//! stagekit: umbrella crate.
pub use stagecore;
