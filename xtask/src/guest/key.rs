//! The cache key: what the image is built from, resolved to exact versions, hashed.
//!
//! Inputs are the recipe (every embedded file plus [`RECIPE_VERSION`] and the build parameters),
//! the exact `package=version` set `mmdebstrap --simulate` says the rootfs gets, the kernel and
//! busybox-static `.deb` file names `apt-get download --print-uris` would fetch, and the
//! demo-app sources (embedded files too). Any point release or security update changes the key.

use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use sha2::{Digest, Sha256};

use super::files;
use crate::run::{Failure, Result};

/// Bump when the recipe changes in a way the embedded files do not show (e.g. a new step in Rust).
pub(crate) const RECIPE_VERSION: &str = "stagecore-guest-recipe-3";

/// The Debian release the guest is built from.
pub(crate) const SUITE: &str = "bookworm";

/// Packages the rootfs gets on top of minbase.
pub(crate) const INCLUDE: &[&str] = &["qemu-guest-agent", "busybox"];

/// The metapackage whose dependency names the current cloud kernel.
pub(crate) const KERNEL_META: &str = "linux-image-cloud-amd64";

/// The host's Debian mirrors, as its apt sources name them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Sources {
    /// URI serving `bookworm` (and `bookworm-updates` unless [`Sources::updates`] differs).
    pub(crate) main: String,
    /// URI serving `bookworm-updates`.
    pub(crate) updates: String,
    /// URI serving `bookworm-security`.
    pub(crate) security: String,
}

impl Sources {
    /// The three `deb` lines handed to mmdebstrap (pitfall 2: one line gives only the point release).
    pub(crate) fn deb_lines(&self) -> Vec<String> {
        vec![
            format!("deb {} {SUITE} main", self.main),
            format!("deb {} {SUITE}-updates main", self.updates),
            format!("deb {} {SUITE}-security main", self.security),
        ]
    }
}

/// Reads the host's apt sources (`/etc/apt/sources.list.d/*.sources`, `/etc/apt/sources.list`,
/// `/etc/apt/sources.list.d/*.list`) and picks the URIs serving the three suites.
pub(crate) fn host_sources() -> Result<Sources> {
    let mut entries = Vec::new();
    let mut read = Vec::new();
    let dir = Path::new("/etc/apt/sources.list.d");
    let mut files: Vec<_> = std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    files.sort();
    files.insert(0, Path::new("/etc/apt/sources.list").to_path_buf());
    for path in files {
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        match path.extension().and_then(|e| e.to_str()) {
            Some("sources") => entries.extend(parse_deb822(&text)),
            Some("list") => entries.extend(parse_one_line(&text)),
            _ => continue,
        }
        read.push(path.display().to_string());
    }
    pick_sources(&entries).ok_or_else(|| {
        Failure(format!(
            "guest-image: the host's apt sources ({}) name no `deb` URI for suites {SUITE} and {SUITE}-security \
             with component main; the guest is built from the same mirror the host uses",
            if read.is_empty() { "none found".to_string() } else { read.join(", ") }
        ))
    })
}

/// One `deb` source: URI, suite, components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SourceEntry {
    uri: String,
    suite: String,
    components: Vec<String>,
}

/// Parses deb822 `.sources` stanzas (`Types`, `URIs`, `Suites`, `Components`; `Enabled: no` skipped).
pub(crate) fn parse_deb822(text: &str) -> Vec<SourceEntry> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields = std::collections::BTreeMap::new();
        let mut last: Option<String> = None;
        for line in stanza.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                if let Some(key) = &last {
                    let v: &mut String = fields.entry(key.clone()).or_default();
                    v.push(' ');
                    v.push_str(line.trim());
                }
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                let key = k.trim().to_ascii_lowercase();
                fields.insert(key.clone(), v.trim().to_string());
                last = Some(key);
            }
        }
        let get = |k: &str| fields.get(k).map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>());
        let types = get("types").unwrap_or_default();
        let enabled = fields.get("enabled").is_none_or(|v| !v.eq_ignore_ascii_case("no"));
        if !enabled || !types.iter().any(|t| t == "deb") {
            continue;
        }
        let components = get("components").unwrap_or_default();
        for uri in get("uris").unwrap_or_default() {
            for suite in get("suites").unwrap_or_default() {
                out.push(SourceEntry { uri: uri.clone(), suite, components: components.clone() });
            }
        }
    }
    out
}

/// Parses one-line `deb [options] URI suite components...` entries.
pub(crate) fn parse_one_line(text: &str) -> Vec<SourceEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ") else { continue };
        let mut rest = rest.trim_start();
        if rest.starts_with('[') {
            let Some(end) = rest.find(']') else { continue };
            rest = rest[end + 1..].trim_start();
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else { continue };
        out.push(SourceEntry {
            uri: uri.to_string(),
            suite: suite.to_string(),
            components: words.map(str::to_string).collect(),
        });
    }
    out
}

/// Picks the URIs for the three suites; `-updates` falls back to the main mirror.
pub(crate) fn pick_sources(entries: &[SourceEntry]) -> Option<Sources> {
    let find = |suite: &str| {
        entries
            .iter()
            .find(|e| e.suite == suite && e.components.iter().any(|c| c == "main"))
            .map(|e| e.uri.trim_end_matches('/').to_string())
    };
    let main = find(SUITE)?;
    let security = find(&format!("{SUITE}-security"))?;
    let updates = find(&format!("{SUITE}-updates")).unwrap_or_else(|| main.clone());
    Some(Sources { main, updates, security })
}

/// Everything the key is computed from, resolved to exact versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Inputs {
    /// The mirrors used.
    pub(crate) sources: Sources,
    /// `package=version` of every package mmdebstrap installs, sorted.
    pub(crate) packages: Vec<String>,
    /// The exact kernel package, e.g. `linux-image-6.1.0-57-cloud-amd64`.
    pub(crate) kernel_package: String,
    /// Its `.deb` file name as `apt-get download` names it.
    pub(crate) kernel_deb: String,
    /// busybox-static's `.deb` file name (the initramfs shell).
    pub(crate) busybox_deb: String,
}

/// Resolves the inputs: `mmdebstrap --simulate` in one thread while the host's apt lists are
/// refreshed and the kernel is resolved in another (the simulation dominates: ~3 s).
pub(crate) fn resolve(sources: &Sources) -> Result<Inputs> {
    thread::scope(|scope| {
        let simulated = scope.spawn(|| simulate(sources));
        let kernel = resolve_kernel();
        let packages = simulated.join().map_err(|_| Failure("guest-image: simulation thread panicked".into()))??;
        let (kernel_package, kernel_deb, busybox_deb) = kernel?;
        Ok(Inputs { sources: sources.clone(), packages, kernel_package, kernel_deb, busybox_deb })
    })
}

/// How long a resolution is reused for cache lookups (the simulation costs 3-5 CPU-seconds,
/// 8-15 s wall on a loaded 2-core machine). A build always resolves afresh.
pub(crate) const RESOLVE_TTL: Duration = Duration::from_secs(3600);

/// Set to `1` to ignore the remembered resolution.
pub(crate) const REFRESH_ENV: &str = "STAGECORE_GUEST_REFRESH";

/// A remembered resolution (`<cache root>/.resolved.json`).
#[derive(Debug, Serialize, Deserialize)]
struct Memo {
    resolved_at: u64,
    inputs: Inputs,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The remembered inputs in `memo` when they are younger than [`RESOLVE_TTL`], for the same
/// sources, and [`REFRESH_ENV`] is not set; returns them with their age in seconds.
pub(crate) fn remembered(memo: &Path, sources: &Sources) -> Option<(Inputs, u64)> {
    if std::env::var_os(REFRESH_ENV).is_some_and(|v| !v.is_empty() && v != "0") {
        return None;
    }
    let memo: Memo = serde_json::from_str(&std::fs::read_to_string(memo).ok()?).ok()?;
    let age = now_secs().checked_sub(memo.resolved_at)?;
    (age < RESOLVE_TTL.as_secs() && memo.inputs.sources == *sources).then_some((memo.inputs, age))
}

/// Remembers `inputs` in `memo` (best effort: written to a temporary file, then renamed).
pub(crate) fn remember(memo: &Path, inputs: &Inputs) {
    let Ok(text) = serde_json::to_string_pretty(&Memo { resolved_at: now_secs(), inputs: inputs.clone() }) else {
        return;
    };
    let tmp = memo.with_extension(format!("tmp-{}", std::process::id()));
    if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, memo).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// `mmdebstrap --simulate` with the build's variant, packages and sources: the exact install set.
fn simulate(sources: &Sources) -> Result<Vec<String>> {
    let scratch = tempfile::Builder::new()
        .prefix("stagecore-guest-simulate.")
        .tempdir()
        .map_err(|e| Failure(format!("guest-image: temporary directory for mmdebstrap --simulate: {e}")))?;
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--simulate", "--verbose", "--variant=minbase", "--mode=root"])
        .arg(format!("--include={}", INCLUDE.join(",")))
        .arg(SUITE)
        .arg(scratch.path().join("simulated.tar"))
        .args(sources.deb_lines());
    let out = cmd.output().map_err(|e| Failure(format!("guest-image: could not start mmdebstrap: {e}")))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        let tail: Vec<&str> = text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(Failure(format!(
            "guest-image: mmdebstrap --simulate failed ({}); last lines:\n{}",
            out.status,
            tail.join("\n")
        )));
    }
    let packages = parse_simulated(&text);
    if packages.len() < 20 {
        return Err(Failure(format!(
            "guest-image: mmdebstrap --simulate listed only {} packages (expected ~100); output format changed?",
            packages.len()
        )));
    }
    Ok(packages)
}

/// `Inst pkg (version suite [arch])` lines of an apt simulation → sorted, unique `pkg=version`.
pub(crate) fn parse_simulated(text: &str) -> Vec<String> {
    let mut set: Vec<String> = text
        .lines()
        .filter_map(|line| {
            let rest = line.trim_start().strip_prefix("Inst ")?;
            let (name, rest) = rest.split_once(' ')?;
            let version = rest.strip_prefix('(')?.split([' ', ')']).next()?;
            Some(format!("{name}={version}"))
        })
        .collect();
    set.sort();
    set.dedup();
    set
}

/// Refreshes the host's apt lists (best effort: a held lock or no network keeps the old lists),
/// then resolves the kernel package and the two `.deb` file names.
fn resolve_kernel() -> Result<(String, String, String)> {
    let update = Command::new("apt-get").args(["update", "-qq"]).env("DEBIAN_FRONTEND", "noninteractive").output();
    if !update.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("guest-image: warning: `apt-get update` failed; resolving the kernel from the existing apt lists");
    }
    let depends = capture("apt-cache", &["depends", KERNEL_META])?;
    let kernel_package = parse_kernel_dependency(&depends).ok_or_else(|| {
        Failure(format!("guest-image: `apt-cache depends {KERNEL_META}` names no linux-image-* dependency"))
    })?;
    let uris = capture("apt-get", &["download", "--print-uris", &kernel_package, "busybox-static"])?;
    let names = parse_print_uris(&uris);
    let find = |prefix: &str| {
        names.iter().find(|n| n.starts_with(&format!("{prefix}_"))).cloned().ok_or_else(|| {
            Failure(format!("guest-image: `apt-get download --print-uris` did not name a .deb for {prefix}"))
        })
    };
    Ok((kernel_package.clone(), find(&kernel_package)?, find("busybox-static")?))
}

fn capture(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| Failure(format!("guest-image: could not start {program}: {e}")))?;
    if !out.status.success() {
        return Err(Failure(format!(
            "guest-image: `{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The first `Depends: linux-image-…` of `apt-cache depends linux-image-cloud-amd64`.
pub(crate) fn parse_kernel_dependency(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let dep = line.trim().strip_prefix("Depends:")?.trim();
        (dep.starts_with("linux-image-") && dep.ends_with("-cloud-amd64")).then(|| dep.to_string())
    })
}

/// File names (second field) of `apt-get download --print-uris` lines: `'URI' FILE SIZE SHA256:…`.
pub(crate) fn parse_print_uris(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with('\''))
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|f| f.ends_with(".deb") && !f.contains('/'))
        .map(str::to_string)
        .collect()
}

/// The recipe part of the key: version constant, build parameters and every embedded file.
pub(crate) fn recipe_text() -> String {
    let mut text = format!(
        "{RECIPE_VERSION}\nsuite={SUITE}\ninclude={}\nkernel-meta={KERNEL_META}\ndisk={}\ncmdline={}\nmodules={}\n",
        INCLUDE.join(","),
        super::image::DISK_SIZE,
        super::CMDLINE,
        super::kernel::MODULES.join(","),
    );
    for (name, content) in files::ALL {
        text.push_str(&format!("--- {name} ({} bytes)\n{content}\n", content.len()));
    }
    text
}

/// The full sha256 (hex) over the recipe and the resolved inputs.
pub(crate) fn key(inputs: &Inputs) -> String {
    let mut hash = Sha256::new();
    hash.update(recipe_text());
    for line in inputs.sources.deb_lines() {
        hash.update(format!("source {line}\n"));
    }
    for p in &inputs.packages {
        hash.update(format!("package {p}\n"));
    }
    hash.update(format!("kernel {} {}\nbusybox {}\n", inputs.kernel_package, inputs.kernel_deb, inputs.busybox_deb));
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "Types: deb\n# comment\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
                          Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                          Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n\
                          Components: main\n\nTypes: deb-src\nURIs: http://src.example\nSuites: bookworm\n\
                          Components: main\n";

    #[test]
    fn deb822_sources_give_the_three_suites() {
        let s = pick_sources(&parse_deb822(DEB822)).unwrap();
        assert_eq!(s.main, "http://deb.debian.org/debian");
        assert_eq!(s.updates, "http://deb.debian.org/debian");
        assert_eq!(s.security, "http://deb.debian.org/debian-security");
        assert_eq!(
            s.deb_lines(),
            [
                "deb http://deb.debian.org/debian bookworm main",
                "deb http://deb.debian.org/debian bookworm-updates main",
                "deb http://deb.debian.org/debian-security bookworm-security main",
            ]
        );
    }

    #[test]
    fn one_line_sources_with_options_and_a_local_mirror() {
        let text = "# deb http://old bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.local/debian/ \
                    bookworm main contrib\ndeb http://mirror.local/security bookworm-security main\n";
        let s = pick_sources(&parse_one_line(text)).unwrap();
        assert_eq!(s.main, "http://mirror.local/debian");
        assert_eq!(s.security, "http://mirror.local/security");
    }

    #[test]
    fn sources_without_security_or_disabled_are_rejected() {
        assert_eq!(pick_sources(&parse_one_line("deb http://m bookworm main\n")), None);
        let disabled = DEB822.replace("Suites: bookworm-security\n", "Suites: bookworm-security\nEnabled: no\n");
        assert_eq!(pick_sources(&parse_deb822(&disabled)), None);
        assert_eq!(
            pick_sources(&parse_one_line("deb http://m bookworm contrib\ndeb http://s bookworm-security main")),
            None
        );
    }

    #[test]
    fn simulated_install_lines_become_sorted_pins() {
        let text = "I: running apt-get\nInst zlib1g (1:1.2.13.dfsg-1 Debian:12.12/stable [amd64])\n\
                    Inst base-files (12.4+deb12u15 Debian:12.12/stable [amd64])\nConf zlib1g (1:1.2.13.dfsg-1 Debian)\n\
                    Inst base-files (12.4+deb12u15 Debian:12.12/stable [amd64])\n";
        assert_eq!(parse_simulated(text), ["base-files=12.4+deb12u15", "zlib1g=1:1.2.13.dfsg-1"]);
    }

    #[test]
    fn kernel_dependency_and_print_uris_parse() {
        let dep = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-57-cloud-amd64\n";
        assert_eq!(parse_kernel_dependency(dep).as_deref(), Some("linux-image-6.1.0-57-cloud-amd64"));
        assert_eq!(parse_kernel_dependency("x\n  Depends: libc6\n"), None);
        let uris = "'http://deb.debian.org/debian/pool/main/b/busybox/busybox-static_1.35.0-4%2bdeb12u1%2bb1_amd64.deb' \
                    busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb 928188 SHA256:3d3f\nW: something\n";
        assert_eq!(parse_print_uris(uris), ["busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"]);
    }

    #[test]
    fn key_changes_with_any_input() {
        let sources = pick_sources(&parse_deb822(DEB822)).unwrap();
        let inputs = Inputs {
            sources,
            packages: vec!["a=1".into(), "b=2".into()],
            kernel_package: "linux-image-6.1.0-57-cloud-amd64".into(),
            kernel_deb: "linux-image-6.1.0-57-cloud-amd64_6.1.158-1_amd64.deb".into(),
            busybox_deb: "busybox-static_1_amd64.deb".into(),
        };
        let k = key(&inputs);
        assert_eq!(k.len(), 64);
        assert_eq!(k, key(&inputs.clone()));
        let mut other = inputs.clone();
        other.packages[1] = "b=3".into();
        assert_ne!(key(&other), k);
        let mut other = inputs.clone();
        other.kernel_deb = "linux-image-6.1.0-58-cloud-amd64_6.1.159-1_amd64.deb".into();
        assert_ne!(key(&other), k);
        let mut other = inputs;
        other.sources.main = "http://elsewhere/debian".into();
        assert_ne!(key(&other), k);
    }

    #[test]
    fn remembered_inputs_need_the_same_sources_and_expire() {
        let tmp = tempfile::tempdir().unwrap();
        let memo = tmp.path().join(".resolved.json");
        let sources = pick_sources(&parse_deb822(DEB822)).unwrap();
        let inputs = Inputs {
            sources: sources.clone(),
            packages: vec!["a=1".into()],
            kernel_package: "k".into(),
            kernel_deb: "k_1_amd64.deb".into(),
            busybox_deb: "b_1_amd64.deb".into(),
        };
        assert!(remembered(&memo, &sources).is_none());
        remember(&memo, &inputs);
        let (again, age) = remembered(&memo, &sources).unwrap();
        assert_eq!(again, inputs);
        assert!(age < 60);
        let mut elsewhere = sources.clone();
        elsewhere.security = "http://other/security".into();
        assert!(remembered(&memo, &elsewhere).is_none());
        let old = Memo { resolved_at: now_secs() - RESOLVE_TTL.as_secs() - 1, inputs };
        std::fs::write(&memo, serde_json::to_string(&old).unwrap()).unwrap();
        assert!(remembered(&memo, &sources).is_none());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1, "no temporary files left");
    }

    #[test]
    fn recipe_covers_every_embedded_file() {
        let text = recipe_text();
        for (name, content) in files::ALL {
            assert!(text.contains(name) && text.contains(content), "{name} not in the recipe text");
        }
        assert!(text.contains(RECIPE_VERSION));
    }
}
