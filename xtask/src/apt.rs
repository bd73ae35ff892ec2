//! Pure helpers for installing QEMU and libvirt on Debian: the package list, the exact
//! `apt-get install` command, and parsers for `apt-cache policy` and `--version` output.
//!
//! Nothing here runs a process, so every decision the setup step makes about *what* to run
//! is unit-tested without touching the machine.

/// Debian packages that provide everything `setup` needs. `qemu-utils` is pinned to the
/// candidate version of `qemu-system-x86` when installing (see [`install_command`]).
pub(crate) const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-utils",
    "libvirt-daemon-system",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
    "libvirt-dev",
    "pkg-config",
    // the guest image build: mmdebstrap for the rootfs, e2fsprogs for `mke2fs -d`
    "mmdebstrap",
    "e2fsprogs",
    // UEFI firmware (OVMF) for the libvirt host-side file tests (NVRAM of `firmware='efi'` domains)
    "ovmf",
    // mkfs.xfs for the reflink test of full copies (an XFS loop image with `-m reflink=1`)
    "xfsprogs",
];

/// A process to run: program, arguments and extra environment variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CommandSpec {
    /// Program name or path.
    pub(crate) program: String,
    /// Arguments, without the program name.
    pub(crate) args: Vec<String>,
    /// Extra environment variables set for this process only.
    pub(crate) env: Vec<(String, String)>,
}

impl CommandSpec {
    /// Renders the command as one shell-like line for logs and error messages.
    pub(crate) fn display(&self) -> String {
        let env = self.env.iter().map(|(k, v)| format!("{k}={v} "));
        let mut line: String = env.collect();
        line.push_str(&self.program);
        for arg in &self.args {
            line.push(' ');
            line.push_str(arg);
        }
        line
    }
}

/// The single `apt-get install` call that installs QEMU and libvirt.
///
/// Debian 12 machines may carry `qemu-utils` 10.0 from backports, which conflicts with the
/// distribution's `qemu-system-x86` 7.2. Pinning `qemu-utils` to the candidate version of
/// `qemu-system-x86` (with `--allow-downgrades`) gives matching versions of both.
pub(crate) fn install_command(qemu_candidate: &str) -> CommandSpec {
    let mut args: Vec<String> =
        ["install", "-y", "--no-install-recommends", "--allow-downgrades"].iter().map(|s| s.to_string()).collect();
    for pkg in PACKAGES {
        if *pkg == "qemu-utils" {
            args.push(format!("qemu-utils={qemu_candidate}"));
        } else {
            args.push((*pkg).to_string());
        }
    }
    CommandSpec {
        program: "apt-get".to_string(),
        args,
        env: vec![("DEBIAN_FRONTEND".to_string(), "noninteractive".to_string())],
    }
}

/// The `apt-get update` call that precedes the install.
pub(crate) fn update_command() -> CommandSpec {
    CommandSpec {
        program: "apt-get".to_string(),
        args: vec!["update".to_string()],
        env: vec![("DEBIAN_FRONTEND".to_string(), "noninteractive".to_string())],
    }
}

/// Extracts the `Candidate:` version from `apt-cache policy <pkg>` output.
///
/// Returns `None` when there is no candidate (`(none)`) or the value does not look like a
/// Debian version (so nothing odd is ever spliced into the apt command line).
pub(crate) fn parse_candidate(policy_output: &str) -> Option<String> {
    let value = policy_output.lines().map(str::trim).find_map(|line| line.strip_prefix("Candidate:"))?.trim();
    let valid = !value.is_empty()
        && value.starts_with(|c: char| c.is_ascii_digit())
        && value.chars().all(|c| c.is_ascii_alphanumeric() || ".+~:-".contains(c));
    valid.then(|| value.to_string())
}

/// Parses `major.minor` from the first `version X.Y[.Z]` in a QEMU tool's `--version` output
/// (`qemu-img version 7.2.22 (...)`, `QEMU emulator version 7.2.22 (...)`).
pub(crate) fn parse_qemu_version(output: &str) -> Option<(u32, u32)> {
    let mut words = output.split_whitespace();
    while let Some(word) = words.next() {
        if word == "version" {
            let mut parts = words.next()?.split('.');
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.trim_end_matches(|c: char| !c.is_ascii_digit()).parse().ok()?;
            return Some((major, minor));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_command_pins_qemu_utils_and_is_one_noninteractive_call() {
        let cmd = install_command("1:7.2+dfsg-7+deb12u18+b3");
        assert_eq!(cmd.program, "apt-get");
        assert_eq!(
            cmd.args,
            [
                "install",
                "-y",
                "--no-install-recommends",
                "--allow-downgrades",
                "qemu-system-x86",
                "qemu-utils=1:7.2+dfsg-7+deb12u18+b3",
                "libvirt-daemon-system",
                "libvirt-daemon-driver-qemu",
                "libvirt-clients",
                "libvirt-dev",
                "pkg-config",
                "mmdebstrap",
                "e2fsprogs",
                "ovmf",
                "xfsprogs",
            ]
        );
        assert_eq!(cmd.env, [("DEBIAN_FRONTEND".to_string(), "noninteractive".to_string())]);
        assert_eq!(
            cmd.display(),
            "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
             --allow-downgrades qemu-system-x86 qemu-utils=1:7.2+dfsg-7+deb12u18+b3 \
             libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config \
             mmdebstrap e2fsprogs ovmf xfsprogs"
        );
    }

    #[test]
    fn update_command_is_apt_get_update() {
        let cmd = update_command();
        assert_eq!(cmd.display(), "DEBIAN_FRONTEND=noninteractive apt-get update");
    }

    #[test]
    fn candidate_is_read_from_apt_cache_policy() {
        let out = "qemu-system-x86:\n  Installed: (none)\n  Candidate: 1:7.2+dfsg-7+deb12u18+b3\n  \
                   Version table:\n     1:7.2+dfsg-7+deb12u18+b3 500\n";
        assert_eq!(parse_candidate(out).as_deref(), Some("1:7.2+dfsg-7+deb12u18+b3"));
    }

    #[test]
    fn missing_or_odd_candidate_is_rejected() {
        assert_eq!(parse_candidate("pkg:\n  Candidate: (none)\n"), None);
        assert_eq!(parse_candidate(""), None);
        assert_eq!(parse_candidate("  Candidate: 1.0; rm -rf /\n"), None);
        assert_eq!(parse_candidate("  Candidate:\n"), None);
    }

    #[test]
    fn qemu_versions_parse_major_minor() {
        assert_eq!(parse_qemu_version("qemu-img version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n"), Some((7, 2)));
        assert_eq!(parse_qemu_version("QEMU emulator version 10.0.3 (Debian 1:10.0.3+ds-1~bpo12+1)\n"), Some((10, 0)));
        assert_eq!(parse_qemu_version("QEMU emulator version 9.1\n"), Some((9, 1)));
        assert_eq!(parse_qemu_version("no version here"), None);
        assert_eq!(parse_qemu_version("version x.y"), None);
    }
}
