//! The cargo-driven tasks: `test` (the CI gate), `demo` and `bench`. Every cargo call runs
//! in the workspace root with stdio inherited, so tool output (nextest's summary included)
//! passes through unchanged; `test` stops at the first failing step and names it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::guest;
use crate::run::{Result, run};
use crate::setup::setup;

/// One step of `cargo xtask test`.
struct Step {
    name: &'static str,
    args: Vec<&'static str>,
    env: Vec<(&'static str, &'static str)>,
}

impl Step {
    fn new(name: &'static str, args: &[&'static str]) -> Self {
        Self { name, args: args.to_vec(), env: Vec::new() }
    }

    fn env(mut self, key: &'static str, value: &'static str) -> Self {
        self.env.push((key, value));
        self
    }
}

/// The workspace root (the parent of this crate's directory).
pub(crate) fn root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// A `cargo` command in the workspace root, using the cargo that runs this xtask.
fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(program);
    cmd.current_dir(root());
    cmd
}

fn nextest_available() -> bool {
    cargo().args(["nextest", "--version"]).output().is_ok_and(|o| o.status.success())
}

/// The steps of `cargo xtask test`, in order.
fn test_steps(nextest: bool) -> Vec<Step> {
    let tests = if nextest {
        Step::new("nextest", &["nextest", "run", "--workspace", "--all-features", "--no-fail-fast"])
    } else {
        Step::new("cargo test", &["test", "--workspace", "--all-features", "--no-fail-fast"])
    };
    vec![
        Step::new("fmt", &["fmt", "--all", "--", "--check"]),
        Step::new("clippy", &["clippy", "--workspace", "--all-targets", "--all-features", "--", "-D", "warnings"]),
        tests.env("STAGECORE_LIVE", "1"),
        Step::new("doctests", &["test", "--workspace", "--all-features", "--doc"]).env("STAGECORE_LIVE", "1"),
        // The README's first command, as a debug build: the main job must work on every CI run.
        Step::new("quickstart", &["run", "-p", "stagekit", "--example", "quickstart"]),
        Step::new("doc", &["doc", "--workspace", "--no-deps", "--all-features"]).env("RUSTDOCFLAGS", "-D warnings"),
    ]
}

/// `cargo xtask test`: setup, the guest image, then fmt, clippy, tests, doctests, the quickstart
/// and docs. Every cargo step gets `STAGECORE_GUEST_IMAGE=<image dir>` and the URIs of the
/// libvirtd test hosts (`STAGECORE_LIBVIRT_HOST_A`/`_B`, see [`crate::hosts`]).
pub(crate) fn test() -> Result<()> {
    setup()?;
    let hosts = crate::hosts::ensure()?;
    let image = guest::for_tasks()?;
    crate::sweep::sweep();
    let nextest = nextest_available();
    if !nextest {
        println!("xtask: cargo-nextest not found, falling back to `cargo test`");
    }
    for step in test_steps(nextest) {
        println!("xtask: step {}: cargo {}", step.name, step.args.join(" "));
        let mut cmd = cargo();
        cmd.args(&step.args).envs(step.env.iter().copied()).env(guest::ENV_VAR, &image);
        // A one-shot run gains nothing from incremental caches; they would double the
        // disk the build takes (CI's disk is not large). A caller's own setting wins.
        if std::env::var_os("CARGO_INCREMENTAL").is_none() {
            cmd.env("CARGO_INCREMENTAL", "0");
        }
        cmd.envs(hosts.iter().map(|(k, v)| (*k, v.as_str())));
        run(&format!("test step `{}`", step.name), &mut cmd)?;
    }
    println!("xtask: all test steps passed");
    Ok(())
}

/// `cargo xtask demo [ARGS...]`: setup, the guest image, then the quickstart example with `ARGS`
/// (with `STAGECORE_GUEST_IMAGE=<image dir>`).
pub(crate) fn demo(args: &[String]) -> Result<()> {
    setup()?;
    let image = guest::for_tasks()?;
    let mut cmd = cargo();
    cmd.env(guest::ENV_VAR, &image);
    cmd.args(["run", "--release", "-p", "stagekit", "--example", "quickstart"]);
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    run("demo", &mut cmd)
}

/// `cargo xtask bench [ARGS...]`: `cargo bench -p stagekit ARGS`.
pub(crate) fn bench(args: &[String]) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "stagekit"]).args(args);
    run("bench", &mut cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_steps_run_in_ci_order_with_live_env_on_tests_only() {
        let steps = test_steps(true);
        let names: Vec<_> = steps.iter().map(|s| s.name).collect();
        assert_eq!(names, ["fmt", "clippy", "nextest", "doctests", "quickstart", "doc"]);
        assert_eq!(steps[2].env, [("STAGECORE_LIVE", "1")]);
        assert_eq!(steps[3].env, [("STAGECORE_LIVE", "1")]);
        assert_eq!(steps[5].env, [("RUSTDOCFLAGS", "-D warnings")]);
        assert!(steps[0].env.is_empty() && steps[1].env.is_empty());
        assert_eq!(steps[1].args[steps[1].args.len() - 2..], ["-D", "warnings"]);
    }

    #[test]
    fn without_nextest_tests_fall_back_to_cargo_test() {
        let steps = test_steps(false);
        assert_eq!(steps[2].name, "cargo test");
        assert_eq!(steps[2].args[0], "test");
    }

    #[test]
    fn root_is_the_workspace() {
        assert!(root().join("xtask").join("Cargo.toml").is_file());
    }
}
