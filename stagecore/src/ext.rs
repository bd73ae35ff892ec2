//! Conveniences over the core traits, for callers. Implementors never write these.

use async_trait::async_trait;

use crate::drift::{Drift, DriftEngine, DriftReport};
use crate::{Backend, ChangeSet, Environment, EnvironmentSpec, Error, Result, Selector};

/// Conveniences on any [`Backend`].
#[async_trait]
pub trait BackendExt: Backend {
    /// Inspects existing production machines into a spec ([`Backend::attach`] + [`Environment::spec`]).
    async fn inspect(&self, selector: &Selector) -> Result<EnvironmentSpec> {
        self.attach(selector).await?.spec().await
    }

    /// The drift report of `stage` against `production`, from the standard [`DriftEngine`].
    /// Both must be environments of this backend (`InvalidSpec` naming the one that is not):
    /// drift compares layers inside one backend's chains.
    async fn drift(&self, production: &dyn Environment, stage: &dyn Environment) -> Result<DriftReport> {
        for (what, env) in [("production", production), ("stage", stage)] {
            let info = env.info().await?;
            if info.backend != self.name() {
                return Err(Error::invalid(
                    what,
                    format!("{} is an environment of the {} backend, not of {}", info.name, info.backend, self.name()),
                ));
            }
        }
        DriftEngine::new().drift(production, stage).await
    }
}

impl<T: Backend + ?Sized> BackendExt for T {}

/// A fingerprint of what an environment's guests see: the spec (normalised JSON) and a SHA-256 per
/// disk. Used to prove that staging operations leave production untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// The spec as JSON.
    pub spec: String,
    /// `(machine, disk, sha256)` for every disk.
    pub disks: Vec<(String, String, [u8; 32])>,
}

/// Conveniences on any [`Environment`].
#[async_trait]
pub trait EnvironmentExt: Environment {
    /// Checks a ChangeSet against the current spec, applies its changes in order, and records it.
    /// A change that fails stops the ChangeSet; the error names the change (`changes[i]`).
    async fn apply_change_set(&self, change_set: &ChangeSet) -> Result<()> {
        change_set.check_against(&self.spec().await?)?;
        for (i, change) in change_set.changes.iter().enumerate() {
            self.apply(change).await.map_err(|e| match e {
                Error::InvalidSpec { path, reason } => Error::invalid(format!("changes[{i}].{path}"), reason),
                other => other,
            })?;
        }
        self.record_change_set(change_set).await
    }

    /// Fingerprint of the spec and of every disk's guest-visible content (needs
    /// [`crate::Capabilities::disk_io`]).
    async fn fingerprint(&self) -> Result<Fingerprint> {
        let spec = self.spec().await?;
        let io = self.disk_io().ok_or_else(|| {
            Error::invalid("environment", format!("{} offers no disk_io: cannot fingerprint its disks", self.name()))
        })?;
        let mut disks = Vec::new();
        for m in &spec.machines {
            for d in &m.disks {
                disks.push((m.name.clone(), d.name.clone(), io.digest(&m.name, &d.name).await?));
            }
        }
        let json = serde_json::to_string(&spec).map_err(|e| Error::core("fingerprint", e))?;
        Ok(Fingerprint { spec: json, disks })
    }
}

impl<T: Environment + ?Sized> EnvironmentExt for T {}
