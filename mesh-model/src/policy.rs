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
    /// What is retried and how (beyond the number of retries); absent: the
    /// seed's defaults, `RetrySettings::default()`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySettings>,
}

/// How callers retry a service's requests. Connection failures (nothing
/// was sent) and 503 are always retried; the statuses listed here are
/// retried too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// Statuses besides 503 worth another try: 409 by default (Envoy's
    /// "retriable-4xx"). Each from 400 to 599.
    #[serde(default = "d_retry_statuses")]
    pub on_statuses: Vec<u16>,
    /// Retry POST and PATCH too; they are retried only when the connection
    /// failed before anything was sent otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub non_idempotent: bool,
    /// Upper bound of the first wait; each retry doubles it, up to
    /// `backoff_max_ms`. The wait is uniform below the bound (full jitter).
    #[serde(default = "d_backoff_base_ms")]
    pub backoff_base_ms: u32,
    #[serde(default = "d_backoff_max_ms")]
    pub backoff_max_ms: u32,
    /// Retries allowed, in percent of the service's requests over the last
    /// 10 s, per calling node.
    #[serde(default = "d_budget_percent")]
    pub budget_percent: u32,
    /// Retries allowed per second whatever the traffic.
    #[serde(default = "d_budget_min_per_second")]
    pub budget_min_per_second: u32,
}

pub const DEFAULT_RETRY_STATUSES: [u16; 1] = [409];
pub const DEFAULT_BACKOFF_BASE_MS: u32 = 25;
pub const DEFAULT_BACKOFF_MAX_MS: u32 = 250;
pub const DEFAULT_BUDGET_PERCENT: u32 = 20;
pub const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = 3;
/// Longest backoff accepted: a minute.
pub const MAX_BACKOFF_MS: u32 = 60_000;
/// Most retriable statuses listed.
pub const MAX_RETRY_STATUSES: usize = 32;

fn d_retry_statuses() -> Vec<u16> {
    DEFAULT_RETRY_STATUSES.to_vec()
}
fn d_backoff_base_ms() -> u32 {
    DEFAULT_BACKOFF_BASE_MS
}
fn d_backoff_max_ms() -> u32 {
    DEFAULT_BACKOFF_MAX_MS
}
fn d_budget_percent() -> u32 {
    DEFAULT_BUDGET_PERCENT
}
fn d_budget_min_per_second() -> u32 {
    DEFAULT_BUDGET_MIN_PER_SECOND
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            on_statuses: d_retry_statuses(),
            non_idempotent: false,
            backoff_base_ms: DEFAULT_BACKOFF_BASE_MS,
            backoff_max_ms: DEFAULT_BACKOFF_MAX_MS,
            budget_percent: DEFAULT_BUDGET_PERCENT,
            budget_min_per_second: DEFAULT_BUDGET_MIN_PER_SECOND,
        }
    }
}

impl RetrySettings {
    fn validate(&self, errors: &mut FieldErrors) {
        if self.on_statuses.len() > MAX_RETRY_STATUSES {
            errors.add(
                "on_statuses",
                format!(
                    "at most {MAX_RETRY_STATUSES} statuses (got {})",
                    self.on_statuses.len()
                ),
            );
        }
        errors.nested("on_statuses", |errors| {
            for (i, status) in self.on_statuses.iter().enumerate() {
                errors.range(&format!("[{i}]"), *status, 400, 599);
            }
        });
        errors.range("backoff_base_ms", self.backoff_base_ms, 1, MAX_BACKOFF_MS);
        if self.backoff_max_ms < self.backoff_base_ms {
            errors.add(
                "backoff_max_ms",
                format!(
                    "must be >= backoff_base_ms ({}) (got {})",
                    self.backoff_base_ms, self.backoff_max_ms
                ),
            );
        } else {
            errors.range("backoff_max_ms", self.backoff_max_ms, 1, MAX_BACKOFF_MS);
        }
        errors.range("budget_percent", self.budget_percent, 0, 100);
        errors.range(
            "budget_min_per_second",
            self.budget_min_per_second,
            0,
            MAX_RATE,
        );
    }
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
            retry: None,
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
        if let Some(retry) = &self.retry {
            errors.nested("retry", |errors| retry.validate(errors));
        }
    }
}
