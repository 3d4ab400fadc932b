//! [`ManagerObserver`]: what the manager tells an embedder about its work, for metrics.
//!
//! The manager calls these hooks at the moment each fact becomes true (a runner is ready, is
//! destroyed, an execution ends, a creation fails). Every hook has a no-op default, so an
//! observer implements only what it records, and [`NoopObserver`] is what a manager built
//! without one uses. This module knows nothing about Prometheus or any exporter: the server
//! implements the trait.
//!
//! Hooks are called on the manager's hot paths (claims, executions): an implementation must
//! return at once, without blocking or awaiting anything (an atomic increment is the budget).

use std::fmt;
use std::time::Duration;

use crate::destroy::DestroyReason;
use crate::execution::{ExecutionEvent, ExecutionFailure};
use crate::executor::BackendError;
use crate::ids::{EnvironmentId, RunnerId};

/// How an execution ended, as counted by metrics: a small, fixed set of labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExecutionOutcome {
    /// The command exited with code 0.
    ExitZero,
    /// The command exited with a non-zero code.
    ExitNonZero,
    /// The time limit or the runner's inactivity timeout ended it.
    Timeout,
    /// The runner was killed for memory.
    OomKilled,
    /// It ended abnormally otherwise (the backend failed, the runner was deleted, the output cap
    /// was reached, it could not be started, …).
    Error,
    /// The client went away before it ended; it was cancelled.
    Cancelled,
}

impl ExecutionOutcome {
    /// Every outcome, for exporters that pre-register their label values.
    pub const ALL: [ExecutionOutcome; 6] = [
        Self::ExitZero,
        Self::ExitNonZero,
        Self::Timeout,
        Self::OomKilled,
        Self::Error,
        Self::Cancelled,
    ];

    /// The outcome a terminal event stands for; `None` for output events.
    pub fn of(event: &ExecutionEvent) -> Option<Self> {
        Some(match event {
            ExecutionEvent::Exit(0) => Self::ExitZero,
            ExecutionEvent::Exit(_) => Self::ExitNonZero,
            ExecutionEvent::Timeout => Self::Timeout,
            ExecutionEvent::Error(ExecutionFailure::OomKilled) => Self::OomKilled,
            ExecutionEvent::Error(_) => Self::Error,
            ExecutionEvent::Stdout(_) | ExecutionEvent::Stderr(_) => return None,
        })
    }

    /// A short stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::ExitZero => "exit_zero",
            Self::ExitNonZero => "exit_nonzero",
            Self::Timeout => "timeout",
            Self::OomKilled => "oom_killed",
            Self::Error => "error",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for ExecutionOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A short stable label for a backend error's kind, for metrics and logs.
pub fn backend_error_kind(error: &BackendError) -> &'static str {
    match error {
        BackendError::RunnerNotFound(_) => "runner_not_found",
        BackendError::EnvironmentNotFound(_) => "environment_not_found",
        BackendError::InvalidRequest(_) => "invalid_request",
        BackendError::Unreachable(_) => "unreachable",
        BackendError::Overloaded(_) => "overloaded",
        BackendError::Unavailable(_) => "unavailable",
        BackendError::Internal(_) => "internal",
    }
}

/// Receives the manager's facts as they happen. Every method defaults to doing nothing.
///
/// Contract: each runner destruction is reported exactly once, by the reason the manager decided
/// it (retries of the same destruction are not reported again); each execution the manager
/// started is reported exactly once when it ends; every method returns without blocking.
pub trait ManagerObserver: Send + Sync + fmt::Debug + 'static {
    /// A runner (`runner`, of `environment`) became ready for the pool, `startup` after its creation was
    /// requested (from the creation call, or from the backend's ready event for a creation the
    /// backend accepted as pending).
    fn runner_started(&self, runner: &RunnerId, environment: EnvironmentId, startup: Duration) {
        let _ = (runner, environment, startup);
    }

    /// Creating a runner of `environment` failed (the refill loop retries or, for a permanent
    /// error, stops until the environment changes).
    fn runner_creation_failed(&self, environment: EnvironmentId, error: &BackendError) {
        let _ = (environment, error);
    }

    /// A runner is being destroyed (or, for a local reason, was lost by the backend).
    fn runner_destroyed(&self, reason: &DestroyReason) {
        let _ = reason;
    }

    /// An execution on a runner of `environment` ended `duration` after it was started.
    fn execution_finished(
        &self,
        environment: EnvironmentId,
        outcome: ExecutionOutcome,
        duration: Duration,
    ) {
        let _ = (environment, outcome, duration);
    }
}

/// The observer that records nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopObserver;

impl ManagerObserver for NoopObserver {}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn terminal_events_map_to_outcomes() {
        assert_eq!(
            ExecutionOutcome::of(&ExecutionEvent::Exit(0)),
            Some(ExecutionOutcome::ExitZero)
        );
        assert_eq!(
            ExecutionOutcome::of(&ExecutionEvent::Exit(137)),
            Some(ExecutionOutcome::ExitNonZero)
        );
        assert_eq!(
            ExecutionOutcome::of(&ExecutionEvent::Timeout),
            Some(ExecutionOutcome::Timeout)
        );
        assert_eq!(
            ExecutionOutcome::of(&ExecutionEvent::Error(ExecutionFailure::OomKilled)),
            Some(ExecutionOutcome::OomKilled)
        );
        assert_eq!(
            ExecutionOutcome::of(&ExecutionEvent::Error(ExecutionFailure::Failed)),
            Some(ExecutionOutcome::Error)
        );
        assert_eq!(
            ExecutionOutcome::of(&ExecutionEvent::Stdout(Bytes::from_static(b"x"))),
            None
        );
        let labels: std::collections::HashSet<_> =
            ExecutionOutcome::ALL.iter().map(|o| o.label()).collect();
        assert_eq!(labels.len(), ExecutionOutcome::ALL.len());
    }
}
