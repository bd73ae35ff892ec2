//! Host-side files of a domain other than its staged disks: UEFI variables (`<os><nvram>`), TPM
//! state, chardev files and sockets (serial, console, channel, parallel), `<log file>`s, graphics
//! sockets and ports, and any other device that names a host path.
//!
//! A stage must never share one of these with production (running the stage would change
//! production's NVRAM or overwrite its logs, two QEMUs cannot hold one serial file, and destroying
//! the stage would delete what production uses). Three entry points, one per operation:
//!
//! - [`save_for_baseline`] (take_baseline): copies production's NVRAM file, as of the baseline,
//!   next to the baseline's XML (`<state>/<env>/baselines/<id>/<machine>.nvram`).
//! - [`own_for_stage`] (stage): rewrites a definition taken from production so every host-side
//!   path is the stage's own — NVRAM copied from the baseline's copy into the stage's directory,
//!   logs and sockets new under the stage's directory — or drops the device, with a note for each
//!   drop (logged at warn and kept in the stage's record, see
//!   [`crate::LibvirtEnvironment::host_file_notes`]).
//! - [`undefine_flags`] (destroy): the undefine flags that delete only what the domain owns (its
//!   NVRAM is deleted only when it lives in the environment's directory or is libvirt's default
//!   file for the domain's own name).
//!
//! [`keep_own`] is the swap's counterpart: a domain keeps its own host-side files whatever
//! definition it runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use stagecore::Result;
use virt::sys;

use crate::xml::edit;
use crate::xml::tree::{Element, Node};

/// What [`own_for_stage`] did: changed paths (old → new, "" = dropped for libvirt to assign) and
/// notes about what was dropped or could not be copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Owned {
    /// Old host path → the stage's own path ("" when libvirt assigns a new one).
    pub(crate) changed: BTreeMap<String, String>,
    /// One sentence per device dropped or file not copied.
    pub(crate) notes: Vec<String>,
}

/// Where a stage's machine gets its files.
#[derive(Debug, Clone)]
pub(crate) struct StageFiles<'a> {
    /// The machine's logical name.
    pub(crate) machine: &'a str,
    /// The stage's own directory for host-side files (its image directory).
    pub(crate) dir: &'a Path,
    /// Production's NVRAM as saved with the baseline ([`save_for_baseline`]), if any.
    pub(crate) baseline_nvram: Option<PathBuf>,
    /// Whether the files live on this host (local URI); a remote stage gets libvirt's defaults.
    pub(crate) local: bool,
}

/// libvirt's NVRAM directory for `qemu:///system`.
const NVRAM_DIR: &str = "/var/lib/libvirt/qemu/nvram";

/// The file name a baseline keeps a machine's NVRAM under.
pub(crate) fn baseline_nvram(baseline_dir: &Path, machine: &str) -> PathBuf {
    baseline_dir.join(format!("{machine}.nvram"))
}

/// Whether the domain boots UEFI with a variable store (`firmware='efi'`, a pflash loader or an
/// `<nvram>`).
fn uses_nvram(domain: &Element) -> bool {
    let Some(os) = domain.child("os") else { return false };
    os.attr("firmware") == Some("efi")
        || os.child("loader").is_some_and(|l| l.attr("type") == Some("pflash"))
        || os.child("nvram").is_some()
}

/// The NVRAM path an `<nvram>` element names (text, or `<source file>`), if any.
fn nvram_path(domain: &Element) -> Option<String> {
    let nvram = domain.child("os")?.child("nvram")?;
    let text = nvram.text().trim().to_string();
    if !text.is_empty() {
        return Some(text);
    }
    nvram.child("source").and_then(|s| s.attr("file")).map(str::to_string)
}

/// The NVRAM file of a domain: the explicit `<nvram>` of its inactive or live XML, else libvirt's
/// default for its name.
fn nvram_file(inactive: &Element, live: Option<&Element>, instance: &str) -> Option<String> {
    if !uses_nvram(inactive) {
        return None;
    }
    nvram_path(inactive)
        .or_else(|| live.and_then(nvram_path))
        .or_else(|| Some(format!("{NVRAM_DIR}/{instance}_VARS.fd")))
}

/// Baseline entry point: copies production's NVRAM file (as it is now, i.e. as of the baseline)
/// to [`baseline_nvram`]. Blocking (runs inside `Conn::run`). Returns a note when the domain
/// uses NVRAM but nothing could be copied (no file yet, a remote host); an I/O error copying an
/// existing file is an error (the baseline would silently lose production's variables).
pub(crate) fn save_for_baseline(
    c: &virt::connect::Connect,
    uri: &str,
    instance: &str,
    machine: &str,
    inactive: &Element,
    baseline_dir: &Path,
) -> Result<Option<String>> {
    if !uses_nvram(inactive) {
        return Ok(None);
    }
    if !crate::shared::is_local(uri) {
        return Ok(Some(format!(
            "{machine}: production's NVRAM lives on the remote host and is not copied; stages start from the \
             firmware's template"
        )));
    }
    let live = c
        .lookup_domain_by_name(instance)
        .ok()
        .filter(|d| d.is_active().unwrap_or(false))
        .and_then(|d| d.xml_desc(0).ok())
        .and_then(|x| Element::parse(&x, instance).ok());
    let Some(file) = nvram_file(inactive, live.as_ref(), instance) else { return Ok(None) };
    let dst = baseline_nvram(baseline_dir, machine);
    match std::fs::copy(&file, &dst) {
        Ok(_) => {
            tracing::info!(machine, nvram = %file, copy = %dst.display(), "kept production's NVRAM with the baseline");
            Ok(None)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Some(format!(
            "{machine}: production has no NVRAM file yet ({file}); stages start from the firmware's template"
        ))),
        Err(e) => Err(crate::error::io(Path::new(&file), e)),
    }
}

/// Stage entry point: makes every host-side path of `domain` (a definition taken from
/// production, disks already staged) the stage's own, or drops the device; see the module docs
/// and `docs/backends/libvirt.md` ("Host-side files").
pub(crate) fn own_for_stage(domain: &mut Element, files: &StageFiles<'_>) -> Result<Owned> {
    let mut out = Owned::default();
    let machine = files.machine;
    drop_shared_devices(domain, machine, &mut out.notes);
    out.changed = edit::own_host_paths(domain, files.dir, machine);
    own_graphics_and_vsock(domain, machine, &mut out);
    own_tpm(domain, machine, &mut out);
    own_nvram(domain, files, &mut out)?;
    if domain.elements().any(|e| e.name.ends_with(":commandline")) {
        out.notes.push(format!(
            "{machine}: <qemu:commandline> is kept as is; host paths in it are not made the stage's own"
        ));
    }
    for note in &out.notes {
        tracing::warn!(machine, note = %note, "stage host-side file");
    }
    Ok(out)
}

/// Whether an element or its descendants name an absolute host path.
fn names_host_path(e: &Element) -> Option<String> {
    for (k, v) in &e.attrs {
        if matches!(k.as_str(), "path" | "file" | "dir" | "socket" | "dev") && v.starts_with('/') {
            return Some(v.clone());
        }
    }
    if e.name == "path" && e.text().trim().starts_with('/') {
        return Some(e.text().trim().to_string());
    }
    e.elements().find_map(names_host_path)
}

/// Removes the devices a stage cannot have a copy of (a host device, a writable host directory,
/// a socket someone else serves, a fixed TCP port), one note each.
fn drop_shared_devices(domain: &mut Element, machine: &str, notes: &mut Vec<String>) {
    let Some(devices) = domain.child_mut("devices") else { return };
    let mut kept = Vec::new();
    for node in std::mem::take(&mut devices.children) {
        let Node::Element(dev) = &node else {
            kept.push(node);
            continue;
        };
        match drop_reason(dev) {
            Some(why) => notes.push(format!("{machine}: dropped <{}> from the stage: {why}", describe(dev))),
            None => kept.push(node),
        }
    }
    devices.children = kept;
}

fn describe(dev: &Element) -> String {
    match dev.attr("type") {
        Some(t) => format!("{} type='{t}'", dev.name),
        None => dev.name.clone(),
    }
}

/// Why a device cannot be in a stage, or `None` when it can (possibly after its paths move).
fn drop_reason(dev: &Element) -> Option<String> {
    let kind = dev.attr("type").unwrap_or_default();
    let source = dev.child("source");
    let source_path = source.and_then(|s| s.attr("path")).unwrap_or_default();
    match dev.name.as_str() {
        "disk" => {
            let device = dev.attr("device").unwrap_or("disk");
            let read_only = dev.child("readonly").is_some() || device == "cdrom";
            if device == "disk" || read_only {
                return None; // staged, or shared read-only
            }
            names_host_path(dev).map(|p| format!("a writable {device} ({p}) is production's and is not staged"))
        }
        "serial" | "console" | "channel" | "parallel" => match kind {
            "dev" => Some(format!("the host device {source_path} is production's")),
            "pipe" => Some(format!("the pipe {source_path} is served by someone else (production's)")),
            "unix" if source.and_then(|s| s.attr("mode")) == Some("connect") => {
                Some(format!("it connects to {source_path}, a socket served for production"))
            }
            "tcp" if source.and_then(|s| s.attr("mode")).unwrap_or("bind") == "bind" => {
                let port = source.and_then(|s| s.attr("service")).unwrap_or("?");
                Some(format!("it listens on TCP port {port}, which production holds"))
            }
            _ => None,
        },
        "hostdev" => Some("a host device cannot be given to two machines".into()),
        "filesystem" if dev.child("readonly").is_none() => {
            let dir = source.and_then(|s| s.attr("dir").or(s.attr("file")).or(s.attr("name"))).unwrap_or("?");
            Some(format!("the host directory {dir} is production's and writable"))
        }
        "filesystem" => None,
        "tpm" => {
            let backend = dev.child("backend").and_then(|b| b.attr("type")).unwrap_or_default();
            (backend == "passthrough").then(|| "a passthrough TPM is the host's, held by production".to_string())
        }
        "interface" | "graphics" | "controller" | "input" | "video" | "sound" | "watchdog" | "memballoon" | "rng"
        | "panic" | "iommu" | "vsock" | "emulator" | "audio" | "crypto" => None,
        _ => names_host_path(dev).map(|p| format!("it uses the host path {p}, which is production's")),
    }
}

/// Graphics listen on ports or sockets of their own: fixed ports become automatic, socket paths
/// are dropped (libvirt assigns); a fixed vsock CID becomes automatic.
fn own_graphics_and_vsock(domain: &mut Element, machine: &str, out: &mut Owned) {
    let Some(devices) = domain.child_mut("devices") else { return };
    for dev in devices.elements_mut() {
        if dev.name == "graphics" {
            if let Some(sock) = dev.attr("socket").map(str::to_string) {
                dev.attrs.retain(|(k, _)| k != "socket");
                out.changed.insert(sock, String::new());
            }
            let mut socks = Vec::new();
            for l in dev.elements().filter(|l| l.attr("type") == Some("socket")) {
                socks.extend(l.attr("socket").map(str::to_string));
            }
            if !socks.is_empty() || dev.elements().any(|l| l.name == "listen" && l.attr("type") == Some("socket")) {
                for l in dev.elements_mut().filter(|l| l.name == "listen" && l.attr("type") == Some("socket")) {
                    l.attrs.retain(|(k, _)| k != "socket");
                }
                for s in socks {
                    out.changed.insert(s, String::new());
                }
            }
            let fixed = dev.attr("autoport") == Some("no")
                || dev.attr("port").is_some_and(|p| p != "-1")
                || dev.attr("tlsPort").is_some_and(|p| p != "-1");
            if fixed {
                dev.attrs.retain(|(k, _)| !matches!(k.as_str(), "port" | "tlsPort" | "autoport"));
                dev.set_attr("autoport", "yes");
                out.notes.push(format!("{machine}: the graphics' fixed port became automatic (production holds it)"));
            }
            if dev.attr("websocket").is_some_and(|p| p != "-1") {
                dev.set_attr("websocket", "-1");
            }
        } else if dev.name == "vsock"
            && let Some(cid) = dev.child_mut("cid")
            && cid.attr("auto") != Some("yes")
        {
            cid.attrs.retain(|(k, _)| k != "address");
            cid.set_attr("auto", "yes");
            out.notes.push(format!("{machine}: the vsock CID became automatic (production holds its CID)"));
        }
    }
}

/// An emulated TPM keeps its state per domain UUID (the stage has a new one, so new state); a
/// state directory of production's is dropped so the stage gets libvirt's per-UUID default.
fn own_tpm(domain: &mut Element, machine: &str, out: &mut Owned) {
    let Some(devices) = domain.child_mut("devices") else { return };
    for tpm in devices.elements_mut().filter(|e| e.name == "tpm") {
        let Some(backend) = tpm.child_mut("backend") else { continue };
        if backend.attr("type") != Some("emulator") {
            continue;
        }
        let paths: Vec<String> = backend
            .elements()
            .filter(|s| s.name == "source")
            .filter_map(|s| s.attr("path").map(str::to_string))
            .collect();
        backend.remove_children(|s| s.name == "source" && s.attr("path").is_some());
        for p in paths {
            out.changed.insert(p, String::new());
        }
        out.notes.push(format!(
            "{machine}: the emulated TPM starts with new state (swtpm state is kept per domain UUID; production's \
             TPM state is not copied)"
        ));
    }
}

/// The stage's NVRAM: a copy of the baseline's, in the stage's directory.
fn own_nvram(domain: &mut Element, files: &StageFiles<'_>, out: &mut Owned) -> Result<()> {
    if !uses_nvram(domain) {
        return Ok(());
    }
    let machine = files.machine;
    let old = nvram_path(domain);
    let os = domain.child_mut("os").expect("uses_nvram checked <os>");
    let template = os.child("nvram").and_then(|n| n.attr("template")).map(str::to_string);
    os.remove_children(|c| c.name == "nvram");
    let mut nvram = Element::new("nvram");
    if let Some(t) = &template {
        nvram.set_attr("template", t);
    }
    if !files.local {
        // libvirt makes `<stage domain>_VARS.fd` from the template on the host: the stage's own.
        if template.is_some() || old.is_some() {
            os.children.push(Node::Element(nvram));
        }
        out.notes.push(format!("{machine}: NVRAM is not copied to a remote host; the stage starts from the template"));
        if let Some(old) = old {
            out.changed.insert(old, String::new());
        }
        return Ok(());
    }
    let new = files.dir.join(format!("{machine}.VARS.fd"));
    match &files.baseline_nvram {
        Some(saved) if saved.exists() => {
            std::fs::copy(saved, &new).map_err(|e| crate::error::io(&new, e))?;
        }
        _ => out.notes.push(format!(
            "{machine}: no NVRAM of production was kept with the baseline; the stage starts from the firmware's \
             template"
        )),
    }
    let new = new.display().to_string();
    nvram.set_text(&new);
    os.children.push(Node::Element(nvram));
    out.changed.insert(old.unwrap_or_else(|| "<nvram of production>".into()), new);
    Ok(())
}

/// Destroy entry point: flags for `virDomainUndefineFlags` that remove only what the domain
/// owns. The NVRAM is deleted when it is in `own_dir` (the environment's directory) or is
/// libvirt's default file for this domain's own name; otherwise it is kept (it is someone else's,
/// e.g. production's NVRAM named by a stage made before stages had their own).
pub(crate) fn undefine_flags(domain: &Element, instance: &str, own_dir: &Path) -> sys::virDomainUndefineFlagsValues {
    let base = sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA;
    if !uses_nvram(domain) {
        return base;
    }
    let owned = match nvram_path(domain) {
        None => true,
        Some(p) => Path::new(&p).starts_with(own_dir) || p == format!("{NVRAM_DIR}/{instance}_VARS.fd"),
    };
    if owned {
        base | sys::VIR_DOMAIN_UNDEFINE_NVRAM
    } else {
        tracing::warn!(domain = instance, nvram = ?nvram_path(domain), "NVRAM is not this domain's own: kept");
        base | sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM
    }
}

/// Swap counterpart: `domain` (a definition taken from another domain) keeps the host-side files
/// of `own` (this domain's previous definition): chardev sockets and logs, and its NVRAM.
pub(crate) fn keep_own(domain: &mut Element, own: &Element) {
    edit::keep_host_paths(domain, own);
    let mine = own.child("os").and_then(|o| o.child("nvram")).cloned();
    if let Some(os) = domain.child_mut("os") {
        os.remove_children(|c| c.name == "nvram");
        if let Some(n) = mine {
            os.children.push(Node::Element(n));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROD: &str = r#"<domain type='qemu'><name>web</name>
      <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type><nvram template='/t/VARS.fd'>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram></os>
      <devices>
        <disk type='file' device='disk'><source file='/img/web.qcow2'/><target dev='vda'/></disk>
        <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda'/><readonly/></disk>
        <disk type='file' device='floppy'><source file='/img/floppy.img'/><target dev='fda'/></disk>
        <serial type='file'><source path='/var/log/web.serial'/><target port='0'/></serial>
        <serial type='dev'><source path='/dev/ttyS1'/><target port='1'/></serial>
        <console type='pty'><log file='/var/log/web.console'/><target type='serial' port='0'/></console>
        <channel type='unix'><source mode='bind' path='/run/web.guest'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
        <channel type='unix'><source mode='connect' path='/run/svc.sock'/><target type='virtio' name='org.ex.c'/></channel>
        <filesystem type='mount'><source dir='/srv/data'/><target dir='data'/></filesystem>
        <hostdev mode='subsystem' type='usb'><source><vendor id='0x1'/><product id='0x2'/></source></hostdev>
        <graphics type='vnc' port='5901' autoport='no'/>
        <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
        <shmem name='s'><server path='/var/lib/libvirt/shmem/s-sock'/></shmem>
      </devices></domain>"#;

    #[test]
    fn a_stage_owns_every_host_path_or_drops_the_device() {
        let tmp = tempfile::tempdir().unwrap();
        let saved = tmp.path().join("web.nvram");
        std::fs::write(&saved, b"production variables").unwrap();
        let stage_dir = tmp.path().join("stage");
        std::fs::create_dir(&stage_dir).unwrap();
        let mut tree = Element::parse(PROD, "prod").unwrap();
        let files = StageFiles { machine: "web", dir: &stage_dir, baseline_nvram: Some(saved), local: true };
        let owned = own_for_stage(&mut tree, &files).unwrap();
        let xml = tree.render();
        for gone in
            ["/var/log/web", "/dev/ttyS1", "/run/", "/srv/data", "hostdev", "5901", "shmem", "floppy", "web_VARS"]
        {
            assert!(!xml.contains(gone), "{gone} left in {xml}");
        }
        for kept in ["/img/web.qcow2", "/iso/x.iso", "org.qemu.guest_agent.0", "tpm-crb", "template=\"/t/VARS.fd\""] {
            assert!(xml.contains(kept), "{kept} missing in {xml}");
        }
        let nvram = stage_dir.join("web.VARS.fd");
        assert_eq!(std::fs::read(&nvram).unwrap(), b"production variables");
        assert!(xml.contains(&nvram.display().to_string()));
        assert_eq!(owned.notes.len(), 8, "{:#?}", owned.notes);
        assert_eq!(owned.changed.get("/run/web.guest").map(String::as_str), Some(""));
        assert!(owned.changed["/var/log/web.serial"].starts_with(&stage_dir.display().to_string()));
        // The stage's NVRAM is its own; production's default file is its own too; a foreign one is kept.
        assert_eq!(
            undefine_flags(&tree, "s-web", &stage_dir) & sys::VIR_DOMAIN_UNDEFINE_NVRAM,
            sys::VIR_DOMAIN_UNDEFINE_NVRAM
        );
        let prod = Element::parse(PROD, "prod").unwrap();
        assert_ne!(undefine_flags(&prod, "web", &stage_dir) & sys::VIR_DOMAIN_UNDEFINE_NVRAM, 0);
        let old_stage = undefine_flags(&prod, "s-web", &stage_dir);
        assert_eq!(old_stage & sys::VIR_DOMAIN_UNDEFINE_NVRAM, 0, "production's NVRAM is never deleted by a stage");
        assert_ne!(old_stage & sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM, 0);
    }

    #[test]
    fn a_bios_domain_has_no_nvram_and_swap_keeps_its_own() {
        let mut tree = Element::parse("<domain><os><type>hvm</type></os><devices/></domain>", "d").unwrap();
        let dir = Path::new("/s");
        let owned =
            own_for_stage(&mut tree, &StageFiles { machine: "m", dir, baseline_nvram: None, local: true }).unwrap();
        assert_eq!(owned, Owned::default());
        assert!(!tree.render().contains("nvram"));
        let prod = Element::parse(PROD, "prod").unwrap();
        let mut theirs = Element::parse(PROD.replace("web_VARS", "stage_VARS").as_str(), "s").unwrap();
        keep_own(&mut theirs, &prod);
        assert!(theirs.render().contains("web_VARS") && !theirs.render().contains("stage_VARS"));
    }
}
