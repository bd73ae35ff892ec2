//! Stage an existing set of libvirt domains, report drift, and promote a tested change by replay.
//!
//! ```text
//! cargo run -p stagekit --features libvirt --example libvirt -- --uri qemu:///system --domains web,app,db
//! cargo run -p stagekit --features libvirt --example libvirt -- --self-test   # makes 3 TCG domains, cleans up
//! ```
//! Options: `--state-dir DIR` (image layers, registry, promotion receipts; default
//! `/var/lib/libvirt/images/stagecore-example`, or a fresh `…-<tag>` one for `--self-test`). The domains are attached by
//! name (their definitions are not edited), get a baseline (a new overlay on every disk), and a
//! linked, fenced stage; the second domain gets 64 MiB more memory on the stage, which is then
//! promoted to production with a snapshot to roll back to.

#[allow(dead_code)]
mod common;

#[tokio::main]
async fn main() -> stagekit::stagecore::Result<()> {
    run::main().await
}

mod run {
    use std::process::Command;
    use std::sync::Arc;

    use stagekit::libvirt::LibvirtBackend;
    use stagekit::stagecore::promotion::{PreconditionPolicy, Promotion, PromotionEngine, PromotionRequest, Strategy};
    use stagekit::stagecore::{
        Backend, BackendExt, Change, ChangeSet, EnvironmentExt, Error, Result, Selector, StageOptions,
    };

    fn arg(args: &[String], name: &str) -> Option<String> {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
    }

    pub(crate) async fn main() -> Result<()> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let uri = arg(&args, "--uri").unwrap_or_else(|| "qemu:///system".into());
        let self_test = args.iter().any(|a| a == "--self-test");
        let tag = &uuid_tag();
        let default_dir = if self_test { format!("stagecore-example-{tag}") } else { "stagecore-example".into() };
        let dir = arg(&args, "--state-dir").unwrap_or_else(|| format!("/var/lib/libvirt/images/{default_dir}"));
        let domains: Vec<String> = if self_test {
            ["web", "app", "db"].iter().map(|t| format!("ex-{tag}-{t}")).collect()
        } else {
            let list = arg(&args, "--domains").ok_or(Error::invalid("--domains", "name the domains: web,app,db"))?;
            list.split(',').map(str::to_string).collect()
        };
        let made = if self_test { make_domains(&uri, &dir, tag, &domains) } else { Ok(()) };
        let result = match made {
            Ok(()) => stage_and_promote(&uri, &dir, tag, &domains).await,
            Err(e) => Err(e),
        };
        if self_test {
            for d in &domains {
                virsh(&uri, &["destroy", d]);
                virsh(&uri, &["undefine", d]);
            }
            let p = std::path::Path::new(&dir);
            let own = if arg(&args, "--state-dir").is_some() { vec![p.join(format!("prod-{tag}"))] } else { vec![] };
            for d in [vec![p.join(format!("self-test-{tag}"))], own].concat() {
                let _ = std::fs::remove_dir_all(d); // disks and baseline layers
            }
            if arg(&args, "--state-dir").is_none() {
                let _ = std::fs::remove_dir_all(p); // the self-test's own state directory
            }
            println!("self-test domains and files removed");
        }
        result
    }

    async fn stage_and_promote(uri: &str, dir: &str, tag: &str, domains: &[String]) -> Result<()> {
        let backend = Arc::new(LibvirtBackend::connect(uri, dir).await?);
        let (pname, sname) = (format!("prod-{tag}"), format!("try-{tag}"));
        let selector = Selector::Machines { environment: pname.clone(), names: domains.to_vec() };
        let prod = backend.attach(&selector).await?;
        println!("attached {domains:?} from {uri} as `{pname}` (definitions untouched)");
        let result = async {
            let baseline = prod.take_baseline().await?;
            println!("baseline {} taken ({} disk layers frozen)", baseline.id, baseline.layers.len());
            let stage = backend.stage(&baseline, &StageOptions::linked(&sname)).await?;
            let names: Vec<_> = stage.info().await?.machines.into_iter().map(|m| m.instance_name).collect();
            println!("linked, fenced stage `{sname}`: {names:?}");
            println!("{}", backend.drift(&*prod, &*stage).await?);

            let target = domains.get(1).unwrap_or(&domains[0]).clone();
            let memory = stage.spec().await?.machine(&target).map(|m| m.memory_mib).unwrap_or(128);
            let cs = ChangeSet {
                id: format!("cs-{tag}"),
                description: format!("{target} gets 64 MiB more memory"),
                changes: vec![Change::SetMemory { machine: target.clone(), memory_mib: memory + 64 }],
            };
            stage.apply_change_set(&cs).await?;
            println!("{}", backend.drift(&*prod, &*stage).await?);

            let (engine, _) =
                PromotionEngine::open(std::path::Path::new(dir).join("promotions"), backend.clone()).await?;
            let receipt = engine
                .promote(PromotionRequest {
                    production: prod.clone(),
                    stage: stage.clone(),
                    strategy: Strategy::Replay,
                    policy: PreconditionPolicy::Anywhere,
                    requested_by: "libvirt example".into(),
                    gates: vec![Arc::new(crate::common::Approve("ops-lead"))],
                })
                .await?;
            println!("promotion {}: {:?}", receipt.id, receipt.outcome);
            for s in &receipt.steps {
                println!("  {:<14} {:>6} ms  {}", s.step, s.millis, s.outcome);
            }
            let now = prod.spec().await?.machine(&target).map(|m| m.memory_mib).unwrap_or(0);
            println!("production {target} now has {now} MiB");
            Ok::<_, Error>(())
        }
        .await;
        let _ = backend.destroy(&sname).await;
        backend.destroy(prod.name()).await?; // forgets the attached production; its domains stay
        result
    }

    fn uuid_tag() -> String {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        format!("{:08x}", nanos.subsec_nanos() ^ std::process::id().rotate_left(16))
    }

    fn virsh(uri: &str, args: &[&str]) -> bool {
        Command::new("virsh").arg("-c").arg(uri).args(args).output().is_ok_and(|o| o.status.success())
    }

    /// Defines 3 small shut-off TCG domains with qcow2 disks, as someone's existing production.
    fn make_domains(uri: &str, dir: &str, tag: &str, names: &[String]) -> Result<()> {
        let files = std::path::Path::new(dir).join(format!("self-test-{tag}"));
        std::fs::create_dir_all(&files).map_err(|e| Error::io("creating", &files, e))?;
        for name in names {
            let tier = name.rsplit('-').next().unwrap_or("vm");
            let disk = files.join(format!("{tier}.qcow2"));
            let ok = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&disk)
                .arg("16M")
                .status()
                .is_ok_and(|s| s.success());
            let xml = files.join(format!("{tier}.xml"));
            std::fs::write(
                &xml,
                format!(
                    "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
                     <os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>\
                     <driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/>\
                     </disk><interface type='network'><source network='default'/><model type='virtio'/>\
                     </interface></devices></domain>",
                    disk.display()
                ),
            )
            .map_err(|e| Error::io("writing", &xml, e))?;
            if !ok || !virsh(uri, &["define", &xml.display().to_string()]) {
                return Err(Error::backend_msg("libvirt", format!("could not define {name} (qemu-img, virsh)")));
            }
        }
        println!("self-test: defined {names:?}");
        Ok(())
    }
}
