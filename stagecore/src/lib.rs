//! stagecore: production-like staging copies of VM environments.
mod error;
pub use error::{BoxError, Error, Result, Secret};
