//! When to renew, and how long to wait after a failure: pure functions of
//! the certificate's validity and a random draw, unit-tested without
//! sockets or clocks.

use std::time::Duration;

/// Renewal and retry settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RotationConfig {
    /// Fraction of the lifetime after which a certificate is renewed.
    pub renew_at: f64,
    /// Renewal is spread by up to this fraction of the lifetime either way,
    /// so a node's workloads (and a mesh's nodes) do not renew in lockstep.
    pub jitter: f64,
    /// How long the previous certificate is kept beside a new one.
    pub overlap: Duration,
    /// First retry delay after the CA failed; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self {
            renew_at: 0.8,
            jitter: 0.01,
            overlap: Duration::from_secs(15 * 60),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// Seconds after `not_before` at which to renew a certificate valid for
/// `lifetime`; `draw` is uniform in `[0, 1)`.
pub fn renewal_offset(config: &RotationConfig, lifetime: Duration, draw: f64) -> Duration {
    let spread = (draw * 2.0 - 1.0) * config.jitter;
    let fraction = (config.renew_at + spread).clamp(0.05, 0.95);
    lifetime.mul_f64(fraction)
}

/// The delay before retry `attempt` (0-based) after failures: exponential
/// with full jitter (`draw` uniform in `[0, 1)`), never below 10 % of the
/// step so a flapping CA is not hammered.
pub fn backoff(config: &RotationConfig, attempt: u32, draw: f64) -> Duration {
    let step = config
        .min_backoff
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(config.max_backoff);
    step.mul_f64(draw.clamp(0.1, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn a_day_long_certificate_renews_at_about_19_point_2_hours() {
        let config = RotationConfig::default();
        assert_eq!(renewal_offset(&config, DAY, 0.5), DAY.mul_f64(0.8));
        let earliest = renewal_offset(&config, DAY, 0.0);
        let latest = renewal_offset(&config, DAY, 0.999_999);
        assert_eq!(earliest, DAY.mul_f64(0.79));
        assert!(latest < DAY.mul_f64(0.81) && latest > DAY.mul_f64(0.8099));
    }

    #[test]
    fn odd_settings_still_renew_inside_the_lifetime() {
        let config = RotationConfig {
            renew_at: 0.99,
            jitter: 0.5,
            ..RotationConfig::default()
        };
        assert!(renewal_offset(&config, DAY, 0.999) <= DAY.mul_f64(0.95));
        assert!(renewal_offset(&config, DAY, 0.0) >= DAY.mul_f64(0.05));
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let config = RotationConfig::default();
        let full: Vec<u64> = (0..9)
            .map(|a| backoff(&config, a, 0.999_999).as_millis() as u64)
            .collect();
        assert_eq!(
            full,
            [999, 1999, 3999, 7999, 15999, 31999, 59999, 59999, 59999]
        );
        assert_eq!(backoff(&config, 3, 0.0), Duration::from_millis(800));
        assert_eq!(backoff(&config, 1000, 0.5), Duration::from_secs(30));
    }
}
