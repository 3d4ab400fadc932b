//! Capped exponential backoff for retrying backend calls.
//!
//! Poseidon retries with an uncapped doubling (≈36 h worst case); here every delay is capped and
//! the number of attempts is bounded by the caller.

use std::time::Duration;

/// The delays between attempts: `initial`, doubling each time, never above `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The first delay.
    pub initial: Duration,
    /// The largest delay.
    pub max: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

/// The running state of a [`BackoffPolicy`].
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    next: Duration,
    failures: u32,
}

impl Backoff {
    /// A fresh backoff at the policy's initial delay.
    pub fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            next: policy.initial,
            failures: 0,
        }
    }

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn fail(&mut self) -> Duration {
        let delay = self.next.min(self.policy.max);
        self.next = delay.saturating_mul(2).min(self.policy.max);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Records a success: the next failure waits the initial delay again.
    pub fn succeed(&mut self) {
        self.next = self.policy.initial;
        self.failures = 0;
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_reset_on_success() {
        let mut b = Backoff::new(BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(350),
        });
        let delays: Vec<_> = (0..5).map(|_| b.fail().as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 350, 350, 350]);
        assert_eq!(b.failures(), 5);
        b.succeed();
        assert_eq!(b.fail(), Duration::from_millis(100));
    }
}
