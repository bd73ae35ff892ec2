//! A plain [`MachineConfig`] turned into a `qemu-system-x86_64` argv.
//!
//! Contract: [`MachineConfig::argv`] validates everything first (names, ids, MACs, paths, sizes) and
//! returns `InvalidSpec` naming the field, or `NotSupported` for UEFI; it never emits `user` or `tap`
//! networking. Every NIC joins a *private L2 segment*: a UDP multicast group derived from the
//! segment name and bound to the loopback interface (`localaddr=127.0.0.1`), so machines on one
//! segment reach each other and nothing else (see docs/decisions.md, "Network fencing").
//! Disks are `-blockdev` pairs with stable node names `<id>-file` / `<id>-fmt` ([`fmt_node`]).

use std::ffi::{OsStr, OsString};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use stagecore::{Error, Result};

/// Guest firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Firmware {
    /// SeaBIOS (QEMU's default).
    #[default]
    Bios,
    /// OVMF; not supported yet.
    Uefi,
}

/// CPU acceleration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM when `/dev/kvm` is usable, else TCG.
    #[default]
    Auto,
    /// Hardware virtualization.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// Resolves `Auto` given whether KVM is usable; `Kvm` and `Tcg` stay as they are.
    pub fn resolve(self, kvm_usable: bool) -> Accel {
        match self {
            Accel::Auto if kvm_usable => Accel::Kvm,
            Accel::Auto => Accel::Tcg,
            other => other,
        }
    }
}

/// Whether `/dev/kvm` can be opened read-write by this process.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// One disk: a qcow2 image attached as a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Device id (also the prefix of its node names); letters, digits, `-`, `_`, at most 26 chars.
    pub id: String,
    /// The qcow2 image (the active layer).
    pub path: PathBuf,
    /// Attach read-only.
    pub read_only: bool,
}

/// One NIC on a private L2 segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicConfig {
    /// Device id.
    pub id: String,
    /// MAC address, `52:54:00:12:34:56` form (unicast).
    pub mac: String,
    /// The segment name; NICs with the same segment share one L2 network. Make it unique per
    /// environment (e.g. `<stage-uuid>/<network>`), since groups are host-wide.
    pub segment: String,
}

/// Direct kernel boot: QEMU loads a kernel (and initrd) from the host and passes a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBoot {
    /// The kernel image (absolute path; `-kernel`).
    pub kernel: PathBuf,
    /// The initrd (absolute path; `-initrd`).
    pub initrd: Option<PathBuf>,
    /// The kernel command line (`-append`; one line).
    pub cmdline: String,
}

/// The name of the virtio-serial port qemu-guest-agent listens on.
pub const AGENT_PORT: &str = "org.qemu.guest_agent.0";

/// Everything needed to start one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    /// Machine name (letters, digits, `.`, `-`, `_`).
    pub name: String,
    /// SMBIOS UUID.
    pub uuid: uuid::Uuid,
    /// Virtual CPUs (1..=255).
    pub vcpus: u32,
    /// Memory in MiB (at least 16).
    pub memory_mib: u64,
    /// Firmware.
    pub firmware: Firmware,
    /// Acceleration.
    pub accel: Accel,
    /// Disks, in boot order.
    pub disks: Vec<DiskConfig>,
    /// NICs.
    pub nics: Vec<NicConfig>,
    /// The QMP unix socket QEMU listens on (absolute path, < 108 bytes).
    pub qmp_socket: PathBuf,
    /// QEMU's pid file.
    pub pidfile: PathBuf,
    /// Where QEMU's stdout/stderr go.
    pub log: PathBuf,
    /// Direct kernel boot; `None` boots from the first disk through the firmware.
    pub boot: Option<KernelBoot>,
    /// The unix socket QEMU listens on for the guest agent, wired to a virtio-serial port named
    /// [`AGENT_PORT`] (absolute path, < 108 bytes); `None`: no agent channel.
    pub agent_socket: Option<PathBuf>,
    /// The file the guest's serial console (ttyS0) is written to; `None`: no serial port.
    pub console_log: Option<PathBuf>,
}

/// The node name of a disk's qcow2 (format) node, e.g. `disk0-fmt`.
pub fn fmt_node(disk_id: &str) -> String {
    format!("{disk_id}-fmt")
}

/// The node name of a disk's file (protocol) node, e.g. `disk0-file`.
pub fn file_node(disk_id: &str) -> String {
    format!("{disk_id}-file")
}

/// The loopback multicast group and port of a segment (239.0.0.0/8, administratively scoped).
pub fn segment_multicast(segment: &str) -> SocketAddrV4 {
    let h = Sha256::digest(segment.as_bytes());
    // 239.255/16 is the site-local range other software (SSDP, mDNS-like tools) uses: avoid it.
    let group = Ipv4Addr::new(239, h[0] % 255, h[1], h[2]);
    let port = 20000 + u16::from_be_bytes([h[3], h[4]]) % 40000;
    SocketAddrV4::new(group, port)
}

/// Escapes a value for QEMU's `key=value,...` option syntax (`,` becomes `,,`).
pub(crate) fn escape_opt(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

fn opt(prefix: &str, path: &Path, suffix: &str) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(escape_opt(path.as_os_str()));
    s.push(suffix);
    s
}

fn check_name(path: &str, value: &str, extra: &[char], max: usize) -> Result<()> {
    let first_ok = value.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = value.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(&c));
    if !first_ok || !rest_ok || value.len() > max {
        let allowed: String = extra.iter().collect();
        return Err(Error::invalid(
            path,
            format!("`{value}` must start with a letter, use letters, digits or `{allowed}`, at most {max} chars"),
        ));
    }
    Ok(())
}

fn check_mac(path: &str, mac: &str) -> Result<()> {
    let parts: Vec<_> = mac.split(':').collect();
    let hex_ok = parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok());
    if !hex_ok {
        return Err(Error::invalid(path, format!("`{mac}` is not a MAC address like 52:54:00:12:34:56")));
    }
    if u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 1) {
        return Err(Error::invalid(path, format!("`{mac}` is a multicast MAC address")));
    }
    Ok(())
}

fn check_abs(path: &str, p: &Path) -> Result<()> {
    if !p.is_absolute() {
        return Err(Error::invalid(path, format!("`{}` must be an absolute path", p.display())));
    }
    Ok(())
}

impl MachineConfig {
    /// Checks every field; errors name the field (`disks[1].id`).
    pub fn validate(&self) -> Result<()> {
        check_name("name", &self.name, &['.', '-', '_'], 64)?;
        if !(1..=255).contains(&self.vcpus) {
            return Err(Error::invalid("vcpus", format!("{} is not within 1..=255", self.vcpus)));
        }
        if self.memory_mib < 16 {
            return Err(Error::invalid("memory_mib", format!("{} MiB is below 16 MiB", self.memory_mib)));
        }
        check_abs("qmp_socket", &self.qmp_socket)?;
        if self.qmp_socket.as_os_str().len() >= 108 {
            return Err(Error::invalid("qmp_socket", "a unix socket path must be shorter than 108 bytes"));
        }
        check_abs("pidfile", &self.pidfile)?;
        check_abs("log", &self.log)?;
        if let Some(sock) = &self.agent_socket {
            check_abs("agent_socket", sock)?;
            if sock.as_os_str().len() >= 108 {
                return Err(Error::invalid("agent_socket", "a unix socket path must be shorter than 108 bytes"));
            }
        }
        if let Some(console) = &self.console_log {
            check_abs("console_log", console)?;
        }
        if let Some(boot) = &self.boot {
            check_abs("boot.kernel", &boot.kernel)?;
            if let Some(initrd) = &boot.initrd {
                check_abs("boot.initrd", initrd)?;
            }
            if boot.cmdline.contains(['\n', '\r', '\0']) {
                return Err(Error::invalid("boot.cmdline", "the kernel command line must be one line"));
            }
        }
        let mut ids = std::collections::HashSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            check_name(&format!("disks[{i}].id"), &d.id, &['-', '_'], 26)?;
            check_abs(&format!("disks[{i}].path"), &d.path)?;
            if !ids.insert(d.id.as_str()) {
                return Err(Error::invalid(format!("disks[{i}].id"), format!("duplicate device id `{}`", d.id)));
            }
        }
        for (i, n) in self.nics.iter().enumerate() {
            check_name(&format!("nics[{i}].id"), &n.id, &['-', '_'], 26)?;
            check_mac(&format!("nics[{i}].mac"), &n.mac)?;
            if n.segment.is_empty() {
                return Err(Error::invalid(format!("nics[{i}].segment"), "segment name is empty"));
            }
            if !ids.insert(n.id.as_str()) {
                return Err(Error::invalid(format!("nics[{i}].id"), format!("duplicate device id `{}`", n.id)));
            }
        }
        if self.firmware == Firmware::Uefi {
            return Err(Error::not_supported("uefi firmware", crate::error::BACKEND));
        }
        Ok(())
    }

    /// The argv (without the binary), resolving `Accel::Auto` against this host's `/dev/kvm`.
    pub fn argv(&self) -> Result<Vec<OsString>> {
        self.argv_with_accel(self.accel.resolve(kvm_usable()))
    }

    /// The argv with `accel` (must be `Kvm` or `Tcg`; `Auto` is resolved as TCG).
    pub fn argv_with_accel(&self, accel: Accel) -> Result<Vec<OsString>> {
        self.validate()?;
        let accel = if accel == Accel::Kvm { "kvm" } else { "tcg" };
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
        push(&["-nodefaults", "-no-user-config", "-display", "none", "-machine", "q35", "-accel", accel]);
        push(&["-name", &self.name, "-uuid", &self.uuid.to_string()]);
        push(&["-smp", &self.vcpus.to_string(), "-m", &format!("{}M", self.memory_mib)]);
        a.push("-chardev".into());
        a.push(opt("socket,id=qmp,server=on,wait=off,path=", &self.qmp_socket, ""));
        a.extend(["-mon", "chardev=qmp,mode=control", "-pidfile"].map(OsString::from));
        a.push(self.pidfile.clone().into_os_string());
        if let Some(boot) = &self.boot {
            a.extend([OsString::from("-kernel"), boot.kernel.clone().into_os_string()]);
            if let Some(initrd) = &boot.initrd {
                a.extend([OsString::from("-initrd"), initrd.clone().into_os_string()]);
            }
            a.extend([OsString::from("-append"), OsString::from(&boot.cmdline)]);
        }
        if let Some(console) = &self.console_log {
            a.push("-chardev".into());
            a.push(opt("file,id=console0,path=", console, ""));
            a.extend(["-serial", "chardev:console0"].map(OsString::from));
        }
        if let Some(sock) = &self.agent_socket {
            a.push("-chardev".into());
            a.push(opt("socket,id=qga0,server=on,wait=off,path=", sock, ""));
            a.extend(["-device", "virtio-serial-pci,id=vser0", "-device"].map(OsString::from));
            a.push(format!("virtserialport,bus=vser0.0,chardev=qga0,name={AGENT_PORT}").into());
        }
        for d in &self.disks {
            let ro = if d.read_only { "on" } else { "off" };
            a.push("-blockdev".into());
            a.push(opt("driver=file,filename=", &d.path, &format!(",node-name={},read-only={ro}", file_node(&d.id))));
            a.push("-blockdev".into());
            a.push(
                format!("driver=qcow2,file={},node-name={},read-only={ro}", file_node(&d.id), fmt_node(&d.id)).into(),
            );
            a.push("-device".into());
            a.push(format!("virtio-blk-pci,drive={},id={}", fmt_node(&d.id), d.id).into());
        }
        for n in &self.nics {
            let group = segment_multicast(&n.segment);
            a.push("-netdev".into());
            a.push(format!("socket,id={}-net,mcast={group},localaddr=127.0.0.1", n.id).into());
            a.push("-device".into());
            a.push(format!("virtio-net-pci,netdev={}-net,mac={},id={}", n.id, n.mac, n.id).into());
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests;
