//! The project's real test guest image, as `cargo xtask guest-image` builds it (docs/guests.md).
//!
//! The image is a directory holding `base.qcow2` (512 MiB virtual, ext4 on the whole disk, Debian
//! 12 minbase with qemu-guest-agent, busybox, the `svc` supervisor and `stagecore-demo-app` 1.0
//! serving HTTP on port 8080), `vmlinuz`, `initrd.img`, `cmdline`, `packages.txt`,
//! `manifest.json` and `debs/` (the demo app in versions 1.0 and 1.1).
//!
//! Tests find it with [`GuestImage::locate`]: `$STAGECORE_GUEST_IMAGE` (which `cargo xtask test`
//! sets), else the cache's `current` symlink. Never boot `base` directly: booting changes a disk
//! (journal replay), so every machine gets its own overlay ([`GuestImage::overlay`]).
//!
//! ```no_run
//! use stagecore_testkit::guest_image::GuestImage;
//! let image = GuestImage::locate();
//! let dir = tempfile::tempdir().unwrap();
//! let spec = image.production_spec("prod", dir.path()).unwrap();
//! assert_eq!(spec.machines.len(), 3);
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use stagecore::{BootSpec, DiskFormat, DiskSpec, EnvironmentSpec, MachineSpec, NetworkSpec, NicSpec};

/// Environment variable naming the image directory.
pub const ENV_VAR: &str = "STAGECORE_GUEST_IMAGE";

/// Where `cargo xtask guest-image` keeps the newest image (a symlink to its key directory).
pub const DEFAULT_DIR: &str = "/var/cache/stagecore/guest-image/current";

/// The demo application's Debian package name.
pub const DEMO_APP_PACKAGE: &str = "stagecore-demo-app";

/// The demo application version installed in the base image.
pub const DEMO_APP_INSTALLED: &str = "1.0";

/// The TCP port the demo application serves HTTP on inside the guest.
pub const DEMO_APP_PORT: u16 = 8080;

/// Virtual size of the base disk.
pub const DISK_BYTES: u64 = 512 << 20;

/// A located, checked test guest image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// The image directory (symlinks resolved, so a later rebuild does not move it under a test).
    pub dir: PathBuf,
    /// `base.qcow2`: the read-only base disk; boot only overlays of it.
    pub base: PathBuf,
    /// `vmlinuz`: the kernel for direct kernel boot.
    pub kernel: PathBuf,
    /// `initrd.img`: the tiny initramfs (virtio modules, mounts `root=`).
    pub initrd: PathBuf,
    /// The kernel command line from `cmdline` (e.g. `root=/dev/vda rw console=ttyS0 quiet`).
    pub cmdline: String,
    /// The demo application's `.deb` files by version (`"1.0"`, `"1.1"`).
    pub app_debs: BTreeMap<String, PathBuf>,
}

impl GuestImage {
    /// Finds the image: the directory in `$STAGECORE_GUEST_IMAGE`, else [`DEFAULT_DIR`]; checks
    /// that every file is there. The error says what is missing and how to build the image.
    pub fn try_locate() -> Result<GuestImage, String> {
        let (dir, origin) = match std::env::var_os(ENV_VAR) {
            Some(dir) if !dir.is_empty() => (PathBuf::from(dir), format!("${ENV_VAR}")),
            _ => (PathBuf::from(DEFAULT_DIR), "the default location".to_string()),
        };
        Self::open(&dir).map_err(|e| format!("test guest image at {} ({origin}): {e}", dir.display()))
    }

    /// Like [`GuestImage::try_locate`], but panics with instructions when the image is missing:
    /// tests that need a real guest fail loudly instead of skipping.
    pub fn locate() -> GuestImage {
        match Self::try_locate() {
            Ok(image) => image,
            Err(e) => panic!(
                "{e}\n\nThis test needs the project's test guest image. Build it (as root, Debian 12, ~1-2 min \
                 the first time, seconds when cached) with\n\n    cargo xtask guest-image\n\nor run the whole \
                 suite with `cargo xtask test`, which builds it and sets ${ENV_VAR}."
            ),
        }
    }

    /// Opens and checks an image directory.
    pub fn open(dir: &Path) -> Result<GuestImage, String> {
        let dir = dir.canonicalize().map_err(|e| format!("cannot open the directory: {e}"))?;
        let file = |name: &str| {
            let path = dir.join(name);
            if path.is_file() { Ok(path) } else { Err(format!("{name} is missing")) }
        };
        let base = file("base.qcow2")?;
        let kernel = file("vmlinuz")?;
        let initrd = file("initrd.img")?;
        file("manifest.json")?;
        let cmdline_path = file("cmdline")?;
        let cmdline =
            std::fs::read_to_string(&cmdline_path).map_err(|e| format!("cannot read cmdline: {e}"))?.trim().to_string();
        if cmdline.is_empty() {
            return Err("cmdline is empty".into());
        }
        let debs = dir.join("debs");
        let entries = std::fs::read_dir(&debs).map_err(|e| format!("cannot list debs/: {e}"))?;
        let mut app_debs = BTreeMap::new();
        for path in entries.flatten().map(|e| e.path()) {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if let Some(version) =
                name.strip_prefix(&format!("{DEMO_APP_PACKAGE}_")).and_then(|rest| rest.strip_suffix("_all.deb"))
            {
                app_debs.insert(version.to_string(), path.clone());
            }
        }
        if !app_debs.contains_key(DEMO_APP_INSTALLED) {
            return Err(format!("debs/ has no {DEMO_APP_PACKAGE}_{DEMO_APP_INSTALLED}_all.deb"));
        }
        Ok(GuestImage { dir, base, kernel, initrd, cmdline, app_debs })
    }

    /// Direct kernel boot of this image (absolute host paths).
    pub fn boot_spec(&self) -> BootSpec {
        BootSpec {
            kernel: self.kernel.display().to_string(),
            initrd: Some(self.initrd.display().to_string()),
            cmdline: self.cmdline.clone(),
        }
    }

    /// Creates `dest`, a new qcow2 overlay backed by [`GuestImage::base`]
    /// (`qemu-img create -f qcow2 -F qcow2 -b <base> <dest>`). Fails if `dest` exists.
    pub fn overlay(&self, dest: &Path) -> std::io::Result<()> {
        if dest.symlink_metadata().is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("overlay {} already exists", dest.display()),
            ));
        }
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&self.base)
            .arg(dest)
            .output()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot run qemu-img: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "qemu-img create -b {} {} failed ({}): {}",
                self.base.display(),
                dest.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// A web/app/db production spec of real guests: one overlay per machine created in
    /// `disk_dir` (created if missing; absolute paths as sources), [`GuestImage::boot_spec`],
    /// 1 vCPU, 256 MiB, NICs as `stagecore::memory::sample_spec` has them (web on frontend and
    /// backend, app and db on backend), start order web after app, app after db.
    pub fn production_spec(&self, name: &str, disk_dir: &Path) -> std::io::Result<EnvironmentSpec> {
        self.production_spec_of(name, disk_dir, &["web", "app", "db"])
    }

    /// [`GuestImage::production_spec`] with only the machines named (of `web`, `app`, `db`):
    /// overlays only for them, `after` entries naming a machine left out dropped, and only the
    /// networks they use. Fewer TCG guests where a test needs fewer.
    pub fn production_spec_of(&self, name: &str, disk_dir: &Path, only: &[&str]) -> std::io::Result<EnvironmentSpec> {
        std::fs::create_dir_all(disk_dir)?;
        let disk_dir = std::path::absolute(disk_dir)?;
        let mut machines = Vec::new();
        for (machine, nets, after) in [
            ("web", &["frontend", "backend"][..], &["app"][..]),
            ("app", &["backend"], &["db"]),
            ("db", &["backend"], &[]),
        ] {
            if !only.contains(&machine) {
                continue;
            }
            let after: Vec<&str> = after.iter().copied().filter(|a| only.contains(a)).collect();
            let disk = disk_dir.join(format!("{machine}.qcow2"));
            self.overlay(&disk)?;
            machines.push(MachineSpec {
                name: machine.into(),
                uuid: None,
                vcpus: 1,
                memory_mib: 256,
                firmware: Default::default(),
                disks: vec![DiskSpec {
                    name: "disk0".into(),
                    source: disk.display().to_string(),
                    format: DiskFormat::Qcow2,
                    size_bytes: Some(DISK_BYTES),
                    read_only: false,
                }],
                nics: nets
                    .iter()
                    .enumerate()
                    .map(|(i, n)| NicSpec {
                        name: format!("eth{i}"),
                        network: (*n).into(),
                        mac: None,
                        model: "virtio".into(),
                    })
                    .collect(),
                labels: [("tier".to_string(), machine.to_string())].into(),
                boot: Some(self.boot_spec()),
                after: after.iter().map(|a| a.to_string()).collect(),
            });
        }
        let networks = [("frontend", "10.0.1.0/24"), ("backend", "10.0.2.0/24")]
            .into_iter()
            .filter(|(n, _)| machines.iter().any(|m: &MachineSpec| m.nics.iter().any(|nic| nic.network == *n)))
            .map(|(n, cidr)| NetworkSpec { name: n.into(), cidr: Some(cidr.into()) })
            .collect();
        Ok(EnvironmentSpec { name: name.into(), machines, networks, labels: Default::default() })
    }
}
