//! Developer tasks for the stagecore workspace, run as `cargo xtask <command>`
//! (the alias lives in `.cargo/config.toml`).
//!
//! - `setup` — install QEMU and libvirt if missing (root on Debian) and start the daemons.
//! - `test` — setup, the guest image, removal of what earlier test runs left (`sweep`), then fmt,
//!   clippy, nextest, doctests, the quickstart (debug) and docs: what CI runs.
//! - `demo [ARGS]` — setup, then the `quickstart` example with `ARGS`.
//! - `hosts [start|stop|status]` — the two extra libvirtd hosts of the remote tests (namespaces).
//! - `guest-image` — build (or find cached) the test guest image and print its directory.
//! - `sweep` — remove what killed test runs left (libvirt test domains, test QEMUs; see `sweep`).
//! - `bench [ARGS]` — `cargo bench -p stagekit ARGS`.
//!
//! Exits non-zero with a message naming the failed step.

mod apt;
mod guest;
mod hosts;
mod run;
mod setup;
mod sweep;
mod tasks;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  setup          install QEMU + libvirt if missing (root on Debian) and start virtlogd/libvirtd
  test           setup, guest image, sweep of earlier test leftovers, then fmt --check, clippy -D warnings, nextest, doctests, doc -D warnings
  demo [ARGS]    setup, guest image, then `cargo run --release -p stagekit --example quickstart -- ARGS`
  hosts [SUB]    start (default; reuses running hosts), stop or status the libvirtd test hosts A and B
  guest-image    build (or find cached) the test guest image; prints its directory
  sweep          remove test domains/directories and kill test QEMUs that earlier runs left
  bench [ARGS]   `cargo bench -p stagekit ARGS`
  help           show this text
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = match args.split_first() {
        Some((command, rest)) => (command.as_str(), rest),
        None => ("help", &[][..]),
    };
    let result = match command {
        "setup" if rest.is_empty() => setup::setup(),
        "test" if rest.is_empty() => tasks::test(),
        "guest-image" if rest.is_empty() => guest::command(),
        "sweep" if rest.is_empty() => {
            sweep::sweep();
            Ok(())
        }
        "setup" | "test" | "guest-image" | "sweep" => {
            eprintln!("xtask: `{command}` takes no arguments\n\n{USAGE}");
            return ExitCode::from(2);
        }
        "hosts" => hosts::command(rest),
        "__relay" => hosts::relay(rest),
        "demo" => tasks::demo(rest),
        "bench" => tasks::bench(rest),
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("xtask: unknown command `{other}`\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("xtask: error: {failure}");
            ExitCode::FAILURE
        }
    }
}
