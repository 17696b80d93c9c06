//! A service's circuit breaker (`ServicePolicy.cb_threshold`,
//! `cb_window_sec`, `cb_recovery_timeout_ms`).
//!
//! **Closed**: every request goes; outcomes are counted in per-second
//! buckets over the window. Once the window holds at least
//! [`BreakerSettings::min_requests`] and failures (5xx, timeouts, failed
//! connections) reach the threshold share, the circuit **opens**: requests
//! fail fast with 503 without touching the upstream. After the recovery
//! timeout it is **half open**: up to [`BreakerSettings::probes`] requests
//! go through at once; when that many succeed it closes (the window starts
//! afresh), the first failure reopens it with the recovery timeout doubled
//! (up to [`BreakerSettings::max_recovery`]). Outcomes of requests admitted
//! before the circuit opened do not move an open or half-open circuit.

use std::{collections::VecDeque, sync::Mutex, time::Duration};

use tokio::time::Instant;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Failure share (percent) that opens the circuit.
    pub threshold_percent: u32,
    pub window: Duration,
    /// Fewer requests than this in the window never open it.
    pub min_requests: u32,
    /// The first wait before half-opening.
    pub recovery: Duration,
    pub max_recovery: Duration,
    /// Probe requests let through at once when half open, and successes
    /// needed to close.
    pub probes: u32,
}

impl BreakerSettings {
    /// The settings of a `ServicePolicy`, with the mesh's minimum volume (10
    /// requests), probes (3) and a recovery that doubles up to 8 times the
    /// configured one.
    pub fn from_policy(policy: &mesh_model::policy::ServicePolicySpec) -> Self {
        let recovery = Duration::from_millis(policy.cb_recovery_timeout_ms.max(1) as u64);
        Self {
            threshold_percent: policy.cb_threshold.clamp(1, 100) as u32,
            window: Duration::from_secs(policy.cb_window_sec.max(1) as u64),
            min_requests: 10,
            recovery,
            max_recovery: recovery * 8,
            probes: 3,
        }
    }
}

/// Where the circuit stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
enum Phase {
    Closed,
    Open {
        until: Instant,
        recovery: Duration,
    },
    HalfOpen {
        recovery: Duration,
        in_flight: u32,
        succeeded: u32,
    },
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    /// (second since `epoch`, successes, failures), oldest first.
    buckets: VecDeque<(u64, u32, u32)>,
    /// Bumped on every transition: a ticket from an earlier one is stale.
    generation: u64,
}

#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    inner: Mutex<Inner>,
    epoch: Instant,
}

/// Permission for one request; report how it went with [`Breaker::record`].
/// A ticket dropped unreported (the client went away, the request was
/// never sent) counts as nothing, and gives its probe slot back.
#[derive(Debug)]
#[must_use = "report the outcome with Breaker::record"]
pub struct Ticket {
    breaker: std::sync::Arc<Breaker>,
    generation: u64,
    probe: bool,
    reported: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.reported || !self.probe {
            return;
        }
        let mut inner = self.breaker.lock();
        if inner.generation != self.generation {
            return;
        }
        if let Phase::HalfOpen { in_flight, .. } = &mut inner.phase {
            *in_flight = in_flight.saturating_sub(1);
        }
    }
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            inner: Mutex::new(Inner {
                phase: Phase::Closed,
                buckets: VecDeque::new(),
                generation: 0,
            }),
            epoch: Instant::now(),
        }
    }

    pub fn settings(&self) -> &BreakerSettings {
        &self.settings
    }

    /// Whether a request may go now; `None`: fail it fast.
    pub fn admit(self: &std::sync::Arc<Self>) -> Option<Ticket> {
        let now = Instant::now();
        let mut inner = self.lock();
        if let Phase::Open { until, recovery } = inner.phase {
            if now < until {
                return None;
            }
            inner.transition(Phase::HalfOpen {
                recovery,
                in_flight: 0,
                succeeded: 0,
            });
        }
        let generation = inner.generation;
        match &mut inner.phase {
            Phase::Closed => Some(Ticket {
                breaker: self.clone(),
                generation,
                probe: false,
                reported: false,
            }),
            Phase::HalfOpen {
                in_flight,
                succeeded,
                ..
            } => {
                if *in_flight + *succeeded >= self.settings.probes {
                    return None;
                }
                *in_flight += 1;
                Some(Ticket {
                    breaker: self.clone(),
                    generation,
                    probe: true,
                    reported: false,
                })
            }
            Phase::Open { .. } => unreachable!("an open circuit past its time half-opened above"),
        }
    }

    /// Reports how an admitted request went.
    pub fn record(&self, mut ticket: Ticket, success: bool) {
        ticket.reported = true;
        let now = Instant::now();
        let second = now.duration_since(self.epoch).as_secs();
        let mut inner = self.lock();
        if ticket.generation != inner.generation {
            return;
        }
        match &mut inner.phase {
            Phase::Closed => {
                inner.count(second, self.settings.window, success);
                let (ok, failed) = inner.buckets.iter().fold((0u64, 0u64), |(s, f), b| {
                    (s + u64::from(b.1), f + u64::from(b.2))
                });
                let total = ok + failed;
                if total >= u64::from(self.settings.min_requests)
                    && failed * 100 >= u64::from(self.settings.threshold_percent) * total
                {
                    inner.transition(Phase::Open {
                        until: now + self.settings.recovery,
                        recovery: self.settings.recovery,
                    });
                }
            }
            Phase::HalfOpen {
                recovery,
                in_flight,
                succeeded,
            } if ticket.probe => {
                *in_flight = in_flight.saturating_sub(1);
                if success {
                    *succeeded += 1;
                    if *succeeded >= self.settings.probes {
                        inner.buckets.clear();
                        inner.transition(Phase::Closed);
                    }
                } else {
                    let recovery = (*recovery * 2).min(self.settings.max_recovery);
                    inner.transition(Phase::Open {
                        until: now + recovery,
                        recovery,
                    });
                }
            }
            Phase::HalfOpen { .. } | Phase::Open { .. } => {}
        }
    }

    /// Where the circuit stands now.
    pub fn state(&self) -> State {
        match self.lock().phase {
            Phase::Closed => State::Closed,
            Phase::Open { until, .. } if Instant::now() < until => State::Open,
            Phase::Open { .. } | Phase::HalfOpen { .. } => State::HalfOpen,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn transition(&mut self, phase: Phase) {
        self.phase = phase;
        self.generation += 1;
    }

    fn count(&mut self, second: u64, window: Duration, success: bool) {
        let oldest = second.saturating_sub(window.as_secs().max(1) - 1);
        while self.buckets.front().is_some_and(|b| b.0 < oldest) {
            self.buckets.pop_front();
        }
        if self.buckets.back().is_none_or(|b| b.0 != second) {
            self.buckets.push_back((second, 0, 0));
        }
        let bucket = self.buckets.back_mut().expect("pushed above");
        if success {
            bucket.1 += 1;
        } else {
            bucket.2 += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> std::sync::Arc<Breaker> {
        std::sync::Arc::new(Breaker::new(BreakerSettings {
            threshold_percent: 50,
            window: Duration::from_secs(30),
            min_requests: 10,
            recovery: Duration::from_secs(10),
            max_recovery: Duration::from_secs(40),
            probes: 3,
        }))
    }

    fn run(breaker: &std::sync::Arc<Breaker>, successes: u32, failures: u32) {
        for i in 0..successes + failures {
            let ticket = breaker.admit().expect("admitted");
            breaker.record(ticket, i < successes);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn it_opens_past_the_threshold_with_enough_volume_only() {
        let b = breaker();
        // 9 failures: below the minimum volume.
        run(&b, 0, 9);
        assert_eq!(b.state(), State::Closed);
        // The tenth request brings the volume: 9 of 10 failed.
        run(&b, 1, 0);
        assert_eq!(b.state(), State::Open);
        let b = breaker();
        run(&b, 6, 4);
        assert_eq!(b.state(), State::Closed, "40 % stays closed");
        run(&b, 0, 2);
        assert_eq!(b.state(), State::Open, "6 of 12 failed: 50 % opens");
        assert!(b.admit().is_none(), "open: fail fast");
    }

    #[tokio::test(start_paused = true)]
    async fn old_outcomes_leave_the_window() {
        let b = breaker();
        run(&b, 0, 4);
        tokio::time::advance(Duration::from_secs(30)).await;
        // The 4 failures are out of the window: 4 of 10 now.
        run(&b, 6, 4);
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_probes_close_it_or_reopen_it_for_longer() {
        let b = breaker();
        run(&b, 0, 10);
        assert_eq!(b.state(), State::Open);
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(b.admit().is_none());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.state(), State::HalfOpen);

        // Three probes at once, no more.
        let probes: Vec<Ticket> = (0..3).map(|_| b.admit().expect("a probe")).collect();
        assert!(b.admit().is_none());
        // One fails: open again, for twice as long.
        let mut probes = probes.into_iter();
        b.record(probes.next().unwrap(), false);
        assert_eq!(b.state(), State::Open);
        // The other probes' outcomes belong to the earlier state.
        b.record(probes.next().unwrap(), true);
        b.record(probes.next().unwrap(), true);
        assert_eq!(b.state(), State::Open);
        tokio::time::advance(Duration::from_millis(19_999)).await;
        assert!(b.admit().is_none());
        tokio::time::advance(Duration::from_millis(1)).await;

        // Fails again: 40 s (the cap), then a third time still 40 s.
        let probe = b.admit().unwrap();
        b.record(probe, false);
        tokio::time::advance(Duration::from_millis(39_999)).await;
        assert!(b.admit().is_none());
        tokio::time::advance(Duration::from_millis(1)).await;
        let probe = b.admit().unwrap();
        b.record(probe, false);
        tokio::time::advance(Duration::from_secs(40)).await;

        // Three successes close it, with a fresh window: a few failures
        // do not reopen it at once.
        run(&b, 3, 0);
        assert_eq!(b.state(), State::Closed);
        run(&b, 0, 9);
        assert_eq!(b.state(), State::Closed);
        // Requests admitted before it opened do not count once it is open.
        let late = b.admit().unwrap();
        run(&b, 0, 1);
        assert_eq!(b.state(), State::Open);
        b.record(late, true);
        assert_eq!(b.state(), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_dropped_unreported_gives_its_slot_back() {
        let b = breaker();
        run(&b, 0, 10);
        tokio::time::advance(Duration::from_secs(10)).await;
        let probes: Vec<Ticket> = (0..3).map(|_| b.admit().expect("a probe")).collect();
        assert!(b.admit().is_none());
        // The clients went away: no outcome, the slots come back.
        drop(probes);
        assert_eq!(b.state(), State::HalfOpen);
        run(&b, 3, 0);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn policy_settings() {
        let settings = BreakerSettings::from_policy(&Default::default());
        assert_eq!(settings.threshold_percent, 50);
        assert_eq!(settings.window, Duration::from_secs(30));
        assert_eq!(settings.recovery, Duration::from_secs(10));
        assert_eq!(settings.max_recovery, Duration::from_secs(80));
    }
}
