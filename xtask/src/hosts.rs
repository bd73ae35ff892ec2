//! `cargo xtask hosts [start|stop|status]` and the first step of `cargo xtask test`: two extra
//! libvirtd "hosts" for the libvirt backend's remote tests, each in network and mount namespaces
//! this task creates.
//!
//! Layout (see docs/backends/libvirt.md, "Remote hosts in the tests"):
//!
//! * network namespaces `stagecore-host-a` / `stagecore-host-b` (`ip netns add`), joined by a veth
//!   pair created inside them (`sc-veth-a` 10.77.0.1/24 in A, `sc-veth-b` 10.77.0.2/24 in B): the
//!   addresses exist only inside those namespaces;
//! * per host a mount namespace (`unshare --mount`) whose `/run`, `/etc/libvirt`,
//!   `/var/lib/libvirt`, `/var/log/libvirt` and `/var/cache/libvirt` are bind mounts of fresh
//!   directories under `/var/lib/stagecore/hosts/<host>/`, with its own `virtlogd` and a
//!   `libvirtd --listen` on TCP at the namespace address (port 16509, `auth_tcp = "none"`, no TLS);
//! * per host a relay (this binary, `xtask __relay`): it listens on a loopback address of the
//!   root namespace (127.0.0.2:16509 for A, 127.0.0.3:16509 for B) and opens each upstream
//!   connection from inside the host's network namespace to the host's address. The tests run in
//!   the root namespace and so talk only to loopback; everything behind the relay is inside the
//!   namespaces this task made.
//!
//! The tests get `STAGECORE_LIBVIRT_HOST_A` / `_B` = `qemu+tcp://127.0.0.x:16509/system`.
//! `start` is idempotent: hosts that answer are reused, and every domain, storage pool and
//! network left on them by an earlier run is removed (clean state per run); anything else (a
//! half-started host, a dead relay) is stopped — only processes found in the task's own pid
//! files and namespaces, by pid — and started afresh.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::run::{Failure, Result, find_program, run, stdout_of, succeeds_within};

/// One extra libvirt host.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Host {
    /// Short name (`a`, `b`).
    pub(crate) name: &'static str,
    /// Network namespace name (`/run/netns/<netns>`).
    pub(crate) netns: &'static str,
    /// The veth end inside the namespace.
    veth: &'static str,
    /// Its address inside the namespace: where libvirtd listens.
    pub(crate) addr: &'static str,
    /// The root-namespace loopback address the relay listens on.
    pub(crate) relay: &'static str,
    /// The environment variable the tests read the URI from.
    pub(crate) env: &'static str,
}

/// libvirtd's TCP port, in the namespaces and on the relays.
pub(crate) const PORT: u16 = 16509;

/// The hosts: A (production side) and B (the other host of cross-host staging).
pub(crate) const HOSTS: [Host; 2] = [
    Host {
        name: "a",
        netns: "stagecore-host-a",
        veth: "sc-veth-a",
        addr: "10.77.0.1",
        relay: "127.0.0.2",
        env: "STAGECORE_LIBVIRT_HOST_A",
    },
    Host {
        name: "b",
        netns: "stagecore-host-b",
        veth: "sc-veth-b",
        addr: "10.77.0.2",
        relay: "127.0.0.3",
        env: "STAGECORE_LIBVIRT_HOST_B",
    },
];

/// Where the hosts' state lives (root namespace view).
const BASE: &str = "/var/lib/stagecore/hosts";

/// How long a fresh libvirtd may take to answer over the relay.
const START_WAIT: Duration = Duration::from_secs(30);

impl Host {
    /// The URI the tests use (through the loopback relay).
    pub(crate) fn uri(&self) -> String {
        format!("qemu+tcp://{}:{PORT}/system", self.relay)
    }

    fn dir(&self) -> PathBuf {
        Path::new(BASE).join(self.name)
    }

    fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.netns)
    }

    fn relay_pid_file(&self) -> PathBuf {
        self.dir().join("relay.pid")
    }

    /// Whether libvirtd answers over the relay (within `limit`).
    fn answers(&self, limit: Duration) -> bool {
        let Some(virsh) = find_program("virsh") else { return false };
        let mut version = Command::new(virsh);
        version.args(["-c", &self.uri(), "version"]);
        succeeds_within(&mut version, limit)
    }
}

/// `cargo xtask hosts <sub>`.
pub(crate) fn command(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str).unwrap_or("start") {
        "start" => {
            for (var, uri) in ensure()? {
                println!("{var}={uri}");
            }
            Ok(())
        }
        "stop" => stop(),
        "status" => {
            for h in HOSTS {
                let state = if h.answers(Duration::from_secs(5)) { "answers" } else { "down" };
                println!("host {}: {} ({} in netns {}): {state}", h.name, h.uri(), h.addr, h.netns);
            }
            Ok(())
        }
        other => Err(Failure(format!("hosts: unknown subcommand `{other}` (start, stop, status)"))),
    }
}

/// Makes sure both hosts run and are clean; returns `(env var, URI)` for the tests.
pub(crate) fn ensure() -> Result<Vec<(&'static str, String)>> {
    if !crate::setup::is_root() {
        return Err(Failure("hosts: starting libvirtd hosts in namespaces needs root".into()));
    }
    for p in ["ip", "nsenter", "unshare", "libvirtd", "virtlogd", "virsh"] {
        if find_program(p).is_none() {
            return Err(Failure(format!("hosts: program {p} not found (run `cargo xtask setup`)")));
        }
    }
    let healthy = HOSTS.iter().all(|h| relay_alive(h) && h.answers(Duration::from_secs(5)));
    if healthy {
        println!("hosts: reusing running hosts; removing what earlier runs left on them");
        for h in HOSTS {
            clean(&h)?;
        }
    } else {
        println!("hosts: starting libvirtd hosts A and B in network namespaces");
        stop()?;
        start_all()?;
    }
    Ok(HOSTS.iter().map(|h| (h.env, h.uri())).collect())
}

/// Stops every process in the hosts' namespaces and the relays (by pid), removes the namespaces.
pub(crate) fn stop() -> Result<()> {
    for h in HOSTS {
        if let Some(pid) = read_pid(&h.relay_pid_file()).filter(|p| is_our_relay(*p)) {
            kill_pid(pid);
        }
        let _ = fs::remove_file(h.relay_pid_file());
        if Path::new(&h.netns_path()).exists() {
            let pids = stdout_of(Command::new("ip").args(["netns", "pids", h.netns])).unwrap_or_default();
            let pids: Vec<i32> = pids.split_whitespace().filter_map(|p| p.parse().ok()).collect();
            for pid in &pids {
                // SAFETY: kill(2) on a pid read from the namespace this task created.
                unsafe { libc::kill(*pid, libc::SIGTERM) };
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(100));
            }
            for pid in pids.iter().filter(|p| alive(**p)) {
                // SAFETY: as above.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
            let _ = Command::new("ip").args(["netns", "del", h.netns]).status();
        }
    }
    Ok(())
}

fn start_all() -> Result<()> {
    for h in HOSTS {
        let dir = h.dir();
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| Failure(format!("hosts: remove {}: {e}", dir.display())))?;
        }
        for sub in ["run", "lib/images", "log", "etc", "cache"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).map_err(|e| Failure(format!("hosts: create {}: {e}", d.display())))?;
        }
        run(&format!("hosts: ip netns add {}", h.netns), Command::new("ip").args(["netns", "add", h.netns]))?;
        run("hosts: lo up", Command::new("ip").args(["-n", h.netns, "link", "set", "lo", "up"]))?;
    }
    let (a, b) = (HOSTS[0], HOSTS[1]);
    // Created inside A's namespace with its peer put straight into B's: neither end is ever in
    // the root namespace.
    run(
        "hosts: veth pair between the host namespaces",
        Command::new("ip")
            .args(["-n", a.netns, "link", "add", a.veth, "type", "veth", "peer", "name", b.veth, "netns", b.netns]),
    )?;
    for h in HOSTS {
        let cidr = format!("{}/24", h.addr);
        run("hosts: veth address", Command::new("ip").args(["-n", h.netns, "addr", "add", &cidr, "dev", h.veth]))?;
        run("hosts: veth up", Command::new("ip").args(["-n", h.netns, "link", "set", h.veth, "up"]))?;
    }
    for h in HOSTS {
        start_daemons(&h)?;
        start_relay(&h)?;
    }
    let deadline = Instant::now() + START_WAIT;
    for h in HOSTS {
        while !h.answers(Duration::from_secs(5)) {
            if Instant::now() >= deadline {
                return Err(Failure(format!(
                    "hosts: libvirtd of host {} does not answer on {} after {}s; see {}/log/libvirtd.log and {}/relay.log",
                    h.name,
                    h.uri(),
                    START_WAIT.as_secs(),
                    h.dir().display(),
                    h.dir().display()
                )));
            }
            thread::sleep(Duration::from_millis(250));
        }
        println!("hosts: host {} answers on {} (libvirtd at {}:{PORT} in {})", h.name, h.uri(), h.addr, h.netns);
    }
    Ok(())
}

/// Copies /etc/libvirt, switches TCP on at the namespace address and starts virtlogd + libvirtd
/// in a new mount namespace inside the host's network namespace.
fn start_daemons(h: &Host) -> Result<()> {
    let dir = h.dir();
    let etc = dir.join("etc");
    run("hosts: copy /etc/libvirt", Command::new("cp").args(["-a", "/etc/libvirt/."]).arg(&etc))?;
    let conf = etc.join("libvirtd.conf");
    let mut text = fs::read_to_string(&conf).unwrap_or_default();
    text.push_str(&format!(
        "\n# stagecore test host {}\nlisten_tls = 0\nlisten_tcp = 1\nauth_tcp = \"none\"\nlisten_addr = \"{}\"\n\
         tcp_port = \"{PORT}\"\nlog_outputs = \"3:file:/var/log/libvirt/libvirtd.log\"\n",
        h.name, h.addr
    ));
    fs::write(&conf, text).map_err(|e| Failure(format!("hosts: write {}: {e}", conf.display())))?;
    let _ = fs::remove_dir_all(etc.join("qemu/networks/autostart"));
    let d = dir.display();
    let script = format!(
        "set -e\nmount --make-rprivate /\nmount --bind {d}/run /run\nmount --bind {d}/etc /etc/libvirt\n\
         mount --bind {d}/lib /var/lib/libvirt\nmount --bind {d}/log /var/log/libvirt\n\
         mkdir -p /var/cache/libvirt\nmount --bind {d}/cache /var/cache/libvirt\n\
         virtlogd -d\nlibvirtd -d --listen\n"
    );
    let path = dir.join("start.sh");
    fs::write(&path, script).map_err(|e| Failure(format!("hosts: write {}: {e}", path.display())))?;
    run(
        &format!("hosts: start virtlogd + libvirtd of host {}", h.name),
        Command::new("nsenter")
            .arg(format!("--net={}", h.netns_path()))
            .args(["unshare", "--mount", "--fork", "sh"])
            .arg(&path),
    )
}

fn start_relay(h: &Host) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| Failure(format!("hosts: own executable: {e}")))?;
    let log = fs::File::create(h.dir().join("relay.log")).map_err(|e| Failure(format!("hosts: relay log: {e}")))?;
    let err = log.try_clone().map_err(|e| Failure(format!("hosts: relay log: {e}")))?;
    let child = Command::new(exe)
        .args(["__relay", &format!("{}:{PORT}", h.relay), &h.netns_path(), &format!("{}:{PORT}", h.addr)])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| Failure(format!("hosts: start the relay of host {}: {e}", h.name)))?;
    fs::write(h.relay_pid_file(), child.id().to_string()).map_err(|e| Failure(format!("hosts: relay pid file: {e}")))
}

/// Removes every domain, storage pool (with its volumes) and network except `default`.
fn clean(h: &Host) -> Result<()> {
    let uri = h.uri();
    let virsh = |args: &[&str]| {
        let mut cmd = Command::new("virsh");
        cmd.args(["-q", "-c", &uri]).args(args);
        stdout_of(&mut cmd).unwrap_or_default()
    };
    let names =
        |out: String| out.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect::<Vec<_>>();
    for d in names(virsh(&["list", "--all", "--name"])) {
        virsh(&["destroy", &d]);
        virsh(&["undefine", &d, "--snapshots-metadata"]);
    }
    for p in names(virsh(&["pool-list", "--all", "--name"])) {
        virsh(&["pool-start", &p]);
        for v in names(virsh(&["vol-list", &p, "--name"])) {
            virsh(&["vol-delete", &v, "--pool", &p]);
        }
        virsh(&["pool-destroy", &p]);
        virsh(&["pool-delete", &p]);
        virsh(&["pool-undefine", &p]);
    }
    for n in names(virsh(&["net-list", "--all", "--name"])).into_iter().filter(|n| n != "default") {
        virsh(&["net-destroy", &n]);
        virsh(&["net-undefine", &n]);
    }
    let left = names(virsh(&["list", "--all", "--name"]));
    if !left.is_empty() {
        return Err(Failure(format!("hosts: could not remove domains {left:?} from host {}", h.name)));
    }
    Ok(())
}

fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    // Zombies count as gone.
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

fn is_our_relay(pid: i32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"__relay"))
}

fn relay_alive(h: &Host) -> bool {
    read_pid(&h.relay_pid_file()).is_some_and(|p| alive(p) && is_our_relay(p))
}

fn kill_pid(pid: i32) {
    // SAFETY: kill(2) on a pid from our own pid file, checked to be our relay.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
}

/// `xtask __relay <listen> <netns path> <target>`: accepts on `listen` (bound in the namespace
/// this process starts in), then enters `netns` and connects every accepted client to `target`
/// from there, copying bytes both ways. Runs until killed.
pub(crate) fn relay(args: &[String]) -> Result<()> {
    let [listen, netns, target] = args else {
        return Err(Failure("usage: xtask __relay <listen addr:port> <netns path> <target addr:port>".into()));
    };
    let listener = TcpListener::bind(listen).map_err(|e| Failure(format!("relay: bind {listen}: {e}")))?;
    let ns = fs::File::open(netns).map_err(|e| Failure(format!("relay: open {netns}: {e}")))?;
    use std::os::unix::io::AsRawFd;
    // SAFETY: setns(2) on an open namespace file; affects this thread and the threads it creates.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(Failure(format!("relay: setns {netns}: {}", std::io::Error::last_os_error())));
    }
    println!("relay: {listen} -> {target} in {netns}");
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let target = target.clone();
        thread::spawn(move || {
            let upstream = match TcpStream::connect(&target) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("relay: connect {target}: {e}");
                    return;
                }
            };
            let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
            let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else { return };
            let t = thread::spawn(move || pipe(c2, u2));
            pipe(upstream, client);
            let _ = t.join();
        });
    }
    Ok(())
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
    let _ = from.shutdown(std::net::Shutdown::Read);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_use_loopback_relays_and_namespace_addresses() {
        for h in HOSTS {
            assert!(h.uri().starts_with("qemu+tcp://127.0.0."), "{}", h.uri());
            assert!(h.addr.starts_with("10.77.0."));
            assert!(h.env.starts_with("STAGECORE_LIBVIRT_HOST_"));
        }
        assert_ne!(HOSTS[0].relay, HOSTS[1].relay);
    }
}
