//! Config changes through libvirt: memory and vCPUs with `setMemoryFlags` / `setVcpusFlags`
//! (config, plus live when running), NICs and disks with attach/detach (config, plus live when
//! running), raw disk writes through [`stagecore::DiskIo`], guest commands and files through the
//! guest agent ([`stagecore::guest::apply_guest_change`] over [`crate::agent`]). Image replacement
//! is not supported yet.

use stagecore::{Change, DiskIo, Error, Result, Role, random_mac};
use virt::sys;

use crate::conn::lv;
use crate::error::NAME;
use crate::handle::LibvirtEnvironment;
use crate::machines::Machine;
use crate::xml::edit;

/// Applies one change to `env`.
#[tracing::instrument(skip_all, fields(environment = %env.name, change = change.kind()))]
pub(crate) async fn apply(env: &LibvirtEnvironment, change: &Change) -> Result<()> {
    let ms = env.machines().await?;
    let mut spec = env.shared.spec_of(&env.name, &ms).await?;
    change.apply_to_spec(&mut spec, 0)?;
    let m = ms.iter().find(|m| m.name() == change.machine()).expect("apply_to_spec checked the machine").clone();
    let (config, live) = (sys::VIR_DOMAIN_AFFECT_CONFIG, if m.active() { sys::VIR_DOMAIN_AFFECT_LIVE } else { 0 });
    let inst = m.instance.clone();
    match change {
        Change::SetMemory { memory_mib, .. } => {
            let kib = memory_mib * 1024;
            env.shared
                .conn
                .run(move |c, uri| {
                    let dom = lv(uri, "domain", &inst, c.lookup_domain_by_name(&inst))?;
                    lv(uri, "domain", &inst, dom.set_memory_flags(kib, sys::VIR_DOMAIN_MEM_MAXIMUM | config))?;
                    lv(uri, "domain", &inst, dom.set_memory_flags(kib, config))?;
                    if live != 0
                        && let Err(e) = dom.set_memory_flags(kib, live)
                    {
                        tracing::warn!(domain = %inst, error = %e, "live memory change refused; applies on restart");
                    }
                    Ok(())
                })
                .await
        }
        Change::SetVcpus { vcpus, .. } => {
            let n = *vcpus;
            env.shared
                .conn
                .run(move |c, uri| {
                    let dom = lv(uri, "domain", &inst, c.lookup_domain_by_name(&inst))?;
                    lv(uri, "domain", &inst, dom.set_vcpus_flags(n, sys::VIR_DOMAIN_VCPU_MAXIMUM | config))?;
                    lv(uri, "domain", &inst, dom.set_vcpus_flags(n, config))?;
                    if live != 0
                        && let Err(e) = dom.set_vcpus_flags(n, live)
                    {
                        tracing::warn!(domain = %inst, error = %e, "live vCPU change refused; applies on restart");
                    }
                    Ok(())
                })
                .await
        }
        Change::AddNic { nic, .. } => {
            let mut nic = nic.clone();
            if nic.mac.is_none() || matches!(m.record.role, Role::Stage(_)) {
                nic.mac = Some(random_mac());
            }
            let net = m.record.networks.get(&nic.network).cloned().unwrap_or_else(|| nic.network.clone());
            attach(env, &m, edit::nic_device(&nic, &net).render(), config | live, true).await
        }
        Change::RemoveNic { nic, .. } => {
            let mut tree = m.tree.clone();
            let xml = edit::nics_mut(&mut tree).into_iter().find(|(n, _)| n == nic).map(|(_, e)| e.render());
            attach(env, &m, xml.expect("apply_to_spec checked the NIC"), config | live, false).await
        }
        Change::AddDisk { disk, .. } => {
            let storage = &env.shared.storage;
            let file = format!("{}.{}.qcow2", m.name(), disk.name);
            let path = if storage.is_remote() {
                format!("{}/{file}", storage.env_dir(&env.name))
            } else {
                format!("{}/disks/{file}", storage.env_dir(&env.name))
            };
            let size = disk.size_bytes.unwrap_or(0);
            let (p, e) = (path.clone(), env.name.clone());
            env.images(move |s, c, uri| s.create_image(c, uri, &e, &p, "qcow2", size)).await?;
            let used: Vec<String> = m.parsed.devices.disks.iter().map(|d| d.target.dev.clone()).collect();
            let dev = (0..26).map(edit::target_dev).find(|d| !used.contains(d)).unwrap_or_else(|| "vdz".into());
            let mut d = disk.clone();
            d.format = stagecore::DiskFormat::Qcow2;
            let xml = edit::disk_device(&d, &path, &dev).render();
            if let Err(e) = attach(env, &m, xml, config | live, true).await {
                let p = path.clone();
                let _ = env.images(move |s, c, uri| s.remove_image(c, uri, &p)).await;
                return Err(e);
            }
            let mut ms = env.machines().await?;
            for x in ms.iter_mut().filter(|x| x.name() == m.name()) {
                x.record.sources.insert(disk.name.clone(), path.clone());
            }
            env.shared.save(&env.name, &ms).await
        }
        Change::RemoveDisk { disk, .. } => {
            let mut tree = m.tree.clone();
            let xml = edit::disks_mut(&mut tree).into_iter().find(|(n, _)| n == disk).map(|(_, e)| e.render());
            attach(env, &m, xml.expect("apply_to_spec checked the disk"), config | live, false).await
        }
        Change::WriteDisk { disk, offset, data, .. } => env.write(m.name(), disk, *offset, data).await,
        Change::GuestCommand { .. } | Change::GuestFile { .. } => {
            stagecore::guest::apply_guest_change(&env.name, env, change).await
        }
        Change::ReplaceDiskImage { .. } => Err(Error::not_supported("replace_disk_image", NAME)),
    }
}

async fn attach(env: &LibvirtEnvironment, m: &Machine, xml: String, flags: u32, add: bool) -> Result<()> {
    let inst = m.instance.clone();
    env.shared
        .conn
        .run(move |c, uri| {
            let dom = lv(uri, "domain", &inst, c.lookup_domain_by_name(&inst))?;
            let r = if add { dom.attach_device_flags(&xml, flags) } else { dom.detach_device_flags(&xml, flags) };
            lv(uri, "domain", &inst, r)
        })
        .await
}
