//! A small three-tier sample spec for examples and tests.

use crate::{DiskFormat, DiskSpec, EnvironmentSpec, MachineSpec, NetworkSpec, NicSpec};

/// A web + app + db environment called `name`, with one 64 MiB qcow2 disk per machine whose
/// source is `{name}/{machine}.qcow2` (relative: backends that create files put them under their
/// own state directory).
pub fn sample_spec(name: &str) -> EnvironmentSpec {
    let machine = |m: &str, vcpus: u32, memory_mib: u64, nets: &[&str]| MachineSpec {
        name: m.into(),
        uuid: None,
        vcpus,
        memory_mib,
        firmware: Default::default(),
        disks: vec![DiskSpec {
            name: "disk0".into(),
            source: format!("{name}/{m}.qcow2"),
            format: DiskFormat::Qcow2,
            size_bytes: Some(64 << 20),
            read_only: false,
        }],
        nics: nets
            .iter()
            .enumerate()
            .map(|(i, n)| NicSpec { name: format!("eth{i}"), network: (*n).into(), mac: None, model: "virtio".into() })
            .collect(),
        labels: [("tier".to_string(), m.to_string())].into(),
        boot: None,
        after: Vec::new(),
    };
    EnvironmentSpec {
        name: name.into(),
        machines: vec![
            machine("web", 1, 128, &["frontend", "backend"]),
            machine("app", 1, 128, &["backend"]),
            machine("db", 1, 128, &["backend"]),
        ],
        networks: vec![
            NetworkSpec { name: "frontend".into(), cidr: Some("10.0.1.0/24".into()) },
            NetworkSpec { name: "backend".into(), cidr: Some("10.0.2.0/24".into()) },
        ],
        labels: Default::default(),
    }
}
