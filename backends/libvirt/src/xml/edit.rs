//! Edits of domain XML trees (keeping everything the spec does not model) and the few documents
//! this crate writes from scratch: a new production domain, an isolated network, device XML for
//! attach/detach.

use std::collections::BTreeMap;
use std::path::Path;

use stagecore::{DiskFormat, DiskSpec, Firmware, MachineSpec, NicSpec};

use super::domain::ALIAS_PREFIX;
use super::tree::{Element, Node};

fn el(name: &str, attrs: &[(&str, &str)]) -> Element {
    let mut e = Element::new(name);
    for (k, v) in attrs {
        e.set_attr(k, v);
    }
    e
}

fn push(parent: &mut Element, child: Element) {
    parent.children.push(Node::Element(child));
}

fn text(name: &str, value: &str, attrs: &[(&str, &str)]) -> Element {
    let mut e = el(name, attrs);
    e.set_text(value);
    e
}

/// Logical name of a `<disk>` or `<interface>` element (`ua-` alias, else `fallback`).
fn logical(e: &Element, fallback: String) -> String {
    e.child("alias")
        .and_then(|a| a.attr("name"))
        .and_then(|n| n.strip_prefix(ALIAS_PREFIX))
        .map(str::to_string)
        .unwrap_or(fallback)
}

/// `<disk device='disk'>` elements with their logical names.
pub(crate) fn disks_mut(domain: &mut Element) -> Vec<(String, &mut Element)> {
    let Some(devices) = domain.child_mut("devices") else { return Vec::new() };
    devices
        .elements_mut()
        .filter(|e| e.name == "disk" && e.attr("device").unwrap_or("disk") == "disk")
        .map(|e| {
            let dev = e.child("target").and_then(|t| t.attr("dev")).unwrap_or_default().to_string();
            (logical(e, dev), e)
        })
        .collect()
}

/// `<interface>` elements with their logical names.
pub(crate) fn nics_mut(domain: &mut Element) -> Vec<(String, &mut Element)> {
    let Some(devices) = domain.child_mut("devices") else { return Vec::new() };
    devices
        .elements_mut()
        .filter(|e| e.name == "interface")
        .enumerate()
        .map(|(i, e)| (logical(e, format!("eth{i}")), e))
        .collect()
}

/// Sets name and UUID.
pub(crate) fn set_identity(domain: &mut Element, name: &str, uuid: &str) {
    domain.child_or_insert("name").set_text(name);
    domain.child_or_insert("uuid").set_text(uuid);
}

/// Points disks at new qcow2 files (logical disk → path); drops `<backingStore>`, which libvirt
/// re-reads from the image. Disks not in `paths` are left as they are.
pub(crate) fn set_disk_sources(domain: &mut Element, paths: &BTreeMap<String, String>) {
    for (name, disk) in disks_mut(domain) {
        let Some(path) = paths.get(&name) else { continue };
        disk.set_attr("type", "file");
        disk.remove_children(|c| c.name == "backingStore" || c.name == "source");
        disk.child_or_insert("driver").set_attr("type", "qcow2");
        if disk.child("driver").and_then(|d| d.attr("name")).is_none() {
            disk.child_or_insert("driver").set_attr("name", "qemu");
        }
        let source = el("source", &[("file", path)]);
        let at = disk.children.iter().position(|c| matches!(c, Node::Element(e) if e.name == "driver"));
        disk.children.insert(at.map_or(0, |i| i + 1), Node::Element(source));
    }
}

/// Gives every interface a new MAC (logical NIC → MAC).
pub(crate) fn set_macs(domain: &mut Element, macs: &BTreeMap<String, String>) {
    for (name, nic) in nics_mut(domain) {
        if let Some(mac) = macs.get(&name) {
            nic.child_or_insert("mac").set_attr("address", mac);
        }
    }
}

/// Moves every interface onto a libvirt network (logical network → libvirt network);
/// `logical_of` maps the interface's current network/bridge to its logical network name.
pub(crate) fn set_networks(
    domain: &mut Element,
    networks: &BTreeMap<String, String>,
    logical_of: impl Fn(&str) -> String,
) {
    for (_, nic) in nics_mut(domain) {
        // The same key as `DomainXml::nics` gives (network, bridge, host device, else the type).
        let source = nic.child("source");
        let current = source
            .and_then(|s| s.attr("network").or(s.attr("bridge")).or(s.attr("dev")))
            .or(nic.attr("type"))
            .unwrap_or_default()
            .to_string();
        let Some(target) = networks.get(&logical_of(&current)) else { continue };
        nic.set_attr("type", "network");
        nic.remove_children(|c| matches!(c.name.as_str(), "source" | "target" | "virtualport"));
        let source = el("source", &[("network", target)]);
        let at = nic.children.iter().position(|c| matches!(c, Node::Element(e) if e.name == "mac"));
        nic.children.insert(at.map_or(0, |i| i + 1), Node::Element(source));
    }
}

/// The name of the virtio-serial port qemu-guest-agent listens on.
pub(crate) const AGENT_PORT: &str = "org.qemu.guest_agent.0";

/// A new TCG/KVM domain for a spec machine. `disks` gives each disk's file, `networks` maps
/// logical networks to libvirt networks, `serial_log` is the host file the serial console is
/// written to (in the environment's own directory).
///
/// Every such domain gets the guest agent's channel (a virtio-serial port with *no* source path:
/// libvirt makes a socket per domain and owns it), no video device, and a file serial console.
/// `machine.boot` becomes `<os><kernel>/<initrd>/<cmdline>` (direct kernel boot).
pub(crate) fn new_domain(
    machine: &MachineSpec,
    instance: &str,
    domain_type: &str,
    disks: &BTreeMap<String, String>,
    networks: &BTreeMap<String, String>,
    serial_log: &str,
) -> Element {
    let mut d = el("domain", &[("type", domain_type)]);
    push(&mut d, text("name", instance, &[]));
    push(&mut d, text("uuid", machine.uuid.as_deref().unwrap_or_default(), &[]));
    push(&mut d, text("memory", &machine.memory_mib.to_string(), &[("unit", "MiB")]));
    push(&mut d, text("vcpu", &machine.vcpus.to_string(), &[]));
    let mut os = el("os", &[]);
    if machine.firmware == Firmware::Uefi {
        os.set_attr("firmware", "efi");
    }
    push(&mut os, text("type", "hvm", &[("arch", "x86_64")]));
    if let Some(boot) = &machine.boot {
        push(&mut os, text("kernel", &boot.kernel, &[]));
        if let Some(initrd) = &boot.initrd {
            push(&mut os, text("initrd", initrd, &[]));
        }
        push(&mut os, text("cmdline", &boot.cmdline, &[]));
    }
    push(&mut d, os);
    let mut devices = el("devices", &[]);
    for (i, disk) in machine.disks.iter().enumerate() {
        let path = disks.get(&disk.name).cloned().unwrap_or_else(|| disk.source.clone());
        push(&mut devices, disk_device(disk, &path, &target_dev(i)));
    }
    for nic in &machine.nics {
        let net = networks.get(&nic.network).cloned().unwrap_or_else(|| nic.network.clone());
        push(&mut devices, nic_device(nic, &net));
    }
    push(&mut devices, el("controller", &[("type", "virtio-serial"), ("index", "0")]));
    let mut channel = el("channel", &[("type", "unix")]);
    push(&mut channel, el("target", &[("type", "virtio"), ("name", AGENT_PORT)]));
    push(&mut devices, channel);
    let mut serial = el("serial", &[("type", "file")]);
    push(&mut serial, el("source", &[("path", serial_log)]));
    push(&mut serial, el("target", &[("port", "0")]));
    push(&mut devices, serial);
    let mut video = el("video", &[]);
    push(&mut video, el("model", &[("type", "none")]));
    push(&mut devices, video);
    push(&mut d, devices);
    if machine.uuid.is_none() {
        d.remove_children(|c| c.name == "uuid");
    }
    d
}

/// Whether the domain has the guest agent's virtio-serial channel.
pub(crate) fn has_agent_channel(domain: &Element) -> bool {
    domain.child("devices").is_some_and(|devices| {
        devices
            .elements()
            .any(|e| e.name == "channel" && e.child("target").is_some_and(|t| t.attr("name") == Some(AGENT_PORT)))
    })
}

/// Character devices whose host-side paths belong to one domain.
const CHARDEVS: [&str; 4] = ["serial", "console", "channel", "parallel"];

/// Gives a domain derived from another one host-side paths of its own, so two domains never share
/// a socket or a log file: a virtio channel's `<source path>` is dropped (libvirt then makes a
/// socket per domain), and every other file, socket or pipe path of a serial, console, channel or
/// parallel device and every `<log file>` is moved into `dir` (named `<machine>.<file name>`, or
/// the file name alone when it already starts with `<machine>.`).
/// Host devices (`type='dev'`) and network chardevs are left alone. Returns what was changed: old
/// path → new path, or "" when the source was dropped for libvirt to assign.
pub(crate) fn own_host_paths(domain: &mut Element, dir: &Path, machine: &str) -> BTreeMap<String, String> {
    let mut changed: BTreeMap<String, String> = BTreeMap::new();
    let Some(devices) = domain.child_mut("devices") else { return changed };
    let relocate = |old: &str, changed: &mut BTreeMap<String, String>| -> String {
        if let Some(new) = changed.get(old).filter(|n| !n.is_empty()) {
            return new.clone();
        }
        let file =
            Path::new(old).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| "chardev".into());
        let file = if file.starts_with(&format!("{machine}.")) { file } else { format!("{machine}.{file}") };
        let mut new = dir.join(&file);
        let mut i = 1;
        while changed.values().any(|v| Path::new(v) == new) {
            new = dir.join(format!("{i}.{file}"));
            i += 1;
        }
        let new = new.display().to_string();
        changed.insert(old.to_string(), new.clone());
        new
    };
    for dev in devices.elements_mut().filter(|e| CHARDEVS.contains(&e.name.as_str())) {
        let kind = dev.attr("type").unwrap_or_default().to_string();
        let virtio_channel = dev.name == "channel"
            && dev.child("target").is_some_and(|t| t.attr("type") == Some("virtio") && t.attr("name").is_some());
        if virtio_channel && kind == "unix" {
            if let Some(old) = dev.child("source").and_then(|s| s.attr("path")).map(str::to_string) {
                dev.remove_children(|c| c.name == "source");
                changed.insert(old, String::new());
            }
        } else if matches!(kind.as_str(), "file" | "unix" | "pipe") {
            for source in dev.elements_mut().filter(|c| c.name == "source") {
                if let Some(old) = source.attr("path").map(str::to_string) {
                    let new = relocate(&old, &mut changed);
                    source.set_attr("path", &new);
                }
            }
        }
        for log in dev.elements_mut().filter(|c| c.name == "log") {
            if let Some(old) = log.attr("file").map(str::to_string) {
                let new = relocate(&old, &mut changed);
                log.set_attr("file", &new);
            }
        }
    }
    changed
}

/// Gives `domain` (a definition taken from another domain, as in a swap) the host-side chardev
/// paths of `own` (the domain's previous definition): the n-th serial/console/channel/parallel
/// device of each kind, when it has the same `type` as the n-th one of `own`, takes that one's
/// path-carrying `<source>` and its `<log>` (or loses them when `own` has none: libvirt then
/// assigns a socket, or the device logs nowhere). So a domain keeps its own sockets and log files
/// whatever definition it runs. Devices whose type differs are left as they are (logged).
pub(crate) fn keep_host_paths(domain: &mut Element, own: &Element) {
    let theirs: Vec<Element> = own
        .child("devices")
        .map(|d| d.elements().filter(|e| CHARDEVS.contains(&e.name.as_str())).cloned().collect())
        .unwrap_or_default();
    let Some(devices) = domain.child_mut("devices") else { return };
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for dev in devices.elements_mut().filter(|e| CHARDEVS.contains(&e.name.as_str())) {
        let n = seen.entry(dev.name.clone()).or_default();
        let mine = theirs.iter().filter(|e| e.name == dev.name).nth(*n);
        *n += 1;
        let Some(mine) = mine.filter(|m| m.attr("type") == dev.attr("type")) else {
            tracing::warn!(device = %dev.name, "no device of the same type to take host paths from");
            continue;
        };
        let with_path = |c: &Element| c.name == "source" && c.attr("path").is_some();
        dev.remove_children(|c| with_path(c) || c.name == "log");
        if let Some(source) = mine.elements().find(|c| with_path(c)) {
            dev.children.insert(0, Node::Element(source.clone()));
        }
        if let Some(log) = mine.child("log") {
            dev.children.push(Node::Element(log.clone()));
        }
    }
}

/// The virtio target device name for disk index `i` (`vda`, `vdb`, …).
pub(crate) fn target_dev(i: usize) -> String {
    format!("vd{}", (b'a' + (i % 26) as u8) as char)
}

/// `<disk>` device XML for a file-backed disk.
pub(crate) fn disk_device(disk: &DiskSpec, path: &str, dev: &str) -> Element {
    let format = match disk.format {
        DiskFormat::Raw => "raw",
        DiskFormat::Vmdk => "vmdk",
        DiskFormat::Qcow2 => "qcow2",
    };
    let mut e = el("disk", &[("type", "file"), ("device", "disk")]);
    push(&mut e, el("driver", &[("name", "qemu"), ("type", format)]));
    push(&mut e, el("source", &[("file", path)]));
    push(&mut e, el("target", &[("dev", dev), ("bus", "virtio")]));
    if disk.read_only {
        push(&mut e, el("readonly", &[]));
    }
    push(&mut e, el("alias", &[("name", &format!("{ALIAS_PREFIX}{}", disk.name))]));
    e
}

/// `<interface type='network'>` device XML.
pub(crate) fn nic_device(nic: &NicSpec, network: &str) -> Element {
    let mut e = el("interface", &[("type", "network")]);
    if let Some(mac) = &nic.mac {
        push(&mut e, el("mac", &[("address", mac)]));
    }
    push(&mut e, el("source", &[("network", network)]));
    push(&mut e, el("model", &[("type", &nic.model)]));
    push(&mut e, el("alias", &[("name", &format!("{ALIAS_PREFIX}{}", nic.name))]));
    e
}

/// An isolated libvirt network: no `<forward>`, no addresses; libvirt picks the bridge.
pub(crate) fn isolated_network(name: &str) -> String {
    let mut n = el("network", &[]);
    push(&mut n, text("name", name, &[]));
    push(&mut n, el("bridge", &[("name", &bridge_name(name))]));
    n.render()
}

/// A bridge name of our own for a network (`sc` + 10 hex digits of a hash of its name; Linux
/// allows 15 characters). Left to itself, libvirt picks the next free `virbrN`, and two networks
/// defined at once can race for the same one ("error creating bridge interface: File exists").
pub(crate) fn bridge_name(network: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    network.hash(&mut h);
    format!("sc{:010x}", h.finish() & 0xff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xml::domain::DomainXml;
    use crate::xml::tree::tests::SAMPLE;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn stage_edits_change_only_identity_disks_and_networks() {
        let mut tree = Element::parse(SAMPLE, "sample").unwrap();
        set_identity(&mut tree, "s1-web", "11111111-2222-3333-4444-555555555555");
        set_disk_sources(&mut tree, &map(&[("vda", "/stage/web.qcow2")]));
        set_macs(&mut tree, &map(&[("eth0", "52:54:00:01:02:03"), ("data", "52:54:00:01:02:04")]));
        let nets = map(&[("br0", "s1-br0"), ("backend", "s1-backend")]);
        set_networks(&mut tree, &nets, |n| n.to_string());
        let xml = tree.render();
        let d = DomainXml::parse(&xml, "edited").unwrap();
        assert_eq!(d.uuid.as_deref(), Some("11111111-2222-3333-4444-555555555555"));
        let disks: Vec<_> = d.disks().collect();
        assert_eq!(disks.len(), 1, "the cdrom is not a modeled disk");
        assert_eq!(disks[0].1.path().as_deref(), Some("/stage/web.qcow2"));
        assert!(!xml.contains("backingStore"), "libvirt re-reads the chain from the image");
        assert!(xml.contains("cache=\"none\""), "driver options survive");
        let nics: Vec<_> = d.nics().collect();
        assert_eq!(nics[0].0, "eth0");
        assert_eq!(nics[0].1.network().as_deref(), Some("s1-br0"));
        assert_eq!(nics[1].0, "data");
        assert_eq!(nics[1].1.mac.as_ref().unwrap().address, "52:54:00:01:02:04");
        for kept in ["keep me", "host-passthrough", "<serial", "pc-q35-7.2", "a comment"] {
            assert!(xml.contains(kept), "{kept} survives the edit");
        }
    }

    #[test]
    fn new_domains_boot_a_kernel_and_have_an_agent_channel_and_a_file_serial() {
        let mut spec = stagecore::memory::sample_spec("prod").machines.remove(0);
        spec.boot = Some(stagecore::BootSpec {
            kernel: "/img/vmlinuz".into(),
            initrd: Some("/img/initrd.img".into()),
            cmdline: "root=/dev/vda console=ttyS0 quiet".into(),
        });
        let disks = map(&[("disk0", "/state/prod/web.qcow2")]);
        let tree = new_domain(&spec, "prod-web", "qemu", &disks, &BTreeMap::new(), "/state/prod/web.serial.log");
        let xml = tree.render();
        let d = DomainXml::parse(&xml, "new").unwrap();
        assert_eq!(d.machine_spec("web", |n| n.to_string(), |_| None).boot, spec.boot, "boot round trip");
        assert!(has_agent_channel(&tree), "{xml}");
        assert!(xml.contains("<target type=\"virtio\" name=\"org.qemu.guest_agent.0\"/>"), "{xml}");
        let channel = tree.child("devices").unwrap().elements().find(|e| e.name == "channel").unwrap();
        assert!(channel.child("source").is_none(), "libvirt assigns the agent socket");
        assert!(xml.contains("<serial type=\"file\"><source path=\"/state/prod/web.serial.log\"/>"), "{xml}");
        assert!(xml.contains("<video><model type=\"none\"/></video>"), "{xml}");
        spec.boot = None;
        let tree = new_domain(&spec, "prod-web", "qemu", &disks, &BTreeMap::new(), "/l");
        assert!(!tree.render().contains("<kernel"), "no boot, no kernel");
    }

    #[test]
    fn derived_domains_get_their_own_chardev_paths() {
        let prod = r#"<domain type='qemu'><name>prod-web</name><devices>
            <serial type='file'><source path='/var/log/prod/web.log'/><target port='0'/></serial>
            <console type='file'><source path='/var/log/prod/web.log'/><target type='serial' port='0'/></console>
            <serial type='pty'><log file='/var/log/prod/pty.log' append='on'/><target port='1'/></serial>
            <serial type='dev'><source path='/dev/ttyS0'/><target port='2'/></serial>
            <channel type='unix'><source mode='bind' path='/run/prod/qga.sock'/>
              <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
            <channel type='unix'><source mode='bind' path='/run/prod/other.log'/><target type='guestfwd' address='10.0.2.1' port='4600'/></channel>
            </devices></domain>"#;
        let mut tree = Element::parse(prod, "prod").unwrap();
        let changed = own_host_paths(&mut tree, Path::new("/state/s1"), "web");
        let xml = tree.render();
        assert_eq!(changed.get("/run/prod/qga.sock").map(String::as_str), Some(""), "agent socket dropped");
        assert_eq!(changed.get("/var/log/prod/web.log").map(String::as_str), Some("/state/s1/web.log"));
        let mut again = Element::parse(&xml, "stage").unwrap();
        let moved = own_host_paths(&mut again, Path::new("/state/s2"), "web");
        assert_eq!(moved.get("/state/s1/web.log").map(String::as_str), Some("/state/s2/web.log"));
        assert_eq!(changed.get("/var/log/prod/pty.log").map(String::as_str), Some("/state/s1/web.pty.log"));
        assert_eq!(changed.get("/run/prod/other.log").map(String::as_str), Some("/state/s1/web.other.log"));
        assert_eq!(changed.len(), 4, "{changed:?}");
        assert_eq!(xml.matches("/state/s1/web.log").count(), 2, "serial and its console stay one file");
        assert!(xml.contains("/dev/ttyS0"), "host devices are not ours to move");
        assert!(!xml.contains("/var/log/prod") && !xml.contains("/run/prod"), "{xml}");
        assert!(has_agent_channel(&tree));
    }

    #[test]
    fn a_swapped_definition_keeps_the_domains_own_chardev_paths() {
        let stage = r#"<domain><devices>
            <serial type='file'><source path='/state/s1/web.serial.log'/><target port='0'/></serial>
            <console type='file'><source path='/state/s1/web.serial.log'/><target type='serial' port='0'/></console>
            <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
            <serial type='pty'><log file='/state/s1/pty.log'/><target port='1'/></serial>
            </devices></domain>"#;
        let prod = r#"<domain><devices>
            <serial type='file'><source path='/state/prod/web.serial.log'/><target port='0'/></serial>
            <console type='file'><source path='/state/prod/web.serial.log'/><target type='serial' port='0'/></console>
            <channel type='unix'><source mode='bind' path='/run/prod.agent'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
            <serial type='pty'><target port='1'/></serial>
            </devices></domain>"#;
        let mut tree = Element::parse(stage, "stage").unwrap();
        keep_host_paths(&mut tree, &Element::parse(prod, "prod").unwrap());
        let xml = tree.render();
        assert_eq!(xml.matches("/state/prod/web.serial.log").count(), 2, "{xml}");
        assert!(xml.contains("/run/prod.agent"), "{xml}");
        assert!(!xml.contains("/state/s1"), "nothing of the stage's directory stays: {xml}");
    }

    #[test]
    fn parsed_view_builds_a_machine_spec() {
        let d = DomainXml::parse(SAMPLE, "sample").unwrap();
        let m = d.machine_spec("web", |n| format!("net-{n}"), |_| Some(1 << 30));
        assert_eq!((m.vcpus, m.memory_mib, m.firmware), (2, 1024, stagecore::Firmware::Uefi));
        assert_eq!(m.disks.len(), 1);
        assert_eq!(m.disks[0].name, "vda");
        assert_eq!(m.nics[0].mac.as_deref(), Some("52:54:00:aa:bb:cc"));
        assert_eq!(m.nics[0].network, "net-br0");
        assert_eq!(m.nics[0].model, "e1000");
    }

    #[test]
    fn metadata_record_round_trips_and_other_namespaces_stay() {
        let mut tree = Element::parse(SAMPLE, "sample").unwrap();
        let record = crate::xml::meta::MachineRecord {
            environment: "prod".into(),
            machine: "web".into(),
            role: stagecore::Role::Production,
            networks: map(&[("backend", "prod-backend")]),
            cidrs: BTreeMap::new(),
            env_labels: BTreeMap::new(),
            owned_networks: vec!["prod-backend".into()],
            origins: BTreeMap::new(),
            snapshots: Vec::new(),
            sources: map(&[("disk0", "/images/web.qcow2")]),
            after: vec!["db".into()],
            host_paths: map(&[("/var/log/a.log", "/stage/web.a.log")]),
            host_notes: vec!["web: dropped <hostdev>".into()],
        };
        let labels = map(&[("tier", "web")]);
        crate::xml::meta::set(&mut tree, &labels, &record).unwrap();
        crate::xml::meta::set(&mut tree, &labels, &record).unwrap();
        let back = Element::parse(&tree.render(), "again").unwrap();
        assert_eq!(crate::xml::meta::record(&back, "web").unwrap(), Some(record));
        assert_eq!(crate::xml::meta::labels(&back), labels);
        assert_eq!(back.child("metadata").unwrap().elements().count(), 2, "replaced, not duplicated");
        crate::xml::meta::strip(&mut tree);
        assert!(tree.render().contains("keep me"));
        assert_eq!(crate::xml::meta::record(&tree, "web").unwrap(), None);
    }
}
