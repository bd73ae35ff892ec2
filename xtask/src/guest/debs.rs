//! The demo application as real Debian packages, built offline with `dpkg-deb --build`:
//! `stagecore-demo-app` 1.0 (installed in the image) and 1.1 (for upgrade tests), arch `all`.
//!
//! Contents: `/opt/app/www/index.html` (says `stagecore-demo-app <version>`), `/opt/app/VERSION`,
//! the conffile `/etc/app/app.conf` (`port=8080`) and the service `/etc/svc/app`
//! (`busybox httpd -f -p 8080 -h /opt/app/www`); the postinst restarts the app when svc runs
//! the system.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{checked, files};
use crate::run::{Failure, Result};

/// The package name.
pub(crate) const PACKAGE: &str = "stagecore-demo-app";
/// The versions built; the first is installed in the image.
pub(crate) const VERSIONS: &[&str] = &["1.0", "1.1"];
/// The version installed in the image.
pub(crate) const INSTALLED: &str = "1.0";

/// The `.deb` file name of `version`.
pub(crate) fn file_name(version: &str) -> String {
    format!("{PACKAGE}_{version}_all.deb")
}

/// Builds every version into `out_dir` (created), using `work` as scratch; returns (version, path).
pub(crate) fn build(work: &Path, out_dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    fs::create_dir_all(out_dir).map_err(|e| fail("create", out_dir, e))?;
    let mut built = Vec::new();
    for version in VERSIONS {
        let root = work.join(format!("demo-app-{version}"));
        let entries: [(&str, String, u32); 7] = [
            ("DEBIAN/control", files::APP_CONTROL.replace("@VERSION@", version), 0o644),
            ("DEBIAN/conffiles", "/etc/app/app.conf\n".to_string(), 0o644),
            ("DEBIAN/postinst", files::APP_POSTINST.to_string(), 0o755),
            ("opt/app/www/index.html", files::APP_INDEX.replace("@VERSION@", version), 0o644),
            ("opt/app/VERSION", format!("{version}\n"), 0o644),
            ("etc/app/app.conf", files::APP_CONF.to_string(), 0o644),
            ("etc/svc/app", files::APP_SVC.to_string(), 0o644),
        ];
        for (rel, content, mode) in entries {
            let path = root.join(rel);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(|e| fail("create", parent, e))?;
            }
            fs::write(&path, content).map_err(|e| fail("write", &path, e))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(|e| fail("chmod", &path, e))?;
        }
        // dpkg-deb wants 0755 directories regardless of the umask
        for dir in ["DEBIAN", "opt", "opt/app", "opt/app/www", "etc", "etc/app", "etc/svc"] {
            let path = root.join(dir);
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).map_err(|e| fail("chmod", &path, e))?;
        }
        let deb = out_dir.join(file_name(version));
        checked(
            "dpkg-deb --build (demo app)",
            Command::new("dpkg-deb")
                .args(["--root-owner-group", "-Zxz", "--build"])
                .arg(&root)
                .arg(&deb)
                .env("SOURCE_DATE_EPOCH", "1700000000"),
        )?;
        built.push((version.to_string(), deb));
    }
    Ok(built)
}

fn fail(what: &str, path: &Path, e: std::io::Error) -> Failure {
    Failure(format!("guest-image: demo app: {what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_both_versions_as_real_debs() {
        let tmp = tempfile::tempdir().unwrap();
        let built = build(&tmp.path().join("work"), &tmp.path().join("debs")).unwrap();
        assert_eq!(built.len(), 2);
        for (version, deb) in &built {
            assert_eq!(deb.file_name().unwrap().to_str().unwrap(), file_name(version));
            let info = Command::new("dpkg-deb")
                .args(["-f"])
                .arg(deb)
                .args(["Package", "Version", "Architecture"])
                .output()
                .unwrap();
            let info = String::from_utf8(info.stdout).unwrap();
            assert_eq!(info, format!("Package: {PACKAGE}\nVersion: {version}\nArchitecture: all\n"));
            let list = Command::new("dpkg-deb").arg("-c").arg(deb).output().unwrap();
            let list = String::from_utf8(list.stdout).unwrap();
            for path in ["./opt/app/www/index.html", "./opt/app/VERSION", "./etc/app/app.conf", "./etc/svc/app"] {
                assert!(list.contains(path), "{path} missing from {version}: {list}");
            }
            assert!(list.contains("root/root"), "owned by root: {list}");
            let index = Command::new("dpkg-deb").arg("--fsys-tarfile").arg(deb).output().unwrap().stdout;
            let needle = format!("stagecore-demo-app {version}");
            assert!(index.windows(needle.len()).any(|w| w == needle.as_bytes()), "{needle} not in {version}");
            let conffiles = Command::new("dpkg-deb").args(["-I"]).arg(deb).arg("conffiles").output().unwrap().stdout;
            assert_eq!(conffiles, b"/etc/app/app.conf\n");
        }
    }
}
