//! Disks of the in-memory backend: sparse block maps stacked as copy-on-write layers, like qcow2.
//!
//! A layer holds the blocks written while it was the top; reads fall through to the parent.
//! Frozen layers (baselines, snapshots) are never written again and may be shared by many disks.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::extent::{self, Extent};

/// Block (cluster) size of in-memory disks.
pub const BLOCK: u64 = 64 * 1024;

/// Index of a layer in the [`LayerStore`].
pub(crate) type LayerId = usize;

#[derive(Debug, Default)]
struct Layer {
    parent: Option<LayerId>,
    blocks: BTreeMap<u64, Vec<u8>>,
    frozen: bool,
}

/// All layers of one backend.
#[derive(Debug, Default)]
pub(crate) struct LayerStore {
    layers: Vec<Layer>,
}

impl LayerStore {
    /// A new empty layer over `parent`.
    pub(crate) fn overlay(&mut self, parent: Option<LayerId>) -> LayerId {
        self.layers.push(Layer { parent, ..Default::default() });
        self.layers.len() - 1
    }

    /// Freezes `top` and returns a new writable layer over it.
    pub(crate) fn freeze(&mut self, top: LayerId) -> LayerId {
        self.layers[top].frozen = true;
        self.overlay(Some(top))
    }

    /// A new parentless layer with the guest-visible content of `top` (a full copy of allocated blocks).
    pub(crate) fn flatten(&mut self, top: LayerId) -> LayerId {
        let mut blocks = BTreeMap::new();
        for layer in self.chain(top).into_iter().rev() {
            for (k, v) in &self.layers[layer].blocks {
                blocks.insert(*k, v.clone());
            }
        }
        self.layers.push(Layer { parent: None, blocks, frozen: true });
        self.layers.len() - 1
    }

    /// The chain from `top` down to the bottom layer.
    pub(crate) fn chain(&self, top: LayerId) -> Vec<LayerId> {
        let mut out = vec![top];
        while let Some(p) = self.layers[*out.last().expect("non-empty")].parent {
            out.push(p);
        }
        out
    }

    fn read_block(&self, top: LayerId, index: u64) -> Option<&[u8]> {
        self.chain(top).into_iter().find_map(|l| self.layers[l].blocks.get(&index).map(Vec::as_slice))
    }

    /// Reads `len` bytes at `offset` through the chain (unallocated reads as zeros).
    pub(crate) fn read(&self, top: LayerId, offset: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        let mut pos = offset;
        while pos < offset + len {
            let (index, within) = (pos / BLOCK, pos % BLOCK);
            let n = (BLOCK - within).min(offset + len - pos);
            if let Some(block) = self.read_block(top, index) {
                let dst = (pos - offset) as usize;
                out[dst..dst + n as usize].copy_from_slice(&block[within as usize..(within + n) as usize]);
            }
            pos += n;
        }
        out
    }

    /// Writes into the top layer (copy-on-write of partially written blocks).
    pub(crate) fn write(&mut self, top: LayerId, offset: u64, data: &[u8]) {
        assert!(!self.layers[top].frozen, "writes never reach a frozen layer");
        let mut pos = offset;
        let end = offset + data.len() as u64;
        while pos < end {
            let (index, within) = (pos / BLOCK, pos % BLOCK);
            let n = (BLOCK - within).min(end - pos);
            let mut block = match self.layers[top].blocks.get(&index) {
                Some(b) => b.clone(),
                None => self.read_block(top, index).map(<[u8]>::to_vec).unwrap_or_else(|| vec![0; BLOCK as usize]),
            };
            let src = (pos - offset) as usize;
            block[within as usize..(within + n) as usize].copy_from_slice(&data[src..src + n as usize]);
            self.layers[top].blocks.insert(index, block);
            pos += n;
        }
    }

    /// Extents allocated in the layers from `top` down to, not including, `base`; `None` when
    /// `base` is not in the chain.
    pub(crate) fn changed_since(&self, top: LayerId, base: LayerId, size: u64) -> Option<Vec<Extent>> {
        let chain = self.chain(top);
        let stop = chain.iter().position(|l| *l == base)?;
        let mut extents = Vec::new();
        for l in &chain[..stop] {
            extents.extend(
                self.layers[*l]
                    .blocks
                    .keys()
                    .map(|i| Extent { offset: i * BLOCK, length: BLOCK.min(size.saturating_sub(i * BLOCK)) }),
            );
        }
        Some(extent::normalize(extents))
    }

    /// SHA-256 of the guest-visible content: the size, then each non-zero block with its index
    /// (zero and unallocated blocks read alike, so both are skipped). Cost grows with allocated data.
    pub(crate) fn digest(&self, top: LayerId, size: u64) -> [u8; 32] {
        let mut indices = std::collections::BTreeSet::new();
        for l in self.chain(top) {
            indices.extend(self.layers[l].blocks.keys().copied());
        }
        let mut h = Sha256::new();
        h.update(size.to_le_bytes());
        for index in indices {
            let n = BLOCK.min(size.saturating_sub(index * BLOCK));
            let data = self.read(top, index * BLOCK, n);
            if data.iter().any(|b| *b != 0) {
                h.update(index.to_le_bytes());
                h.update(&data);
            }
        }
        h.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlays_read_through_and_track_changes() {
        let mut s = LayerStore::default();
        let base = s.overlay(None);
        s.write(base, 10, b"hello");
        let top = s.freeze(base);
        assert_eq!(s.read(top, 10, 5), b"hello");
        s.write(top, BLOCK + 1, b"x");
        assert_eq!(s.changed_since(top, base, 4 * BLOCK), Some(vec![Extent { offset: BLOCK, length: BLOCK }]));
        assert_eq!(s.read(base, BLOCK + 1, 1), [0]);
        let copy = s.flatten(top);
        assert_eq!(s.digest(copy, 4 * BLOCK), s.digest(top, 4 * BLOCK));
    }
}
