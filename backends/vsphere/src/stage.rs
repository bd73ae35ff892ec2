//! Executing a [`StagePlan`] on vCenter.
//!
//! Contract: the plan (`stagecore::toolbox`) checks the options and the baseline and names the
//! stage VMs (`prefix + logical name`); this module makes one clone per production VM of the
//! baseline's snapshot — linked (`CloneVM_Task`, `createNewChildDiskBacking`) or full
//! (`CloneVM_Task`, `moveAllDiskBackingsAndDisallowSharing`, so the copy is the baseline's state
//! and not the VM's current one) — with new MACs (`addressType: generated`) and, when fenced,
//! every NIC on the configured isolated port group. vCenter, not the plan, chooses the clones'
//! UUIDs and MACs (its MACs must come from its own ranges); the record keeps the spec as vCenter
//! reports it after cloning. Right after cloning, each clone gets an *origin* snapshot whose CBT
//! change ids are what the stage's disk changes are measured from. A failure midway deletes the
//! clones already made ([`Undo`]); what could not be deleted is named in
//! [`stagecore::Error::LeftBehind`].

use std::collections::BTreeMap;
use std::sync::Arc;

use stagecore::toolbox::{StagePlan, Undo};
use stagecore::{Baseline, Capabilities, CloneKind, Error, Result, StageOptions};

use crate::core::{Shared, live_spec, resolve_folder, vm_infos};
use crate::record::{MachineRecord, Record, VmPoint, VsphereExtra, baseline_set, layers, tops};
use crate::vms::{delete_vm, snapshot_all};
use crate::{BACKEND, LinkedCloneSpec, MoRef, VsphereClient};

/// The name of the snapshot taken of every stage VM right after cloning.
pub(crate) const ORIGIN_SNAPSHOT: &str = "stagecore-origin";

/// The longest VM name vCenter accepts.
const MAX_VM_NAME: usize = 80;

/// The id of the folder holding `vm`.
async fn folder_of(client: &VsphereClient, vm: &str) -> Result<String> {
    for f in client.list_folders(&[]).await? {
        if client.list_vms(&[], &[&f.folder]).await?.iter().any(|v| v.vm == vm) {
            return Ok(f.folder);
        }
    }
    Err(Error::not_found("folder of vSphere VM", vm))
}

/// Creates the stage and records it.
pub(crate) async fn stage(
    shared: &Arc<Shared>,
    caps: &Capabilities,
    baseline: &Baseline,
    options: &StageOptions,
) -> Result<()> {
    stagecore::checked::check_stage(caps, options, BACKEND)?;
    let mut plan = StagePlan::new(baseline, options)?;
    if let Some(m) = plan.instances().iter().find(|m| m.instance_name.len() > MAX_VM_NAME) {
        return Err(Error::invalid(
            "stage.name_prefix",
            format!("`{}` is longer than vSphere's {MAX_VM_NAME} characters", m.instance_name),
        ));
    }
    let isolated = if plan.fencing.fenced { shared.opts.isolated_network.clone() } else { None };
    let _guard = shared.lock.lock().await;
    plan.require_name_free(shared.registry.exists(&plan.name)?)?;
    let source = shared.registry.load(&baseline.environment)?;
    plan.require_known_baseline(Some(&source.baselines))?;
    let points =
        source.backend.points.get(&baseline_set(&baseline.id)).ok_or_else(|| {
            Error::not_found("baseline snapshots", format!("{}/{}", baseline.environment, baseline.id))
        })?;
    let folder = match &shared.opts.folder {
        Some(f) => Some(resolve_folder(&shared.client, f).await?),
        None => None,
    };
    let mut undo = Undo::new(format!("stage {}", plan.name));
    let result = execute(shared, &mut plan, points, folder.as_deref(), isolated, &mut undo).await;
    undo.finish(result).await?;
    tracing::info!(clone = ?options.clone, fenced = options.fenced, "staged");
    Ok(())
}

/// Clones, snapshots the origins, starts when asked and saves the record; every VM made is
/// pushed onto `undo`.
async fn execute(
    shared: &Arc<Shared>,
    plan: &mut StagePlan,
    points: &[VmPoint],
    folder: Option<&str>,
    isolated: Option<String>,
    undo: &mut Undo,
) -> Result<()> {
    let client = &shared.client;
    let mut created = Vec::new();
    for instance in plan.instances() {
        let p = points.iter().find(|p| p.machine == instance.name).ok_or_else(|| {
            Error::not_found("baseline snapshot of machine", format!("{}/{}", plan.baseline().id, instance.name))
        })?;
        let folder = match folder {
            Some(f) => f.to_string(),
            None => folder_of(client, &p.vm).await?,
        };
        let spec = LinkedCloneSpec {
            snapshot: MoRef::new("VirtualMachineSnapshot", &p.snapshot),
            name: instance.instance_name.clone(),
            folder,
            network_name: isolated.clone(),
            power_on: false,
        };
        let vm = match plan.info.clone {
            CloneKind::Linked => client.linked_clone(&p.vm, &spec).await?,
            CloneKind::Full => client.full_clone_from_snapshot(&p.vm, &spec).await?,
        };
        let (s, v) = (shared.clone(), vm.clone());
        undo.push_async(format!("VM {} ({vm})", spec.name), move || async move { delete_vm(&s.client, &v).await });
        created.push(MachineRecord { name: instance.name.clone(), vm, instance_name: spec.name });
    }
    let description = format!("stagecore: state of stage {} when cloned", plan.name);
    let origin = snapshot_all(shared, &created, ORIGIN_SNAPSHOT, &description, undo).await?;
    if plan.start {
        for m in &created {
            client.power_on(&m.vm).await?;
        }
    }
    let role = stagecore::Role::Stage(Box::new(plan.info.clone()));
    let infos = vm_infos(client, &created).await?;
    plan.spec = live_spec(shared, &plan.name, &role, &created, &infos);
    let disks = tops(&plan.spec, &created);
    let origin_layers = layers(&origin);
    let points = BTreeMap::from([(baseline_set(&plan.baseline().id), origin)]);
    let record = Record::stage(plan, disks, origin_layers, VsphereExtra { machines: created, points });
    shared.registry.save(&record)
}
