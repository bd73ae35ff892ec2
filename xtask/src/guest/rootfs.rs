//! The root filesystem: `mmdebstrap --variant=minbase --mode=root` of bookworm (three suites, the
//! host's mirror) with qemu-guest-agent and busybox, docs/man/locales excluded, then our
//! customisation: `guestinit` as PID 1 and as shutdown/poweroff/halt/reboot, `svc`, hostname,
//! fstab (`noatime`), an empty root password, the demo app 1.0 installed with `dpkg -i` in a
//! chroot, and the apt lists and `.deb` cache dropped.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

use super::key::{INCLUDE, SUITE, Sources};
use super::{checked, files};
use crate::run::{Failure, Result, run};

/// dpkg path filters: applied while mmdebstrap installs, and kept in the guest for later installs.
const PATH_FILTERS: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
];

/// Builds the rootfs in `dir` (must not exist) and installs `app_deb` into it.
pub(crate) fn build(sources: &Sources, dir: &Path, app_deb: &Path) -> Result<()> {
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--variant=minbase", "--mode=root", "--quiet"])
        .arg(format!("--include={}", INCLUDE.join(",")))
        .arg("--dpkgopt=force-unsafe-io");
    for filter in PATH_FILTERS {
        cmd.arg(format!("--dpkgopt={filter}"));
    }
    cmd.arg(SUITE).arg(dir).args(sources.deb_lines());
    println!("guest-image: mmdebstrap {SUITE} into {} (the slow part: ~40-60 s)", dir.display());
    run("guest-image: mmdebstrap", &mut cmd)?;
    customize(dir, app_deb)
}

fn customize(root: &Path, app_deb: &Path) -> Result<()> {
    // Keep the path filters for dpkg runs in the guest, but not force-unsafe-io: package changes
    // inside the guest must be as durable as on a real machine.
    let dpkg_cfg = root.join("etc/dpkg/dpkg.cfg.d/99mmdebstrap");
    let filters: String = PATH_FILTERS.iter().map(|f| format!("{f}\n")).collect();
    write(&dpkg_cfg, &filters, 0o644)?;

    let sbin = root.join("usr/sbin");
    write(&sbin.join("guestinit"), files::GUESTINIT, 0o755)?;
    for name in ["init", "shutdown", "poweroff", "halt", "reboot"] {
        let link = sbin.join(name);
        if link.symlink_metadata().is_ok() {
            return Err(Failure(format!(
                "guest-image: {} already exists in the rootfs (an init package slipped in?)",
                link.display()
            )));
        }
        symlink("guestinit", &link).map_err(|e| fail("symlink", &link, e))?;
    }
    write(&root.join("usr/local/sbin/svc"), files::SVC, 0o755)?;
    for dir in ["etc/svc", "var/log/svc"] {
        let path = root.join(dir);
        fs::create_dir_all(&path).map_err(|e| fail("create", &path, e))?;
    }
    write(&root.join("etc/hostname"), "guest\n", 0o644)?;
    write(&root.join("etc/hosts"), "127.0.0.1\tlocalhost\n127.0.1.1\tguest\n::1\tlocalhost ip6-localhost\n", 0o644)?;
    write(
        &root.join("etc/fstab"),
        "# <device> <mount> <type> <options> <dump> <pass>\n/dev/vda / ext4 rw,noatime 0 1\n",
        0o644,
    )?;

    chroot(root, "passwd -d root", &["passwd", "-d", "root"])?;
    let inside = Path::new("tmp").join(app_deb.file_name().unwrap_or_default());
    fs::copy(app_deb, root.join(&inside)).map_err(|e| fail("copy", app_deb, e))?;
    let inside_abs = format!("/{}", inside.display());
    chroot(root, "dpkg -i (demo app)", &["dpkg", "-i", &inside_abs])?;
    fs::remove_file(root.join(&inside)).map_err(|e| fail("remove", &root.join(&inside), e))?;

    // Drop what only the build needed: apt lists, the .deb cache and apt's binary caches.
    type Wanted = fn(&Path) -> bool;
    let drop: [(&str, Wanted); 3] = [
        ("var/lib/apt/lists", |_| true),
        ("var/cache/apt/archives", |p| p.extension().is_some_and(|e| e == "deb")),
        ("var/cache/apt", |p| p.extension().is_some_and(|e| e == "bin")),
    ];
    for (dir, wanted) in drop {
        let path = root.join(dir);
        let Ok(entries) = fs::read_dir(&path) else { continue };
        for p in entries.flatten().map(|e| e.path()) {
            if p.is_file() && wanted(&p) {
                fs::remove_file(&p).map_err(|e| fail("remove", &p, e))?;
            }
        }
    }
    Ok(())
}

/// `dpkg-query -W` of the rootfs: `name version arch` per line, sorted.
pub(crate) fn package_list(root: &Path) -> Result<String> {
    let out = Command::new("chroot")
        .arg(root)
        .args(["dpkg-query", "-W", "-f", "${Package} ${Version} ${Architecture}\\n"])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .map_err(|e| Failure(format!("guest-image: could not start chroot dpkg-query: {e}")))?;
    if !out.status.success() {
        return Err(Failure(format!(
            "guest-image: dpkg-query in the rootfs failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut lines: Vec<&str> = std::str::from_utf8(&out.stdout)
        .map_err(|_| Failure("guest-image: dpkg-query printed non-UTF-8".into()))?
        .lines()
        .collect();
    lines.sort();
    Ok(lines.iter().map(|l| format!("{l}\n")).collect())
}

fn chroot(root: &Path, what: &str, argv: &[&str]) -> Result<()> {
    checked(
        &format!("chroot {what}"),
        Command::new("chroot")
            .arg(root)
            .args(argv)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn write(path: &Path, content: &str, mode: u32) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| fail("create", parent, e))?;
    }
    fs::write(path, content).map_err(|e| fail("write", path, e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| fail("chmod", path, e))
}

fn fail(what: &str, path: &Path, e: std::io::Error) -> Failure {
    Failure(format!("guest-image: rootfs: {what} {}: {e}", path.display()))
}
