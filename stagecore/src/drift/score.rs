//! The match score.
//!
//! ```text
//! config_match = 1 − D / N      D: unintended config records, N: compared leaf fields (N ≥ D)
//! disk_match   = 1 − X / V      X: unintended differing bytes, V: virtual size of checked disks
//! guest_match  = 1 − G / M      G: unintended guest records, M: compared guest items (M ≥ G)
//! score        = 100 × Σ wᵢ × matchᵢ / Σ wᵢ   over the layers checked (config always;
//!                disk when some disk was checked; guest when some machine's inventory was)
//! weights      w_config = 0.6, w_disk = 0.4, w_guest = 0.4
//! ```
//! So without a guest layer the score is `0.6 × config + 0.4 × disk` (or `config` alone), as in
//! schema v1. Every part only falls as D, X or G grow (adding a record adds at most one field or
//! item to N or M, and (D+1)/(N+1) ≥ D/N whenever N ≥ D), so more drift never raises the score
//! for the same set of checked layers. The score is rounded down to one decimal.

/// Weight of the config layer when the disk layer was checked.
pub const CONFIG_WEIGHT: f64 = 0.6;
/// Weight of the disk layer when it was checked.
pub const DISK_WEIGHT: f64 = 0.4;
/// Weight of the guest layer when it was checked.
pub const GUEST_WEIGHT: f64 = 0.4;

/// The score for `drift_records` out of `compared_fields`, and `drift_bytes` out of `checked_bytes`
/// (`None` when no disk was checked).
pub fn score(drift_records: usize, compared_fields: usize, disk: Option<(u64, u64)>) -> f64 {
    score_layers(drift_records, compared_fields, disk, None)
}

/// The score with the guest layer: `guest` is (unintended guest records, compared guest items),
/// `None` when no machine's inventory was compared.
pub fn score_layers(
    drift_records: usize,
    compared_fields: usize,
    disk: Option<(u64, u64)>,
    guest: Option<(usize, usize)>,
) -> f64 {
    let ratio = |d: usize, n: usize| 1.0 - d as f64 / n.max(d).max(1) as f64;
    let mut sum = CONFIG_WEIGHT * ratio(drift_records, compared_fields);
    let mut weights = CONFIG_WEIGHT;
    if let Some((drift_bytes, checked_bytes)) = disk.filter(|(_, v)| *v > 0) {
        sum += DISK_WEIGHT * (1.0 - (drift_bytes.min(checked_bytes) as f64 / checked_bytes as f64));
        weights += DISK_WEIGHT;
    }
    if let Some((g, m)) = guest {
        sum += GUEST_WEIGHT * ratio(g, m);
        weights += GUEST_WEIGHT;
    }
    ((sum / weights).clamp(0.0, 1.0) * 1000.0 + 1e-9).floor() / 10.0
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

    proptest! {
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
