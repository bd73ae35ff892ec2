//! Stage named vCenter VMs, change the stage, report drift.
//!
//! ```text
//! STAGECORE_VSPHERE_URL=https://vcenter.example.com STAGECORE_VSPHERE_USER=administrator@vsphere.local \
//! STAGECORE_VSPHERE_PASSWORD=… STAGECORE_VSPHERE_VMS=web,db STAGECORE_VSPHERE_ISOLATED_NETWORK=isolated-pg \
//!   cargo run -p stagekit --features vsphere --example vsphere
//! cargo run -p stagekit --features vsphere --example vsphere -- --simulator   # against the bundled simulator
//! ```
//! Optional: `STAGECORE_VSPHERE_CA` (PEM file of the vCenter's CA), `STAGECORE_VSPHERE_FOLDER` (where
//! stage VMs go).

use std::env;

use stagekit::stagecore::{Backend, BackendExt, Change, Error, Result, Secret, Selector, StageOptions};
use stagekit::vsphere::{Reconfig, VsphereBackend, VsphereConfig, VsphereOptions};

fn var(name: &str) -> Result<String> {
    env::var(name).map_err(|_| Error::invalid(name, "environment variable not set"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let simulate = env::args().any(|a| a == "--simulator");
    let state = tempfile::tempdir().map_err(|e| Error::io("creating a directory in", std::env::temp_dir(), e))?;
    let _sim;
    let (config, vms, isolated, folder) = if simulate {
        let sim = stagecore_vsphere_sim::Simulator::start(Default::default())
            .await
            .map_err(|e| Error::backend_msg("simulator", e))?;
        let mut config = VsphereConfig::new(
            sim.https_url(),
            stagecore_vsphere_sim::SIM_USER,
            Secret::new(stagecore_vsphere_sim::SIM_PASSWORD),
        )?;
        let ca = state.path().join("sim-ca.pem");
        std::fs::write(&ca, sim.ca_pem()).map_err(|e| Error::io("writing", &ca, e))?;
        config.ca_cert_pem = Some(ca);
        _sim = sim;
        (config, "web,db".to_string(), Some("isolated-pg".to_string()), Some("stage".to_string()))
    } else {
        let mut config = VsphereConfig::new(
            &var("STAGECORE_VSPHERE_URL")?,
            var("STAGECORE_VSPHERE_USER")?,
            Secret::new(var("STAGECORE_VSPHERE_PASSWORD")?),
        )?;
        config.ca_cert_pem = env::var("STAGECORE_VSPHERE_CA").ok().map(Into::into);
        (
            config,
            var("STAGECORE_VSPHERE_VMS")?,
            env::var("STAGECORE_VSPHERE_ISOLATED_NETWORK").ok(),
            env::var("STAGECORE_VSPHERE_FOLDER").ok(),
        )
    };
    println!("connecting to {}", config.base_url);
    let mut options = VsphereOptions::new(state.path().join("registry"));
    options.isolated_network = isolated;
    options.folder = folder;
    let backend = VsphereBackend::connect(config, options).await?;
    if simulate {
        // As an administrator would: turn on changed block tracking so disk drift can be checked.
        backend.client().reconfigure("vm-102", &Reconfig { change_tracking: Some(true), ..Default::default() }).await?;
    }

    let names: Vec<String> = vms.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    let prod = backend.attach(&Selector::Machines { environment: "prod".into(), names }).await?;
    println!("production: {:?}", prod.spec().await?.machines.iter().map(|m| &m.name).collect::<Vec<_>>());
    let baseline = prod.take_baseline().await?;
    println!("baseline {} taken (one snapshot per VM)", baseline.id);
    let stage = backend.stage(&baseline, &StageOptions::linked("try-1")).await?;
    let info = stage.info().await?;
    println!("linked, fenced stage: {:?}", info.machines.iter().map(|m| &m.instance_name).collect::<Vec<_>>());
    let first = &stage.spec().await?.machines[0];
    stage.apply(&Change::SetMemory { machine: first.name.clone(), memory_mib: first.memory_mib * 2 }).await?;
    println!("{}", backend.drift(&*prod, &*stage).await?);
    backend.destroy("try-1").await?;
    backend.destroy("prod").await?;
    println!("stage deleted; production forgotten (its VMs are never deleted)");
    Ok(())
}
