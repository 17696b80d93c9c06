//! Inbound rate limits: a token bucket per destination workload (and per
//! caller with `per_source`), refilled continuously at the configured rate
//! up to its burst. A request takes a token or is answered 429.

use mesh_model::policy::RateLimit;
use tokio::time::Instant;

/// One bucket.
#[derive(Debug)]
pub struct TokenBucket {
    limit: RateLimit,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    /// A full bucket for `limit`.
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            tokens: f64::from(limit.capacity()),
            refilled: Instant::now(),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes a token if there is one.
    pub fn try_take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * f64::from(self.limit.requests_per_second))
            .min(f64::from(self.limit.capacity()));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_flood_gets_the_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(RateLimit {
            requests_per_second: 100,
            burst: Some(20),
            per_source: false,
        });
        // 500 requests a second for 5 seconds.
        let mut admitted = 0;
        for _ in 0..2500 {
            if bucket.try_take() {
                admitted += 1;
            }
            tokio::time::advance(Duration::from_millis(2)).await;
        }
        // The burst, then 100 a second (the last refill may be a token
        // short).
        assert!((519..=520).contains(&admitted), "{admitted}");
        // Idle, it fills up to the burst and no further.
        tokio::time::advance(Duration::from_secs(60)).await;
        let burst = (0..100).filter(|_| bucket.try_take()).count();
        assert_eq!(burst, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn the_burst_defaults_to_one_second() {
        let mut bucket = TokenBucket::new(RateLimit {
            requests_per_second: 7,
            burst: None,
            per_source: true,
        });
        assert_eq!((0..100).filter(|_| bucket.try_take()).count(), 7);
    }
}
