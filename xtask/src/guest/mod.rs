//! `cargo xtask guest-image`: the project's test guest (GUEST.md variant "A-lean"), built from
//! Debian packages by our own recipe, cached by content key.
//!
//! - [`key`]: the host's mirrors, the exact inputs (`mmdebstrap --simulate`, kernel file name), the key.
//! - [`debs`]: the demo application packages (`dpkg-deb --build`).
//! - [`kernel`]: vmlinuz and the tiny initramfs (virtio modules in dependency order, newc cpio).
//! - [`rootfs`]: mmdebstrap minbase + guestinit + svc + the demo app.
//! - [`image`]: ext4 by `mke2fs -d`, then an uncompressed qcow2.
//! - [`cache`]: `/var/cache/stagecore/guest-image/<key>/`, atomic rename, `current`, pruning.
//!
//! The artifact directory holds `base.qcow2`, `vmlinuz`, `initrd.img`, `cmdline`, `packages.txt`,
//! `manifest.json` and `debs/*.deb`; docs/guests.md describes it.

mod cache;
mod debs;
mod files;
mod image;
mod kernel;
mod key;
mod rootfs;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::run::{Failure, Result, find_program};

/// The kernel command line written to `cmdline`.
pub(crate) const CMDLINE: &str = "root=/dev/vda rw console=ttyS0 quiet";

/// The environment variable naming the artifact directory for tests, doctests and the demo.
pub(crate) const ENV_VAR: &str = "STAGECORE_GUEST_IMAGE";

/// Programs the build runs.
pub(crate) const PROGRAMS: &[&str] =
    &["mmdebstrap", "mke2fs", "qemu-img", "dpkg-deb", "dpkg", "apt-get", "apt-cache", "chroot", "umount"];

/// `cargo xtask guest-image`: build or find the image and print its directory.
pub(crate) fn command() -> Result<()> {
    let dir = ensure()?;
    println!("{}", dir.display());
    Ok(())
}

/// The image for `cargo xtask test` / `demo`: `$STAGECORE_GUEST_IMAGE` when set (checked), else
/// [`ensure`].
pub(crate) fn for_tasks() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(ENV_VAR) {
        let dir = PathBuf::from(dir);
        if cache::complete(&dir) {
            println!("guest-image: using ${ENV_VAR}={}", dir.display());
            return Ok(dir);
        }
        return Err(Failure(format!(
            "guest-image: ${ENV_VAR}={} is not a complete image directory (needs {} and debs/); unset it to build one",
            dir.display(),
            cache::REQUIRED.join(", ")
        )));
    }
    ensure()
}

/// Finds the image for the current inputs in the cache, or builds it; returns its directory.
pub(crate) fn ensure() -> Result<PathBuf> {
    let started = Instant::now();
    let root = cache::root();
    let current = root.join("current");
    let fallback = |why: &str| -> Result<PathBuf> {
        if cache::complete(&current) {
            let dir = fs::canonicalize(&current).unwrap_or(current.clone());
            eprintln!(
                "guest-image: warning: {why}; using the cached image {} without checking it is current",
                dir.display()
            );
            Ok(dir)
        } else {
            Err(Failure(format!("guest-image: {why}, and no cached image at {}", current.display())))
        }
    };
    if !crate::setup::is_root() {
        return fallback("building the guest image needs root (mmdebstrap --mode=root, chroot)");
    }
    let missing: Vec<&str> = PROGRAMS.iter().copied().filter(|p| find_program(p).is_none()).collect();
    if !missing.is_empty() {
        println!("guest-image: missing {}; running setup", missing.join(", "));
        crate::setup::setup()?;
    }
    let sources = key::host_sources()?;
    fs::create_dir_all(&root).map_err(|e| Failure(format!("guest-image: create {}: {e}", root.display())))?;
    let memo = root.join(".resolved.json");
    // A resolution younger than key::RESOLVE_TTL is enough to find a cached image; a build
    // (or a miss) always resolves afresh.
    if let Some((inputs, age)) = key::remembered(&memo, &sources) {
        let dir = cache::key_dir(&root, &key::key(&inputs));
        if cache::complete(&dir) {
            let dir_name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            cache::set_current(&root, dir_name)?;
            println!(
                "guest-image: cache hit {} (inputs resolved {age} s ago; {}=1 re-checks them)",
                dir.display(),
                key::REFRESH_ENV
            );
            return Ok(dir);
        }
    }
    let inputs = match key::resolve(&sources) {
        Ok(inputs) => inputs,
        Err(e) => return fallback(&format!("could not resolve the image inputs ({e})")),
    };
    key::remember(&memo, &inputs);
    let full_key = key::key(&inputs);
    let dir = cache::key_dir(&root, &full_key);
    let dir_name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    if cache::complete(&dir) {
        cache::set_current(&root, &dir_name)?;
        println!("guest-image: cache hit {} ({:.1} s)", dir.display(), started.elapsed().as_secs_f64());
        return Ok(dir);
    }
    let _lock = cache::lock(&root)?;
    if cache::complete(&dir) {
        cache::set_current(&root, &dir_name)?;
        println!("guest-image: built by another process: {}", dir.display());
        return Ok(dir);
    }
    for stale in cache::remove_stale(&root)? {
        println!("guest-image: removed {} (left by an interrupted build)", stale.display());
    }
    println!("guest-image: building key {dir_name} ({} packages, {})", inputs.packages.len(), inputs.kernel_package);
    let tmp = cache::TempBuild::new(&root, &full_key)?;
    build(&inputs, &full_key, tmp.path(), started)?;
    tmp.commit(&dir)?;
    cache::set_current(&root, &dir_name)?;
    for removed in cache::prune(&root)? {
        println!("guest-image: pruned {}", removed.display());
    }
    println!("guest-image: built {} in {:.1} s", dir.display(), started.elapsed().as_secs_f64());
    Ok(dir)
}

/// Builds every artifact into `out` (a fresh directory).
fn build(inputs: &key::Inputs, full_key: &str, out: &Path, started: Instant) -> Result<()> {
    let work = out.join("work");
    fs::create_dir(&work).map_err(|e| Failure(format!("guest-image: create {}: {e}", work.display())))?;
    let debs = debs::build(&work.join("debs"), &out.join("debs"))?;
    let installed = debs
        .iter()
        .find(|(v, _)| v == debs::INSTALLED)
        .map(|(_, p)| p.clone())
        .ok_or_else(|| Failure("guest-image: the installed demo-app version was not built".into()))?;
    let rootfs = work.join("rootfs");
    let (kernel, rootfs_result) = thread::scope(|scope| {
        let kernel = scope.spawn(|| kernel::build(&inputs.kernel_package, &work.join("kernel"), out));
        let rootfs_result = rootfs::build(&inputs.sources, &rootfs, &installed);
        (kernel.join(), rootfs_result)
    });
    rootfs_result?;
    let kernel = kernel.map_err(|_| Failure("guest-image: kernel thread panicked".into()))??;
    let packages = rootfs::package_list(&rootfs)?;
    let wanted = format!("{} {} all", debs::PACKAGE, debs::INSTALLED);
    if !packages.lines().any(|l| l == wanted) {
        return Err(Failure(format!("guest-image: dpkg-query of the rootfs does not list `{wanted}`")));
    }
    let drift = installed_vs_simulated(&packages, &inputs.packages);
    if !drift.is_empty() {
        eprintln!("guest-image: warning: installed set differs from the simulation: {}", drift.join(", "));
    }
    write(&out.join("packages.txt"), &packages)?;
    let compression = image::build(&rootfs, &work.join("disk.raw"), &out.join("base.qcow2"))?;
    write(&out.join("cmdline"), &format!("{CMDLINE}\n"))?;
    cache::remove_tree(&work)?;
    let manifest = serde_json::json!({
        "key": full_key,
        "recipe_version": key::RECIPE_VERSION,
        "variant": "A-lean",
        "inputs": {
            "suite": key::SUITE,
            "sources": inputs.sources.deb_lines(),
            "include": key::INCLUDE,
            "simulated_packages": inputs.packages,
            "kernel_package": inputs.kernel_package,
            "kernel_deb": inputs.kernel_deb,
            "busybox_deb": inputs.busybox_deb,
        },
        "packages": {
            "count": packages.lines().count(),
            "file": "packages.txt",
            "selected": summary(&packages, &["base-files", "dpkg", "apt", "qemu-guest-agent", "busybox", debs::PACKAGE]),
        },
        "kernel": { "release": kernel.release, "initramfs_modules": kernel.modules, "cmdline": CMDLINE },
        "demo_app": {
            "package": debs::PACKAGE,
            "installed": debs::INSTALLED,
            "versions": debs.iter().map(|(v, p)| (v.clone(), format!("debs/{}", p.file_name().unwrap_or_default().to_string_lossy()))).collect::<std::collections::BTreeMap<_, _>>(),
        },
        "disk": {
            "file": "base.qcow2",
            "format": "qcow2",
            "virtual_size": image::DISK_BYTES,
            "filesystem": "ext4 on the whole disk (/dev/vda), label guestroot, mounted noatime",
            "compression": compression.name(),
        },
        "build_seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "built_at_unix": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    });
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| Failure(format!("guest-image: manifest: {e}")))?;
    write(&out.join("manifest.json"), &format!("{text}\n"))
}

/// `name version` of the selected packages in a `packages.txt`.
fn summary(packages: &str, names: &[&str]) -> serde_json::Map<String, serde_json::Value> {
    packages
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (name, version) = (w.next()?, w.next()?);
            names.contains(&name).then(|| (name.to_string(), serde_json::Value::from(version)))
        })
        .collect()
}

/// Differences between `packages.txt` and the simulated `pkg=version` set (the demo app aside).
fn installed_vs_simulated(packages: &str, simulated: &[String]) -> Vec<String> {
    let installed: std::collections::BTreeSet<String> = packages
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (name, version) = (w.next()?, w.next()?);
            (name != debs::PACKAGE).then(|| format!("{name}={version}"))
        })
        .collect();
    let simulated: std::collections::BTreeSet<String> = simulated.iter().cloned().collect();
    installed.symmetric_difference(&simulated).cloned().collect()
}

fn write(path: &Path, content: &str) -> Result<()> {
    fs::write(path, content).map_err(|e| Failure(format!("guest-image: write {}: {e}", path.display())))
}

/// Runs `cmd` with captured output; on failure the message names `step` and ends with the
/// last lines the tool printed.
pub(crate) fn checked(step: &str, cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .map_err(|e| Failure(format!("guest-image: {step}: could not start {:?}: {e}", cmd.get_program())))?;
    if out.status.success() {
        return Ok(());
    }
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    Err(Failure(format!("guest-image: {step} failed ({}):\n{tail}", out.status)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_and_drift_read_packages_txt() {
        let txt = "base-files 12.4+deb12u15 amd64\nbusybox 1:1.35.0-4+deb12u1+b1 amd64\nstagecore-demo-app 1.0 all\n";
        let s = summary(txt, &["busybox", "stagecore-demo-app", "absent"]);
        assert_eq!(s.len(), 2);
        assert_eq!(s["stagecore-demo-app"], "1.0");
        let sim = vec!["base-files=12.4+deb12u15".to_string(), "busybox=1:1.35.0-4+deb12u1+b1".to_string()];
        assert!(installed_vs_simulated(txt, &sim).is_empty());
        let sim = vec!["base-files=12.4+deb12u16".to_string(), "busybox=1:1.35.0-4+deb12u1+b1".to_string()];
        assert_eq!(installed_vs_simulated(txt, &sim), ["base-files=12.4+deb12u15", "base-files=12.4+deb12u16"]);
    }
}
