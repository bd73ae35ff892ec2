//! The kernel outside the image: the Debian cloud kernel's `vmlinuz` from `dpkg -x`, and a tiny
//! initramfs (an uncompressed newc cpio written here) holding busybox-static, the virtio modules
//! in dependency order and our `/init`.
//!
//! The load order comes from each module's `.modinfo` `depends=` field, sorted topologically,
//! because a plain `dpkg -x` has no `modules.dep` and the order changed between kernel updates
//! (GUEST.md pitfall 1: in 6.1.0-57 `virtio` depends on `virtio_ring`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{checked, files};
use crate::run::{Failure, Result};

/// The modules the guest needs; their dependencies are added by the sort.
pub(crate) const MODULES: &[&str] = &["virtio_pci", "virtio_blk", "virtio_console", "virtio_net"];

/// What the kernel step produced.
#[derive(Debug)]
pub(crate) struct Kernel {
    /// Kernel release, e.g. `6.1.0-57-cloud-amd64`.
    pub(crate) release: String,
    /// Modules in load order.
    pub(crate) modules: Vec<String>,
}

/// Downloads the kernel and busybox-static `.deb`s into `work`, extracts them, writes
/// `out/vmlinuz` and `out/initrd.img`.
pub(crate) fn build(kernel_package: &str, work: &Path, out: &Path) -> Result<Kernel> {
    let downloads = work.join("downloads");
    fs::create_dir_all(&downloads).map_err(|e| io_fail("create", &downloads, e))?;
    checked(
        "apt-get download (kernel, busybox-static)",
        Command::new("apt-get").args(["download", "-q", kernel_package, "busybox-static"]).current_dir(&downloads),
    )?;
    let deb = |prefix: &str| -> Result<PathBuf> {
        fs::read_dir(&downloads)
            .map_err(|e| io_fail("list", &downloads, e))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{prefix}_"))))
            .ok_or_else(|| {
                Failure(format!("guest-image: apt-get download left no {prefix}_*.deb in {}", downloads.display()))
            })
    };
    let tree = work.join("kernel-tree");
    let bb_tree = work.join("busybox-tree");
    for (deb, dir) in [(deb(kernel_package)?, &tree), (deb("busybox-static")?, &bb_tree)] {
        checked("dpkg -x", Command::new("dpkg").arg("-x").arg(&deb).arg(dir))?;
    }
    let boot = tree.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .map_err(|e| io_fail("list", &boot, e))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .ok_or_else(|| Failure(format!("guest-image: no boot/vmlinuz-* in {kernel_package}")))?;
    let release =
        vmlinuz.file_name().and_then(|n| n.to_str()).unwrap_or_default().trim_start_matches("vmlinuz-").to_string();
    fs::copy(&vmlinuz, out.join("vmlinuz")).map_err(|e| io_fail("copy", &vmlinuz, e))?;

    let available = index_modules(&tree.join("lib/modules").join(&release).join("kernel"))?;
    let mut depends = BTreeMap::new();
    for (name, path) in &available {
        let bytes = fs::read(path).map_err(|e| io_fail("read", path, e))?;
        depends.insert(name.clone(), modinfo_depends(&bytes));
    }
    let order = load_order(MODULES, &depends)?;
    let busybox = [bb_tree.join("bin/busybox"), bb_tree.join("usr/bin/busybox")]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| Failure("guest-image: busybox-static has no bin/busybox".into()))?;

    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "run", "newroot", "lib", "lib/modules"] {
        cpio.dir(dir);
    }
    cpio.char_device("dev/console", 0o600, 5, 1);
    cpio.file("init", 0o755, files::INITRAMFS_INIT.as_bytes());
    cpio.file("bin/busybox", 0o755, &fs::read(&busybox).map_err(|e| io_fail("read", &busybox, e))?);
    for applet in ["sh", "mount", "umount", "insmod", "switch_root", "sleep", "cat", "findfs", "mkdir", "echo"] {
        cpio.symlink(&format!("bin/{applet}"), "busybox");
    }
    for name in &order {
        let path = &available[name];
        cpio.file(&format!("lib/modules/{name}.ko"), 0o644, &fs::read(path).map_err(|e| io_fail("read", path, e))?);
    }
    cpio.file("lib/modules/load-order", 0o644, format!("{}\n", order.join("\n")).as_bytes());
    let initrd = out.join("initrd.img");
    fs::write(&initrd, cpio.finish()).map_err(|e| io_fail("write", &initrd, e))?;
    Ok(Kernel { release, modules: order })
}

fn io_fail(what: &str, path: &Path, e: std::io::Error) -> Failure {
    Failure(format!("guest-image: {what} {}: {e}", path.display()))
}

/// Every `*.ko` under `dir`, by module name (`-` normalised to `_`, as the kernel does).
fn index_modules(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut found = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).map_err(|e| io_fail("list", &d, e))?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(stem) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".ko")) {
                found.insert(stem.replace('-', "_"), path);
            }
        }
    }
    Ok(found)
}

/// The `depends=` list of a module's `.modinfo` (NUL-separated `key=value` strings).
pub(crate) fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    ko.split(|b| *b == 0)
        .find_map(|s| s.strip_prefix(b"depends="))
        .map(|v| String::from_utf8_lossy(v).split(',').filter(|d| !d.is_empty()).map(|d| d.replace('-', "_")).collect())
        .unwrap_or_default()
}

/// Topological load order of `roots` and everything they depend on (dependencies first,
/// otherwise in the order first needed). Fails on a missing module or a cycle.
pub(crate) fn load_order(roots: &[&str], depends: &BTreeMap<String, Vec<String>>) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        depends: &BTreeMap<String, Vec<String>>,
        path: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if order.iter().any(|o| o == name) {
            return Ok(());
        }
        if path.iter().any(|p| p == name) {
            return Err(Failure(format!("guest-image: module dependency cycle: {} -> {name}", path.join(" -> "))));
        }
        let deps = depends
            .get(name)
            .ok_or_else(|| Failure(format!("guest-image: kernel module {name} not found in the kernel package")))?;
        path.push(name.to_string());
        for d in deps {
            visit(d, depends, path, order)?;
        }
        path.pop();
        order.push(name.to_string());
        Ok(())
    }
    let mut order = Vec::new();
    for root in roots {
        visit(root, depends, &mut Vec::new(), &mut order)?;
    }
    Ok(order)
}

/// A newc ("070701") cpio archive, written in memory: uid/gid 0, mtime 0, so the output depends
/// only on the contents.
#[derive(Default)]
pub(crate) struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields =
            [self.ino, mode, 0, 0, nlink, 0, data.len() as u32, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// A directory (mode 0755).
    pub(crate) fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[], (0, 0));
    }

    /// A regular file.
    pub(crate) fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, data, (0, 0));
    }

    /// A symbolic link to `target`.
    pub(crate) fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, target.as_bytes(), (0, 0));
    }

    /// A character device node.
    pub(crate) fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, 0o020000 | perm, &[], (major, minor));
    }

    /// The archive with its trailer.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deps(list: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        list.iter().map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect())).collect()
    }

    #[test]
    fn modinfo_depends_is_read_from_the_nul_separated_strings() {
        let ko = b"\x7fELF junk\0license=GPL\0depends=virtio_ring,virtio\0retpoline=Y\0name=virtio_blk\0";
        assert_eq!(modinfo_depends(ko), ["virtio_ring", "virtio"]);
        assert!(modinfo_depends(b"\0depends=\0name=virtio_ring\0").is_empty());
        assert!(modinfo_depends(b"no modinfo").is_empty());
    }

    #[test]
    fn load_order_puts_dependencies_first_as_in_6_1_0_57() {
        let d = deps(&[
            ("virtio_ring", &[]),
            ("virtio", &["virtio_ring"]),
            ("virtio_pci_modern_dev", &[]),
            ("virtio_pci_legacy_dev", &[]),
            ("virtio_pci", &["virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio", "virtio_ring"]),
            ("virtio_blk", &["virtio", "virtio_ring"]),
            ("failover", &[]),
            ("net_failover", &["failover"]),
            ("virtio_net", &["net_failover", "virtio", "virtio_ring"]),
        ]);
        let order = load_order(&["virtio_pci", "virtio_blk", "virtio_net"], &d).unwrap();
        let pos = |m: &str| order.iter().position(|o| o == m).unwrap();
        for (m, ds) in &d {
            for dep in ds {
                assert!(pos(dep) < pos(m), "{dep} must load before {m}: {order:?}");
            }
        }
        assert_eq!(order.len(), d.len());
    }

    #[test]
    fn load_order_rejects_missing_modules_and_cycles() {
        let missing = load_order(&["virtio_blk"], &deps(&[("virtio_blk", &["virtio"])])).unwrap_err();
        assert!(missing.0.contains("virtio not found"), "{missing}");
        let cycle = load_order(&["a"], &deps(&[("a", &["b"]), ("b", &["a"])])).unwrap_err();
        assert!(cycle.0.contains("cycle"), "{cycle}");
    }

    #[test]
    fn cpio_is_newc_aligned_and_readable_by_cpio_tools() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("bin/x", 0o755, b"hello");
        c.symlink("bin/y", "x");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
        // header of the file entry: filesize field (7th) is 5
        let second = out.windows(6).enumerate().filter(|(_, w)| *w == b"070701").nth(1).unwrap().0;
        assert_eq!(&out[second + 6 + 6 * 8..second + 6 + 7 * 8], b"00000005");
    }
}
