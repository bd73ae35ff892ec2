//! Spec validation names the field path; specs round-trip through TOML, JSON and YAML.

use stagecore::memory::sample_spec;
use stagecore::{EnvironmentSpec, Error, SpecFormat};

fn invalid_at(spec: &EnvironmentSpec) -> String {
    match spec.validate() {
        Err(Error::InvalidSpec { path, .. }) => path,
        other => panic!("expected InvalidSpec, got {other:?}"),
    }
}

#[test]
fn sample_is_valid() {
    sample_spec("prod").validate().unwrap();
}

#[test]
fn empty_environment_name() {
    let mut s = sample_spec("prod");
    s.name.clear();
    assert_eq!(invalid_at(&s), "name");
}

#[test]
fn traversal_in_machine_name() {
    let mut s = sample_spec("prod");
    s.machines[1].name = "../x".into();
    assert_eq!(invalid_at(&s), "machines[1].name");
}

#[test]
fn duplicate_machine_names() {
    let mut s = sample_spec("prod");
    s.machines[2].name = s.machines[0].name.clone();
    assert_eq!(invalid_at(&s), "machines[2].name");
}

#[test]
fn disk_without_source() {
    let mut s = sample_spec("prod");
    s.machines[1].disks[0].source = "  ".into();
    assert_eq!(invalid_at(&s), "machines[1].disks[0].source");
}

#[test]
fn zero_memory_and_vcpus() {
    let mut s = sample_spec("prod");
    s.machines[0].memory_mib = 0;
    assert_eq!(invalid_at(&s), "machines[0].memory_mib");
    let mut s = sample_spec("prod");
    s.machines[2].vcpus = 0;
    assert_eq!(invalid_at(&s), "machines[2].vcpus");
}

#[test]
fn unknown_network_and_bad_mac() {
    let mut s = sample_spec("prod");
    s.machines[0].nics[1].network = "nowhere".into();
    assert_eq!(invalid_at(&s), "machines[0].nics[1].network");
    let mut s = sample_spec("prod");
    s.machines[0].nics[0].mac = Some("52:54:00:zz:00:01".into());
    assert_eq!(invalid_at(&s), "machines[0].nics[0].mac");
}

#[test]
fn control_characters_and_long_names() {
    let mut s = sample_spec("prod");
    s.machines[0].disks[0].name = "a\u{7}b".into();
    assert_eq!(invalid_at(&s), "machines[0].disks[0].name");
    let mut s = sample_spec("prod");
    s.networks[0].name = "n".repeat(64);
    assert_eq!(invalid_at(&s), "networks[0].name");
}

#[test]
fn round_trips_through_every_format() {
    let spec = sample_spec("prod");
    for format in [SpecFormat::Toml, SpecFormat::Json, SpecFormat::Yaml] {
        let text = spec.render(format).unwrap();
        assert_eq!(EnvironmentSpec::parse(&text, format).unwrap(), spec, "{format:?}:\n{text}");
    }
}

#[test]
fn parse_errors_are_typed() {
    let err = EnvironmentSpec::parse("name = 'prod'\n[[machines]]\nname = 'web'\n", SpecFormat::Toml).unwrap_err();
    assert!(matches!(err, Error::InvalidSpec { ref path, .. } if path == "<toml>"), "{err}");
    let text = r#"{"name": "prod", "machines": [{"name": "web", "vcpus": 1, "memory_mib": 0}]}"#;
    let err = EnvironmentSpec::parse(text, SpecFormat::Json).unwrap_err();
    assert!(matches!(err, Error::InvalidSpec { ref path, .. } if path == "machines[0].memory_mib"), "{err}");
}

#[test]
fn hand_written_toml() {
    let text = r#"
name = "shop"

[[networks]]
name = "lan"
cidr = "10.1.0.0/24"

[[machines]]
name = "web"
vcpus = 2
memory_mib = 1024
disks = [{ name = "root", source = "/var/lib/images/web.qcow2", size_bytes = 1073741824 }]
nics = [{ name = "eth0", network = "lan" }]
"#;
    let spec = EnvironmentSpec::parse(text, SpecFormat::Toml).unwrap();
    assert_eq!(spec.machines[0].nics[0].model, "virtio");
    assert_eq!(spec.machines[0].disks[0].format, stagecore::DiskFormat::Qcow2);
}

#[test]
fn secrets_never_show() {
    let s = stagecore::Secret::new("hunter2");
    assert!(!format!("{s:?} {s}").contains("hunter2"));
}
