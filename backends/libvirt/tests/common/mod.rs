//! Shared helpers of the live tests: a unique tag, a state directory libvirt can read, and a guard
//! that removes every domain, network and file carrying the tag, even when a test panics.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use stagecore_libvirt::LibvirtBackend;

/// The live daemon's URI.
pub(crate) const URI: &str = "qemu:///system";

/// Removes everything a test made (by tag) when dropped.
pub(crate) struct Guard {
    /// Unique tag in every name the test uses.
    pub(crate) tag: String,
    /// The state directory.
    pub(crate) dir: PathBuf,
}

impl Guard {
    /// A new tag and state directory under /var/lib/libvirt/images.
    pub(crate) fn new(prefix: &str) -> Self {
        let tag = format!("{prefix}{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let dir = PathBuf::from(format!("/var/lib/libvirt/images/stagecore-test-{tag}"));
        Guard { tag, dir }
    }

    /// A backend on the live daemon; panics (fails the test) when libvirtd is not there.
    pub(crate) async fn backend(&self) -> LibvirtBackend {
        LibvirtBackend::connect(URI, &self.dir)
            .await
            .unwrap_or_else(|e| panic!("libvirtd must be running for the live tests ({URI}): {e}"))
    }

    /// Names of domains whose name contains the tag.
    pub(crate) fn domains(&self) -> Vec<String> {
        virsh(&["list", "--all", "--name"]).into_iter().filter(|n| n.contains(&self.tag)).collect()
    }

    /// Names of networks whose name contains the tag.
    pub(crate) fn networks(&self) -> Vec<String> {
        virsh(&["net-list", "--all", "--name"]).into_iter().filter(|n| n.contains(&self.tag)).collect()
    }
}

/// Runs virsh on the live daemon and returns its non-empty output lines.
pub(crate) fn virsh(args: &[&str]) -> Vec<String> {
    let out = Command::new("virsh").arg("-c").arg(URI).args(args).output().expect("virsh runs");
    String::from_utf8_lossy(&out.stdout).lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
}

impl Guard {
    /// Domains whose name carries the tag or whose definition uses a file in the state directory
    /// (the kit names environments itself), and the networks those domains use.
    fn owned(&self) -> (Vec<String>, Vec<String>) {
        let dir = self.dir.display().to_string();
        let (mut doms, mut nets) = (Vec::new(), self.networks());
        for d in virsh(&["list", "--all", "--name"]) {
            let xml = virsh(&["dumpxml", "--inactive", &d]).join("\n");
            if d.contains(&self.tag) || xml.contains(&dir) {
                for part in xml.split("<source network='").skip(1) {
                    let net = part.split('\'').next().unwrap_or_default().to_string();
                    if net != "default" && !nets.contains(&net) {
                        nets.push(net);
                    }
                }
                doms.push(d);
            }
        }
        (doms, nets)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let (doms, nets) = self.owned();
        for d in doms {
            virsh(&["destroy", &d]);
            virsh(&["undefine", &d, "--nvram"]);
            virsh(&["undefine", &d]);
        }
        for n in nets {
            virsh(&["net-destroy", &n]);
            virsh(&["net-undefine", &n]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The URI of one of the libvirtd test hosts `cargo xtask test` starts in network namespaces
/// (`STAGECORE_LIBVIRT_HOST_A` / `_B`); panics (fails the test) with instructions when unset.
pub(crate) fn host_uri(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: the remote tests need the libvirtd test hosts. Run `cargo xtask hosts start` \
             and export the variables it prints (`cargo xtask test` does both)"
        )
    })
}

/// Runs virsh against `uri` and returns its non-empty output lines.
pub(crate) fn virsh_at(uri: &str, args: &[&str]) -> Vec<String> {
    let out = Command::new("virsh").arg("-c").arg(uri).args(args).output().expect("virsh runs");
    String::from_utf8_lossy(&out.stdout).lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
}
