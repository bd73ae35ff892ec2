//! Shared test helpers: real qemu-img / qemu-io invocations (fail loudly when QEMU is missing).
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use stagecore_qcow2::Extent;

/// Runs a command, panicking with its stderr if it cannot start or fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?} (is QEMU installed?): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `qemu-img <args>`.
pub fn qemu_img(args: &[&str]) -> Output {
    run(Command::new("qemu-img").args(args))
}

/// `qemu-io -f <fmt> -c <cmd>... <file>`.
pub fn qemu_io(fmt: &str, file: &Path, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(file);
    let out = run(&mut c);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!text.contains("Pattern verification failed"), "qemu-io {cmds:?}: {text}");
    assert!(!text.to_lowercase().contains("failed"), "qemu-io {cmds:?}: {text}");
    text
}

/// Creates a qcow2 image with qemu-img.
pub fn create_qcow2(path: &Path, size: &str) {
    qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), size]);
}

/// `qemu-img info --output=json`.
pub fn info_json(path: &Path) -> serde_json::Value {
    let out = qemu_img(&["info", "--output=json", path.to_str().unwrap()]);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `qemu-img check` must pass (exit 0: no errors, no leaks).
pub fn check(path: &Path) {
    qemu_img(&["check", "-q", path.to_str().unwrap()]);
}

/// Extents of `qemu-img map --output=json` whose depth is below `depth` (allocated in the top
/// `depth` layers), merged.
pub fn qemu_map(path: &Path, depth: u64) -> Vec<Extent> {
    let out = qemu_img(&["map", "--output=json", path.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut ext = Vec::new();
    for e in v.as_array().unwrap() {
        let d = e["depth"].as_u64().unwrap();
        let present = e.get("present").and_then(|p| p.as_bool()).unwrap_or(true);
        if d < depth && present {
            ext.push(Extent { offset: e["start"].as_u64().unwrap(), length: e["length"].as_u64().unwrap() });
        }
    }
    stagecore::extent::normalize(ext)
}

/// A unique temp dir.
pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// `dir/name`.
pub fn p(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// Shorthand for an extent.
pub fn ext(offset: u64, length: u64) -> Extent {
    Extent { offset, length }
}

/// Names in a directory, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

pub const K: u64 = 1024;
pub const M: u64 = 1024 * 1024;
