//! The match score.
//!
//! ```text
//! config_match = 1 − D / N      D: unintended config records, N: compared leaf fields (N ≥ D)
//! disk_match   = 1 − (X + U) / (V + U)
//!                               X: unintended differing bytes, V: virtual size of checked disks,
//!                               U: virtual size of NOT_CHECKED disks (unknown counts as differing)
//! guest_match  = 1 − G / M      G: unintended guest records, M: compared guest items (M ≥ G)
//! score        = 100 × Σ wᵢ × matchᵢ / Σ wᵢ   over the layers checked (config always;
//!                disk when some disk was checked or is NOT_CHECKED; guest when some machine's
//!                inventory was compared)
//! weights      w_config = 0.6, w_disk = 0.4, w_guest = 0.4
//! cap          a report with a NOT_CHECKED disk scores at most 99.9
//! ```
//! So without a guest layer and with every disk checked the score is `0.6 × config + 0.4 × disk`
//! (or `config` alone), as in schema v1. Every part only falls as D, X, G or U grow (adding a
//! record adds at most one field or item to N or M, and (D+1)/(N+1) ≥ D/N whenever N ≥ D), so
//! more drift never raises the score for the same set of checked layers; and a disk that turns
//! NOT_CHECKED never raises it either (its whole size counts as differing, at least its drifted
//! bytes did). Disk records that are INFORMATIONAL (judged by the guest layer) are in none of X,
//! V, U. The score is rounded down to one decimal, then capped.

/// Weight of the config layer when the disk layer was checked.
pub const CONFIG_WEIGHT: f64 = 0.6;
/// Weight of the disk layer when it was checked.
pub const DISK_WEIGHT: f64 = 0.4;
/// Weight of the guest layer when it was checked.
pub const GUEST_WEIGHT: f64 = 0.4;
/// The highest score of a report with a NOT_CHECKED disk (what could not be seen never reads 100 %).
pub const NOT_CHECKED_CAP: f64 = 99.9;

/// What the disk layer contributes to the score.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskTerm {
    /// X: unintended differing bytes of the checked disks.
    pub drifted_bytes: u64,
    /// V: virtual size of the checked disks.
    pub checked_bytes: u64,
    /// U: virtual size of the NOT_CHECKED disks.
    pub unchecked_bytes: u64,
    /// How many disks are NOT_CHECKED (any caps the score at [`NOT_CHECKED_CAP`]).
    pub unchecked_disks: usize,
}

/// The score for `drift_records` out of `compared_fields`, and `drift_bytes` out of `checked_bytes`
/// (`None` when no disk was checked).
pub fn score(drift_records: usize, compared_fields: usize, disk: Option<(u64, u64)>) -> f64 {
    score_layers(drift_records, compared_fields, disk, None)
}

/// The score with the guest layer: `guest` is (unintended guest records, compared guest items),
/// `None` when no machine's inventory was compared. Every disk counts as checked.
pub fn score_layers(
    drift_records: usize,
    compared_fields: usize,
    disk: Option<(u64, u64)>,
    guest: Option<(usize, usize)>,
) -> f64 {
    let disk = disk.map_or(DiskTerm::default(), |(x, v)| DiskTerm {
        drifted_bytes: x,
        checked_bytes: v,
        ..DiskTerm::default()
    });
    score_report((drift_records, compared_fields), disk, guest)
}

/// The score of a report: `config` is (unintended config records, compared fields), `disk` the
/// disk layer's term (NOT_CHECKED disks included), `guest` as in [`score_layers`].
pub fn score_report(config: (usize, usize), disk: DiskTerm, guest: Option<(usize, usize)>) -> f64 {
    let ratio = |d: usize, n: usize| 1.0 - d as f64 / n.max(d).max(1) as f64;
    let mut sum = CONFIG_WEIGHT * ratio(config.0, config.1);
    let mut weights = CONFIG_WEIGHT;
    let (x, v, u) = (disk.drifted_bytes.min(disk.checked_bytes), disk.checked_bytes, disk.unchecked_bytes);
    if v.saturating_add(u) > 0 {
        let total = v.saturating_add(u) as f64;
        sum += DISK_WEIGHT * (1.0 - (x as f64 + u as f64) / total);
        weights += DISK_WEIGHT;
    }
    if let Some((g, m)) = guest {
        sum += GUEST_WEIGHT * ratio(g, m);
        weights += GUEST_WEIGHT;
    }
    let score = ((sum / weights).clamp(0.0, 1.0) * 1000.0 + 1e-9).floor() / 10.0;
    if disk.unchecked_disks > 0 { score.min(NOT_CHECKED_CAP) } else { score }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn no_drift_is_full_score() {
        assert_eq!(score(0, 10, Some((0, 1 << 30))), 100.0);
        assert_eq!(score(0, 10, None), 100.0);
        assert_eq!(score_layers(0, 10, Some((0, 1 << 30)), Some((0, 500))), 100.0);
        assert_eq!(score_layers(0, 10, None, Some((0, 0))), 100.0);
    }

    #[test]
    fn v1_scores_are_unchanged_without_a_guest_layer() {
        assert_eq!(score_layers(1, 10, Some((0, 100)), None), 94.0);
        assert_eq!(score_layers(1, 10, None, None), 90.0);
    }

    fn term(x: u64, v: u64, u: u64, n: usize) -> DiskTerm {
        DiskTerm { drifted_bytes: x, checked_bytes: v, unchecked_bytes: u, unchecked_disks: n }
    }

    #[test]
    fn a_not_checked_disk_is_never_full_score() {
        // The issue's case: one disk unreadable, the others clean: not 100.
        let one = term(0, 2 << 30, 1 << 30, 1);
        assert_eq!(score_report((0, 10), one, None), 86.6);
        // Its size unknown (0 bytes): the cap still shows it.
        assert_eq!(score_report((0, 10), term(0, 1 << 30, 0, 1), None), NOT_CHECKED_CAP);
        // No disk checked at all: the disk term is 0, not left out.
        assert_eq!(score_report((0, 10), term(0, 0, 1 << 30, 1), None), 60.0);
        assert_eq!(score_report((0, 10), term(0, 0, 1 << 30, 1), Some((0, 100))), 71.4);
        // INFORMATIONAL disks only (none in X, V, U): config and guest decide.
        assert_eq!(score_report((0, 10), DiskTerm::default(), Some((0, 100))), 100.0);
    }

    proptest! {
        #[test]
        fn not_checking_a_disk_never_raises_the_score(d in 0usize..20, n in 1usize..100, x in 0u64..1000, v in 1u64..1000, xi in 0u64..1000, vi in 1u64..1000, u in 0u64..1000, k in 0usize..3) {
            // Disk i (xi drifted of vi) turns from checked into NOT_CHECKED.
            let (n, x, xi) = (n.max(d), x.min(v), xi.min(vi));
            let checked = score_report((d, n), term(x + xi, v + vi, u, k), None);
            let unchecked = score_report((d, n), term(x, v, u + vi, k + 1), None);
            prop_assert!(unchecked <= checked, "{unchecked} > {checked}");
            prop_assert!(unchecked <= NOT_CHECKED_CAP);
            let more = score_report((d, n), term(x, v, u + vi + 1, k + 1), None);
            prop_assert!(more <= unchecked);
        }

        #[test]
        fn more_drift_never_raises_the_score(d in 0usize..50, n in 1usize..200, x in 0u64..1_000_000, v in 1u64..1_000_000, add_field in any::<bool>()) {
            let n = n.max(d);
            let base = score(d, n, Some((x.min(v), v)));
            let more_records = score(d + 1, n + usize::from(add_field), Some((x.min(v), v)));
            let more_bytes = score(d, n, Some(((x + 4096).min(v), v)));
            prop_assert!(more_records <= base);
            prop_assert!(more_bytes <= base);
            prop_assert!((0.0..=100.0).contains(&base));
        }

        #[test]
        fn more_guest_drift_never_raises_the_score(d in 0usize..50, n in 1usize..200, g in 0usize..50, m in 1usize..500, add_item in any::<bool>(), x in 0u64..1000, v in 1u64..1000) {
            let (n, m) = (n.max(d), m.max(g));
            let disk = Some((x.min(v), v));
            let base = score_layers(d, n, disk, Some((g, m)));
            let more = score_layers(d, n, disk, Some((g + 1, m + usize::from(add_item))));
            let more_config = score_layers(d + 1, n + usize::from(add_item), disk, Some((g, m)));
            prop_assert!(more <= base && more_config <= base);
            prop_assert!((0.0..=100.0).contains(&base));
        }
    }
}
