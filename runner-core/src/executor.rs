//! The seam every backend implements: [`ExecutorApi`].
//!
//! A backend owns sandboxes (local namespaces, Nomad allocations, …) and their durable state. It
//! knows nothing about pools, claims or timers; the manager drives it. Every method may be called
//! concurrently from many tasks.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::destroy::DestroyReason;
use crate::environment::EnvironmentSpec;
use crate::execution::{ExecutionEvent, ExecutionRequest};
use crate::files::{FileContent, FileError, FileHeader, FileUpdate, ListFilesRequest};
use crate::ids::{EnvironmentId, RunnerId};

/// A port inside a runner and the address where it is reachable from outside.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MappedPort {
    /// The port inside the runner.
    pub exposed_port: u16,
    /// `host:port` to connect to from outside.
    pub host_address: String,
}

/// A runner as the backend created it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerInfo {
    /// The backend-chosen id.
    pub id: RunnerId,
    /// The environment it belongs to.
    pub environment: EnvironmentId,
    /// Where its exposed ports are reachable.
    pub mapped_ports: Vec<MappedPort>,
}

/// What [`ExecutorApi::create_runner`] achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Creation {
    /// The runner can execute commands now.
    Ready(RunnerInfo),
    /// The backend accepted the creation; the runner is ready once the backend's event stream
    /// reports [`BackendEvent::RunnerReady`] for it (or is destroyed and replaced by the manager
    /// when that does not happen within its start-up timeout).
    Pending(RunnerInfo),
}

impl Creation {
    /// The runner, ready or not.
    pub fn info(&self) -> &RunnerInfo {
        match self {
            Self::Ready(info) | Self::Pending(info) => info,
        }
    }

    /// The runner, ready or not, by value.
    pub fn into_info(self) -> RunnerInfo {
        match self {
            Self::Ready(info) | Self::Pending(info) => info,
        }
    }
}

/// What a claimed runner's durable record says about its use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedState {
    /// The client's inactivity timeout; zero means never.
    pub inactivity_timeout: Duration,
    /// When the runner expires unless used again (wall clock), if known.
    pub deadline: Option<SystemTime>,
}

/// The state the manager asks a backend to record durably for a runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerState {
    /// In the prewarming pool.
    Idle,
    /// Claimed by a client.
    Used(UsedState),
}

/// A runner's state as read back after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordedState {
    /// Recorded idle, and the record is known to be current.
    Idle,
    /// Recorded as claimed.
    Used(UsedState),
    /// The record may be stale (e.g. a claim's used-mark may have been lost in a crash); such a
    /// runner is never put back into the idle pool.
    Uncertain,
}

/// A runner found by [`ExecutorApi::load_runners`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerRecord {
    /// The runner.
    pub info: RunnerInfo,
    /// What its durable record says.
    pub state: RecordedState,
}

/// Something that happened to runners without the manager asking for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendEvent {
    /// A runner the manager did not create came up (e.g. a rescheduled allocation).
    RunnerStarted {
        /// The runner.
        info: RunnerInfo,
        /// How long it took from creation to ready.
        startup: Duration,
    },
    /// A runner stopped on its own: it is gone from the backend.
    RunnerStopped {
        /// The runner.
        runner: RunnerId,
        /// Why (usually a local reason such as [`DestroyReason::OomKilled`]).
        reason: DestroyReason,
    },
    /// A runner whose creation returned [`Creation::Pending`] can now execute commands.
    RunnerReady {
        /// The runner.
        runner: RunnerId,
        /// How long it took from the creation request to ready.
        startup: Duration,
    },
    /// The backend lost track of events (e.g. its event stream broke); the manager should reload
    /// its runners from [`ExecutorApi::load_runners`].
    Resynchronize,
    /// An environment appeared on the backend without the manager creating it (e.g. an operator
    /// registered its template); the manager adopts it and fills its pool.
    EnvironmentAppeared(EnvironmentSpec),
    /// An environment vanished from the backend (e.g. an operator deleted its template); the
    /// manager forgets it and destroys its runners.
    EnvironmentVanished(EnvironmentId),
}

/// An execution started by a backend.
///
/// `events` yields output as the process produces it and then exactly one terminal event; it is
/// bounded, so a backend stops reading output while the consumer is slow.
#[derive(Debug)]
pub struct ExecutionHandle {
    /// The process's stdin. Closing it sends end-of-file.
    pub stdin: mpsc::Sender<Bytes>,
    /// Output, then `Exit`, `Timeout` or `Error`.
    pub events: mpsc::Receiver<ExecutionEvent>,
}

/// Why a backend call failed. A backend picks the variant that tells the manager what to do:
/// [`BackendError::RunnerNotFound`] ends retries of a destruction, [`BackendError::InvalidRequest`]
/// and [`BackendError::Unavailable`] will not heal by retrying the same call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The runner does not exist (any more).
    #[error("runner {0} not found")]
    RunnerNotFound(RunnerId),
    /// The environment does not exist on the backend.
    #[error("execution environment {0} not found")]
    EnvironmentNotFound(EnvironmentId),
    /// The request cannot be served as given (e.g. an image the backend does not allow).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The backend cannot be reached.
    #[error("backend unreachable: {0}")]
    Unreachable(String),
    /// The backend is out of capacity.
    #[error("backend overloaded: {0}")]
    Overloaded(String),
    /// The backend lacks something it needs for this request and will keep lacking it until an
    /// operator acts (e.g. a host tool is not installed); retrying does not help.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// Anything else.
    #[error("backend error: {0}")]
    Internal(String),
}

impl BackendError {
    /// Whether retrying the same call cannot succeed until the request changes (e.g. an
    /// environment asks for networking on a machine without it): a refill loop stops on it.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::InvalidRequest(_))
    }
}

/// A sandbox backend: everything the manager needs from the place runners actually live.
///
/// Contract for implementors:
/// - environment calls persist the specification so [`ExecutorApi::load_environments`] returns it
///   after a restart;
/// - [`ExecutorApi::create_runner`] either returns [`Creation::Ready`] once the runner can execute
///   commands, or returns [`Creation::Pending`] at once and later emits
///   [`BackendEvent::RunnerReady`] (a slow, event-driven backend such as Nomad). The manager
///   counts pending creations toward the pool, never hands a pending runner out, and destroys
///   one that is not ready within its start-up timeout;
/// - [`ExecutorApi::destroy_runner`] is idempotent: destroying an unknown runner succeeds;
/// - [`ExecutorApi::mark_runner`] records the state durably before returning;
/// - [`ExecutorApi::execute`] starts `bash -c <command>` with stdin/stdout on a terminal and
///   stderr apart; when `cancel` fires, the execution's whole process tree is killed and the
///   events stream ends. The manager enforces `time_limit` by cancelling;
/// - a runner's files survive a restart of the manager;
/// - **the crash rule**: [`ExecutorApi::load_runners`] may report a runner
///   [`RecordedState::Idle`] only when its record is known to be current, i.e. the previous
///   process ended cleanly (everything it marked was written) or the backend otherwise knows no
///   claim of it can have been lost. The manager claims without a backend round trip and writes
///   the used-mark afterwards, so after a crash a runner recorded idle may in fact have been
///   handed to a client: report such a runner [`RecordedState::Uncertain`] and the manager
///   destroys and replaces it instead of handing it out a second time. (The local backend keeps
///   a clean-shutdown marker; a remote backend may keep the same in its own durable store.)
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait ExecutorApi: Send + Sync + std::fmt::Debug + 'static {
    /// Creates or replaces the environment's template on the backend.
    async fn register_environment(&self, spec: &EnvironmentSpec) -> Result<(), BackendError>;

    /// Removes the environment's template (its runners are destroyed by the manager first).
    async fn delete_environment(&self, id: EnvironmentId) -> Result<(), BackendError>;

    /// Every environment the backend knows, for recovery.
    async fn load_environments(&self) -> Result<Vec<EnvironmentSpec>, BackendError>;

    /// Creates an idle runner of `spec`: ready now, or pending until the backend reports it ready.
    async fn create_runner(&self, spec: &EnvironmentSpec) -> Result<Creation, BackendError>;

    /// Destroys the runner and everything in it; succeeds when it is already gone.
    async fn destroy_runner(
        &self,
        runner: &RunnerId,
        reason: &DestroyReason,
    ) -> Result<(), BackendError>;

    /// Records the runner's state durably.
    async fn mark_runner(&self, runner: &RunnerId, state: &RunnerState)
    -> Result<(), BackendError>;

    /// Records that a used runner was active and now expires at `deadline` (wall clock). Called
    /// often, so it may be written lazily: losing the latest value in a crash only shortens the
    /// restored timeout. The default does nothing.
    async fn record_activity(
        &self,
        runner: &RunnerId,
        deadline: SystemTime,
    ) -> Result<(), BackendError> {
        let _ = (runner, deadline);
        Ok(())
    }

    /// Every runner of `environment` that still exists, with its recorded state.
    async fn load_runners(
        &self,
        environment: EnvironmentId,
    ) -> Result<Vec<RunnerRecord>, BackendError>;

    /// Starts `request` in the runner.
    async fn execute(
        &self,
        runner: &RunnerId,
        request: &ExecutionRequest,
        cancel: CancellationToken,
    ) -> Result<ExecutionHandle, BackendError>;

    /// Deletes, then copies files; a failed path does not stop the others.
    async fn update_files(&self, runner: &RunnerId, update: &FileUpdate) -> Result<(), FileError>;

    /// Lists a directory with the request's credentials.
    async fn list_files(
        &self,
        runner: &RunnerId,
        request: &ListFilesRequest,
    ) -> Result<Vec<FileHeader>, FileError>;

    /// Streams a file's content with the request's credentials.
    async fn read_file(
        &self,
        runner: &RunnerId,
        path: &str,
        privileged: bool,
    ) -> Result<FileContent, FileError>;

    /// Whether the backend can be reached and serve requests; the manager surfaces a failure on
    /// `/health`. The default is always healthy (a backend in this process).
    async fn health(&self) -> Result<(), BackendError> {
        Ok(())
    }

    /// Events about runners the manager did not cause. Called once, at start-up; a backend with
    /// nothing to report returns a stream that never yields.
    fn events(&self) -> BoxStream<'static, BackendEvent>;
}
