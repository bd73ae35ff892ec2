//! Client configuration: endpoint, credentials, TLS trust, deadlines and retry policy.
//!
//! Contract: [`VsphereConfig::new`] rejects a URL that is not http(s) or that carries credentials;
//! the password is a [`Secret`] and `Debug` never shows it.

use stagecore::{Error, Result, Secret};
use std::path::PathBuf;
use std::time::Duration;

/// How temporary failures (503, connection errors, timeouts) are retried.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Wait before the first retry; doubles each time.
    pub initial_backoff: Duration,
    /// Upper bound of one wait.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 6, initial_backoff: Duration::from_millis(50), max_backoff: Duration::from_secs(2) }
    }
}

/// How vim25 tasks are polled.
#[derive(Clone, Debug)]
pub struct TaskPolicy {
    /// First poll interval; doubles up to `max_interval`.
    pub initial_interval: Duration,
    /// Largest poll interval.
    pub max_interval: Duration,
    /// A task not finished after this long is cancelled and reported as [`Error::Timeout`].
    pub timeout: Duration,
}

impl Default for TaskPolicy {
    fn default() -> Self {
        TaskPolicy {
            initial_interval: Duration::from_millis(20),
            max_interval: Duration::from_secs(2),
            timeout: Duration::from_secs(30 * 60),
        }
    }
}

/// Everything needed to reach one vCenter.
#[derive(Clone, Debug)]
pub struct VsphereConfig {
    /// `https://vcenter.example.com` (no path, no credentials).
    pub base_url: url::Url,
    /// User name, e.g. `administrator@vsphere.local`.
    pub username: String,
    /// Password (never printed).
    pub password: Secret,
    /// A PEM file with CA certificates to trust in addition to the system roots.
    pub ca_cert_pem: Option<PathBuf>,
    /// Accept any server certificate (logs a warning at connect). For labs only.
    pub insecure: bool,
    /// Total deadline of one call, retries included.
    pub deadline: Duration,
    /// Retry policy for temporary failures.
    pub retry: RetryPolicy,
    /// Task polling policy.
    pub task: TaskPolicy,
    /// The VI/JSON release segment to use, e.g. `8.0.2.0`; `None` (the default) negotiates it at
    /// connect (`POST /api/vcenter/system?action=hello` with [`crate::VIM_RELEASES`]).
    pub release: Option<String>,
}

impl VsphereConfig {
    /// A configuration with defaults (60 s deadline, negotiated VI/JSON release, system roots only).
    pub fn new(base_url: &str, username: impl Into<String>, password: Secret) -> Result<Self> {
        let url =
            url::Url::parse(base_url).map_err(|e| Error::invalid("vsphere.base_url", format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::invalid("vsphere.base_url", format!("scheme `{}` is not http or https", url.scheme())));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Error::invalid("vsphere.base_url", "must not carry credentials; use username/password"));
        }
        if url.host_str().is_none() {
            return Err(Error::invalid("vsphere.base_url", "has no host"));
        }
        let username = username.into();
        if username.is_empty() {
            return Err(Error::invalid("vsphere.username", "is empty"));
        }
        Ok(VsphereConfig {
            base_url: url,
            username,
            password,
            ca_cert_pem: None,
            insecure: false,
            deadline: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            task: TaskPolicy::default(),
            release: None,
        })
    }

    /// The endpoint for error messages: scheme, host and port only.
    pub(crate) fn endpoint(&self) -> String {
        self.base_url.origin().ascii_serialization()
    }
}
