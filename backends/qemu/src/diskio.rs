//! [`DiskIo`] for QEMU environments: what a guest reads from and writes to its disks.
//!
//! Contract: reads and digests of a running machine's disk happen after QEMU flushed it; writes
//! to a running machine go through QEMU itself (`qemu-io` over HMP), never behind its back;
//! writes to a stopped machine go straight into the top qcow2 layer. A machine in an unknown
//! state is refused (`Precondition`). Ranges beyond the virtual size are `InvalidSpec`.

use async_trait::async_trait;
use stagecore::toolbox::check_range;
use stagecore::{DiskIo, Result};

use crate::error::qcow2;
use crate::machines;
use crate::shared::{EnvShared, EnvState, QemuEnvironment, blocking};

/// Writes `data` at `offset` of `machine`/`disk` (the caller holds the environment lock).
pub(crate) async fn write(
    shared: &EnvShared,
    st: &mut EnvState,
    machine: &str,
    disk: &str,
    offset: u64,
    data: &[u8],
) -> Result<()> {
    let rec = st.rec(&shared.name)?;
    let top = rec.top(machine, disk)?.clone();
    let m = rec.spec.require_machine(machine)?;
    let index = m.disks.iter().position(|d| d.name == disk).expect("top() found the disk");
    let label = format!("{}/{machine}/{disk}", shared.name);
    let t = top.clone();
    let size = blocking(move || Ok(stagecore_qcow2::info(&t).map_err(qcow2)?.virtual_size)).await?;
    check_range(&shared.name, machine, disk, size, offset, data.len() as u64)?;
    match machines::live_or_down(shared, st, machine).await? {
        Some(q) => {
            let scratch = shared.paths.machine_dir(machine);
            machines::write_running(&q, index, &scratch, offset, data).await?;
            let (t, len, expect) = (top, data.len(), data.to_vec());
            blocking(move || {
                let mut back = vec![0u8; len];
                stagecore_qcow2::read_at(&t, offset, &mut back).map_err(qcow2)?;
                if back != expect {
                    return Err(crate::error::msg(format!("write through qemu-io to {label} did not reach the image")));
                }
                Ok(())
            })
            .await
        }
        None => {
            let data = data.to_vec();
            blocking(move || stagecore_qcow2::write_at(&top, offset, &data).map_err(qcow2)).await
        }
    }
}

/// Flushes the machine's disks when it runs and returns the disk's top.
async fn settled_top(shared: &EnvShared, st: &mut EnvState, machine: &str, disk: &str) -> Result<std::path::PathBuf> {
    let top = st.rec(&shared.name)?.top(machine, disk)?.clone();
    if let Some(q) = machines::live_or_down(shared, st, machine).await? {
        machines::flush_all(&q).await?;
    }
    Ok(top)
}

#[async_trait]
impl DiskIo for QemuEnvironment {
    async fn read(&self, machine: &str, disk: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        let mut st = self.shared.state.lock().await;
        let top = settled_top(&self.shared, &mut st, machine, disk).await?;
        let (env, m, d) = (self.shared.name.clone(), machine.to_string(), disk.to_string());
        blocking(move || {
            let size = stagecore_qcow2::info(&top).map_err(qcow2)?.virtual_size;
            check_range(&env, &m, &d, size, offset, length)?;
            let mut buf = vec![0u8; length as usize];
            stagecore_qcow2::read_at(&top, offset, &mut buf).map_err(qcow2)?;
            Ok(buf)
        })
        .await
    }

    async fn write(&self, machine: &str, disk: &str, offset: u64, data: &[u8]) -> Result<()> {
        let mut st = self.shared.state.lock().await;
        write(&self.shared, &mut st, machine, disk, offset, data).await
    }

    async fn digest(&self, machine: &str, disk: &str) -> Result<[u8; 32]> {
        let mut st = self.shared.state.lock().await;
        let top = settled_top(&self.shared, &mut st, machine, disk).await?;
        blocking(move || stagecore_qcow2::digest(&top).map_err(qcow2)).await
    }
}
