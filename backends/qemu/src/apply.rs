//! Applying one [`Change`] to a QEMU environment.
//!
//! Contract: the change is checked against the spec first (`Change::apply_to_spec`: unknown
//! machines, disks and NICs are `NotFound`, bad values `InvalidSpec`) and nothing happens when it
//! fails. Config changes and image replacement stop the machine if it runs, edit the record, and
//! start it again. `WriteDisk` writes like a guest ([`crate::diskio`]). Guest changes
//! (`GuestCommand`, `GuestFile`) go through the machine's guest agent
//! ([`stagecore::guest::apply_guest_change`]: a non-zero exit is `Error::GuestCommand`); a machine
//! that does not run gives `Precondition`.

use std::path::PathBuf;

use stagecore::{Change, EnvironmentSpec, Error, Result};
use stagecore_qcow2::ImageFormat;

use crate::error::{BACKEND, qcow2};
use crate::machines;
use crate::shared::{EnvShared, EnvState, blocking};
use crate::store::{QemuRecord, disk_key};

pub(crate) async fn apply(shared: &EnvShared, st: &mut EnvState, change: &Change) -> Result<()> {
    if let Some(message) = shared.ctx.hooks.before_apply.as_ref().and_then(|hook| hook()) {
        return Err(Error::backend_msg(BACKEND, format!("injected fault: {message}")));
    }
    let mut spec = st.rec(&shared.name)?.spec.clone();
    change.apply_to_spec(&mut spec, 0)?;
    let machine = change.machine().to_string();
    match change {
        Change::GuestCommand { .. } | Change::GuestFile { .. } => {
            crate::freeze::recover(shared, st).await;
            let agent = crate::guest::agent(shared, st, &machine).await?;
            let channel = crate::guest::Resolved { env: shared.name.clone(), machine, agent };
            return stagecore::guest::apply_guest_change(&shared.name, &channel, change).await;
        }
        Change::WriteDisk { disk, offset, data, .. } => {
            return crate::diskio::write(shared, st, &machine, disk, *offset, data).await;
        }
        _ => {}
    }
    let was_running = machines::stop_machine(shared, st, &machine).await?;
    let result = apply_offline(shared, st, change, spec).await;
    if was_running && st.rec(&shared.name)?.spec.machine(&machine).is_some() {
        machines::start_machine(shared, st, &machine).await?;
    }
    result
}

async fn apply_offline(
    shared: &EnvShared,
    st: &mut EnvState,
    change: &Change,
    mut spec: EnvironmentSpec,
) -> Result<()> {
    let disks_dir = shared.paths.disks();
    let env = shared.name.clone();
    let rec = st.rec_mut(&env)?;
    let m = change.machine();
    match change {
        Change::AddDisk { disk, .. } => {
            let (path, _) = rec.new_layer_path(&disks_dir, m, &disk.name);
            crate::images::create_empty(&path, disk.size_bytes.unwrap_or(0)).await?;
            let d = spec.machine_mut(m).and_then(|x| x.disks.iter_mut().find(|d| d.name == disk.name));
            d.expect("added by apply_to_spec").source = format!("qemu:{env}/{m}/{}", disk.name);
            rec.disks.insert(disk_key(m, &disk.name), path);
        }
        Change::RemoveDisk { disk, .. } => {
            if let Some(top) = rec.disks.remove(&disk_key(m, disk))
                && !rec.is_referenced(&top)
            {
                let _ = std::fs::remove_file(top);
            }
        }
        Change::AddNic { nic, .. } => {
            let n = spec.machine_mut(m).and_then(|x| x.nics.iter_mut().find(|n| n.name == nic.name));
            n.expect("added by apply_to_spec").mac.get_or_insert_with(stagecore::random_mac);
        }
        Change::ReplaceDiskImage { disk, image, .. } => {
            let field = format!("{env}/{m}/{disk}.image");
            let src = crate::images::resolve(&shared.ctx.root, &field, image)?;
            crate::images::check_existing(&field, &src).await?;
            let (copy, _) = rec.new_layer_path(&disks_dir, m, disk);
            let (top, _) = rec.new_layer_path(&disks_dir, m, disk);
            let (c, t) = (copy.clone(), top.clone());
            blocking(move || {
                stagecore_qcow2::copy_allocated(&src, None, &c).map_err(qcow2)?;
                stagecore_qcow2::create_overlay(&t, &c, ImageFormat::Qcow2, None).map_err(|e| {
                    let _ = std::fs::remove_file(&c);
                    qcow2(e)
                })
            })
            .await?;
            let old: Option<PathBuf> = rec.disks.insert(disk_key(m, disk), top);
            if let Some(old) = old.filter(|o| !rec.is_referenced(o)) {
                let _ = std::fs::remove_file(old);
            }
        }
        _ => {}
    }
    rec.spec = spec;
    rec.save(&shared.paths)
}
