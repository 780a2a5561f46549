//! The circuit breaker in front of the judge: after `failures` consecutive
//! failed attempts it opens and refuses calls (they take the fallback); after
//! `cooldown` it lets `probes` calls through (half-open); a probe that succeeds
//! closes it, one that fails opens it again.

use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// The breaker's state, as reported in the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
pub(crate) struct Breaker {
    failures: u32,
    cooldown: Duration,
    probes: u32,
    state: BreakerState,
    consecutive: u32,
    opened_at: Instant,
    probes_in_flight: u32,
    pub opens: u64,
}

/// Permission to make one attempt; `probe` when granted in the half-open state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pass {
    pub probe: bool,
}

impl Breaker {
    pub fn new(failures: u32, cooldown: Duration, probes: u32) -> Self {
        Self {
            failures,
            cooldown,
            probes,
            state: BreakerState::Closed,
            consecutive: 0,
            opened_at: Instant::now(),
            probes_in_flight: 0,
            opens: 0,
        }
    }

    pub fn state(&mut self, now: Instant) -> BreakerState {
        if self.state == BreakerState::Open && now.duration_since(self.opened_at) >= self.cooldown {
            self.state = BreakerState::HalfOpen;
            self.probes_in_flight = 0;
        }
        self.state
    }

    /// May an attempt start now?
    pub fn try_pass(&mut self, now: Instant) -> Option<Pass> {
        match self.state(now) {
            BreakerState::Closed => Some(Pass { probe: false }),
            BreakerState::Open => None,
            BreakerState::HalfOpen if self.probes_in_flight < self.probes => {
                self.probes_in_flight += 1;
                Some(Pass { probe: true })
            }
            BreakerState::HalfOpen => None,
        }
    }

    pub fn succeeded(&mut self, pass: Pass) {
        if pass.probe {
            self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
            if self.state != BreakerState::Closed {
                tracing::warn!(opens = self.opens, "judge answering again: circuit breaker closed, judge calls resume");
            }
            self.state = BreakerState::Closed;
        }
        if self.state == BreakerState::Closed {
            self.consecutive = 0;
        }
    }

    pub fn failed(&mut self, pass: Pass, now: Instant) {
        if pass.probe {
            self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
            if self.state == BreakerState::HalfOpen {
                self.open(now);
            }
            return;
        }
        if self.state == BreakerState::Closed {
            self.consecutive += 1;
            if self.consecutive >= self.failures {
                tracing::warn!(
                    failures = self.consecutive,
                    cooldown_ms = self.cooldown.as_millis() as u64,
                    "judge failing: circuit breaker open, steps take the fallback until a probe succeeds"
                );
                self.open(now);
            }
        }
    }

    /// A pass given up without an answer either way (its caller was cancelled).
    pub fn abandoned(&mut self, pass: Pass) {
        if pass.probe {
            self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = BreakerState::Open;
        self.opened_at = now;
        self.consecutive = 0;
        self.opens += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_k_failures_then_probes() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, Duration::from_secs(10), 1);
        let p = b.try_pass(t0).unwrap();
        b.failed(p, t0);
        b.failed(p, t0);
        // A success resets the count.
        b.succeeded(p);
        for _ in 0..2 {
            b.failed(p, t0);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.failed(p, t0);
        assert_eq!((b.state(t0), b.opens), (BreakerState::Open, 1));
        assert_eq!(b.try_pass(t0 + Duration::from_secs(9)), None);
        // Cooldown over: one probe at a time.
        let t1 = t0 + Duration::from_secs(10);
        let probe = b.try_pass(t1).unwrap();
        assert!(probe.probe);
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        assert_eq!(b.try_pass(t1), None);
        // The probe fails: open again, for another cooldown.
        b.failed(probe, t1);
        assert_eq!((b.state(t1), b.opens), (BreakerState::Open, 2));
        let t2 = t1 + Duration::from_secs(10);
        let probe = b.try_pass(t2).unwrap();
        b.succeeded(probe);
        assert_eq!(b.state(t2), BreakerState::Closed);
        assert!(!b.try_pass(t2).unwrap().probe);
    }

    #[test]
    fn an_abandoned_probe_frees_its_slot() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, Duration::ZERO, 1);
        let p = b.try_pass(t0).unwrap();
        b.failed(p, t0);
        let probe = b.try_pass(t0).unwrap();
        assert_eq!(b.try_pass(t0), None);
        b.abandoned(probe);
        assert!(b.try_pass(t0).unwrap().probe);
    }
}
