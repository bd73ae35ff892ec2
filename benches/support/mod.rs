//! Shared by the benches: specs of many machines with many disks.

use stagekit::stagecore::{DiskFormat, DiskSpec, EnvironmentSpec, MachineSpec};

/// `machines` machines `m0..` with `disks` qcow2 disks `d0..` of `disk_size` bytes each (sources
/// `<name>/m<i>/d<d>.qcow2`), no NICs, no networks.
pub(crate) fn grid_spec(name: &str, machines: usize, disks: usize, disk_size: u64) -> EnvironmentSpec {
    EnvironmentSpec {
        name: name.into(),
        machines: (0..machines)
            .map(|i| MachineSpec {
                name: format!("m{i}"),
                uuid: None,
                vcpus: 1,
                memory_mib: 64,
                firmware: Default::default(),
                disks: (0..disks)
                    .map(|d| DiskSpec {
                        name: format!("d{d}"),
                        source: format!("{name}/m{i}/d{d}.qcow2"),
                        format: DiskFormat::Qcow2,
                        size_bytes: Some(disk_size),
                        read_only: false,
                    })
                    .collect(),
                nics: vec![],
                labels: Default::default(),
                boot: None,
                after: Vec::new(),
            })
            .collect(),
        networks: vec![],
        labels: Default::default(),
    }
}
