//! The match score.
//!
//! ```text
//! config_match = 1 − D / N      D: unintended config records, N: compared leaf fields (N ≥ D)
//! disk_match   = 1 − X / V      X: unintended differing bytes, V: virtual size of checked disks
//! score        = 100 × (0.6 × config_match + 0.4 × disk_match)   when some disk was checked
//!              = 100 × config_match                              otherwise
//! ```
//! Both parts only fall as D or X grow (adding a record adds at most one field to N, and
//! (D+1)/(N+1) ≥ D/N whenever N ≥ D), so more drift never raises the score. The score is rounded
//! to one decimal.

/// Weight of the config layer when the disk layer was checked.
pub const CONFIG_WEIGHT: f64 = 0.6;
/// Weight of the disk layer when it was checked.
pub const DISK_WEIGHT: f64 = 0.4;

/// The score for `drift_records` out of `compared_fields`, and `drift_bytes` out of `checked_bytes`
/// (`None` when no disk was checked).
pub fn score(drift_records: usize, compared_fields: usize, disk: Option<(u64, u64)>) -> f64 {
    let n = compared_fields.max(drift_records).max(1) as f64;
    let config = 1.0 - drift_records as f64 / n;
    let raw = match disk {
        Some((drift_bytes, checked_bytes)) if checked_bytes > 0 => {
            let d = 1.0 - (drift_bytes.min(checked_bytes) as f64 / checked_bytes as f64);
            CONFIG_WEIGHT * config + DISK_WEIGHT * d
        }
        _ => config,
    };
    (raw * 1000.0).floor() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn no_drift_is_full_score() {
        assert_eq!(score(0, 10, Some((0, 1 << 30))), 100.0);
        assert_eq!(score(0, 10, None), 100.0);
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
    }
}
