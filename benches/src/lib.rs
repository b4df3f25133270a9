//! Shared helpers of the benchmark harnesses: percentiles, medians, waiting for a cluster
//! to settle, and the loopback identities both sides of a comparison use.

use std::time::{Duration, Instant};

use grid::Grid;

/// The `p`-th percentile (0–100) of `samples`, which it sorts.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[rank.min(samples.len() - 1)]
}

/// The median of `values`.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

/// Whether every member sees `members` members and applied the coordinator's settled table.
pub async fn settled(grids: &[Grid], members: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(c) = grids
            .iter()
            .find(|g| g.runtime().coordinator_status().active)
        {
            let version = c.runtime().table().version();
            if c.runtime().coordinator_status().settled
                && c.runtime().table().members().len() == members
                && grids.iter().all(|g| {
                    g.runtime().table().version() == version
                        && g.cluster().members().len() == members
                })
            {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_medians() {
        let mut s: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&mut s, 50.0), Duration::from_micros(51));
        assert_eq!(percentile(&mut s, 99.0), Duration::from_micros(99));
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
