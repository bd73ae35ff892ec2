//! Parsing the collector script's output into a [`GuestInventory`]. Never panics: unknown
//! sections and malformed lines are skipped, and what could not be read is said in the inventory.

use std::collections::BTreeMap;

use time::OffsetDateTime;

use super::{GuestInventory, OsRelease, Package, Service, WatchedPath};

/// Parses the output of [`super::SCRIPT`] for `machine`. Fails only when the output is not the
/// collector's at all (no `@@end` line: cut off, or another program answered).
pub(crate) fn parse(machine: &str, out: &str) -> Result<GuestInventory, String> {
    let mut sections: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut current: Option<&str> = None;
    let mut ended = false;
    for line in out.lines() {
        if let Some(name) = line.strip_prefix("@@") {
            if name == "end" {
                ended = true;
                break;
            }
            current = Some(name);
            sections.entry(name).or_default();
        } else if let Some(name) = current {
            sections.entry(name).or_default().push(line);
        }
    }
    if !ended {
        return Err("the inventory output has no end marker (cut off, or not the collector's output)".into());
    }
    let section = |name: &str| sections.get(name).cloned().unwrap_or_default();
    let mut inv = GuestInventory {
        machine: machine.into(),
        collected_at: OffsetDateTime::now_utc(),
        millis: 0,
        output_bytes: out.len() as u64,
        os: os_release(&section("os")),
        kernel: section("kernel").first().map(|s| s.trim().to_string()).unwrap_or_default(),
        hostname: section("hostname").first().map(|s| s.trim().to_string()).unwrap_or_default(),
        package_format: String::new(),
        packages: BTreeMap::new(),
        service_manager: String::new(),
        services: BTreeMap::new(),
        ports: BTreeMap::new(),
        files: BTreeMap::new(),
        watched: Vec::new(),
    };
    (inv.package_format, inv.packages) = packages(&section("packages"));
    (inv.service_manager, inv.services) = services(&section("services"));
    inv.ports = ports(&section("ports"));
    (inv.files, inv.watched) = files(&section("files"));
    Ok(inv)
}

fn unquote(v: &str) -> String {
    let v = v.trim();
    let inner = v
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .or_else(|| v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
        .unwrap_or(v);
    inner.replace("\\\"", "\"").replace("\\\\", "\\")
}

fn os_release(lines: &[&str]) -> OsRelease {
    let mut os = OsRelease::default();
    for line in lines {
        let Some((k, v)) = line.split_once('=') else { continue };
        match k.trim() {
            "ID" => os.id = unquote(v),
            "VERSION_ID" => os.version_id = unquote(v),
            "PRETTY_NAME" => os.pretty_name = unquote(v),
            _ => {}
        }
    }
    os
}

fn format_of(lines: &[&str]) -> String {
    lines.first().and_then(|l| l.strip_prefix("format ")).unwrap_or("none").trim().to_string()
}

fn insert_package(out: &mut BTreeMap<String, Package>, name: &str, version: &str, arch: &str) {
    if name.is_empty() {
        return;
    }
    let pkg = Package { version: version.into(), arch: arch.into() };
    if out.contains_key(name) {
        // The same package for a second architecture (multi-arch): key both by name:arch.
        if let Some(first) = out.remove(name) {
            out.insert(format!("{name}:{}", first.arch), first);
        }
        out.insert(format!("{name}:{arch}"), pkg);
    } else if out.keys().any(|k| k.starts_with(&format!("{name}:"))) {
        out.insert(format!("{name}:{arch}"), pkg);
    } else {
        out.insert(name.into(), pkg);
    }
}

fn packages(lines: &[&str]) -> (String, BTreeMap<String, Package>) {
    let format = format_of(lines);
    let mut out = BTreeMap::new();
    for line in lines.iter().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        match (format.as_str(), f.as_slice()) {
            // `${db:Status-Abbrev}` is three characters: desired, status, error; `i` in the middle
            // means installed (`ii`, `hi`).
            ("dpkg", [status, name, version, arch, ..]) if status.as_bytes().get(1) == Some(&b'i') => {
                insert_package(&mut out, name.trim(), version.trim(), arch.trim())
            }
            ("rpm", [name, version, arch, ..]) => {
                insert_package(&mut out, name.trim(), version.trim().trim_start_matches(':'), arch.trim())
            }
            _ => {}
        }
    }
    (format, out)
}

fn services(lines: &[&str]) -> (String, BTreeMap<String, Service>) {
    let format = format_of(lines);
    let mut out: BTreeMap<String, Service> = BTreeMap::new();
    for line in lines.iter().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        match (format.as_str(), f.as_slice()) {
            ("systemd", ["F", unit, state, ..]) => {
                let name = unit.strip_suffix(".service").unwrap_or(unit);
                out.entry(name.into()).or_insert_with(|| Service { state: String::new(), running: false }).state =
                    (*state).into();
            }
            ("systemd", ["R", unit, ..]) => {
                let name = unit.strip_suffix(".service").unwrap_or(unit);
                out.entry(name.into()).or_insert_with(|| Service { state: "runtime".into(), running: false }).running =
                    true;
            }
            ("svc", [name, state, ..]) => {
                out.insert((*name).into(), Service { state: "enabled".into(), running: *state == "running" });
            }
            _ => {}
        }
    }
    (format, out)
}

/// An address from /proc/net/{tcp,udp}{,6}: hex, each 32-bit word in host (little-endian) order.
fn address(hex: &str) -> Option<String> {
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::swap_bytes);
    match hex.len() {
        8 => Some(std::net::Ipv4Addr::from(word(hex)?).to_string()),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                let w = word(&hex[i * 8..i * 8 + 8])?;
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
            }
            Some(std::net::Ipv6Addr::from(bytes).to_string())
        }
        _ => None,
    }
}

fn ports(lines: &[&str]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut proto = "";
    for line in lines {
        if let Some(file) = line.strip_prefix("file ") {
            proto = if file.starts_with("tcp") {
                "tcp"
            } else if file.starts_with("udp") {
                "udp"
            } else {
                ""
            };
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let [_, local, remote, state, ..] = f.as_slice() else { continue };
        let listening = match proto {
            "tcp" => *state == "0A",
            "udp" => remote.split(':').next().is_some_and(|a| a.chars().all(|c| c == '0')),
            _ => false,
        };
        if !listening {
            continue;
        }
        let Some((addr, port)) = local.split_once(':') else { continue };
        let (Some(addr), Ok(port)) = (address(addr), u16::from_str_radix(port, 16)) else { continue };
        let list = out.entry(format!("{proto}:{port}")).or_default();
        if !list.contains(&addr) {
            list.push(addr);
            list.sort();
        }
    }
    out
}

/// A `sha256sum` line: `HASH  PATH`, or `\HASH  PATH` with `\\` and `\n` escaped in PATH.
fn hash_line(line: &str) -> Option<(String, String)> {
    let (escaped, line) = match line.strip_prefix('\\') {
        Some(rest) => (true, rest),
        None => (false, line),
    };
    let (hash, path) = line.split_once("  ").or_else(|| line.split_once(" *"))?;
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let path = if escaped { path.replace("\\n", "\n").replace("\\\\", "\\") } else { path.to_string() };
    Some((path, hash.to_ascii_lowercase()))
}

fn files(lines: &[&str]) -> (BTreeMap<String, String>, Vec<WatchedPath>) {
    let mut files = BTreeMap::new();
    let mut watched: Vec<WatchedPath> = Vec::new();
    for line in lines {
        if let Some(p) = line.strip_prefix("missing ") {
            watched.push(WatchedPath { path: p.into(), files: 0, skipped: None, missing: true });
        } else if let Some(rest) = line.strip_prefix("path ") {
            let mut f = rest.splitn(3, ' ');
            let (mode, opts, path) = (f.next().unwrap_or(""), f.next().unwrap_or(""), f.next().unwrap_or(""));
            let skipped = (mode == "skip").then(|| {
                format!(
                    "mounted with access-time updates ({opts}): hashing would write the guest's disk \
                     (set hash_on_atime_mounts to hash with O_NOATIME)"
                )
            });
            watched.push(WatchedPath { path: path.into(), files: 0, skipped, missing: false });
        } else if let Some((path, hash)) = hash_line(line) {
            if let Some(w) = watched.last_mut() {
                w.files += 1;
            }
            files.insert(path, hash);
        }
    }
    (files, watched)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "@@os\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID=\"12\"\n\
@@kernel\n6.1.0-57-cloud-amd64\n@@hostname\nweb\n@@packages\nformat dpkg\nii \tbash\t5.2.15-2+b8\tamd64\n\
rc \told\t1.0\tamd64\nii \tlibc6\t2.36-9\tamd64\nii \tlibc6\t2.36-9\ti386\n\
@@services\nformat systemd\nF cron.service enabled enabled\nF getty@.service enabled enabled\n\
R cron.service loaded active running Regular background program processing daemon\n\
@@ports\nfile tcp\n  sl  local_address rem_address   st\n   0: 00000000:1F90 00000000:0000 0A 0\n\
   1: 0100007F:0016 0100007F:9CC8 01 0\nfile tcp6\n   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 0\n\
   1: 00000000000000000000000001000000:0019 00000000000000000000000000000000:0000 0A 0\n\
file udp\n 1284: 14550FEF:93B8 00000000:0000 07 0\n 1285: 14550FEF:93B9 0100007F:0035 01 0\n\
@@files\npath bulk rw,noatime /etc\n\
eded7927860d99905445d40d1002ce7c3de48610b7a1881d44a9203a70891afd  /etc/app/app.conf\n\
\\bc03b2f6944643f5913ad5bf08bf9dc920d07b6bee3dff18f7b06211efd4c21c  /etc/we\\nird\n\
missing /opt/app\npath skip rw,relatime /var\n@@end\n";

    #[test]
    fn parses_every_section() {
        let inv = parse("web", SAMPLE).unwrap();
        assert_eq!((inv.os.id.as_str(), inv.os.version_id.as_str()), ("debian", "12"));
        assert_eq!(inv.os.pretty_name, "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(inv.kernel, "6.1.0-57-cloud-amd64");
        assert_eq!(inv.packages["bash"].version, "5.2.15-2+b8");
        assert!(!inv.packages.contains_key("old"), "removed-but-configured packages are not installed");
        assert!(inv.packages.contains_key("libc6:amd64") && inv.packages.contains_key("libc6:i386"));
        assert!(inv.services["cron"].running && inv.services["cron"].state == "enabled");
        assert!(!inv.services["getty@"].running);
        assert_eq!(inv.ports["tcp:8080"], vec!["0.0.0.0".to_string()]);
        assert_eq!(inv.ports["tcp:22"], vec!["::".to_string()]);
        assert_eq!(inv.ports["udp:37816"], vec!["239.15.85.20".to_string()]);
        assert!(!inv.ports.contains_key("udp:37817"), "a connected UDP socket is not listening");
        assert_eq!(inv.ports["tcp:25"], vec!["::1".to_string()]);
        assert_eq!(inv.ports.len(), 4);
        assert_eq!(inv.files.len(), 2);
        assert!(inv.files.contains_key("/etc/we\nird"));
        assert_eq!(inv.watched.len(), 3);
        assert_eq!(inv.watched[0].files, 2);
        assert!(inv.watched[1].missing);
        assert!(inv.watched[2].skipped.as_deref().unwrap().contains("relatime"));
    }

    #[test]
    fn cut_off_output_is_an_error() {
        assert!(parse("web", &SAMPLE[..SAMPLE.len() - 7]).is_err());
        assert!(parse("web", "garbage\n\u{0}\n").is_err());
    }

    #[test]
    fn rpm_and_svc_formats() {
        let out = "@@packages\nformat rpm\nbash\t:5.2.15-3.el9\tx86_64\nkernel\t1:6.1-1\tx86_64\n\
@@services\nformat svc\napp running\ncron stopped\n@@end\n";
        let inv = parse("m", out).unwrap();
        assert_eq!(inv.packages["bash"].version, "5.2.15-3.el9");
        assert_eq!(inv.packages["kernel"].version, "1:6.1-1");
        assert!(inv.services["app"].running && !inv.services["cron"].running);
        assert_eq!(inv.service_manager, "svc");
    }
}
