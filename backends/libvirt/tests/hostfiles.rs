//! Live tests of the host-side files of hand-written production domains (libvirtd on
//! `qemu:///system`, real QEMU under TCG, OVMF from the `ovmf` package, the test guest image):
//! a stage never shares production's NVRAM, logs, sockets or ports, destroy removes only what the
//! stage owns, a failed baseline leaves production exactly as it was, and a user-mode NIC's spec
//! validates. They FAIL when libvirtd, OVMF or the guest image is missing.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use stagecore::{Backend, Selector, StageOptions};
use stagecore_testkit::guest_image::GuestImage;

use common::{Guard, virsh};

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";

fn sh(program: &str, args: &[&str]) {
    let st = std::process::Command::new(program).args(args).status().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(st.success(), "{program} {args:?} failed");
}

fn hash(path: &Path) -> (u64, [u8; 32]) {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    (data.len() as u64, Sha256::digest(&data).into())
}

fn define(g: &Guard, name: &str, xml: &str) {
    let path = g.dir.join(format!("{name}.xml"));
    std::fs::write(&path, xml).unwrap();
    let out = std::process::Command::new("virsh")
        .args(["-c", common::URI, "define", path.to_str().unwrap()])
        .output()
        .expect("virsh runs");
    assert!(out.status.success(), "define {name}: {}", String::from_utf8_lossy(&out.stderr));
}

fn active(name: &str) -> bool {
    virsh(&["domstate", name]).first().map(String::as_str) == Some("running")
}

/// Waits (at most `secs`) for `f`; panics naming `what`.
fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn qcow2(path: &Path, backing: Option<&Path>) {
    let p = path.to_str().unwrap();
    match backing {
        Some(b) => sh("qemu-img", &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", b.to_str().unwrap(), p]),
        None => sh("qemu-img", &["create", "-q", "-f", "qcow2", p, "8M"]),
    }
}

fn disk_xml(path: &Path, dev: &str, extra: &str) -> String {
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/>\
         <target dev='{dev}' bus='virtio'/>{extra}</disk>",
        path.display()
    )
}

/// The stage's domain name for production domain `prod` (attached: logical name = domain name).
fn stage_domain(stage: &str, prod: &str) -> String {
    format!("{stage}-{prod}")
}

fn xml_of(name: &str, inactive: bool) -> String {
    let args: Vec<&str> = if inactive { vec!["dumpxml", "--inactive", name] } else { vec!["dumpxml", name] };
    virsh(&args).join("\n")
}

/// A domain's XML without `<metadata>` (our record names production's paths, as history).
fn without_metadata(xml: &str) -> String {
    match (xml.find("<metadata>"), xml.find("</metadata>")) {
        (Some(a), Some(b)) => format!("{}{}", &xml[..a], &xml[b + "</metadata>".len()..]),
        _ => xml.to_string(),
    }
}

/// The text of `<nvram>` in a domain's XML.
fn nvram_in(xml: &str) -> Option<String> {
    let at = xml.find("<nvram")?;
    let rest = &xml[at..];
    let start = rest.find('>')? + 1;
    let end = rest.find("</nvram>")?;
    Some(rest[start..end].trim().to_string())
}

async fn uefi_case(running: bool, explicit: bool) {
    assert!(Path::new(OVMF_CODE).exists(), "OVMF is missing ({OVMF_CODE}): apt-get install ovmf (cargo xtask setup)");
    let g = Guard::new(if running { "ur" } else { "us" });
    std::fs::create_dir_all(&g.dir).unwrap();
    let prod = format!("h{}-efi", g.tag);
    let disk = g.dir.join("efi.qcow2");
    qcow2(&disk, None);
    let prod_nvram = if explicit {
        g.dir.join("efi-prod.VARS.fd")
    } else {
        PathBuf::from(format!("/var/lib/libvirt/qemu/nvram/{prod}_VARS.fd"))
    };
    let nvram = if explicit { format!("<nvram>{}</nvram>", prod_nvram.display()) } else { String::new() };
    define(
        &g,
        &prod,
        &format!(
            "<domain type='qemu'><name>{prod}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>\
             <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type>{nvram}</os><features><acpi/></features>\
             <devices>{}</devices></domain>",
            disk_xml(&disk, "vda", "")
        ),
    );
    // Boot once so the firmware writes production's own variables (they differ from the template).
    sh("virsh", &["-c", common::URI, "start", &prod]);
    let template = nvram_in(&xml_of(&prod, false))
        .and_then(|_| {
            xml_of(&prod, false).split("template='").nth(1).map(|t| t.split('\'').next().unwrap().to_string())
        })
        .expect("libvirt names the NVRAM template");
    wait_for("OVMF to write production's variables", 300, || {
        std::fs::read(&prod_nvram).ok().is_some_and(|v| v != std::fs::read(&template).unwrap())
    });
    if !running {
        sh("virsh", &["-c", common::URI, "destroy", &prod]);
    }
    let backend = g.backend().await;
    let env = backend
        .attach(&Selector::Machines { environment: format!("p{}", g.tag), names: vec![prod.clone()] })
        .await
        .expect("attach the UEFI production");
    let baseline = env.take_baseline().await.expect("baseline");
    let saved = g.dir.join(format!("p{}", g.tag)).join("baselines").join(&baseline.id).join(format!("{prod}.nvram"));
    let stage_name = format!("s{}", g.tag);
    let stage = backend.stage(&baseline, &StageOptions::linked(&stage_name)).await.expect("stage");
    let sdom = stage_domain(&stage_name, &prod);
    let stage_nvram = PathBuf::from(nvram_in(&xml_of(&sdom, true)).expect("the stage names its own NVRAM"));
    assert!(stage_nvram.starts_with(g.dir.join(&stage_name)), "{} is in the stage's directory", stage_nvram.display());
    assert_eq!(hash(&stage_nvram), hash(&saved), "the stage got the NVRAM kept with the baseline");
    assert_ne!(std::fs::read(&stage_nvram).unwrap(), std::fs::read(&template).unwrap(), "production's variables");

    stage.start().await.expect("the stage starts (while production runs, when it does)");
    assert!(active(&sdom));
    assert_eq!(active(&prod), running, "production's power state is unchanged");
    if running {
        // Production's own firmware may still write its variables: hold it (QEMU keeps its files
        // open) so only the stage could change them from here on.
        sh("virsh", &["-c", common::URI, "suspend", &prod]);
    }
    let before = hash(&prod_nvram);
    wait_for("the stage's firmware to run", 300, || {
        virsh(&["domstate", &sdom]).first().map(String::as_str) == Some("running")
    });
    assert_eq!(hash(&prod_nvram), before, "running the stage leaves production's NVRAM as it was");
    backend.destroy(&stage_name).await.expect("destroy the stage");
    assert!(prod_nvram.exists(), "destroying the stage keeps production's NVRAM");
    assert_eq!(hash(&prod_nvram), before, "production's NVRAM bytes are unchanged");
    assert!(!stage_nvram.exists(), "the stage's own NVRAM went with it");
    if running {
        sh("virsh", &["-c", common::URI, "resume", &prod]);
    }
    assert_eq!(active(&prod), running);
    backend.destroy(&format!("p{}", g.tag)).await.expect("forget production");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uefi_running_production_with_its_own_nvram_path() {
    uefi_case(true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uefi_stopped_production_with_libvirts_nvram() {
    uefi_case(false, false).await;
}

/// A free loopback TCP port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_sockets_and_ports_are_the_stages_own_while_production_runs() {
    let image = GuestImage::locate();
    let g = Guard::new("hl");
    std::fs::create_dir_all(&g.dir).unwrap();
    let prod = format!("h{}-web", g.tag);
    let disk = g.dir.join("web.qcow2");
    qcow2(&disk, Some(&image.base));
    let f = |n: &str| g.dir.join(n);
    let (serial, console, chan, usock) =
        (f("web.serial.log"), f("web.console.log"), f("web.chan.sock"), f("web.ttyS1.sock"));
    let port = free_port();
    define(
        &g,
        &prod,
        &format!(
            "<domain type='qemu'><name>{prod}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64'>hvm</type><kernel>{}</kernel><initrd>{}</initrd><cmdline>{}</cmdline></os>\
             <devices>{}\
             <serial type='file'><source path='{}'/><target port='0'/></serial>\
             <serial type='unix'><source mode='bind' path='{}'/><target port='1'/></serial>\
             <serial type='tcp'><source mode='bind' host='127.0.0.1' service='{port}'/><protocol type='raw'/><target port='2'/></serial>\
             <console type='pty'><log file='{}'/><target type='virtio' port='0'/></console>\
             <channel type='unix'><source mode='bind' path='{}'/><target type='virtio' name='org.example.chan'/></channel>\
             </devices></domain>",
            image.kernel.display(),
            image.initrd.display(),
            image.cmdline.trim().replace(" quiet", ""),
            disk_xml(&disk, "vda", ""),
            serial.display(),
            usock.display(),
            console.display(),
            chan.display(),
        ),
    );
    sh("virsh", &["-c", common::URI, "start", &prod]);
    wait_for("production's boot output in its serial log", 300, || booted(&serial));
    let backend = g.backend().await;
    let env = backend
        .attach(&Selector::Machines { environment: format!("p{}", g.tag), names: vec![prod.clone()] })
        .await
        .expect("attach");
    let baseline = env.take_baseline().await.expect("baseline of the running production");
    let stage_name = format!("s{}", g.tag);
    let stage = backend.stage(&baseline, &StageOptions::linked(&stage_name)).await.expect("stage");
    let sdom = stage_domain(&stage_name, &prod);
    let sxml = without_metadata(&xml_of(&sdom, true));
    for p in [&serial, &console, &chan, &usock] {
        assert!(
            !sxml.contains(&p.display().to_string()),
            "the stage does not name production's {}: {sxml}",
            p.display()
        );
    }
    assert!(!sxml.contains(&format!("service='{port}'")), "production's TCP port is not the stage's: {sxml}");
    let lenv = backend.open_libvirt(&stage_name).await.unwrap();
    let notes = lenv.host_file_notes().await.unwrap();
    assert!(
        notes.values().flatten().any(|n| n.contains(&format!("TCP port {port}"))),
        "the dropped TCP serial is noted: {notes:?}"
    );

    stage.start().await.expect("the stage starts while production runs");
    assert!(active(&prod) && active(&sdom), "both run at once");
    let stage_dir = g.dir.join(&stage_name);
    let stage_serial = std::fs::read_dir(&stage_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("serial.log"))
        .expect("the stage's serial log is in its directory");
    wait_for("the stage's boot output in its own serial log while production runs", 300, || booted(&stage_serial));
    // Production's logs must not change while only the stage runs: stop production, then let
    // the stage boot again and write its own.
    sh("virsh", &["-c", common::URI, "destroy", &prod]);
    let (s0, c0) = (hash(&serial), hash(&console));
    stage.stop().await.unwrap();
    // QEMU truncates a file serial on start unless append='on', so a count of boots in the log
    // says nothing; remove the stage's own log and wait for the restarted stage to write it anew.
    std::fs::remove_file(&stage_serial).unwrap();
    stage.start().await.unwrap();
    wait_for("the stage's boot output in its own serial log", 300, || booted(&stage_serial));
    assert_eq!(hash(&serial), s0, "production's serial log is unchanged while the stage runs");
    assert_eq!(hash(&console), c0, "production's console log is unchanged while the stage runs");
    let live = without_metadata(&xml_of(&sdom, false));
    assert!(!live.contains(&chan.display().to_string()), "the stage's channel socket is its own: {live}");
    backend.destroy(&stage_name).await.expect("destroy the stage");
    assert_eq!((hash(&serial), hash(&console)), (s0, c0), "destroy leaves production's logs");
    sh("virsh", &["-c", common::URI, "start", &prod]);
    wait_for("production's channel socket", 300, || {
        use std::os::unix::fs::FileTypeExt as _;
        std::fs::metadata(&chan).is_ok_and(|m| m.file_type().is_socket())
    });
    backend.destroy(&format!("p{}", g.tag)).await.unwrap();
}

/// Whether the serial log at `p` holds a kernel's boot banner.
fn booted(p: &Path) -> bool {
    std::fs::read(p).is_ok_and(|s| String::from_utf8_lossy(&s).contains("Linux version"))
}

/// Every file under `dir` (recursively) with its size and hash.
fn files(dir: &Path) -> Vec<(PathBuf, (u64, [u8; 32]))> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push((p.clone(), hash(&p)));
            }
        }
    }
    out.sort();
    out
}

/// The live XML without what changes on its own between two dumps of one running domain.
fn stable(xml: String) -> String {
    xml.lines().filter(|l| !l.contains("<backingStore") && !l.contains("</backingStore")).collect::<Vec<_>>().join("\n")
}

/// Three hand-written machines, `a` running, `b` stopped, `c` running (`c_extra` on its disk),
/// attached as one production; returns the guard, the backend's environment name and the names.
async fn three(prefix: &str, c_extra: &str) -> (Guard, String, Vec<String>) {
    let g = Guard::new(prefix);
    let files_dir = g.dir.join("prod-files");
    std::fs::create_dir_all(&files_dir).unwrap();
    let mut names = Vec::new();
    for m in ["a", "b", "c"] {
        let name = format!("h{}-{m}", g.tag);
        let disk = files_dir.join(format!("{m}.qcow2"));
        qcow2(&disk, None);
        let extra = if m == "c" { c_extra } else { "" };
        define(
            &g,
            &name,
            &format!(
                "<domain type='qemu'><name>{name}</name><memory unit='MiB'>48</memory><vcpu>1</vcpu>\
                 <os><type arch='x86_64'>hvm</type></os><devices>{}</devices></domain>",
                disk_xml(&disk, "vda", extra)
            ),
        );
        if m != "b" {
            sh("virsh", &["-c", common::URI, "start", &name]);
        }
        names.push(name);
    }
    let backend = g.backend().await;
    let env_name = format!("p{}", g.tag);
    backend.attach(&Selector::Machines { environment: env_name.clone(), names: names.clone() }).await.expect("attach");
    (g, env_name, names)
}

type State = (Vec<(String, String)>, Vec<(PathBuf, (u64, [u8; 32]))>);

fn state(g: &Guard, names: &[String]) -> State {
    let xml = names.iter().map(|n| (xml_of(n, true), stable(xml_of(n, false)))).collect();
    (xml, files(&g.dir.join("prod-files")))
}

fn no_layers(g: &Guard, env: &str) {
    let dir = g.dir.join(env);
    let left: Vec<_> = if dir.exists() { files(&dir).into_iter().map(|f| f.0).collect() } else { Vec::new() };
    assert!(left.is_empty(), "a failed baseline leaves no files: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_disk_refuses_the_baseline_before_anything_changes() {
    let (g, env_name, names) = three("bt", "<transient/>").await;
    let before = state(&g, &names);
    let env = g.backend().await.open(&env_name).await.unwrap();
    let err = env.take_baseline().await.expect_err("a transient disk cannot be layered");
    assert!(err.to_string().contains("transient"), "{err}");
    assert_eq!(state(&g, &names), before, "production's definitions and disk files are exactly as before");
    no_layers(&g, &env_name);
    assert!(active(&names[0]) && !active(&names[1]) && active(&names[2]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_baseline_failing_on_a_later_machine_is_rolled_back() {
    let (g, env_name, names) = three("br", "").await;
    let before = state(&g, &names);
    // The third machine fails after the first two were moved onto new layers.
    // SAFETY: the variable names this test's own domain only; other tests never fail on it.
    unsafe { std::env::set_var("STAGECORE_LIBVIRT_FAULT", format!("baseline-fail:{}", names[2])) };
    let env = g.backend().await.open(&env_name).await.unwrap();
    let err = env.take_baseline().await.expect_err("the injected fault fails the baseline");
    assert!(err.to_string().contains("fault injected"), "the original error comes back: {err}");
    assert_eq!(state(&g, &names), before, "production's definitions and disk files are exactly as before");
    no_layers(&g, &env_name);
    assert!(active(&names[0]) && !active(&names[1]) && active(&names[2]), "power states are unchanged");
    // And production still takes a baseline afterwards.
    unsafe { std::env::remove_var("STAGECORE_LIBVIRT_FAULT") };
    env.take_baseline().await.expect("a baseline after the rollback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_mode_nic_validates_and_stages() {
    let g = Guard::new("un");
    std::fs::create_dir_all(&g.dir).unwrap();
    let prod = format!("h{}-u", g.tag);
    let disk = g.dir.join("u.qcow2");
    qcow2(&disk, None);
    define(
        &g,
        &prod,
        &format!(
            "<domain type='qemu'><name>{prod}</name><memory unit='MiB'>48</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64'>hvm</type></os><devices>{}\
             <interface type='user'><mac address='52:54:00:12:34:56'/><model type='virtio'/></interface>\
             </devices></domain>",
            disk_xml(&disk, "vda", "")
        ),
    );
    let backend = g.backend().await;
    let env = backend
        .attach(&Selector::Machines { environment: format!("p{}", g.tag), names: vec![prod.clone()] })
        .await
        .expect("attach");
    let spec = env.spec().await.unwrap();
    spec.validate().expect("the spec of a domain with a user-mode NIC validates");
    assert_eq!(spec.machines[0].nics[0].network, "user");
    let baseline = env.take_baseline().await.unwrap();
    let stage_name = format!("s{}", g.tag);
    let stage = backend.stage(&baseline, &StageOptions::linked(&stage_name)).await.expect("stage");
    let sspec = stage.spec().await.unwrap();
    sspec.validate().expect("the stage's spec validates");
    assert_eq!(sspec.machines[0].nics[0].network, "user", "logical network kept");
    let sxml = without_metadata(&xml_of(&stage_domain(&stage_name, &prod), true));
    assert!(!sxml.contains("type='user'"), "a fenced stage's user-mode NIC is on the stage's isolated network: {sxml}");
    stage.start().await.expect("the stage runs");
    backend.destroy(&stage_name).await.unwrap();
    backend.destroy(&format!("p{}", g.tag)).await.unwrap();
}
