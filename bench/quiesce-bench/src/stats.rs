//! Medians, percentiles and the report's rows.

use serde::Serialize;
use std::time::Duration;

/// A sample of durations, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    pub n: usize,
    pub median_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

impl Sample {
    pub fn of_ms(values: &[f64]) -> Sample {
        if values.is_empty() {
            return Sample::default();
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Sample {
            n: v.len(),
            median_ms: percentile(&v, 50.0),
            p99_ms: percentile(&v, 99.0),
            min_ms: v[0],
            max_ms: v[v.len() - 1],
        }
    }

    pub fn of(durations: &[Duration]) -> Sample {
        Sample::of_ms(
            &durations
                .iter()
                .map(|d| d.as_secs_f64() * 1000.0)
                .collect::<Vec<_>>(),
        )
    }
}

/// The `p`th percentile of sorted values (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        let s = Sample::of_ms(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median_ms, s.min_ms, s.max_ms, s.n), (2.0, 1.0, 3.0, 3));
    }
}
