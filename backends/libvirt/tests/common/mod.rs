//! Shared helpers of the live tests: a unique tag, a state directory libvirt can read, and a guard
//! that removes every domain, network and file carrying the tag, even when a test panics.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use stagecore_libvirt::LibvirtBackend;

/// `spec` with 64 MiB machines and 8 MiB disks: cheap environments for tests without a guest OS.
pub(crate) fn small(spec: stagecore::EnvironmentSpec) -> stagecore::EnvironmentSpec {
    let mut spec = spec;
    for m in &mut spec.machines {
        m.memory_mib = 64;
        for d in &mut m.disks {
            d.size_bytes = Some(8 << 20);
        }
    }
    spec
}

/// `r` must be `Error::Precondition` saying that the layer `file` (named by its file name)
/// changed since it was sealed; `what` names the call in the message.
#[track_caller]
pub(crate) fn assert_changed<T: std::fmt::Debug>(r: stagecore::Result<T>, file: &str, what: &str) {
    let name = std::path::Path::new(file).file_name().unwrap().to_str().unwrap();
    match r {
        Err(stagecore::Error::Precondition(m)) => {
            assert!(m.contains(name) && m.contains("layer changed since it was sealed"), "{what}: {m}")
        }
        other => panic!("{what}: expected Precondition naming {file}, got {other:?}"),
    }
}

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

/// A backend on one of the remote test hosts whose state directory is on the client (a temp
/// directory) and whose images live on the host under a unique root; removes everything the
/// test made there when dropped: domains using files under the root, the networks they use,
/// and the pools under the root.
pub(crate) struct RemoteGuard {
    /// Unique tag.
    pub(crate) tag: String,
    /// The host's URI.
    pub(crate) uri: String,
    /// The root directory on the host (never present on the client).
    pub(crate) root: String,
    /// The client-side state directory.
    pub(crate) state: tempfile::TempDir,
}

impl RemoteGuard {
    /// A guard on the host named by `var` (`STAGECORE_LIBVIRT_HOST_A` / `_B`).
    pub(crate) fn new(var: &str, prefix: &str) -> Self {
        let tag = format!("{prefix}{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let root = format!("/var/lib/libvirt/images/stagecore-test-{tag}");
        RemoteGuard { tag, uri: host_uri(var), root, state: tempfile::tempdir().expect("temp dir") }
    }

    /// The backend over `qemu+tcp://` with its images under the guard's root on the host.
    pub(crate) async fn backend(&self) -> LibvirtBackend {
        LibvirtBackend::connect(&self.uri, self.state.path())
            .await
            .unwrap_or_else(|e| panic!("the libvirtd test host must answer on {}: {e}", self.uri))
            .with_remote_root(&self.root)
    }

    /// Domains on the host whose definition uses a file under the root or carries the tag.
    pub(crate) fn domains(&self) -> Vec<String> {
        virsh_at(&self.uri, &["list", "--all", "--name"])
            .into_iter()
            .filter(|d| {
                d.contains(&self.tag)
                    || virsh_at(&self.uri, &["dumpxml", "--inactive", d]).join("\n").contains(&self.root)
            })
            .collect()
    }
}

impl Drop for RemoteGuard {
    fn drop(&mut self) {
        let local_copy = std::path::Path::new(&self.root).exists();
        let mut nets = Vec::new();
        for d in self.domains() {
            let xml = virsh_at(&self.uri, &["dumpxml", "--inactive", &d]).join("\n");
            for part in xml.split("<source network='").skip(1) {
                let net = part.split('\'').next().unwrap_or_default().to_string();
                if net != "default" && !nets.contains(&net) {
                    nets.push(net);
                }
            }
            virsh_at(&self.uri, &["destroy", &d]);
            virsh_at(&self.uri, &["undefine", &d]);
        }
        for n in nets
            .into_iter()
            .chain(virsh_at(&self.uri, &["net-list", "--all", "--name"]).into_iter().filter(|n| n.contains(&self.tag)))
        {
            virsh_at(&self.uri, &["net-destroy", &n]);
            virsh_at(&self.uri, &["net-undefine", &n]);
        }
        for p in virsh_at(&self.uri, &["pool-list", "--all", "--name"]) {
            if !virsh_at(&self.uri, &["pool-dumpxml", &p]).join("\n").contains(&self.root) {
                continue;
            }
            virsh_at(&self.uri, &["pool-start", &p]);
            virsh_at(&self.uri, &["pool-refresh", &p]);
            for v in virsh_at(&self.uri, &["vol-list", &p, "--name"]) {
                virsh_at(&self.uri, &["vol-delete", &v, "--pool", &p]);
            }
            virsh_at(&self.uri, &["pool-destroy", &p]);
            virsh_at(&self.uri, &["pool-delete", &p]);
            virsh_at(&self.uri, &["pool-undefine", &p]);
        }
        if !std::thread::panicking() {
            assert!(!local_copy, "{} exists on the client: the remote images must only be on the host", self.root);
        }
    }
}

/// The conformance kit over `backend` (the kit wraps it in the capability check layer).
pub(crate) fn kit(backend: LibvirtBackend) -> stagecore_testkit::Kit {
    stagecore_testkit::Kit::new(std::sync::Arc::new(backend))
}
