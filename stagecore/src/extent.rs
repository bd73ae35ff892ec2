//! Disk extents: which byte ranges of a disk changed since a baseline.

use serde::{Deserialize, Serialize};

/// A byte range of a disk as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Whether `extents` is already normalized: non-empty ranges, sorted, none touching the next.
pub fn is_normalized(extents: &[Extent]) -> bool {
    extents.iter().all(|e| e.length > 0) && extents.windows(2).all(|w| w[0].end() < w[1].offset)
}

/// Sorts extents and merges those that touch or overlap. Linear (no sort, no copy) when the list
/// is already normalized, as backends' reports are.
pub fn normalize(mut extents: Vec<Extent>) -> Vec<Extent> {
    if is_normalized(&extents) {
        return extents;
    }
    extents.retain(|e| e.length > 0);
    if !extents.is_sorted() {
        extents.sort_unstable();
    }
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents {
        match out.last_mut() {
            Some(last) if e.offset <= last.end() => last.length = last.end().max(e.end()) - last.offset,
            _ => out.push(e),
        }
    }
    out
}

/// Widens normalized extents outward to multiples of `granularity` (clamped to `size`).
pub fn align(extents: &[Extent], granularity: u64, size: u64) -> Vec<Extent> {
    let g = granularity.max(1);
    normalize(
        extents
            .iter()
            .map(|e| {
                let start = e.offset / g * g;
                let end = e.end().div_ceil(g).saturating_mul(g).min(size.max(e.end()));
                Extent { offset: start, length: end - start }
            })
            .collect(),
    )
}

/// Total bytes covered by normalized extents.
pub fn total(extents: &[Extent]) -> u64 {
    extents.iter().map(|e| e.length).sum()
}

/// The union of two normalized extent lists (one linear merge).
pub fn union(a: &[Extent], b: &[Extent]) -> Vec<Extent> {
    let (mut i, mut j) = (0, 0);
    let mut out: Vec<Extent> = Vec::with_capacity(a.len() + b.len());
    while i < a.len() || j < b.len() {
        let e = if j >= b.len() || (i < a.len() && a[i].offset <= b[j].offset) {
            i += 1;
            a[i - 1]
        } else {
            j += 1;
            b[j - 1]
        };
        match out.last_mut() {
            Some(last) if e.offset <= last.end() => last.length = last.end().max(e.end()) - last.offset,
            _ => out.push(e),
        }
    }
    out
}

/// The intersection of two normalized extent lists.
pub fn intersect(a: &[Extent], b: &[Extent]) -> Vec<Extent> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let start = a[i].offset.max(b[j].offset);
        let end = a[i].end().min(b[j].end());
        if start < end {
            out.push(Extent { offset: start, length: end - start });
        }
        if a[i].end() < b[j].end() { i += 1 } else { j += 1 }
    }
    out
}

/// The parts of normalized `a` not covered by normalized `b` (one linear pass over both).
pub fn subtract(a: &[Extent], b: &[Extent]) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut j = 0;
    for e in a {
        // `b` is sorted and disjoint: pieces ending at or before `e` cannot cover later extents.
        while j < b.len() && b[j].end() <= e.offset {
            j += 1;
        }
        let mut start = e.offset;
        let mut k = j;
        while k < b.len() && b[k].offset < e.end() {
            if b[k].offset > start {
                out.push(Extent { offset: start, length: b[k].offset - start });
            }
            start = start.max(b[k].end());
            k += 1;
        }
        if start < e.end() {
            out.push(Extent { offset: start, length: e.end() - start });
        }
    }
    out
}

/// Checks that `length` bytes at `offset` lie within a disk of `size` bytes; the error names
/// `env/machine/disk`.
pub fn check_range(env: &str, machine: &str, disk: &str, size: u64, offset: u64, length: u64) -> crate::Result<()> {
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(crate::Error::invalid(
            format!("{env}/{machine}/{disk}"),
            format!("range {offset}+{length} lies beyond the disk's {size} bytes"),
        ));
    }
    Ok(())
}

/// What changed on one disk since a baseline, as reported by a backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskChanges {
    /// Logical machine name.
    pub machine: String,
    /// Logical disk name.
    pub disk: String,
    /// Virtual size of the disk in bytes.
    pub virtual_size: u64,
    /// The unit in which the backend tracks changes (qcow2 cluster size, CBT block size); a write
    /// of one byte shows as a changed extent of this size. 1 when exact.
    pub granularity: u64,
    /// The changed extents, or why they could not be determined.
    pub changes: ChangeMap,
}

/// Changed extents of a disk, or the reason they are unknown (never a silent zero).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ChangeMap {
    /// The extents are known (normalized).
    Checked {
        /// Changed byte ranges, sorted and merged.
        extents: Vec<Extent>,
    },
    /// The backend could not tell (no CBT, remote files, disk added after the baseline, ...).
    NotChecked {
        /// Why.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    fn e(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    #[test]
    fn set_operations() {
        let a = normalize(vec![e(10, 10), e(0, 5), e(5, 5), e(40, 10)]);
        assert_eq!(a, vec![e(0, 20), e(40, 10)]);
        let b = vec![e(15, 30)];
        assert_eq!(intersect(&a, &b), vec![e(15, 5), e(40, 5)]);
        assert_eq!(subtract(&a, &b), vec![e(0, 15), e(45, 5)]);
        assert_eq!(union(&a, &b), vec![e(0, 50)]);
        assert_eq!(total(&a), 30);
    }

    /// The linear set operations agree with a per-byte model on random lists.
    #[test]
    fn linear_operations_match_a_byte_model() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let bits = |v: &[Extent]| {
            let mut m = [false; 256];
            v.iter().for_each(|e| (e.offset..e.end()).for_each(|x| m[x as usize] = true));
            m
        };
        for _ in 0..500 {
            let mut list = || normalize((0..next(6)).map(|_| e(next(200), next(40))).collect());
            let (a, b) = (list(), list());
            assert!(is_normalized(&a) && is_normalized(&b), "{a:?} {b:?}");
            let (ma, mb) = (bits(&a), bits(&b));
            let model = |f: fn(bool, bool) -> bool| -> [bool; 256] { std::array::from_fn(|i| f(ma[i], mb[i])) };
            for (got, want) in [
                (union(&a, &b), model(|x, y| x || y)),
                (intersect(&a, &b), model(|x, y| x && y)),
                (subtract(&a, &b), model(|x, y| x && !y)),
            ] {
                assert!(is_normalized(&got) || got.windows(2).all(|w| w[0].end() <= w[1].offset), "{got:?}");
                assert_eq!(bits(&got), want, "a={a:?} b={b:?} got={got:?}");
            }
        }
        assert_eq!(normalize(vec![e(5, 0), e(3, 2), e(0, 3)]), vec![e(0, 5)]);
        assert!(!is_normalized(&[e(0, 3), e(3, 2)]));
    }
}
