//! Swap promotion: a stage's machines take over production's identity, and production's old
//! machines become the stage's.
//!
//! Contract of [`swap`] (its own inverse): both environments' machines are stopped; the records
//! exchange their machines (spec: config, disks, logical sources), disk tops and the origins of
//! the stage's baseline, and each side then gets its own identities back (UUIDs and MACs by
//! machine and NIC name; instance-name prefix, fencing and segments never move). Production's
//! machines that ran are started again, now on the stage's disks; the stage stays stopped.
//! Snapshots and baselines stay with their environment.
//!
//! Files follow the records: layers in the stage's `disks/` that production now needs move to
//! production's directory, and layers in production's directory that only the stage needs move
//! to the stage's (headers of files backed by them are rewritten with `qemu-img rebase -u`, which
//! is safe as no machine runs). Production keeps layers that it, or a third environment, still
//! needs — so destroying the stage after a committed swap never touches production's chains.
//!
//! Crash safety: an intent file (`envs/<production>/swap-intent.json`) is written before any
//! file changes; moves are hard links until production's record is saved with the swap's id —
//! the decision point. [`settle`] (run by `swap` and when either environment is opened) finishes
//! an interrupted swap forward if production's record carries the id, else undoes it. Either way
//! production's disk `source`s match exactly one of the two specs, which is what the promotion
//! engine's recovery compares.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use stagecore::{Error, Identities, Result, Role};

use crate::env::stop_all;
use crate::error;
use crate::gc::{canonical, chain_files, layer_files, needed_by_others, roots};
use crate::shared::{Ctx, EnvShared, EnvState, blocking, open_shared};
use crate::store::{EnvPaths, EnvRecord, QemuRecord, write_atomic};

/// The intent file's name in production's directory.
const INTENT: &str = "swap-intent.json";

/// A backing-file name to rewrite: `image` (its new name; `alt` the old one) from `old` to `new`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Rebase {
    image: PathBuf,
    alt: PathBuf,
    old: PathBuf,
    new: PathBuf,
}

/// What a swap in progress will do.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Intent {
    id: String,
    stage: String,
    /// Old → new name of every moved layer (hard links until the swap is decided).
    moves: Vec<(PathBuf, PathBuf)>,
    rebases: Vec<Rebase>,
    /// The stage's record after the swap.
    stage_record: EnvRecord,
}

fn intent_path(root: &Path, production: &str) -> PathBuf {
    EnvPaths::new(root, production).dir.join(INTENT)
}

/// Exchanges machines, tops and the stage baseline's origins; identities stay with each side.
fn exchange_records(p: &mut EnvRecord, s: &mut EnvRecord, baseline_id: &str) {
    let (p_ids, s_ids) = (Identities::of(&p.spec), Identities::of(&s.spec));
    std::mem::swap(&mut p.spec.machines, &mut s.spec.machines);
    std::mem::swap(&mut p.disks, &mut s.disks);
    let (po, so) = (p.origins.remove(baseline_id), s.origins.remove(baseline_id));
    p.origins.extend(so.map(|o| (baseline_id.to_string(), o)));
    s.origins.extend(po.map(|o| (baseline_id.to_string(), o)));
    p_ids.apply_to(&mut p.spec);
    s_ids.apply_to(&mut s.spec);
    // A seal is a fact about a file, whichever record keeps it: after the exchange each side may
    // stand on layers the other sealed (production's seals win for a file both sealed).
    let mut seals = s.backend.seals.clone();
    seals.extend(p.backend.seals.clone());
    (p.backend.seals, s.backend.seals) = (seals.clone(), seals);
}

/// Replaces every path of `rec` that is (canonically) a moved file by its new name.
fn remap(rec: &mut EnvRecord, moves: &BTreeMap<PathBuf, PathBuf>) {
    let map = |p: &mut PathBuf| {
        if let Some(new) = moves.get(&canonical(p)) {
            *p = new.clone();
        }
    };
    rec.disks.values_mut().for_each(map);
    rec.snapshots.iter_mut().flat_map(|s| s.layers.values_mut()).for_each(map);
    rec.origins.values_mut().flat_map(|o| o.values_mut()).for_each(map);
    for l in rec.baselines.iter_mut().flat_map(|b| b.layers.iter_mut()) {
        let mut p = PathBuf::from(&l.layer);
        map(&mut p);
        l.layer = p.display().to_string();
    }
    for (old, new) in moves {
        rec.backend.seals.rename(old, new);
    }
}

/// Which files move which way, and every (image, backing) link of both sides' chains. Blocking.
struct Moves {
    to_p: Vec<PathBuf>,
    to_s: Vec<PathBuf>,
    links: Vec<(PathBuf, PathBuf)>,
}

fn plan_moves(root: &Path, (p, s): (&EnvPaths, &EnvPaths), np: &EnvRecord, ns: &EnvRecord) -> Result<Moves> {
    let (rp, rs) = (roots(np), roots(ns));
    let (need_p, need_s) = (chain_files(&rp)?, chain_files(&rs)?);
    let others: HashSet<PathBuf> = needed_by_others(root, &[&np.name, &ns.name])?;
    let mut to_p = Vec::new();
    for f in layer_files(&s.disks())? {
        let c = canonical(&f);
        if need_p.contains(&c) && !others.contains(&c) {
            to_p.push(c);
        }
    }
    let mut to_s = Vec::new();
    for f in layer_files(&p.disks())? {
        let c = canonical(&f);
        if need_s.contains(&c) && !need_p.contains(&c) && !others.contains(&c) {
            to_s.push(c);
        }
    }
    let mut links = Vec::new();
    for r in rp.iter().chain(&rs) {
        let chain = stagecore_qcow2::chain(r).map_err(error::qcow2)?;
        for pair in chain.windows(2) {
            links.push((canonical(&pair[0].path), canonical(&pair[1].path)));
        }
    }
    links.sort();
    links.dedup();
    Ok(Moves { to_p, to_s, links })
}

/// Swaps `production` and `stage` (see the module contract).
pub(crate) async fn swap(ctx: &Arc<Ctx>, production: &str, stage: &str) -> Result<()> {
    stagecore::name::validate("environment", production)?;
    stagecore::name::validate("environment", stage)?;
    if production == stage {
        return Err(Error::invalid("stage", format!("{stage} cannot be swapped with itself")));
    }
    settle(ctx, production).await?;
    let (p, s) = (open_shared(ctx, production)?, open_shared(ctx, stage)?);
    let mut pst = p.state.lock().await;
    let mut sst = s.state.lock().await;
    if pst.rec(production)?.role != Role::Production {
        return Err(Error::Precondition(format!("{production} is not a production environment")));
    }
    let baseline_id = match &sst.rec(stage)?.role {
        Role::Stage(info) if info.source == production => info.baseline.id.clone(),
        _ => return Err(Error::Precondition(format!("{stage} is not a stage of {production}"))),
    };
    let running = stop_all(&p, &mut pst).await?;
    stop_all(&s, &mut sst).await?;
    let result = exchange(ctx, (&p, &mut pst), (&s, &mut sst), &baseline_id).await;
    if let Err(e) = &result
        && e.to_string().contains(crate::config::CRASH)
    {
        return result;
    }
    let spec = pst.rec(production)?.spec.clone();
    let again: Vec<String> = running.into_iter().filter(|m| spec.machine(m).is_some()).collect();
    let started = crate::env::start_some(&p, &mut pst, Some(&again)).await;
    result.and(started)
}

/// The name a layer gets when it moves: `m<n>-` + its name without an earlier `m<k>-` prefix.
fn moved_name(n: u64, file: &Path) -> String {
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let bare = match name.split_once('-') {
        Some((m, rest)) if m.len() > 1 && m.starts_with('m') && m[1..].bytes().all(|b| b.is_ascii_digit()) => rest,
        _ => name.as_str(),
    };
    format!("m{n}-{bare}")
}

/// Names the moves, points both records at the new names and lists the header rewrites.
fn intent_for(
    id: String,
    (pp, sp): (&EnvPaths, &EnvPaths),
    np: &mut EnvRecord,
    mut ns: EnvRecord,
    plan: &Moves,
) -> Intent {
    let mut moves = BTreeMap::new();
    for (files, rec, dir) in [(&plan.to_p, &mut *np, pp.disks()), (&plan.to_s, &mut ns, sp.disks())] {
        for f in files {
            let n = rec.backend.next_layer;
            rec.backend.next_layer += 1;
            moves.insert(f.clone(), canonical(&dir).join(moved_name(n, f)));
        }
    }
    remap(np, &moves);
    remap(&mut ns, &moves);
    let rebases = plan
        .links
        .iter()
        .filter_map(|(image, backing)| {
            let new = moves.get(backing)?.clone();
            let moved = moves.get(image).cloned().unwrap_or_else(|| image.clone());
            Some(Rebase { image: moved, alt: image.clone(), old: backing.clone(), new })
        })
        .collect::<Vec<Rebase>>();
    // A backing-file name we rewrite changes the image's header: such an image keeps no seal
    // (today only unsealed tops and snapshot layers are rebased; baseline layers never move).
    for r in &rebases {
        for rec in [&mut *np, &mut ns] {
            rec.backend.seals.remove(&r.image);
            rec.backend.seals.remove(&r.alt);
        }
    }
    Intent { id, stage: ns.name.clone(), moves: moves.into_iter().collect(), rebases, stage_record: ns }
}

type Side<'a, 'b> = (&'a EnvShared, &'b mut EnvState);

/// Plans and performs the exchange with both environments stopped and locked.
async fn exchange(ctx: &Ctx, p: Side<'_, '_>, s: Side<'_, '_>, baseline_id: &str) -> Result<()> {
    let (ps, pst) = p;
    let (ss, sst) = s;
    let (mut np, mut ns) = (pst.rec(&ps.name)?.clone(), sst.rec(&ss.name)?.clone());
    exchange_records(&mut np, &mut ns, baseline_id);
    let id = uuid::Uuid::new_v4().to_string();
    np.backend.last_swap = Some(id.clone());
    let plan = {
        let (root, pe, se, np, ns) = (ctx.root.clone(), ps.paths.clone(), ss.paths.clone(), np.clone(), ns.clone());
        blocking(move || plan_moves(&root, (&pe, &se), &np, &ns)).await?
    };
    let intent = intent_for(id, (&ps.paths, &ss.paths), &mut np, ns, &plan);
    let file = intent_path(&ctx.root, &ps.name);
    let text = serde_json::to_vec_pretty(&intent).map_err(|e| error::msg(format!("serialising swap intent: {e}")))?;
    write_atomic(&file, &text)?;
    tracing::info!(production = %ps.name, stage = %ss.name, moves = intent.moves.len(), "swap intent written");
    let decided = async {
        for (old, new) in &intent.moves {
            link(old, new)?;
        }
        for r in &intent.rebases {
            rebase(r, true).await?;
        }
        ctx.hooks.crash("swap:linked")?;
        np.save(&ps.paths)?;
        ctx.hooks.crash("swap:decided")
    }
    .await;
    if let Err(e) = &decided
        && e.to_string().contains(crate::config::CRASH)
    {
        return decided;
    }
    let settled = resolve((ps, pst), (ss, sst), &file, &intent).await;
    decided.and(settled)
}

/// Hard-links `old` to `new` unless `new` exists.
fn link(old: &Path, new: &Path) -> Result<()> {
    if new.exists() {
        return Ok(());
    }
    std::fs::hard_link(old, new).map_err(|e| error::io("linking", new, &e))?;
    if let Some(dir) = new.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| error::io("syncing", dir, &e))?;
    }
    Ok(())
}

/// Points `r`'s image at the new (`forward`) or old backing name, unless it already does.
async fn rebase(r: &Rebase, forward: bool) -> Result<()> {
    let image = if r.image.exists() { r.image.clone() } else { r.alt.clone() };
    let target = if forward { &r.new } else { &r.old };
    let probe = image.clone();
    let current = blocking(move || stagecore_qcow2::info(&probe).map_err(error::qcow2)).await?.backing_file;
    if current.as_deref().map(canonical) == Some(canonical(target)) {
        return Ok(());
    }
    crate::images::set_backing(&image, target).await
}

/// Finishes (production's record carries the id) or undoes an interrupted swap, reloads both
/// records and removes the intent file.
async fn resolve(p: Side<'_, '_>, s: Side<'_, '_>, file: &Path, intent: &Intent) -> Result<()> {
    let (ps, pst) = p;
    let (ss, sst) = s;
    let on_disk = EnvRecord::load(&ps.paths, &ps.name)?;
    if on_disk.backend.last_swap.as_deref() == Some(intent.id.as_str()) {
        for (old, new) in &intent.moves {
            if old.exists() {
                link(old, new)?;
            }
        }
        for r in &intent.rebases {
            rebase(r, true).await?;
        }
        intent.stage_record.save(&ss.paths)?;
        for (old, new) in &intent.moves {
            if new.exists() {
                let _ = std::fs::remove_file(old);
            }
        }
        sst.rec = Some(intent.stage_record.clone());
        tracing::info!(production = %ps.name, stage = %ss.name, "swap completed");
    } else {
        for r in &intent.rebases {
            if r.old.exists() {
                rebase(r, false).await?;
            }
        }
        for (old, new) in &intent.moves {
            if old.exists() {
                let _ = std::fs::remove_file(new);
            }
        }
        sst.rec = Some(EnvRecord::load(&ss.paths, &ss.name)?);
        tracing::warn!(production = %ps.name, stage = %ss.name, "interrupted swap undone");
    }
    pst.rec = Some(on_disk);
    std::fs::remove_file(file).map_err(|e| error::io("removing", file, &e))?;
    Ok(())
}

/// Finishes or undoes a swap of `production` that a crash interrupted (no-op without one).
pub(crate) async fn settle(ctx: &Arc<Ctx>, production: &str) -> Result<()> {
    let file = intent_path(&ctx.root, production);
    let text = match std::fs::read(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(error::io("reading", &file, &e)),
    };
    let intent: Intent = serde_json::from_slice(&text)
        .map_err(|e| error::msg(format!("corrupt swap intent {}: {e}", file.display())))?;
    let (p, s) = (open_shared(ctx, production)?, open_shared(ctx, &intent.stage)?);
    let mut pst = p.state.lock().await;
    let mut sst = s.state.lock().await;
    if !file.exists() {
        return Ok(());
    }
    resolve((&p, &mut pst), (&s, &mut sst), &file, &intent).await
}

#[cfg(test)]
mod tests {
    use super::moved_name;
    use std::path::Path;

    #[test]
    fn moved_names_do_not_grow_with_every_swap() {
        assert_eq!(moved_name(7, Path::new("/d/web.disk0.3.qcow2")), "m7-web.disk0.3.qcow2");
        assert_eq!(moved_name(9, Path::new("/d/m7-web.disk0.3.qcow2")), "m9-web.disk0.3.qcow2");
        assert_eq!(moved_name(2, Path::new("/d/my-db.disk0.1.qcow2")), "m2-my-db.disk0.1.qcow2");
    }
}
