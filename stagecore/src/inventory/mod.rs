//! Guest inventory: what software runs inside each machine, as typed data — OS release, kernel,
//! installed packages (dpkg, or rpm where present), services (systemd, or the test guest's `svc`),
//! listening ports (`/proc/net/{tcp,udp}{,6}`) and SHA-256 hashes of the files under watched paths.
//!
//! # How it is collected
//! **One exec per machine** through the [`crate::GuestChannel`]: a POSIX `sh` script
//! ([`SCRIPT`]) prints everything in sections and Rust parses it. Every exec is bounded in time
//! ([`InventoryConfig::timeout`], after waiting at most [`InventoryConfig::agent_timeout`] for the
//! agent) and output ([`InventoryConfig::output_cap`], [`InventoryConfig::max_files`] per watched
//! path); machines are collected in parallel, at most [`InventoryConfig::parallel`] at a time.
//! A machine that is not running, has no guest channel, or whose agent does not answer (or whose
//! output is cut off) gives [`MachineInventory::NotCollected`] with the reason — never an empty
//! inventory.
//!
//! # Read-only, also on atime
//! The script writes nothing in the guest (no temporary files: pipes only). Reading a file can
//! update its access time, which *is* a disk write, so files are hashed only where that cannot
//! happen: on filesystems mounted `noatime` or `ro` (the test guest's root is `noatime`) the
//! script hashes in bulk with `sha256sum`; elsewhere it skips the path and says why
//! ([`WatchedPath::skipped`]), unless [`InventoryConfig::hash_on_atime_mounts`] is set, in which
//! case each file is read with `O_NOATIME` (GNU `dd iflag=noatime`; needs root or the file's
//! owner). Directory reads by `find` on such mounts may still update directory access times,
//! which is why hashing there is opt-in.
//!
//! # Watched paths
//! Defaults: [`DEFAULT_WATCH`]. An environment (or one machine) chooses its own with the spec
//! label `stagecore.watch` (colon-separated absolute paths: `/etc:/opt/app`); files matching
//! `stagecore.ignore` (colon-separated globs, `*` matches anything) are left out, in addition to
//! [`DEFAULT_IGNORE`] — what a stage must differ in (hostname, machine-id, SSH host keys).
//!
//! # Kept with the baseline and the ChangeSets
//! [`take_baseline`] collects production's inventory just before the freeze; [`stage`] creates a
//! stage and records it there (see [`records`](self#records)); [`apply_change_set`] records the
//! *footprint* of a ChangeSet's guest changes. The drift engine reads both back.

mod items;
mod join;
mod parse;
mod records;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub use items::{Category, GuestDelta, ItemKey, delta, item_path, items};
pub(crate) use join::{Job, bounded};
pub use records::{
    BASELINE_RECORD, BaselineInventory, FOOTPRINT_PREFIX, Footprint, baseline_inventory, baseline_record,
    footprint_record, footprints, is_record, user_change_sets,
};

use crate::progress::{Progress, emit};
use crate::{
    Backend, Baseline, Change, ChangeSet, Environment, EnvironmentExt, EnvironmentSpec, Error, GuestExec, PowerState,
    Result, StageOptions,
};

/// The collector script (POSIX `sh`), run as `sh -c SCRIPT stagecore-inventory MAX DD PATH...`.
pub const SCRIPT: &str = include_str!("collector.sh");

/// The first line of [`SCRIPT`], by which a simulated guest recognises it.
pub const SCRIPT_MARKER: &str = "# stagecore-inventory v1";

/// Watched paths when the spec names none.
pub const DEFAULT_WATCH: &[&str] = &["/etc", "/opt", "/usr/local"];

/// Files never compared: what a stage must differ in, or regenerates.
pub const DEFAULT_IGNORE: &[&str] =
    &["/etc/hostname", "/etc/machine-id", "/etc/ssh/ssh_host_*", "/var/lib/dbus/machine-id", "/etc/adjtime"];

/// Spec label (environment or machine) with the watched paths, colon-separated.
pub const WATCH_LABEL: &str = "stagecore.watch";
/// Spec label (environment or machine) with extra ignore globs, colon-separated.
pub const IGNORE_LABEL: &str = "stagecore.ignore";

/// `/etc/os-release` in short.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsRelease {
    /// `ID` (`debian`).
    pub id: String,
    /// `VERSION_ID` (`12`).
    pub version_id: String,
    /// `PRETTY_NAME`.
    pub pretty_name: String,
}

/// An installed package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// Version (`1.24.0-1`, with epoch when there is one).
    pub version: String,
    /// Architecture (`amd64`, `all`, `x86_64`).
    pub arch: String,
}

/// A service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Unit-file state (`enabled`, `disabled`, `static`, `masked`; `enabled` for `svc`).
    pub state: String,
    /// Whether it is running.
    pub running: bool,
}

/// What was hashed under one watched path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchedPath {
    /// The path.
    pub path: String,
    /// Files hashed.
    pub files: usize,
    /// Why the path was not hashed, if it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// The path does not exist in the guest.
    #[serde(default)]
    pub missing: bool,
}

/// The inventory of one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInventory {
    /// Logical machine name.
    pub machine: String,
    /// When it was collected.
    #[serde(with = "time::serde::rfc3339")]
    pub collected_at: OffsetDateTime,
    /// What collecting it cost: wall time of the exec round trip, in milliseconds.
    pub millis: u64,
    /// What collecting it cost: bytes of output.
    pub output_bytes: u64,
    /// OS release.
    pub os: OsRelease,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// Hostname (not compared: a stage may differ).
    pub hostname: String,
    /// `dpkg`, `rpm` or `none`.
    pub package_format: String,
    /// Installed packages by name (`name:arch` when one name is installed for two architectures).
    pub packages: BTreeMap<String, Package>,
    /// `systemd`, `svc` or `none`.
    pub service_manager: String,
    /// Services by name (without `.service`).
    pub services: BTreeMap<String, Service>,
    /// Listening ports (`tcp:8080`, `udp:53`) with their local addresses.
    pub ports: BTreeMap<String, Vec<String>>,
    /// SHA-256 (hex) of each file under the watched paths, ignored files left out.
    pub files: BTreeMap<String, String>,
    /// What happened under each watched path.
    pub watched: Vec<WatchedPath>,
}

impl GuestInventory {
    /// Watched paths that were skipped or hit the file limit, as one note.
    pub fn incomplete(&self, max_files: usize) -> Option<String> {
        let notes: Vec<String> = self
            .watched
            .iter()
            .filter_map(|w| match &w.skipped {
                Some(why) => Some(format!("{}: {why}", w.path)),
                None if max_files > 0 && w.files >= max_files => {
                    Some(format!("{}: only the first {max_files} files were hashed", w.path))
                }
                None => None,
            })
            .collect();
        (!notes.is_empty()).then(|| notes.join("; "))
    }
}

/// The inventory of one machine, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum MachineInventory {
    /// Collected.
    Collected {
        /// The inventory.
        inventory: Box<GuestInventory>,
    },
    /// Not collected, and why (not running, no agent, timeout, output cut off).
    NotCollected {
        /// Why.
        reason: String,
    },
}

impl MachineInventory {
    /// The inventory, if collected.
    pub fn inventory(&self) -> Option<&GuestInventory> {
        match self {
            MachineInventory::Collected { inventory } => Some(inventory),
            MachineInventory::NotCollected { .. } => None,
        }
    }

    /// Why there is no inventory, if there is none.
    pub fn reason(&self) -> Option<&str> {
        match self {
            MachineInventory::Collected { .. } => None,
            MachineInventory::NotCollected { reason } => Some(reason),
        }
    }

    fn not(reason: impl Into<String>) -> Self {
        MachineInventory::NotCollected { reason: reason.into() }
    }
}

/// How long inventory collection waits, by default, for a machine's guest agent to answer
/// ([`InventoryConfig::agent_timeout`]; set that field to change it).
pub const DEFAULT_AGENT_WAIT: Duration = Duration::from_secs(5);

/// How inventories are collected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryConfig {
    /// Watched paths (absolute); the spec label [`WATCH_LABEL`] overrides them.
    pub watch: Vec<String>,
    /// Globs of files left out (plus the spec label [`IGNORE_LABEL`]).
    pub ignore: Vec<String>,
    /// Files hashed per watched path, at most.
    pub max_files: usize,
    /// Time the collector may run per machine (default 180 s: hashing `/etc` in a TCG guest on a
    /// busy host takes minutes; a real guest takes seconds).
    pub timeout: Duration,
    /// Time the agent gets to answer before the machine counts as unreachable (default
    /// [`DEFAULT_AGENT_WAIT`], 5 s).
    pub agent_timeout: Duration,
    /// Output accepted per machine, in bytes; more makes the machine NOT_CHECKED.
    pub output_cap: usize,
    /// Machines collected at the same time.
    pub parallel: usize,
    /// Hash files on mounts that update access times, reading with `O_NOATIME`.
    pub hash_on_atime_mounts: bool,
}

impl Default for InventoryConfig {
    fn default() -> Self {
        InventoryConfig {
            watch: DEFAULT_WATCH.iter().map(|s| s.to_string()).collect(),
            ignore: DEFAULT_IGNORE.iter().map(|s| s.to_string()).collect(),
            max_files: 20_000,
            timeout: Duration::from_secs(180),
            agent_timeout: DEFAULT_AGENT_WAIT,
            output_cap: 8 << 20,
            parallel: 4,
            hash_on_atime_mounts: false,
        }
    }
}

fn split(label: &str) -> Vec<String> {
    label.split(':').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

impl InventoryConfig {
    /// The configuration for `machine` of `spec`: labels of the environment, then of the machine,
    /// override the watched paths and add ignore globs.
    pub fn for_machine(&self, spec: &EnvironmentSpec, machine: &str) -> InventoryConfig {
        let mut cfg = self.clone();
        let machine_labels = spec.machine(machine).map(|m| &m.labels);
        for labels in [Some(&spec.labels), machine_labels].into_iter().flatten() {
            if let Some(w) = labels.get(WATCH_LABEL) {
                cfg.watch = split(w);
            }
            if let Some(i) = labels.get(IGNORE_LABEL) {
                cfg.ignore.extend(split(i));
            }
        }
        cfg
    }

    /// Checks the watched paths: absolute, no `..`, no control characters.
    pub fn validate(&self) -> Result<()> {
        for (i, p) in self.watch.iter().enumerate() {
            if !p.starts_with('/') || p.split('/').any(|s| s == "..") || p.chars().any(char::is_control) {
                return Err(Error::invalid(format!("inventory.watch[{i}]"), format!("{p:?} is not an absolute path")));
            }
        }
        Ok(())
    }

    /// The exec request that collects one machine's inventory.
    pub fn request(&self) -> GuestExec {
        let mut argv = vec![
            "/bin/sh".to_string(),
            "-c".into(),
            SCRIPT.into(),
            "stagecore-inventory".into(),
            self.max_files.to_string(),
            if self.hash_on_atime_mounts { "1" } else { "0" }.into(),
        ];
        argv.extend(self.watch.iter().cloned());
        GuestExec::new(argv).timeout(self.timeout)
    }
}

async fn collect_one(env: &dyn Environment, machine: &str, cfg: &InventoryConfig) -> MachineInventory {
    let Some(guest) = env.guest() else { return MachineInventory::not("the backend offers no guest channel") };
    if let Err(e) = cfg.validate() {
        return MachineInventory::not(e.to_string());
    }
    if let Err(e) = guest.wait_ready(machine, cfg.agent_timeout).await {
        return MachineInventory::not(format!("the guest agent did not answer: {e}"));
    }
    let started = Instant::now();
    let output = match guest.exec(machine, &cfg.request()).await {
        Ok(o) => o,
        Err(e) => return MachineInventory::not(format!("the inventory command failed: {e}")),
    };
    let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    if output.truncated || output.stdout.len() > cfg.output_cap {
        return MachineInventory::not(format!(
            "the inventory output exceeded the cap ({} bytes, cap {}; truncated by the channel: {})",
            output.stdout.len(),
            cfg.output_cap,
            output.truncated
        ));
    }
    if !output.success() {
        let stderr = output.stderr_text();
        return MachineInventory::not(format!(
            "the inventory script exited with {}: {}",
            output.exit_code,
            stderr.trim().chars().take(500).collect::<String>()
        ));
    }
    match parse::parse(machine, &output.stdout_text()) {
        Ok(mut inv) => {
            inv.millis = millis;
            inv.files.retain(|path, _| !cfg.ignore.iter().any(|g| items::glob(g, path)));
            tracing::debug!(machine, millis, bytes = inv.output_bytes, files = inv.files.len(), "inventory collected");
            MachineInventory::Collected { inventory: Box::new(inv) }
        }
        Err(reason) => MachineInventory::not(reason),
    }
}

/// Collects the inventory of `machines` of `env` (all machines of its spec when `None`), in
/// parallel (at most `config.parallel` at once). Machines that are not running are not asked.
/// Fails only when the environment's spec or status cannot be read.
#[tracing::instrument(skip_all, fields(environment = env.name()))]
pub async fn collect(
    env: &dyn Environment,
    machines: Option<&[String]>,
    config: &InventoryConfig,
    progress: Option<&Progress>,
) -> Result<BTreeMap<String, MachineInventory>> {
    let spec = env.spec().await?;
    let names: Vec<String> = match machines {
        Some(list) => list.to_vec(),
        None => spec.machines.iter().map(|m| m.name.clone()).collect(),
    };
    let status = env.status().await?;
    let total = names.len() as u64;
    let done = std::sync::atomic::AtomicU64::new(0);
    let jobs: Vec<Job<'_, MachineInventory>> = names
        .iter()
        .map(|name| {
            let cfg = config.for_machine(&spec, name);
            let power = status.iter().find(|s| &s.machine == name).map(|s| s.power);
            let (done, env_name, spec) = (&done, env.name(), &spec);
            Box::pin(async move {
                let inv = match power {
                    None if spec.machine(name).is_none() => MachineInventory::not(format!("no machine {name}")),
                    Some(PowerState::Running) | None => collect_one(env, name, &cfg).await,
                    Some(p) => MachineInventory::not(format!("the machine is not running ({p:?})")),
                };
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                let step = if inv.inventory().is_some() { "collected" } else { "not collected" };
                emit(progress, "inventory", &format!("{env_name}/{name}"), step, n, total);
                inv
            }) as Job<'_, MachineInventory>
        })
        .collect();
    let results = bounded(jobs, config.parallel).await;
    Ok(names.into_iter().zip(results).collect())
}

/// Takes a baseline of production with its guest inventory: collects every machine's inventory
/// just before [`Environment::take_baseline`] freezes the disks. (Changes made in the guests
/// between the two are in the disks but not in the inventory; the window is one exec round trip.)
pub async fn take_baseline(
    production: &dyn Environment,
    config: &InventoryConfig,
    progress: Option<&Progress>,
) -> Result<(Baseline, BaselineInventory)> {
    let machines = collect(production, None, config, progress).await?;
    let baseline = production.take_baseline().await?;
    Ok((baseline.clone(), BaselineInventory { baseline: baseline.id, machines }))
}

/// Creates a stage from `baseline` ([`Backend::stage`]) and records `inventory` on it, so the
/// drift engine can tell which side moved in the guest layer. If recording fails the stage is
/// destroyed again (nothing half-built is left).
pub async fn stage(
    backend: &dyn Backend,
    baseline: &Baseline,
    inventory: &BaselineInventory,
    options: &StageOptions,
) -> Result<Arc<dyn Environment>> {
    if inventory.baseline != baseline.id {
        return Err(Error::invalid(
            "inventory.baseline",
            format!("the inventory is of baseline {}, not {}", inventory.baseline, baseline.id),
        ));
    }
    let stage = backend.stage(baseline, options).await?;
    if let Err(e) = stage.record_change_set(&baseline_record(inventory)).await {
        if let Err(d) = backend.destroy(&options.name).await {
            tracing::error!(stage = %options.name, error = %d, "destroying the stage after a failed record failed");
        }
        return Err(e);
    }
    Ok(stage)
}

/// The machines a ChangeSet runs guest changes on, in order of first appearance.
pub fn guest_machines(change_set: &ChangeSet) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in &change_set.changes {
        if matches!(c, Change::GuestCommand { .. } | Change::GuestFile { .. }) && !out.iter().any(|m| m == c.machine())
        {
            out.push(c.machine().to_string());
        }
    }
    out
}

/// Applies a ChangeSet to a stage like [`EnvironmentExt::apply_change_set`] and, when it has guest
/// changes, records its [`Footprint`]: the inventory delta of each machine it runs guest changes
/// on (inventories taken right before and right after). Fails before applying anything when a
/// machine's inventory cannot be taken beforehand. Returns the footprint (if any).
#[tracing::instrument(skip_all, fields(environment = env.name(), change_set = %change_set.id))]
pub async fn apply_change_set(
    env: &dyn Environment,
    change_set: &ChangeSet,
    config: &InventoryConfig,
) -> Result<Option<Footprint>> {
    if is_record(change_set) || change_set.id.starts_with("stagecore.") {
        return Err(Error::invalid("change_set.id", "ids starting with `stagecore.` are reserved for records"));
    }
    let machines = guest_machines(change_set);
    if machines.is_empty() {
        env.apply_change_set(change_set).await?;
        return Ok(None);
    }
    let before = collect(env, Some(&machines), config, None).await?;
    if let Some((m, why)) = before.iter().find_map(|(m, i)| i.reason().map(|r| (m, r))) {
        return Err(Error::Precondition(format!(
            "cannot record the footprint of {}: the inventory of {}/{m} before the change failed: {why}",
            change_set.id,
            env.name()
        )));
    }
    env.apply_change_set(change_set).await?;
    let after = collect(env, Some(&machines), config, None).await?;
    let mut footprint =
        Footprint { change_set: change_set.id.clone(), machines: BTreeMap::new(), unknown: BTreeMap::new() };
    for m in &machines {
        match (before.get(m).and_then(MachineInventory::inventory), after.get(m)) {
            (Some(b), Some(MachineInventory::Collected { inventory })) => {
                footprint.machines.insert(m.clone(), delta(m, b, inventory));
            }
            (_, other) => {
                let why = other.and_then(MachineInventory::reason).unwrap_or("not collected");
                footprint.unknown.insert(m.clone(), why.to_string());
            }
        }
    }
    env.record_change_set(&footprint_record(&footprint)).await?;
    Ok(Some(footprint))
}

/// The footprint deltas of `change_sets` combined per item: the value before the first ChangeSet
/// that touched it, and after the last one. Keyed by (machine, item path).
pub fn combined_footprint(change_sets: &[ChangeSet]) -> BTreeMap<(String, String), GuestDelta> {
    let mut out: BTreeMap<(String, String), GuestDelta> = BTreeMap::new();
    for fp in footprints(change_sets) {
        for (m, d) in fp.deltas() {
            out.entry((m.to_string(), d.path.clone()))
                .and_modify(|e| e.after = d.after.clone())
                .or_insert_with(|| d.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    //! The collector script runs for real here, with this host's `/bin/sh`, dpkg, coreutils and
    //! /proc (the project's machines are Debian 12, like the test guest).

    use std::process::Command;
    use std::time::SystemTime;

    use sha2::{Digest, Sha256};

    use super::*;

    fn run_script(args: &[&str]) -> String {
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("stagecore-inventory")
            .args(args)
            .output()
            .expect("run /bin/sh");
        assert!(out.status.success(), "collector failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8")
    }

    fn hex(data: &[u8]) -> String {
        Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
    }

    fn atime(path: &std::path::Path) -> SystemTime {
        std::fs::metadata(path).unwrap().accessed().unwrap()
    }

    /// Sets the access time to 2000-01-01, before the modification time: a plain read on a
    /// `relatime` mount then updates it.
    fn age(path: &std::path::Path) {
        let st = Command::new("touch").args(["-a", "-d", "@946684800"]).arg(path).status().expect("touch");
        assert!(st.success());
    }

    #[test]
    fn collector_runs_on_this_host_and_parses() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("a.txt"), b"alpha\n").unwrap();
        std::fs::write(dir.path().join("sub/b.conf"), b"beta\n").unwrap();
        let d = dir.path().to_str().unwrap();
        let inv = parse::parse("host", &run_script(&["100", "1", d, "/nonexistent-stagecore"])).unwrap();
        assert!(!inv.os.id.is_empty() && !inv.kernel.is_empty(), "{inv:?}");
        assert_eq!(inv.package_format, "dpkg");
        assert!(
            inv.packages.contains_key("dpkg") && inv.packages.contains_key("coreutils"),
            "{:?}",
            inv.packages.keys()
        );
        assert_eq!(inv.files.get(&format!("{d}/a.txt")), Some(&hex(b"alpha\n")));
        assert_eq!(inv.files.get(&format!("{d}/sub/b.conf")), Some(&hex(b"beta\n")));
        assert_eq!(inv.watched.len(), 2);
        assert!(inv.watched[1].missing);
        let limited = parse::parse("host", &run_script(&["1", "1", d])).unwrap();
        assert_eq!(limited.files.len(), 1, "the per-path file limit holds");
        assert!(limited.incomplete(1).is_some_and(|n| n.contains("only the first 1")));
    }

    #[test]
    fn hashing_keeps_access_times() {
        let dir = tempfile::tempdir().unwrap();
        let (f, control) = (dir.path().join("f.conf"), dir.path().join("control"));
        std::fs::write(&f, b"data\n").unwrap();
        std::fs::write(&control, b"control\n").unwrap();
        age(&f);
        age(&control);
        let old = atime(&f);
        std::fs::read(&control).unwrap();
        assert_ne!(
            atime(&control),
            old,
            "this test's directory does not update access times on read, so it cannot show anything: \
             run it on a relatime filesystem"
        );
        let d = dir.path().to_str().unwrap();
        // Without the opt-in, a relatime mount is skipped with the reason.
        let inv = parse::parse("host", &run_script(&["100", "0", d])).unwrap();
        let why = inv.watched[0].skipped.clone().unwrap_or_default();
        assert!(inv.files.is_empty() && why.contains("access-time"), "{inv:?}");
        assert_eq!(atime(&f), old, "skipping must not read");
        // With it, every file is read with O_NOATIME.
        let inv = parse::parse("host", &run_script(&["100", "1", d])).unwrap();
        assert_eq!(inv.files.get(&format!("{d}/f.conf")), Some(&hex(b"data\n")));
        assert_eq!(atime(&f), old, "hashing updated the access time");
    }
}
