//! The libvirt backend vs the manual way, side by side, on the live libvirtd (`qemu:///system`):
//! (a) a linked clone of a 3-domain environment vs `qemu-img create -b` + `virsh define` per
//! domain; (b) a whole-stage snapshot of 3 running domains vs `virsh snapshot-create-as
//! --disk-only --atomic` per domain.
//!
//! Run: `cargo bench -p stagekit --features libvirt --bench libvirt` (needs libvirtd, virsh,
//! qemu-img; takes about two minutes). Everything it makes carries a unique tag and is removed at
//! the end, also after a panic.

criterion::criterion_main!(bench::benches);

mod bench {
    use std::path::PathBuf;
    use std::process::Command;
    use std::time::{Duration, Instant};

    use criterion::{Criterion, SamplingMode, criterion_group};
    use stagekit::libvirt::LibvirtBackend;
    use stagekit::stagecore::{Backend, Baseline, DynEnvironment, StageOptions, memory::sample_spec};

    const URI: &str = "qemu:///system";

    fn run(cmd: &mut Command) -> String {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn virsh(args: &[&str]) -> String {
        run(Command::new("virsh").arg("-c").arg(URI).args(args))
    }

    /// A production of 3 TCG domains with a baseline, plus per-machine XML templates for the manual way.
    struct Fixture {
        rt: tokio::runtime::Runtime,
        backend: LibvirtBackend,
        tag: String,
        dir: PathBuf,
        baseline: Baseline,
        /// (machine, production's inactive XML without our metadata, baseline layer, production top).
        templates: Vec<(String, String, String, String)>,
    }

    impl Fixture {
        fn new() -> Fixture {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
            let tag = format!("bn{:08x}", std::process::id().rotate_left(16) ^ now);
            let dir = PathBuf::from(format!("/var/lib/libvirt/images/stagecore-bench-{tag}"));
            let backend = rt.block_on(LibvirtBackend::connect(URI, &dir)).expect("libvirtd must be running");
            let prod_name = format!("{tag}-p");
            let mut spec = sample_spec(&prod_name);
            spec.machines.iter_mut().for_each(|m| m.memory_mib = 64);
            let baseline = rt.block_on(async {
                let prod = backend.create(&spec).await.expect("create production");
                prod.take_baseline().await.expect("baseline")
            });
            std::fs::create_dir_all(dir.join("manual")).unwrap();
            let templates = baseline
                .layers
                .iter()
                .map(|l| {
                    let xml = virsh(&["dumpxml", "--inactive", &format!("{prod_name}-{}", l.machine)]);
                    let xml = cut(&xml, "<metadata>", "</metadata>"); // the clone must not join production
                    let top = between(&xml, "<source file='", "'").to_string();
                    (l.machine.clone(), xml, l.layer.clone(), top)
                })
                .collect();
            Fixture { rt, backend, tag, dir, baseline, templates }
        }

        fn stage(&self, name: &str, start: bool) -> DynEnvironment {
            let opts = StageOptions { fenced: false, start, ..StageOptions::linked(name) };
            self.rt.block_on(self.backend.stage(&self.baseline, &opts)).expect("stage")
        }

        /// The manual linked clone: per domain an overlay by qemu-img and an edited XML defined by virsh.
        fn manual_clone(&self, n: u64) -> Vec<String> {
            let mut names = Vec::new();
            for (machine, xml, layer, top) in &self.templates {
                let name = format!("{}-m{n}-{machine}", self.tag);
                let disk = self.dir.join("manual").join(format!("{name}.qcow2"));
                let d = disk.to_str().unwrap();
                run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", layer, d]));
                let old_name = between(xml, "<name>", "</name>");
                let xml = xml.replace(&format!("<name>{old_name}</name>"), &format!("<name>{name}</name>"));
                let xml = cut(&xml, "<uuid>", "</uuid>").replace(top.as_str(), d);
                let xml = xml.lines().filter(|l| !l.contains("<mac address=")).collect::<Vec<_>>().join("\n");
                let file = self.dir.join("manual").join(format!("{name}.xml"));
                std::fs::write(&file, xml).unwrap();
                virsh(&["define", file.to_str().unwrap()]);
                names.push(name);
            }
            names
        }
    }

    fn between<'a>(s: &'a str, start: &str, end: &str) -> &'a str {
        let from = s.find(start).map(|i| i + start.len()).unwrap_or_else(|| panic!("no {start}"));
        &s[from..from + s[from..].find(end).unwrap()]
    }

    fn cut(s: &str, start: &str, end: &str) -> String {
        match (s.find(start), s.find(end)) {
            (Some(a), Some(b)) => format!("{}{}", &s[..a], &s[b + end.len()..]),
            _ => s.to_string(),
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            for d in virsh(&["list", "--all", "--name"]).lines().filter(|d| d.contains(&self.tag)) {
                let _ = Command::new("virsh").args(["-c", URI, "destroy", d]).output();
                let _ = Command::new("virsh").args(["-c", URI, "undefine", d]).output();
            }
            for n in virsh(&["net-list", "--all", "--name"]).lines().filter(|n| n.contains(&self.tag)) {
                let _ = Command::new("virsh").args(["-c", URI, "net-destroy", n]).output();
                let _ = Command::new("virsh").args(["-c", URI, "net-undefine", n]).output();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn linked_clone(c: &mut Criterion, f: &Fixture) {
        let mut g = c.benchmark_group("libvirt_linked_clone_3_domains");
        g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_secs(1));
        g.measurement_time(Duration::from_secs(8));
        let mut n = 0u64;
        g.bench_function("stagecore_stage_linked", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    let name = format!("{}-s{n}", f.tag);
                    let t = Instant::now();
                    f.stage(&name, false);
                    total += t.elapsed();
                    f.rt.block_on(f.backend.destroy(&name)).unwrap();
                }
                total
            })
        });
        g.bench_function("manual_qemu_img_b_and_virsh_define", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    let t = Instant::now();
                    let names = f.manual_clone(n);
                    total += t.elapsed();
                    for d in names {
                        virsh(&["undefine", &d]);
                    }
                }
                total
            })
        });
        g.finish();
    }

    fn snapshot(c: &mut Criterion, f: &Fixture) {
        let ours = f.stage(&format!("{}-snapa", f.tag), true);
        let theirs: Vec<String> = f.stage(&format!("{}-snapb", f.tag), true).info_blocking(&f.rt).into_iter().collect();
        let mut g = c.benchmark_group("libvirt_snapshot_3_running_domains");
        g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_secs(1));
        g.measurement_time(Duration::from_secs(8));
        let mut n = 0u64;
        g.bench_function("stagecore_whole_stage_snapshot", |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    n += 1;
                    f.rt.block_on(ours.create_snapshot(&format!("s{n}"))).unwrap();
                }
                t.elapsed()
            })
        });
        g.bench_function("virsh_snapshot_create_as_disk_only_atomic_per_domain", |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    n += 1;
                    for d in &theirs {
                        let file = f.dir.join("manual").join(format!("{d}.snap{n}.qcow2"));
                        let spec = format!("vda,file={}", file.display());
                        let name = format!("s{n}");
                        let args = ["snapshot-create-as", d, &name, "--disk-only", "--atomic", "--no-metadata"];
                        virsh(&[&args[..], &["--diskspec", &spec]].concat());
                    }
                }
                t.elapsed()
            })
        });
        g.finish();
    }

    /// Instance names of an environment, blocking.
    trait InfoBlocking {
        fn info_blocking(&self, rt: &tokio::runtime::Runtime) -> Vec<String>;
    }

    impl InfoBlocking for DynEnvironment {
        fn info_blocking(&self, rt: &tokio::runtime::Runtime) -> Vec<String> {
            let info = rt.block_on(self.info()).unwrap();
            info.machines.into_iter().map(|m| m.instance_name).collect()
        }
    }

    fn all(c: &mut Criterion) {
        let f = Fixture::new();
        linked_clone(c, &f);
        snapshot(c, &f);
    }

    criterion_group!(benches, all);
}
