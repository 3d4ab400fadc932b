//! [`InactivityTimer`]: destroys a used runner that nobody has touched for its timeout.
//!
//! The timer is restarted at the start of every operation (execute, file operations); traffic on
//! a running execution does not restart it, so a runaway execution cannot hold a runner forever.
//! It never fires after [`InactivityTimer::stop`].

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A restartable one-shot timer.
#[derive(Debug)]
pub struct InactivityTimer {
    timeout: Duration,
    deadline: Mutex<Option<Instant>>,
    stopped: CancellationToken,
}

impl InactivityTimer {
    /// A timer that fires `timeout` after the last restart; a zero timeout never fires.
    /// `first` overrides the first deadline (used to restore a remaining timeout on recovery).
    pub fn new(timeout: Duration, first: Option<Duration>) -> Arc<Self> {
        let deadline =
            (!timeout.is_zero()).then(|| Instant::now() + first.unwrap_or(timeout).min(timeout));
        Arc::new(Self {
            timeout,
            deadline: Mutex::new(deadline),
            stopped: CancellationToken::new(),
        })
    }

    /// The configured timeout (zero = never).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Time left until the timer fires, or `None` if it never will.
    pub fn remaining(&self) -> Option<Duration> {
        let deadline = *self.lock();
        deadline.map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Restarts the countdown from now. Returns the new remaining time, or `None` for a timer that
    /// never fires or was stopped.
    pub fn restart(&self) -> Option<Duration> {
        if self.stopped.is_cancelled() || self.timeout.is_zero() {
            return None;
        }
        *self.lock() = Some(Instant::now() + self.timeout);
        Some(self.timeout)
    }

    /// Stops the timer for good.
    pub fn stop(&self) {
        self.stopped.cancel();
    }

    /// Spawns the countdown; `on_expire` runs once when the deadline passes without a restart.
    pub fn spawn<F>(self: &Arc<Self>, on_expire: F)
    where
        F: FnOnce() + Send + 'static,
    {
        let timer = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let Some(deadline) = *timer.lock() else {
                    return;
                };
                tokio::select! {
                    () = timer.stopped.cancelled() => return,
                    () = tokio::time::sleep_until(deadline) => {}
                }
                // A restart while we slept moved the deadline: sleep again.
                let current = *timer.lock();
                if current.is_some_and(|d| d <= Instant::now()) && !timer.stopped.is_cancelled() {
                    timer.stopped.cancel();
                    on_expire();
                    return;
                }
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.deadline.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn flag() -> (Arc<AtomicBool>, impl FnOnce() + Send + 'static) {
        let fired = Arc::new(AtomicBool::new(false));
        let f = Arc::clone(&fired);
        (fired, move || f.store(true, Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn fires_after_timeout() {
        let timer = InactivityTimer::new(Duration::from_secs(5), None);
        let (fired, f) = flag();
        timer.spawn(f);
        tokio::time::sleep(Duration::from_millis(4_900)).await;
        assert!(!fired.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(fired.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn restart_postpones_expiry() {
        let timer = InactivityTimer::new(Duration::from_secs(5), None);
        let (fired, f) = flag();
        timer.spawn(f);
        tokio::time::sleep(Duration::from_secs(4)).await;
        timer.restart();
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!fired.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        assert!(fired.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_timeout_and_stopped_timers_never_fire() {
        let never = InactivityTimer::new(Duration::ZERO, None);
        let (fired_never, f) = flag();
        never.spawn(f);
        assert_eq!(never.restart(), None);
        let stopped = InactivityTimer::new(Duration::from_secs(1), None);
        let (fired_stopped, f) = flag();
        stopped.spawn(f);
        stopped.stop();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!fired_never.load(Ordering::SeqCst));
        assert!(!fired_stopped.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn restored_remaining_time_is_used_first() {
        let timer = InactivityTimer::new(Duration::from_secs(60), Some(Duration::from_secs(2)));
        let (fired, f) = flag();
        timer.spawn(f);
        tokio::time::sleep(Duration::from_millis(2_100)).await;
        assert!(fired.load(Ordering::SeqCst));
    }
}
