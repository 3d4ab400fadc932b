//! The errors the manager reports to its callers (the HTTP layer maps them to statuses).

use crate::environment::ValidationError;
use crate::execution::InvalidExecution;
use crate::executor::BackendError;
use crate::files::FileError;
use crate::ids::{EnvironmentId, RunnerId};

/// Why a manager operation failed. Each variant corresponds to one class of API answer.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// No such environment (HTTP 404).
    #[error("execution environment {0} not found")]
    UnknownEnvironment(EnvironmentId),
    /// The environment's pool is empty right now (HTTP 500 `NOMAD_OVERLOAD`).
    #[error("no runners available for execution environment {0}")]
    NoIdleRunner(EnvironmentId),
    /// No used runner with this id: unknown, idle, or already destroyed (HTTP 410).
    #[error("no runner found with id {0}")]
    UnknownRunner(RunnerId),
    /// The execution id is unknown, already used, or expired (HTTP 404).
    #[error("execution id unknown")]
    UnknownExecution,
    /// An environment specification breaks a bound (HTTP 400).
    #[error(transparent)]
    InvalidSpec(#[from] ValidationError),
    /// An execution request cannot be run (HTTP 400).
    #[error(transparent)]
    InvalidExecution(#[from] InvalidExecution),
    /// Too many execution requests are stored on this runner and not yet connected (HTTP 400).
    #[error("too many pending executions on runner {0}")]
    TooManyPendingExecutions(RunnerId),
    /// The execution requests stored on this runner and not yet connected would hold more
    /// than the configured bytes (HTTP 400).
    #[error(
        "pending executions on runner {runner} would hold more than {limit} bytes; connect to the stored executions (or let them expire) first"
    )]
    PendingExecutionsTooLarge {
        /// The runner.
        runner: RunnerId,
        /// The configured bound in bytes.
        limit: usize,
    },
    /// A file operation failed (424, 500 `UNKNOWN` or 400 by kind).
    #[error(transparent)]
    Files(#[from] FileError),
    /// The backend failed (HTTP 500).
    #[error(transparent)]
    Backend(#[from] BackendError),
}
