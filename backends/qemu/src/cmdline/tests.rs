//! Unit tests of the argv builder: shape, fencing, validation, accel resolution.

use super::*;

fn config() -> MachineConfig {
    MachineConfig {
        name: "web-1".into(),
        uuid: uuid::Uuid::from_u128(0x1234),
        vcpus: 2,
        memory_mib: 256,
        firmware: Firmware::Bios,
        accel: Accel::Tcg,
        disks: vec![
            DiskConfig { id: "disk0".into(), path: "/state/web,1/disk0.qcow2".into(), read_only: false },
            DiskConfig { id: "disk1".into(), path: "/state/disk1.qcow2".into(), read_only: true },
        ],
        nics: vec![
            NicConfig { id: "nic0".into(), mac: "52:54:00:12:34:56".into(), segment: "stage-a/front".into() },
            NicConfig { id: "nic1".into(), mac: "52:54:00:12:34:57".into(), segment: "stage-a/back".into() },
        ],
        qmp_socket: "/state/qmp.sock".into(),
        pidfile: "/state/qemu.pid".into(),
        log: "/state/qemu.log".into(),
        boot: None,
        agent_socket: None,
        console_log: None,
    }
}

fn strings(argv: &[OsString]) -> Vec<String> {
    argv.iter().map(|s| s.to_string_lossy().into_owned()).collect()
}

/// The value following each occurrence of `flag`.
fn values(argv: &[String], flag: &str) -> Vec<String> {
    argv.windows(2).filter(|w| w[0] == flag).map(|w| w[1].clone()).collect()
}

#[test]
fn argv_has_base_options_and_forced_accel() {
    let argv = strings(&config().argv().unwrap());
    for flag in ["-nodefaults", "-no-user-config"] {
        assert!(argv.contains(&flag.to_string()), "{flag} missing");
    }
    assert_eq!(values(&argv, "-display"), ["none"]);
    assert_eq!(values(&argv, "-machine"), ["q35"]);
    assert_eq!(values(&argv, "-accel"), ["tcg"]);
    assert_eq!(values(&argv, "-name"), ["web-1"]);
    assert_eq!(values(&argv, "-uuid"), ["00000000-0000-0000-0000-000000001234"]);
    assert_eq!(values(&argv, "-smp"), ["2"]);
    assert_eq!(values(&argv, "-m"), ["256M"]);
    assert_eq!(values(&argv, "-pidfile"), ["/state/qemu.pid"]);
    assert_eq!(values(&argv, "-chardev"), ["socket,id=qmp,server=on,wait=off,path=/state/qmp.sock"]);
    assert_eq!(values(&argv, "-mon"), ["chardev=qmp,mode=control"]);
}

#[test]
fn disks_are_blockdev_pairs_with_stable_node_names() {
    let argv = strings(&config().argv().unwrap());
    assert_eq!(
        values(&argv, "-blockdev"),
        [
            "driver=file,filename=/state/web,,1/disk0.qcow2,node-name=disk0-file,read-only=off",
            "driver=qcow2,file=disk0-file,node-name=disk0-fmt,read-only=off",
            "driver=file,filename=/state/disk1.qcow2,node-name=disk1-file,read-only=on",
            "driver=qcow2,file=disk1-file,node-name=disk1-fmt,read-only=on",
        ]
    );
    let devices = values(&argv, "-device");
    assert!(devices.contains(&"virtio-blk-pci,drive=disk0-fmt,id=disk0".to_string()));
    assert!(devices.contains(&"virtio-blk-pci,drive=disk1-fmt,id=disk1".to_string()));
    assert_eq!(fmt_node("disk0"), "disk0-fmt");
}

#[test]
fn nics_are_fenced_on_loopback_multicast_never_user_or_tap() {
    let argv = strings(&config().argv().unwrap());
    let netdevs = values(&argv, "-netdev");
    assert_eq!(netdevs.len(), 2);
    for (netdev, segment) in netdevs.iter().zip(["stage-a/front", "stage-a/back"]) {
        assert!(netdev.starts_with("socket,"), "{netdev}");
        assert!(netdev.ends_with(",localaddr=127.0.0.1"), "{netdev}");
        assert!(netdev.contains(&format!("mcast={}", segment_multicast(segment))), "{netdev}");
    }
    assert!(!argv.iter().any(|a| a == "-nic" || a == "-net"), "legacy NIC options: {argv:?}");
    for arg in netdevs.iter().chain(values(&argv, "-device").iter()) {
        for forbidden in ["user", "tap", "bridge", "vhost", "hostfwd", "l2tpv3", "vde"] {
            assert!(!arg.contains(forbidden), "`{arg}` contains `{forbidden}`");
        }
    }
    assert!(values(&argv, "-device").contains(&"virtio-net-pci,netdev=nic0-net,mac=52:54:00:12:34:56,id=nic0".into()));
}

#[test]
fn segments_map_to_stable_distinct_admin_scoped_groups() {
    let a = segment_multicast("stage-a/front");
    assert_eq!(a, segment_multicast("stage-a/front"));
    assert_ne!(a, segment_multicast("stage-b/front"));
    for seg in ["x", "stage-a/front", "prod/db", ""] {
        let g = segment_multicast(seg);
        assert!(g.ip().is_multicast() && g.ip().octets()[0] == 239 && g.ip().octets()[1] != 255, "{g}");
        assert!((20000..60000).contains(&g.port()), "{g}");
    }
}

#[test]
fn accel_auto_is_kvm_only_when_usable() {
    assert_eq!(Accel::Auto.resolve(true), Accel::Kvm);
    assert_eq!(Accel::Auto.resolve(false), Accel::Tcg);
    assert_eq!(Accel::Tcg.resolve(true), Accel::Tcg);
    assert_eq!(Accel::Kvm.resolve(false), Accel::Kvm);
    let mut c = config();
    c.accel = Accel::Auto;
    let expected = if kvm_usable() { "kvm" } else { "tcg" };
    assert_eq!(values(&strings(&c.argv().unwrap()), "-accel"), [expected]);
    assert_eq!(values(&strings(&c.argv_with_accel(Accel::Kvm).unwrap()), "-accel"), ["kvm"]);
}

#[test]
fn uefi_is_not_supported_yet() {
    let mut c = config();
    c.firmware = Firmware::Uefi;
    let err = c.argv().unwrap_err();
    assert!(matches!(err, Error::NotSupported { operation: "uefi firmware", backend: "qemu" }), "{err}");
}

fn invalid_path(c: &MachineConfig) -> String {
    match c.argv() {
        Err(Error::InvalidSpec { path, .. }) => path,
        other => panic!("expected InvalidSpec, got {other:?}"),
    }
}

#[test]
fn bad_fields_are_named() {
    let mut c = config();
    c.name = "../evil".into();
    assert_eq!(invalid_path(&c), "name");
    let mut c = config();
    c.disks[1].id = "disk,0".into();
    assert_eq!(invalid_path(&c), "disks[1].id");
    let mut c = config();
    c.disks[1].id = "disk0".into();
    assert_eq!(invalid_path(&c), "disks[1].id");
    let mut c = config();
    c.nics[0].id = "disk1".into();
    assert_eq!(invalid_path(&c), "nics[0].id");
    let mut c = config();
    c.nics[1].mac = "01:00:5e:00:00:01".into();
    assert_eq!(invalid_path(&c), "nics[1].mac");
    let mut c = config();
    c.nics[1].mac = "52:54:00:12:34".into();
    assert_eq!(invalid_path(&c), "nics[1].mac");
    let mut c = config();
    c.nics[0].segment.clear();
    assert_eq!(invalid_path(&c), "nics[0].segment");
    let mut c = config();
    c.disks[0].path = "relative.qcow2".into();
    assert_eq!(invalid_path(&c), "disks[0].path");
    let mut c = config();
    c.vcpus = 0;
    assert_eq!(invalid_path(&c), "vcpus");
    let mut c = config();
    c.memory_mib = 1;
    assert_eq!(invalid_path(&c), "memory_mib");
    let mut c = config();
    c.qmp_socket = PathBuf::from(format!("/{}", "s".repeat(120)));
    assert_eq!(invalid_path(&c), "qmp_socket");
}

#[test]
fn option_values_escape_commas() {
    assert_eq!(escape_opt(OsStr::new("/a,b,,c")), "/a,,b,,,,c");
}

#[test]
fn kernel_boot_agent_channel_and_console_are_in_the_argv() {
    let mut c = config();
    c.boot = Some(KernelBoot {
        kernel: "/img/vmlinuz".into(),
        initrd: Some("/img/initrd.img".into()),
        cmdline: "root=/dev/vda console=ttyS0 quiet".into(),
    });
    c.agent_socket = Some("/state/m,1/qga.sock".into());
    c.console_log = Some("/state/console.log".into());
    let argv = strings(&c.argv().unwrap());
    assert_eq!(values(&argv, "-kernel"), ["/img/vmlinuz"]);
    assert_eq!(values(&argv, "-initrd"), ["/img/initrd.img"]);
    assert_eq!(values(&argv, "-append"), ["root=/dev/vda console=ttyS0 quiet"]);
    let chardevs = values(&argv, "-chardev");
    assert!(chardevs.contains(&"socket,id=qga0,server=on,wait=off,path=/state/m,,1/qga.sock".into()), "{chardevs:?}");
    assert!(chardevs.contains(&"file,id=console0,path=/state/console.log".into()), "{chardevs:?}");
    assert_eq!(values(&argv, "-serial"), ["chardev:console0"]);
    let devices = values(&argv, "-device");
    assert!(devices.contains(&"virtio-serial-pci,id=vser0".into()), "{devices:?}");
    assert!(devices.contains(&format!("virtserialport,bus=vser0.0,chardev=qga0,name={AGENT_PORT}")), "{devices:?}");

    let plain = strings(&config().argv().unwrap());
    for flag in ["-kernel", "-initrd", "-append", "-serial"] {
        assert!(!plain.contains(&flag.to_string()), "{flag} without boot/console: {plain:?}");
    }

    let mut bad = c.clone();
    bad.agent_socket = Some(PathBuf::from(format!("/{}", "s".repeat(120))));
    assert_eq!(invalid_path(&bad), "agent_socket");
    let mut bad = c.clone();
    bad.boot.as_mut().unwrap().kernel = "vmlinuz".into();
    assert_eq!(invalid_path(&bad), "boot.kernel");
    let mut bad = c.clone();
    bad.boot.as_mut().unwrap().cmdline = "root=/dev/vda\ninit=/bin/sh".into();
    assert_eq!(invalid_path(&bad), "boot.cmdline");
    let mut bad = c;
    bad.console_log = Some("console.log".into());
    assert_eq!(invalid_path(&bad), "console_log");
}
