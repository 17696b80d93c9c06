//! Request statistics as nodes report them and the control plane sums
//! them: counts and a latency histogram per edge (calling workload →
//! service), over the same buckets everywhere.

/// Upper bounds of the latency buckets, in seconds: fine below a
/// millisecond, where a hop through a node proxy lands, and out to 30 s.
/// A histogram over them has one more bucket, past the last bound.
pub const LATENCY_BOUNDS: [f64; 24] = [
    0.00005, 0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The bucket (index into a histogram of `LATENCY_BOUNDS.len() + 1`) a
/// request of `seconds` falls in: bounds are inclusive.
pub fn bucket_of(seconds: f64) -> usize {
    LATENCY_BOUNDS
        .iter()
        .position(|&bound| seconds <= bound)
        .unwrap_or(LATENCY_BOUNDS.len())
}

/// The `q` quantile (0 to 1) of a histogram over [`LATENCY_BOUNDS`]
/// (requests per bucket, not cumulative), in seconds, interpolated within
/// its bucket as Prometheus' `histogram_quantile` does; the last bound
/// when it falls past it. `None` for an empty histogram or a histogram of
/// another shape.
pub fn quantile(q: f64, buckets: &[u64]) -> Option<f64> {
    if buckets.len() != LATENCY_BOUNDS.len() + 1 {
        return None;
    }
    let total = buckets.iter().fold(0u64, |sum, n| sum.saturating_add(*n));
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (i, &count) in buckets.iter().enumerate() {
        if count > 0 && below.saturating_add(count) as f64 >= rank {
            let Some(&upper) = LATENCY_BOUNDS.get(i) else {
                return LATENCY_BOUNDS.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { LATENCY_BOUNDS[i - 1] };
            let within = ((rank - below as f64) / count as f64).clamp(0.0, 1.0);
            return Some(lower + (upper - lower) * within);
        }
        below = below.saturating_add(count);
    }
    LATENCY_BOUNDS.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(entries: &[(usize, u64)]) -> Vec<u64> {
        let mut buckets = vec![0; LATENCY_BOUNDS.len() + 1];
        for &(i, n) in entries {
            buckets[i] = n;
        }
        buckets
    }

    #[test]
    fn buckets_include_their_bound() {
        assert_eq!(bucket_of(0.0), 0);
        assert_eq!(bucket_of(0.00005), 0);
        assert_eq!(bucket_of(0.00006), 1);
        assert_eq!(bucket_of(0.001), 6);
        assert_eq!(bucket_of(30.0), 23);
        assert_eq!(bucket_of(31.0), 24);
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        // 100 requests between 0.5 and 0.75 ms: the median halfway.
        let even = histogram(&[(5, 100)]);
        let p50 = quantile(0.5, &even).unwrap();
        assert!((p50 - 0.000625).abs() < 1e-12, "{p50}");
        assert!((quantile(1.0, &even).unwrap() - 0.00075).abs() < 1e-12);
        // 99 fast, 1 slow: p50 among the fast, p99 at the top of the fast
        // bucket, p99.9 in the slow one.
        let tail = histogram(&[(0, 99), (19, 1)]);
        assert!(quantile(0.5, &tail).unwrap() <= 0.00005);
        assert!((quantile(0.99, &tail).unwrap() - 0.00005).abs() < 1e-12);
        let slow = quantile(0.999, &tail).unwrap();
        assert!(slow > 0.5 && slow <= 1.0, "{slow}");
        // Past the last bound: the last bound.
        assert_eq!(quantile(0.5, &histogram(&[(24, 3)])), Some(30.0));
        assert_eq!(quantile(0.5, &histogram(&[])), None);
        assert_eq!(quantile(0.5, &[1, 2, 3]), None);
    }
}
