//! A token bucket per key (per node): a node may send a burst of CSRs —
//! every workload at its start — and then a steady trickle. The buckets
//! follow tokio's clock.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use tokio::time::Instant;

/// Limits on requests per key.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Requests allowed at once after a quiet period.
    pub burst: u32,
    /// Requests allowed per second in the long run.
    pub per_second: f64,
}

impl Default for RateLimit {
    /// Enough for a node with Kubernetes' 110 pods per node to start them
    /// all at once, and renew a day's certificates many times over.
    fn default() -> Self {
        Self {
            burst: 200,
            per_second: 20.0,
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token from `key`'s bucket, or says how long until one is
    /// there.
    pub fn take(&self, key: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let burst = f64::from(self.limit.burst);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refill = (now - bucket.at).as_secs_f64() * self.limit.per_second;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else if self.limit.per_second > 0.0 {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.limit.per_second,
            ))
        } else {
            Err(Duration::MAX)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_steady_rate() {
        let limiter = RateLimiter::new(RateLimit {
            burst: 3,
            per_second: 2.0,
        });
        for _ in 0..3 {
            assert_eq!(limiter.take("node1"), Ok(()));
        }
        let wait = limiter.take("node1").unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Another node has its own bucket.
        assert_eq!(limiter.take("node2"), Ok(()));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(limiter.take("node1"), Ok(()));
        assert!(limiter.take("node1").is_err());
        // A long quiet period refills only up to the burst.
        tokio::time::advance(Duration::from_secs(3600)).await;
        for _ in 0..3 {
            assert_eq!(limiter.take("node1"), Ok(()));
        }
        assert!(limiter.take("node1").is_err());
    }
}
