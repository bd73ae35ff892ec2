//! Whole-environment snapshots of libvirt domains.
//!
//! Create: [`crate::freeze`] (freeze answering guests, suspend all, external disk-only atomic
//! snapshot per domain, resume, thaw); per-machine consistency is in `SnapshotInfo::machines`;
//! the frozen files and each domain's XML are recorded in our metadata (or the registry).
//! libvirt 9.0 cannot revert external snapshots, so revert is by hand: destroy, a fresh overlay on
//! the snapshot's layer per disk, redefine from the recorded XML, start what was running. Delete
//! only forgets the record: every file stays, so every chain stays valid.

use std::collections::BTreeMap;

use async_trait::async_trait;
use stagecore::{Consistency, Error, Result, Snapshot, SnapshotInfo};
use time::OffsetDateTime;

use crate::freeze::freeze;
use crate::handle::LibvirtEnvironment;
use crate::machines::Store;
use crate::xml::meta::{self, SnapshotRecord};
use crate::xml::{edit, tree::Element};

fn tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

#[async_trait]
impl Snapshot for LibvirtEnvironment {
    #[tracing::instrument(skip(self), fields(environment = %self.name))]
    async fn create_snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        stagecore::name::validate("snapshot", name)?;
        let mut ms = self.machines().await?;
        if ms[0].record.snapshots.iter().any(|s| s.info.name == name) {
            return Err(Error::already_exists("snapshot", format!("{}/{name}", self.name)));
        }
        let spec = self.shared.spec_of(&self.name, &ms).await?;
        let (frozen, machines) = freeze(self, &ms, &format!("snap-{name}-{}", tag())).await?;
        let info = SnapshotInfo {
            name: name.into(),
            environment: self.name.clone(),
            created_at: OffsetDateTime::now_utc(),
            spec,
            consistency: Consistency::CrashConsistent,
            memory: false,
            machines,
        };
        let fresh = self.machines().await?;
        for ((m, layers), now) in ms.iter_mut().zip(frozen).zip(fresh) {
            let mut xml = m.tree.clone();
            meta::strip(&mut xml);
            m.record.snapshots.push(SnapshotRecord { info: info.clone(), layers, xml: xml.render() });
            m.power = now.power;
        }
        self.shared.save(&self.name, &ms).await?;
        Ok(info)
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let ms = self.machines().await?;
        Ok(ms[0].record.snapshots.iter().map(|s| s.info.clone()).collect())
    }

    #[tracing::instrument(skip(self), fields(environment = %self.name))]
    async fn revert_snapshot(&self, name: &str) -> Result<()> {
        stagecore::name::validate("snapshot", name)?;
        let ms = self.machines().await?;
        let mut plans = Vec::new();
        let storage = self.shared.storage.clone();
        let t = tag();
        for m in &ms {
            let snap = m
                .record
                .snapshots
                .iter()
                .find(|s| s.info.name == name)
                .ok_or_else(|| Error::not_found("snapshot", format!("{}/{name}", self.name)))?;
            let mut tree = Element::parse(&snap.xml, &format!("snapshot {name} of {}", m.instance))?;
            let mut paths = BTreeMap::new();
            for (disk, layer) in &snap.layers {
                let next = storage.layer_path(&self.name, &format!("{}.{disk}.revert-{t}.qcow2", m.name()));
                let (st, n, l, env) = (storage.clone(), next.clone(), layer.clone(), self.name.clone());
                self.shared.conn.run(move |c, uri| st.create_overlay(c, uri, &env, &n, &l)).await?;
                paths.insert(disk.clone(), next);
            }
            edit::set_disk_sources(&mut tree, &paths);
            if m.store == Store::Metadata {
                meta::set(&mut tree, &m.labels, &m.record)?;
            }
            plans.push((m.instance.clone(), m.active(), tree.render()));
        }
        self.shared
            .conn
            .run(move |c, uri| {
                let plan: std::collections::BTreeMap<&str, (bool, &str)> =
                    plans.iter().map(|(n, active, xml)| (n.as_str(), (*active, xml.as_str()))).collect();
                let names: Vec<String> = plans.iter().map(|(n, ..)| n.clone()).collect();
                crate::conn::each_domain(c, uri, &names, |n, dom| {
                    let (active, xml) = plan[n];
                    if active {
                        dom.destroy()?;
                    }
                    c.define_domain_xml(xml).map(drop)
                })?;
                let running: Vec<String> =
                    plans.iter().filter(|(_, active, _)| *active).map(|(n, ..)| n.clone()).collect();
                crate::conn::each_domain(c, uri, &running, |_, dom| dom.create().map(drop))
            })
            .await
    }

    #[tracing::instrument(skip(self), fields(environment = %self.name))]
    async fn delete_snapshot(&self, name: &str) -> Result<()> {
        stagecore::name::validate("snapshot", name)?;
        let mut ms = self.machines().await?;
        if !ms[0].record.snapshots.iter().any(|s| s.info.name == name) {
            return Err(Error::not_found("snapshot", format!("{}/{name}", self.name)));
        }
        for m in &mut ms {
            m.record.snapshots.retain(|s| s.info.name != name);
        }
        self.shared.save(&self.name, &ms).await
    }
}
