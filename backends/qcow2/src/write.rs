//! Guest writes into the top qcow2 layer: copy-on-write of partially written clusters from the
//! backing chain, cluster and L2-table allocation at the end of the file, refcount upkeep.
//!
//! Contract: after [`write_at`] the image passes `qemu-img check` without errors (overwritten
//! compressed clusters may be reported as leaked) and reads back the written bytes through qemu.
//! Order per cluster: data, refcount, L2 entry, L1 entry. Not synced: callers wanting durability
//! sync themselves. Images with internal snapshots (shared clusters), extended L2 entries,
//! encryption or refcount widths other than 16 bits are refused with `UnsupportedFeature`.

use crate::source::{ReadAt as _, Resolver};
use std::path::Path;

use crate::chain::Chain;
use crate::error::{Feature, Result, corrupt, ctx, invalid, unsupported};
use crate::header::{COPIED, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, OFFSET_MASK};
use crate::layer::{Mapping, Qcow2Layer};

/// See [`crate::write_at`].
pub(crate) fn write_at(top: &Path, offset: u64, data: &[u8]) -> Result<()> {
    write_at_in(None, top, offset, data)
}

/// [`write_at`] with the chain opened through `resolver` (local files when `None`).
pub(crate) fn write_at_in(resolver: Option<&dyn Resolver>, top: &Path, offset: u64, data: &[u8]) -> Result<()> {
    let mut chain = Chain::open_in(resolver, top, true)?;
    let q = chain.top();
    let h = &q.header;
    if h.incompatible & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT) != 0 {
        return Err(corrupt(&q.path, "image is marked dirty or corrupt; run qemu-img check -r"));
    }
    let refused = if h.crypt_method != 0 {
        Some(Feature::Encryption)
    } else if h.extended_l2() {
        Some(Feature::ExtendedL2Write)
    } else if h.nb_snapshots != 0 {
        Some(Feature::WriteWithSnapshots)
    } else if h.refcount_order != 4 {
        Some(Feature::WriteRefcountWidth(h.refcount_order))
    } else {
        None
    };
    if let Some(f) = refused {
        return Err(unsupported(&q.path, f));
    }
    let size = h.size;
    if offset.checked_add(data.len() as u64).is_none_or(|e| e > size) {
        return Err(invalid(
            &q.path,
            "offset",
            format!("write of {} bytes at {offset} beyond virtual size {size}", data.len()),
        ));
    }
    let cs = h.cluster_size();
    let mut done = 0usize;
    let mut cluster = vec![0u8; cs as usize];
    while done < data.len() {
        let pos = offset + done as u64;
        let (gc, in_off) = (pos / cs, pos % cs);
        let n = ((cs - in_off) as usize).min(data.len() - done);
        let piece = &data[done..done + n];
        match chain.top().mapping(gc)? {
            Mapping::Data { host, copied: true } => {
                let q = chain.top();
                q.file.write_all_at(piece, host + in_off).map_err(ctx("write data to", &q.path))?;
            }
            Mapping::Data { copied: false, .. } => {
                let q = chain.top();
                return Err(unsupported(&q.path, Feature::WriteWithSnapshots));
            }
            _ => {
                if n as u64 != cs {
                    let avail = (size - gc * cs).min(cs) as usize;
                    cluster[avail..].fill(0);
                    chain.read(gc * cs, &mut cluster[..avail])?;
                }
                cluster[in_off as usize..in_off as usize + n].copy_from_slice(piece);
                chain.top().put_cluster(gc, &cluster)?;
            }
        }
        done += n;
    }
    Ok(())
}

fn put_be(q: &Qcow2Layer, off: u64, bytes: &[u8], what: &'static str) -> Result<()> {
    q.file.write_all_at(bytes, off).map_err(ctx(what, &q.path))
}

impl Qcow2Layer {
    /// Allocates a new cluster at guest cluster `gc` holding `content` (one full cluster).
    fn put_cluster(&mut self, gc: u64, content: &[u8]) -> Result<()> {
        let l2_bits = self.header.l2_bits();
        let (l1_idx, l2_idx) = ((gc >> l2_bits) as usize, (gc & ((1 << l2_bits) - 1)) as usize);
        let l2_off = self.ensure_l2(l1_idx)?;
        let old = self.l2_table(l2_off)?[l2_idx];
        let host = match self.decode(old, 0)? {
            Mapping::Zero { host } if host != 0 && old & COPIED != 0 => host,
            _ => self.alloc_cluster()?,
        };
        put_be(self, host, content, "write data to")?;
        let entry = host | COPIED;
        put_be(self, l2_off + 8 * l2_idx as u64, &entry.to_be_bytes(), "write L2 entry of")?;
        self.update_cached_l2(l2_off, l2_idx, entry);
        Ok(())
    }

    /// Returns the L2 table for L1 index `i`, allocating a zeroed one if needed.
    fn ensure_l2(&mut self, i: usize) -> Result<u64> {
        let e = self.l1[i];
        if e & OFFSET_MASK != 0 {
            if e & COPIED == 0 {
                return Err(unsupported(&self.path, Feature::WriteWithSnapshots));
            }
            return Ok(e & OFFSET_MASK);
        }
        let off = self.alloc_cluster()?;
        put_be(self, off, &vec![0u8; self.header.cluster_size() as usize], "write L2 table of")?;
        let entry = off | COPIED;
        let at = self.header.l1_table_offset + 8 * i as u64;
        put_be(self, at, &entry.to_be_bytes(), "write L1 entry of")?;
        self.l1[i] = entry;
        Ok(off)
    }

    /// Reserves the cluster at the end of the file and gives it refcount 1.
    fn alloc_cluster(&mut self) -> Result<u64> {
        let cs = self.header.cluster_size();
        let off = self.file_len.next_multiple_of(cs);
        self.file_len = off + cs;
        self.file.set_len(self.file_len).map_err(ctx("extend", &self.path))?;
        self.set_refcount(off, 1)?;
        Ok(off)
    }

    /// Sets the 16-bit refcount of the cluster at `off`, creating its refcount block if needed.
    fn set_refcount(&mut self, off: u64, value: u16) -> Result<()> {
        let cs = self.header.cluster_size();
        let per_block = cs / 2;
        let (cluster, table_len) = (off / cs, self.header.refcount_table_clusters as u64 * cs / 8);
        let block_idx = cluster / per_block;
        if block_idx >= table_len {
            return Err(unsupported(&self.path, Feature::GrowRefcountTable));
        }
        let te_off = self.header.refcount_table_offset + 8 * block_idx;
        let mut te = [0u8; 8];
        self.file.read_exact_at(&mut te, te_off).map_err(ctx("read refcount table of", &self.path))?;
        let mut block = u64::from_be_bytes(te) & OFFSET_MASK;
        if block == 0 {
            block = self.file_len.next_multiple_of(cs);
            self.file_len = block + cs;
            self.file.set_len(self.file_len).map_err(ctx("extend", &self.path))?;
            put_be(self, te_off, &block.to_be_bytes(), "write refcount table of")?;
            self.set_refcount(block, 1)?;
        }
        let at = block + 2 * (cluster % per_block);
        put_be(self, at, &value.to_be_bytes(), "write refcount of")
    }
}
