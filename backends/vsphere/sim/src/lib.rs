//! A stateful vCenter simulator for testing `stagecore-vsphere` (not published).
//!
//! Contract: [`Simulator::start`] serves the subset of the Automation REST API (`/api/...`) and the
//! VI/JSON API (`/sdk/vim25/{release}/...`) that the client uses, over HTTPS (a certificate signed by
//! a CA generated at start, see [`Simulator::ca_pem`]) and over plain HTTP, both on 127.0.0.1 with
//! random ports. Every `/api` request and response whose endpoint the official 7.0.3 OpenAPI
//! documents describe is checked against them (see `openapi.rs`); a violation is answered with 500
//! and recorded ([`Simulator::violations`]). VI/JSON answers are recorded ([`Simulator::vim_answers`])
//! and checked by the tests against `vim_rs`'s specification types. Every VM runs a simulated guest
//! behind the guest operations (`guest.rs`: `stagecore::sim_guest`, shared with the memory backend). Faults are injected through [`Simulator`] methods.
//! The servers stop when the [`Simulator`] is dropped.

mod exchange;
mod guest;
mod guest_api;
mod openapi;
mod rest;
mod server;
mod state;
mod tasks;
mod tls;
mod vim;

pub use guest::{PRODUCT_UUID, SIM_GUEST_PASSWORD, SIM_GUEST_USER, SimGuest};
pub use openapi::OPENAPI_DIR_ENV;
pub use state::{Disk, DiskBacking, Fault, Network, NetworkKind, Nic, PowerState, Snapshot, Vm, VmConfig, Write};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The user name the simulator accepts.
pub const SIM_USER: &str = "administrator@vsphere.local";
/// The password the simulator accepts.
pub const SIM_PASSWORD: &str = "sim-Passw0rd!";

/// The VI/JSON releases the simulator knows, oldest first (VI/JSON starts with vSphere 8.0U1).
pub const VIM_RELEASES: [&str; 4] = ["8.0.1.0", "8.0.2.0", "8.0.3.0", "9.0.0.0"];

/// One VI/JSON request and the answer the simulator gave, kept so tests can check both against the
/// specification.
#[derive(Clone, Debug)]
pub struct VimAnswer {
    /// HTTP method.
    pub method: String,
    /// Request path (`/sdk/vim25/8.0.2.0/VirtualMachine/vm-101/config`).
    pub path: String,
    /// HTTP status.
    pub status: u16,
    /// The JSON body, `None` when empty.
    pub body: Option<serde_json::Value>,
    /// The request's JSON body, `None` when empty (the request log: tests check it against the
    /// method's request type in the specification).
    pub request: Option<serde_json::Value>,
}

/// The current time in RFC 3339 (`2026-12-01T08:52:12.123Z`).
pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

/// Compares two dotted release strings numerically (`8.0.10.0` > `8.0.2.0`).
pub(crate) fn release_key(r: &str) -> Vec<u32> {
    r.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

/// A documented-shape violation found in a request or response.
#[derive(Clone, Debug)]
pub struct Violation {
    /// HTTP method.
    pub method: String,
    /// Request path with query.
    pub path: String,
    /// `request` or `response`.
    pub direction: &'static str,
    /// What is wrong, one entry per finding (JSON pointer: message).
    pub details: Vec<String>,
}

/// Request counters, for tests that check what the client did.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Successful REST logins.
    pub rest_logins: u64,
    /// Successful VI/JSON logins.
    pub vim_logins: u64,
    /// REST logouts.
    pub rest_logouts: u64,
    /// VI/JSON logouts.
    pub vim_logouts: u64,
    /// Requests answered 503 by an injected burst.
    pub injected_503: u64,
    /// `CancelTask` calls.
    pub task_cancels: u64,
    /// Endpoints checked against the OpenAPI documents (method + template), de-duplicated.
    pub checked_endpoints: Vec<String>,
    /// Endpoints served that the documents do not describe (all VI/JSON ones).
    pub unchecked_endpoints: Vec<String>,
    /// Every session token issued (so tests can look for leaks).
    pub issued_tokens: Vec<String>,
}

#[derive(Debug, Default)]
pub(crate) struct Faults {
    pub(crate) burst_503: u32,
    pub(crate) reject_logins: bool,
    pub(crate) task_delay: Duration,
    pub(crate) fail_next_tasks: Vec<Fault>,
    /// Path endings whose next request is carried out and then answered with a broken body.
    pub(crate) lose_answers: Vec<String>,
}

#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) vim: bool,
    pub(crate) expires: Instant,
}

pub(crate) struct Shared {
    pub(crate) inv: Mutex<state::Inventory>,
    pub(crate) faults: Mutex<Faults>,
    pub(crate) sessions: Mutex<HashMap<String, Session>>,
    pub(crate) tasks: Mutex<HashMap<String, tasks::Task>>,
    pub(crate) violations: Mutex<Vec<Violation>>,
    pub(crate) stats: Mutex<Stats>,
    pub(crate) openapi: &'static openapi::OpenApi,
    pub(crate) session_ttl: Duration,
    /// The newest VI/JSON release served; `None`: a vCenter 7.0.x without VI/JSON.
    pub(crate) vim_release: Option<String>,
    /// The SessionManager's managed object id announced in ServiceContent.
    pub(crate) session_manager: String,
    pub(crate) vim_answers: Mutex<Vec<VimAnswer>>,
    /// Guest transfer URLs handed out and not used yet: token → (VM, path, direction).
    pub(crate) transfers: Mutex<HashMap<String, guest::Transfer>>,
    /// The HTTPS listener's port (to tell which scheme a transfer URL needs).
    pub(crate) https_port: std::sync::OnceLock<u16>,
}

impl Shared {
    /// Whether `release` is served: a known release not newer than the server's own, or the
    /// server's own release.
    pub(crate) fn serves(&self, release: &str) -> bool {
        let Some(top) = &self.vim_release else { return false };
        release == top || (VIM_RELEASES.contains(&release) && release_key(release) <= release_key(top))
    }
}

/// Locks a mutex, ignoring poisoning (a panicking test must not hide the state from others).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Options for [`Simulator::start`].
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// How long a session lives without being expired by hand.
    pub session_ttl: Duration,
    /// Seed the default inventory (folders `prod`/`stage`/`apps`, networks, VMs `web`, `db` and `app`).
    pub seed: bool,
    /// The VI/JSON release this "vCenter" is (it also serves the older known releases, see
    /// [`VIM_RELEASES`]); `None` for a vCenter 7.0.x: no VI/JSON and no
    /// `POST /api/vcenter/system?action=hello`.
    pub vim_release: Option<String>,
    /// The SessionManager's managed object id, announced in `ServiceContent.sessionManager`.
    pub session_manager_id: String,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            session_ttl: Duration::from_secs(3600),
            seed: true,
            vim_release: Some("8.0.2.0".to_string()),
            session_manager_id: "SessionManager".to_string(),
        }
    }
}

impl SimOptions {
    /// Default options for a vCenter of the given VI/JSON release (`None`: 7.0.x, no VI/JSON).
    pub fn release(release: Option<&str>) -> Self {
        SimOptions { vim_release: release.map(str::to_string), ..SimOptions::default() }
    }
}

/// A running simulator. Dropping it stops its servers.
pub struct Simulator {
    shared: Arc<Shared>,
    https_url: String,
    http_url: String,
    ca_pem: String,
    shutdown: Vec<axum_server::Handle<std::net::SocketAddr>>,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator").field("https_url", &self.https_url).field("http_url", &self.http_url).finish()
    }
}

impl Simulator {
    /// Starts HTTPS and HTTP servers on 127.0.0.1 (random ports). Fails if the OpenAPI documents
    /// cannot be loaded.
    pub async fn start(options: SimOptions) -> Result<Simulator, String> {
        let openapi = openapi::OpenApi::get()?;
        let mut inv = state::Inventory::default();
        if options.seed {
            server::seed(&mut inv);
        }
        let shared = Arc::new(Shared {
            inv: Mutex::new(inv),
            faults: Mutex::new(Faults::default()),
            sessions: Mutex::new(HashMap::new()),
            tasks: Mutex::new(HashMap::new()),
            violations: Mutex::new(Vec::new()),
            stats: Mutex::new(Stats::default()),
            openapi,
            session_ttl: options.session_ttl,
            vim_release: options.vim_release.clone(),
            session_manager: options.session_manager_id.clone(),
            vim_answers: Mutex::new(Vec::new()),
            transfers: Mutex::new(HashMap::new()),
            https_port: std::sync::OnceLock::new(),
        });
        let generated = tls::generate().map_err(|e| format!("certificate generation: {e}"))?;
        let (https_url, h1) = server::serve_https(shared.clone(), &generated).await?;
        let (http_url, h2) = server::serve_http(shared.clone()).await?;
        Ok(Simulator { shared, https_url, http_url, ca_pem: generated.ca_pem, shutdown: vec![h1, h2] })
    }

    /// `https://127.0.0.1:PORT` (certificate signed by [`Simulator::ca_pem`], valid for 127.0.0.1).
    pub fn https_url(&self) -> &str {
        &self.https_url
    }

    /// `http://127.0.0.1:PORT`.
    pub fn http_url(&self) -> &str {
        &self.http_url
    }

    /// The PEM of the CA that signed the HTTPS certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// All OpenAPI violations recorded so far.
    pub fn violations(&self) -> Vec<Violation> {
        lock(&self.shared.violations).clone()
    }

    /// Every VI/JSON answer given so far, in order.
    pub fn vim_answers(&self) -> Vec<VimAnswer> {
        lock(&self.shared.vim_answers).clone()
    }

    /// A copy of the simulated guest of a VM (`None`: the VM has no guest with VMware Tools).
    pub fn guest(&self, vm: &str) -> Option<SimGuest> {
        lock(&self.shared.inv).guests.get(vm).cloned()
    }

    /// Changes the simulated guest of a VM (creating it when absent).
    pub fn with_guest<T>(&self, vm: &str, f: impl FnOnce(&mut SimGuest) -> T) -> T {
        let mut inv = lock(&self.shared.inv);
        let name = inv.vms.get(vm).map_or_else(|| vm.to_string(), |v| v.name.clone());
        f(inv.guests.entry(vm.to_string()).or_insert_with(|| guest::vsphere_guest(&name)))
    }

    /// Request counters and the endpoints checked / not checked so far.
    pub fn stats(&self) -> Stats {
        lock(&self.shared.stats).clone()
    }

    /// Fault: every live session expires now (the next call gets 401).
    pub fn expire_all_sessions(&self) {
        lock(&self.shared.sessions).clear();
    }

    /// Fault: the next `n` requests (any endpoint, logins included) are answered 503.
    pub fn fail_next_requests_with_503(&self, n: u32) {
        lock(&self.shared.faults).burst_503 = n;
    }

    /// Fault: every login is refused (as if the credentials were wrong).
    pub fn reject_logins(&self, reject: bool) {
        lock(&self.shared.faults).reject_logins = reject;
    }

    /// Fault: tasks take this long (half queued, half running) before they finish.
    pub fn set_task_delay(&self, delay: Duration) {
        lock(&self.shared.faults).task_delay = delay;
    }

    /// Fault: the next request whose path ends with `path_end` (e.g. `CreateSnapshotEx_Task`) is
    /// carried out, but its answer is lost: the connection breaks in the middle of the body, as when
    /// a network path fails after the server acted.
    pub fn lose_next_answer(&self, path_end: &str) {
        lock(&self.shared.faults).lose_answers.push(path_end.to_string());
    }

    /// Fault: the next task started ends in error with this fault (`_typeName`, message).
    pub fn fail_next_task(&self, type_name: &str, message: &str) {
        lock(&self.shared.faults).fail_next_tasks.push(Fault::new(type_name, message));
    }

    /// A copy of a VM, by identifier.
    pub fn vm(&self, id: &str) -> Option<Vm> {
        lock(&self.shared.inv).vms.get(id).cloned()
    }

    /// A copy of a VM, by name.
    pub fn vm_by_name(&self, name: &str) -> Option<Vm> {
        lock(&self.shared.inv).vms.values().find(|v| v.name == name).cloned()
    }

    /// A copy of a snapshot.
    pub fn snapshot(&self, id: &str) -> Option<Snapshot> {
        lock(&self.shared.inv).snapshots.get(id).cloned()
    }

    /// Simulates a guest write of `length` bytes at `offset` into disk `disk_key` of VM `vm`.
    pub fn guest_write(&self, vm: &str, disk_key: i32, offset: u64, length: u64) -> Result<(), String> {
        let mut inv = lock(&self.shared.inv);
        let vm = inv.vms.get_mut(vm).ok_or_else(|| format!("no VM {vm}"))?;
        let disk =
            vm.config.disks.iter_mut().find(|d| d.key == disk_key).ok_or_else(|| format!("no disk {disk_key}"))?;
        if offset.checked_add(length).is_none_or(|end| end > disk.capacity) {
            return Err(format!("write beyond capacity {}", disk.capacity));
        }
        let seq = disk.next_seq;
        disk.next_seq += 1;
        disk.lineage.push(Write { seq, start: offset, length });
        Ok(())
    }

    /// Adds a network (port group); returns its identifier.
    pub fn add_network(&self, name: &str, isolated: bool) -> String {
        let mut inv = lock(&self.shared.inv);
        let id = inv.next("network");
        inv.networks.push(Network::standard(&id, name, isolated));
        id
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        for h in &self.shutdown {
            h.shutdown();
        }
    }
}
