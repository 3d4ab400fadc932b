//! Why a runner was destroyed, and what that means for the backend and for executions still
//! running on it.

use std::fmt;

use crate::execution::{ExecutionEvent, ExecutionFailure};

/// Why a runner is being (or was) destroyed.
///
/// A *local* reason means the backend has already lost the runner (or another record owns it):
/// the manager only drops its reference. Every other reason makes the manager ask the backend to
/// destroy the runner. Mirrors Poseidon's `DestroyReason` table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DestroyReason {
    /// The client deleted the runner (`DELETE /runners/{id}`).
    ApiRequest,
    /// The runner's inactivity timeout fired.
    InactivityTimeout,
    /// Its environment was changed in a way that replaces runners, or its pool shrank.
    EnvironmentUpdated,
    /// Its environment was deleted.
    EnvironmentDeleted,
    /// An execution could not be stopped, so the whole runner is destroyed to stop it.
    CannotStopExecution,
    /// The backend accepted the runner's creation but did not report it ready within the
    /// start-up timeout; it is destroyed and replaced.
    StartupTimeout,
    /// After a crash the runner's claimed/idle state was uncertain, or it was a duplicate; it is
    /// destroyed rather than risk handing it out twice.
    Replaced,
    /// The backend reports the runner's sandbox/allocation was killed for memory (local).
    OomKilled,
    /// The runner's process table is full (e.g. a fork bomb left running in the background), so
    /// nothing can be started in it any more; the backend destroys it (not memory: never reported
    /// as an OOM kill).
    ProcessLimitReached,
    /// The backend reports the runner ended on its own or was stopped by someone else (local).
    Stopped(String),
    /// The manager drops its reference without touching the backend (e.g. on reload) (local).
    LocalOnly,
}

impl DestroyReason {
    /// Whether the backend has already lost the runner, so only the local reference is dropped.
    pub fn is_local(&self) -> bool {
        matches!(self, Self::OomKilled | Self::Stopped(_) | Self::LocalOnly)
    }

    /// The final event an execution still running on the destroyed runner receives (design §2).
    pub fn execution_event(&self) -> ExecutionEvent {
        match self {
            Self::InactivityTimeout => ExecutionEvent::Timeout,
            Self::OomKilled => ExecutionEvent::Error(ExecutionFailure::OomKilled),
            Self::ProcessLimitReached => {
                ExecutionEvent::Error(ExecutionFailure::ProcessLimitReached)
            }
            Self::ApiRequest | Self::EnvironmentUpdated | Self::EnvironmentDeleted => {
                ExecutionEvent::Error(ExecutionFailure::StoppedAsExpected)
            }
            Self::CannotStopExecution
            | Self::StartupTimeout
            | Self::Replaced
            | Self::Stopped(_)
            | Self::LocalOnly => ExecutionEvent::Error(ExecutionFailure::Failed),
        }
    }

    /// A short stable label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::ApiRequest => "api_request",
            Self::InactivityTimeout => "inactivity_timeout",
            Self::EnvironmentUpdated => "environment_updated",
            Self::EnvironmentDeleted => "environment_deleted",
            Self::CannotStopExecution => "cannot_stop_execution",
            Self::StartupTimeout => "startup_timeout",
            Self::Replaced => "replaced",
            Self::OomKilled => "oom_killed",
            Self::ProcessLimitReached => "process_limit_reached",
            Self::Stopped(_) => "stopped",
            Self::LocalOnly => "local_only",
        }
    }
}

impl fmt::Display for DestroyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ApiRequest => f.write_str("the client wants to stop the runner"),
            Self::InactivityTimeout => f.write_str("runner inactivity timeout exceeded"),
            Self::EnvironmentUpdated => {
                f.write_str("the environment will be destroyed and updated")
            }
            Self::EnvironmentDeleted => f.write_str("the environment was deleted"),
            Self::CannotStopExecution => f.write_str("the execution did not stop"),
            Self::StartupTimeout => f.write_str("the runner did not start in time"),
            Self::Replaced => f.write_str("the runner will be destroyed and replaced"),
            Self::OomKilled => f.write_str("the allocation was OOM Killed"),
            Self::ProcessLimitReached => f.write_str("the runner's process limit was reached"),
            Self::Stopped(why) => write!(f, "the runner stopped: {why}"),
            Self::LocalOnly => f.write_str("the destruction should not cause external changes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_map_to_the_contract_messages() {
        assert_eq!(
            DestroyReason::InactivityTimeout.execution_event(),
            ExecutionEvent::Timeout
        );
        let msg = |r: DestroyReason| match r.execution_event() {
            ExecutionEvent::Error(e) => e.to_string(),
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(
            msg(DestroyReason::OomKilled),
            "the allocation was OOM Killed"
        );
        assert_eq!(
            msg(DestroyReason::ApiRequest),
            "the allocation stopped as expected"
        );
        assert_eq!(
            msg(DestroyReason::EnvironmentUpdated),
            "the allocation stopped as expected"
        );
        assert_eq!(
            msg(DestroyReason::EnvironmentDeleted),
            "the allocation stopped as expected"
        );
        assert_eq!(
            msg(DestroyReason::Stopped("lost".into())),
            "Error executing the request"
        );
        let process_limit = msg(DestroyReason::ProcessLimitReached);
        assert!(process_limit.contains("process limit"), "{process_limit}");
        assert!(!process_limit.contains("OOM"), "{process_limit}");
    }

    #[test]
    fn only_backend_side_losses_are_local() {
        assert!(DestroyReason::OomKilled.is_local());
        assert!(DestroyReason::Stopped("x".into()).is_local());
        assert!(!DestroyReason::ApiRequest.is_local());
        assert!(!DestroyReason::InactivityTimeout.is_local());
        assert!(!DestroyReason::Replaced.is_local());
        assert!(!DestroyReason::ProcessLimitReached.is_local());
    }
}
