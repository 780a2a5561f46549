//! Restart policy shared by every supervising actor: exponential backoff per
//! actor, and a budget of restarts per time window beyond which the run fails.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Restart accounting for the children of one supervisor.
#[derive(Debug)]
pub struct RestartPolicy {
    limit: usize,
    window: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    history: HashMap<String, VecDeque<Instant>>,
}

impl RestartPolicy {
    pub fn new(limit: usize, window: Duration, backoff_initial: Duration, backoff_max: Duration) -> Self {
        Self { limit, window, backoff_initial, backoff_max, history: HashMap::new() }
    }

    /// Records a failure of `actor` at `now`. Returns the backoff before
    /// restarting it, or an error message naming the actor and its last error
    /// when it failed more than `limit` times within the window.
    pub fn on_failure(&mut self, actor: &str, error: &str, now: Instant) -> Result<Duration, String> {
        let h = self.history.entry(actor.to_string()).or_default();
        while h.front().is_some_and(|&t| now.duration_since(t) > self.window) {
            h.pop_front();
        }
        h.push_back(now);
        let recent = h.len();
        if recent > self.limit {
            return Err(format!(
                "{actor} failed {recent} times within {:?} (limit {}); last error: {error}",
                self.window, self.limit
            ));
        }
        let factor = 1u32 << (recent - 1).min(16);
        Ok((self.backoff_initial * factor).min(self.backoff_max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_budget_fails_the_run() {
        let mut p = RestartPolicy::new(3, Duration::from_secs(60), Duration::from_millis(100), Duration::from_millis(250));
        let t = Instant::now();
        assert_eq!(p.on_failure("rollout-0", "boom", t), Ok(Duration::from_millis(100)));
        assert_eq!(p.on_failure("rollout-0", "boom", t), Ok(Duration::from_millis(200)));
        assert_eq!(p.on_failure("rollout-0", "boom", t), Ok(Duration::from_millis(250)), "capped");
        // another actor has its own budget
        assert_eq!(p.on_failure("reward-1", "x", t), Ok(Duration::from_millis(100)));
        let e = p.on_failure("rollout-0", "out of memory", t).unwrap_err();
        assert!(e.starts_with("rollout-0 failed 4 times within 60s (limit 3)"), "{e}");
        assert!(e.ends_with("last error: out of memory"), "{e}");
    }

    #[test]
    fn old_failures_leave_the_window() {
        let mut p = RestartPolicy::new(1, Duration::from_secs(10), Duration::from_millis(1), Duration::from_secs(1));
        let t = Instant::now();
        assert!(p.on_failure("a", "e", t).is_ok());
        assert!(p.on_failure("a", "e", t + Duration::from_secs(11)).is_ok());
        assert!(p.on_failure("a", "e", t + Duration::from_secs(12)).is_err());
    }
}
