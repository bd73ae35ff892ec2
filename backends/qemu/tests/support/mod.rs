//! Shared fixtures of the backend tests: a [`Fixture`] owns a temp state root and a TCG
//! [`QemuBackend`] on it, and on drop SIGKILLs every process whose command line mentions the
//! root (so no QEMU outlives a test, even a failing one).

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use stagecore::Backend;
use stagecore_qemu::{Accel, QemuBackend, QemuConfig};
use stagecore_testkit::{Kit, ProductionFactory, SEED};

/// A temp root with a backend; kills the root's QEMUs on drop.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub backend: Arc<QemuBackend>,
}

impl Fixture {
    pub fn new() -> Fixture {
        Self::with(|c| c)
    }

    /// A fixture whose config is adjusted by `f`.
    pub fn with(f: impl FnOnce(QemuConfig) -> QemuConfig) -> Fixture {
        require_qemu();
        let dir = tempfile::tempdir().expect("temp dir");
        let config = f(QemuConfig::new(dir.path()).with_accel(Accel::Tcg));
        Fixture { backend: Arc::new(QemuBackend::new(config)), dir }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        kill_under(self.dir.path());
    }
}

/// SIGKILLs every process whose command line mentions `root`, and waits for them to go.
pub fn kill_under(root: &Path) {
    let needle = root.as_os_str().as_encoded_bytes().to_vec();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if pid as u32 == std::process::id() {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.windows(needle.len()).any(|w| w == needle.as_slice()) {
            pids.push(pid);
        }
    }
    for pid in &pids {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    for pid in pids {
        for _ in 0..500 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// Fails loudly when QEMU is not installed.
pub fn require_qemu() {
    for tool in ["qemu-system-x86_64", "qemu-img"] {
        let ok = Command::new(tool).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
        assert!(ok, "{tool} is required for the QEMU backend tests and could not run");
    }
}

/// Runs a tool and returns (success, stdout+stderr).
pub fn run(tool: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("{tool} could not run: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// `qemu-img check` of an image chain; panics with the output when it fails.
pub fn qemu_img_check(path: &Path) {
    let (ok, text) = run("qemu-img", &["check", "-U", path.to_str().expect("utf-8 path")]);
    assert!(ok, "qemu-img check {} failed: {text}", path.display());
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(files_under(&p)) } else { out.push(p) }
    }
    out
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// A kit whose productions are seeded like `Kit::new`'s and then *running*, so promotions
/// snapshot, write and revert live machines.
pub fn running_kit(f: &Fixture) -> Kit {
    let b = f.backend.clone();
    let factory: ProductionFactory = Arc::new(move |name: String| {
        let b = b.clone();
        Box::pin(async move {
            let env = b.create(&stagecore::memory::sample_spec(&name)).await?;
            let io = env.disk_io().expect("disk_io");
            for m in env.spec().await?.machines {
                for d in &m.disks {
                    io.write(&m.name, &d.name, 0, SEED).await?;
                    io.write(&m.name, &d.name, 1 << 20, m.name.as_bytes()).await?;
                }
            }
            env.start().await?;
            Ok(env)
        })
    });
    Kit::with_factory(f.backend.clone(), factory)
}

/// One event the backend logged: its message and its string/debug fields.
#[derive(Debug, Clone)]
pub struct Logged {
    pub message: String,
    pub fields: std::collections::BTreeMap<String, String>,
}

/// Records every tracing event of the current thread (tests run on a current-thread runtime,
/// so the backend's tasks log here too) while the guard returned by [`EventLog::install`] lives.
#[derive(Clone, Default)]
pub struct EventLog(Arc<std::sync::Mutex<Vec<Logged>>>);

impl EventLog {
    pub fn install() -> (EventLog, tracing::subscriber::DefaultGuard) {
        use tracing_subscriber::layer::SubscriberExt;
        let log = EventLog::default();
        let guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(log.clone()));
        (log, guard)
    }

    pub fn events(&self) -> Vec<Logged> {
        self.0.lock().unwrap().clone()
    }

    /// The index of the first event with `message` whose `machine` field is `machine`.
    pub fn position(&self, message: &str, machine: &str) -> Option<usize> {
        self.events()
            .iter()
            .position(|e| e.message == message && e.fields.get("machine").map(String::as_str) == Some(machine))
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for EventLog {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Visit(Logged);
        impl tracing::field::Visit for Visit {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                self.0.fields.insert(field.name().to_string(), value.to_string());
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                let text = format!("{value:?}");
                if field.name() == "message" {
                    self.0.message = text;
                } else {
                    self.0.fields.insert(field.name().to_string(), text.trim_matches('"').to_string());
                }
            }
        }
        let mut v = Visit(Logged { message: String::new(), fields: Default::default() });
        event.record(&mut v);
        self.0.lock().unwrap().push(v.0);
    }
}

/// A web/app/db production spec of real guests from the project's test image (web after app
/// after db), its overlays in `disk_dir/<name>/`; panics with instructions when the image is
/// missing.
pub fn guest_spec(name: &str, disk_dir: &Path) -> stagecore::EnvironmentSpec {
    let image = stagecore_testkit::guest_image::GuestImage::locate();
    image.production_spec(name, &disk_dir.join(name)).expect("production spec of real guests")
}
