//! The runner lifecycle of a code-execution runner manager, as a library.
//!
//! An [`ExecutorApi`] backend owns sandboxes; [`RunnerManager`] keeps a [`PrewarmingPool`] of idle
//! runners per environment, hands them out in O(1), tracks used runners with an
//! [`InactivityTimer`], runs executions with bounded, cancellable event streams, and recovers its
//! state from the backend after a restart.
//!
//! This crate performs no I/O of its own beyond tokio timers and channels, and depends on no HTTP
//! stack and no backend.

pub mod backoff;
pub mod destroy;
pub mod environment;
pub mod error;
pub mod execution;
pub mod executor;
pub mod fake;
pub mod files;
pub mod ids;
mod manager;
pub mod observe;
pub mod pool;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod timer;
pub mod traits;

pub use destroy::DestroyReason;
pub use environment::{EnvironmentSpec, EnvironmentStatistics, SpecBounds, ValidationError};
pub use error::ManagerError;
pub use execution::{
    Execution, ExecutionEvent, ExecutionFailure, ExecutionRequest, InvalidExecution, TakenExecution,
};
#[cfg(any(test, feature = "mock"))]
pub use executor::MockExecutorApi;
pub use executor::{
    BackendError, BackendEvent, Creation, ExecutionHandle, ExecutorApi, MappedPort, RecordedState,
    RunnerInfo, RunnerRecord, RunnerState, UsedState,
};
pub use files::{
    FileContent, FileCopy, FileError, FileFailure, FileHeader, FileUpdate, ListFilesRequest,
};
pub use ids::{EnvironmentId, ExecutionId, InvalidId, RunnerId};
pub use manager::{
    DEFAULT_MAX_PENDING_BYTES, ManagedEnvironment, ManagerConfig, RecoveryReport, RunnerManager,
    UsedRunner,
};
pub use observe::{ExecutionOutcome, ManagerObserver, NoopObserver};
pub use pool::PrewarmingPool;
pub use timer::InactivityTimer;
pub use traits::{Environment, Manager, PutOutcome, Runner};
