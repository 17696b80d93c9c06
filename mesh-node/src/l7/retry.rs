//! Whether a failed attempt is tried again, after how long, and whether
//! the service's retry budget allows it.
//!
//! Retried: a connection that could not be made (the request never left,
//! whatever its method), a 503, and the retriable 4xx statuses (409 by
//! default) — the last two, and a connection lost mid-request, only for
//! idempotent methods unless the policy opts in. A timeout is not retried:
//! the caller's time is spent. Waits grow exponentially with full jitter
//! (AWS's "full jitter": uniform between zero and the capped exponential),
//! and a budget caps retries at a share of requests so that retries cannot
//! multiply an outage (as Linkerd's retry budgets).

use std::{collections::VecDeque, sync::Mutex, time::Duration};

use http::Method;
use mesh_model::policy::{RetrySettings, ServicePolicySpec};
use tokio::time::Instant;

/// How one attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// No connection to the endpoint: nothing was sent.
    ConnectFailed,
    /// The connection was lost after the request (or part of it) left.
    Reset,
    /// The upstream answered with this status.
    Status(u16),
    /// The request's time ran out.
    TimedOut,
}

/// A service's retry settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (`ServicePolicy.retry_attempts`).
    pub retries: u32,
    /// Statuses besides 503 worth another try.
    pub retriable_4xx: Vec<u16>,
    /// Retry non-idempotent methods (POST, PATCH) too.
    pub non_idempotent: bool,
    /// First wait's upper bound; doubled per retry up to `cap`.
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            retries: 3,
            retriable_4xx: vec![409],
            non_idempotent: false,
            base: Duration::from_millis(25),
            cap: Duration::from_millis(250),
        }
    }
}

/// RFC 9110 §9.2.2: repeating these has the effect of doing it once.
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl RetryPolicy {
    /// The policy a ServicePolicy asks for (its `retry` settings, or their
    /// defaults).
    pub fn from_policy(policy: &ServicePolicySpec) -> Self {
        let settings = policy.retry.clone().unwrap_or_default();
        Self {
            retries: policy.retry_attempts.max(0) as u32,
            retriable_4xx: settings.on_statuses,
            non_idempotent: settings.non_idempotent,
            base: Duration::from_millis(settings.backoff_base_ms.into()),
            cap: Duration::from_millis(settings.backoff_max_ms.into()),
        }
    }

    /// Whether an attempt of `method` that ended as `attempt`, after
    /// `retried` retries already, is worth another.
    pub fn should_retry(&self, method: &Method, attempt: Attempt, retried: u32) -> bool {
        if retried >= self.retries {
            return false;
        }
        // Opting in makes POST and PATCH repeatable; CONNECT and methods
        // of extensions never are.
        let repeatable = idempotent(method)
            || (self.non_idempotent && matches!(*method, Method::POST | Method::PATCH));
        match attempt {
            Attempt::ConnectFailed => true,
            Attempt::Reset | Attempt::Status(503) => repeatable,
            Attempt::Status(status) => repeatable && self.retriable_4xx.contains(&status),
            Attempt::TimedOut => false,
        }
    }

    /// How long to wait before retry number `retry` (0 for the first):
    /// `roll` (uniform in `[0, 1)`) times the capped exponential.
    pub fn backoff(&self, retry: u32, roll: f64) -> Duration {
        let ceiling = self
            .base
            .checked_mul(1u32.checked_shl(retry).unwrap_or(u32::MAX))
            .unwrap_or(self.cap)
            .min(self.cap);
        ceiling.mul_f64(roll.clamp(0.0, 1.0))
    }
}

/// How many retries a budget allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetLimits {
    /// Retries allowed per hundred requests.
    pub percent: u32,
    /// Retries allowed per second whatever the traffic.
    pub min_per_second: u32,
}

impl From<&RetrySettings> for BudgetLimits {
    fn from(settings: &RetrySettings) -> Self {
        Self {
            percent: settings.budget_percent,
            min_per_second: settings.budget_min_per_second,
        }
    }
}

/// Caps retries to a share of a service's requests over a sliding window,
/// with a floor so a quiet service can still retry.
#[derive(Debug)]
pub struct RetryBudget {
    window: Duration,
    state: Mutex<Window>,
    epoch: Instant,
}

#[derive(Debug)]
struct Window {
    limits: BudgetLimits,
    /// Per-second buckets: (second, requests, retries), oldest first.
    buckets: VecDeque<(u64, u32, u32)>,
}

impl RetryBudget {
    /// A budget of `limits` over the last `window`.
    pub fn new(limits: BudgetLimits, window: Duration) -> Self {
        Self {
            window: window.max(Duration::from_secs(1)),
            state: Mutex::new(Window {
                limits,
                buckets: VecDeque::new(),
            }),
            epoch: Instant::now(),
        }
    }

    /// Applies `limits` from now on, to the requests and retries already
    /// counted: a policy change neither refills nor empties the budget.
    pub fn set_limits(&self, limits: BudgetLimits) {
        self.current().limits = limits;
    }

    /// Counts a first attempt.
    pub fn request(&self) {
        if let Some(bucket) = self.current().buckets.back_mut() {
            bucket.1 += 1;
        }
    }

    /// Takes a retry from the budget if it has one.
    pub fn try_retry(&self) -> bool {
        let mut state = self.current();
        let (requests, retries) = state.buckets.iter().fold((0u64, 0u64), |(q, r), b| {
            (q + u64::from(b.1), r + u64::from(b.2))
        });
        let floor = u64::from(state.limits.min_per_second) * self.window.as_secs();
        let allowed = floor.max(requests * u64::from(state.limits.percent) / 100);
        if retries >= allowed {
            return false;
        }
        if let Some(bucket) = state.buckets.back_mut() {
            bucket.2 += 1;
        }
        true
    }

    /// The window, with this second's bucket at the back and none older
    /// than the window.
    fn current(&self) -> std::sync::MutexGuard<'_, Window> {
        let second = Instant::now().duration_since(self.epoch).as_secs();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = second.saturating_sub(self.window.as_secs() - 1);
        let buckets = &mut state.buckets;
        while buckets.front().is_some_and(|b| b.0 < oldest) {
            buckets.pop_front();
        }
        if buckets.back().is_none_or(|b| b.0 != second) {
            buckets.push_back((second, 0, 0));
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eligibility_by_method_outcome_and_count() {
        use Attempt::*;
        let policy = RetryPolicy::default();
        // (method, outcome, retried?) for a policy with the defaults.
        let table: &[(Method, Attempt, bool)] = &[
            (Method::GET, ConnectFailed, true),
            (Method::POST, ConnectFailed, true),
            (Method::GET, Status(503), true),
            (Method::PUT, Status(503), true),
            (Method::DELETE, Status(503), true),
            (Method::POST, Status(503), false),
            (Method::PATCH, Status(503), false),
            (Method::GET, Status(409), true),
            (Method::POST, Status(409), false),
            (Method::GET, Status(500), false),
            (Method::GET, Status(502), false),
            (Method::GET, Status(404), false),
            (Method::GET, Status(429), false),
            (Method::GET, Status(200), false),
            (Method::GET, Reset, true),
            (Method::HEAD, Reset, true),
            (Method::POST, Reset, false),
            (Method::GET, TimedOut, false),
            (Method::POST, TimedOut, false),
        ];
        for (method, attempt, expected) in table {
            assert_eq!(
                policy.should_retry(method, *attempt, 0),
                *expected,
                "{method} {attempt:?}"
            );
        }
        // The attempts run out.
        assert!(policy.should_retry(&Method::GET, Status(503), 2));
        assert!(!policy.should_retry(&Method::GET, Status(503), 3));
        assert!(!policy.should_retry(&Method::GET, ConnectFailed, 3));
        let none = RetryPolicy {
            retries: 0,
            ..RetryPolicy::default()
        };
        assert!(!none.should_retry(&Method::GET, ConnectFailed, 0));
        // Opting in makes POST repeatable; other statuses join the list.
        let opted = RetryPolicy {
            non_idempotent: true,
            retriable_4xx: vec![409, 425],
            ..RetryPolicy::default()
        };
        assert!(opted.should_retry(&Method::POST, Status(503), 0));
        assert!(opted.should_retry(&Method::PATCH, Status(425), 0));
        assert!(!opted.should_retry(&Method::POST, TimedOut, 0));
        // Only POST and PATCH: not CONNECT, nor an extension's method.
        assert!(!opted.should_retry(&Method::CONNECT, Status(503), 0));
        let extension = Method::from_bytes(b"PURGE").unwrap();
        assert!(!opted.should_retry(&extension, Status(503), 0));
    }

    #[test]
    fn backoff_is_full_jitter_under_a_capped_exponential() {
        let policy = RetryPolicy::default();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        // The ceiling: 25, 50, 100, 200, then 250 for good.
        for (retry, ceiling) in [
            (0, 25.0),
            (1, 50.0),
            (2, 100.0),
            (3, 200.0),
            (4, 250.0),
            (40, 250.0),
        ] {
            assert_eq!(ms(policy.backoff(retry, 0.0)), 0.0);
            assert!(
                (ms(policy.backoff(retry, 0.999_999)) - ceiling).abs() < 0.01,
                "retry {retry}"
            );
            assert!((ms(policy.backoff(retry, 0.5)) - ceiling / 2.0).abs() < 0.01);
        }
        // Random rolls stay within the bounds.
        let mut rng = fastrand::Rng::with_seed(1);
        for retry in 0..8 {
            let wait = policy.backoff(retry, rng.f64());
            assert!(wait <= Duration::from_millis(250));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_policys_settings_reach_every_decision() {
        let policy = ServicePolicySpec {
            retry_attempts: 2,
            retry: Some(RetrySettings {
                on_statuses: vec![502],
                non_idempotent: true,
                backoff_base_ms: 10,
                backoff_max_ms: 40,
                budget_percent: 0,
                budget_min_per_second: 0,
            }),
            ..ServicePolicySpec::default()
        };
        let retry = RetryPolicy::from_policy(&policy);
        assert!(retry.should_retry(&Method::POST, Attempt::Status(503), 0));
        assert!(retry.should_retry(&Method::PATCH, Attempt::Reset, 1));
        assert!(retry.should_retry(&Method::GET, Attempt::Status(502), 1));
        assert!(!retry.should_retry(&Method::GET, Attempt::Status(502), 2));
        // The default 409 is gone once the list is given.
        assert!(!retry.should_retry(&Method::GET, Attempt::Status(409), 0));
        assert_eq!(retry.backoff(0, 0.999_999).as_micros(), 9_999);
        assert_eq!(retry.backoff(9, 0.999_999).as_micros(), 39_999);

        // A budget of nothing grants nothing, however quiet.
        let budget = RetryBudget::new(
            BudgetLimits::from(policy.retry.as_ref().unwrap()),
            Duration::from_secs(10),
        );
        for _ in 0..100 {
            budget.request();
        }
        assert!(!budget.try_retry());

        // Without settings: the defaults, as the seed says.
        let defaults = RetryPolicy::from_policy(&ServicePolicySpec::default());
        assert_eq!(defaults, RetryPolicy::default());
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_allows_a_share_of_requests_with_a_floor() {
        // 20 % of requests, at least 3 per second, over 10 seconds.
        let budget = RetryBudget::new(
            BudgetLimits {
                percent: 20,
                min_per_second: 3,
            },
            Duration::from_secs(10),
        );
        // Quiet: the floor, 30 in the window.
        let granted = (0..100).filter(|_| budget.try_retry()).count();
        assert_eq!(granted, 30);
        // The window slides: after 10 s the old retries no longer count.
        tokio::time::advance(Duration::from_secs(10)).await;
        // Busy: 1,000 requests allow 200 retries.
        for _ in 0..1000 {
            budget.request();
        }
        let granted = (0..1000).filter(|_| budget.try_retry()).count();
        assert_eq!(granted, 200);
        // Half the window later the requests still count; the retries too.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!budget.try_retry());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(budget.try_retry());
    }

    #[tokio::test(start_paused = true)]
    async fn new_limits_apply_to_what_was_counted() {
        let limits = |percent| BudgetLimits {
            percent,
            min_per_second: 0,
        };
        let budget = RetryBudget::new(limits(10), Duration::from_secs(10));
        for _ in 0..100 {
            budget.request();
        }
        assert_eq!((0..100).filter(|_| budget.try_retry()).count(), 10);
        // Raised: the 10 already taken count against the new 30.
        budget.set_limits(limits(30));
        assert_eq!((0..100).filter(|_| budget.try_retry()).count(), 20);
        // Lowered below what was taken: nothing more, not a fresh start.
        budget.set_limits(limits(5));
        assert!(!budget.try_retry());
    }
}
