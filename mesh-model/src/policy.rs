//! ServicePolicy: retries, timeout and circuit breaking for calls to one
//! service, with the seed's defaults.

use serde::{Deserialize, Serialize};

use crate::{FieldErrors, Kind, Metadata, resource::Spec};

pub const DEFAULT_RETRY_ATTEMPTS: i32 = 3;
pub const DEFAULT_TIMEOUT_MS: i32 = 5_000;
pub const DEFAULT_CB_THRESHOLD: i32 = 50;
pub const DEFAULT_CB_WINDOW_SEC: i32 = 30;
pub const DEFAULT_CB_RECOVERY_TIMEOUT_MS: i32 = 10_000;

/// Longest timeout or recovery accepted: one hour. Longer is a mistake, not
/// a policy.
pub const MAX_DURATION_MS: i32 = 3_600_000;
pub const MAX_RETRY_ATTEMPTS: i32 = 10;

/// The policy for calls to the service named by `metadata.name`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePolicySpec {
    /// Retries after the first attempt.
    #[serde(default = "d_retry_attempts")]
    pub retry_attempts: i32,
    /// Per-request timeout; the caller gets 504 past it.
    #[serde(default = "d_timeout_ms")]
    pub timeout_ms: i32,
    /// Error rate (percent) over the window that opens the circuit.
    #[serde(default = "d_cb_threshold")]
    pub cb_threshold: i32,
    #[serde(default = "d_cb_window_sec")]
    pub cb_window_sec: i32,
    /// How long an open circuit waits before letting a probe through.
    #[serde(default = "d_cb_recovery_timeout_ms")]
    pub cb_recovery_timeout_ms: i32,
    /// A limit on the requests each workload of the service accepts (its
    /// HTTP ports), enforced at the workload's node; none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// Largest rate or burst accepted.
pub const MAX_RATE: u32 = 1_000_000;

/// A token bucket: `requests_per_second` sustained, `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_second: u32,
    /// Requests let through at once on top of the rate; absent: one
    /// second's worth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// One bucket per caller identity rather than one for all callers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_source: bool,
}

impl RateLimit {
    /// The bucket's size.
    pub fn capacity(&self) -> u32 {
        self.burst.unwrap_or(self.requests_per_second)
    }
}

fn d_retry_attempts() -> i32 {
    DEFAULT_RETRY_ATTEMPTS
}
fn d_timeout_ms() -> i32 {
    DEFAULT_TIMEOUT_MS
}
fn d_cb_threshold() -> i32 {
    DEFAULT_CB_THRESHOLD
}
fn d_cb_window_sec() -> i32 {
    DEFAULT_CB_WINDOW_SEC
}
fn d_cb_recovery_timeout_ms() -> i32 {
    DEFAULT_CB_RECOVERY_TIMEOUT_MS
}

impl Default for ServicePolicySpec {
    fn default() -> Self {
        Self {
            retry_attempts: DEFAULT_RETRY_ATTEMPTS,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            cb_threshold: DEFAULT_CB_THRESHOLD,
            cb_window_sec: DEFAULT_CB_WINDOW_SEC,
            cb_recovery_timeout_ms: DEFAULT_CB_RECOVERY_TIMEOUT_MS,
            rate_limit: None,
        }
    }
}

impl Spec for ServicePolicySpec {
    const KIND: Kind = Kind::ServicePolicy;

    fn validate(&self, _metadata: &Metadata, errors: &mut FieldErrors) {
        errors.range("retry_attempts", self.retry_attempts, 0, MAX_RETRY_ATTEMPTS);
        errors.range("timeout_ms", self.timeout_ms, 1, MAX_DURATION_MS);
        errors.range("cb_threshold", self.cb_threshold, 1, 100);
        errors.range("cb_window_sec", self.cb_window_sec, 1, 3_600);
        errors.range(
            "cb_recovery_timeout_ms",
            self.cb_recovery_timeout_ms,
            1,
            MAX_DURATION_MS,
        );
        if let Some(limit) = &self.rate_limit {
            errors.nested("rate_limit", |errors| {
                errors.range(
                    "requests_per_second",
                    i64::from(limit.requests_per_second),
                    1,
                    i64::from(MAX_RATE),
                );
                if let Some(burst) = limit.burst {
                    errors.range("burst", i64::from(burst), 1, i64::from(MAX_RATE));
                }
            });
        }
    }
}
