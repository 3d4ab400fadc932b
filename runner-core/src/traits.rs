//! The domain's seams as traits, so the HTTP layer and embedders depend on behaviour, not on
//! [`crate::RunnerManager`]: [`Manager`] hands out [`Runner`]s of [`Environment`]s.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::environment::{EnvironmentSpec, EnvironmentStatistics};
use crate::error::ManagerError;
use crate::execution::{Execution, ExecutionRequest, TakenExecution};
use crate::executor::MappedPort;
use crate::files::{FileContent, FileHeader, FileUpdate, ListFilesRequest};
use crate::ids::{EnvironmentId, ExecutionId, RunnerId};

/// A claimed runner. Every operation restarts its inactivity timer.
#[async_trait]
pub trait Runner: Send + Sync + fmt::Debug {
    /// The runner's id.
    fn id(&self) -> &RunnerId;

    /// The environment it was created from.
    fn environment(&self) -> EnvironmentId;

    /// Where its exposed ports are reachable.
    fn mapped_ports(&self) -> Vec<MappedPort>;

    /// Stores `request` under a fresh single-use id that expires if never started.
    fn store_execution(&self, request: ExecutionRequest) -> Result<ExecutionId, ManagerError>;

    /// Takes the stored request `id` without starting it; the id cannot be used again. Fails
    /// with [`ManagerError::UnknownExecution`] for an unknown, used or expired id and with
    /// [`ManagerError::UnknownRunner`] once the runner is destroyed.
    fn take_execution(&self, id: ExecutionId) -> Result<TakenExecution, ManagerError>;

    /// Starts a request taken with [`Runner::take_execution`]. Fails when the runner is gone or
    /// the backend cannot start the process.
    async fn start(&self, taken: TakenExecution) -> Result<Execution, ManagerError>;

    /// Takes the stored request `id` and starts it. The id cannot be used again.
    async fn start_execution(&self, id: ExecutionId) -> Result<Execution, ManagerError> {
        let taken = self.take_execution(id)?;
        self.start(taken).await
    }

    /// Deletes and copies files.
    async fn update_files(&self, update: FileUpdate) -> Result<(), ManagerError>;

    /// Lists files.
    async fn list_files(&self, request: ListFilesRequest) -> Result<Vec<FileHeader>, ManagerError>;

    /// Reads a file.
    async fn read_file(&self, path: &str, privileged: bool) -> Result<FileContent, ManagerError>;
}

/// An execution environment with its prewarming pool.
pub trait Environment: Send + Sync + fmt::Debug {
    /// Its current specification.
    fn spec(&self) -> EnvironmentSpec;

    /// Idle and used runner counts.
    fn statistics(&self) -> EnvironmentStatistics;

    /// Why no runner of this environment can be created until its specification changes, when
    /// the backend said so (its pool has stopped refilling).
    fn creation_failure(&self) -> Option<String> {
        None
    }

    /// Whether idle/pool is below `threshold` (a pool of size 0 never is).
    fn is_depleting(&self, threshold: f64) -> bool {
        let stats = self.statistics();
        stats.prewarming_pool_size > 0
            && f64::from(stats.idle_runners) / f64::from(stats.prewarming_pool_size) < threshold
    }
}

/// Whether a `PUT` created a new environment or replaced an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The environment did not exist (HTTP 201).
    Created,
    /// An existing environment was updated (HTTP 204).
    Replaced,
}

/// The runner manager: environments, their pools, and the runners clients hold.
#[async_trait]
pub trait Manager: Send + Sync + fmt::Debug {
    /// Creates or updates an environment. A change of the pool size only resizes the pool; any
    /// other change replaces the idle runners and lets used ones run on.
    async fn put_environment(&self, spec: EnvironmentSpec) -> Result<PutOutcome, ManagerError>;

    /// Deletes an environment and destroys all its runners.
    async fn delete_environment(&self, id: EnvironmentId) -> Result<(), ManagerError>;

    /// One environment.
    fn environment(&self, id: EnvironmentId) -> Option<Arc<dyn Environment>>;

    /// All environments, ordered by id.
    fn environments(&self) -> Vec<Arc<dyn Environment>>;

    /// Claims an idle runner, or fails with [`ManagerError::NoIdleRunner`]: at once when the
    /// pool is empty with no runner on its way, after a short bounded wait when runners are being
    /// created but none became ready. A zero `inactivity_timeout` means the runner never expires.
    async fn claim(
        &self,
        environment: EnvironmentId,
        inactivity_timeout: Duration,
    ) -> Result<Arc<dyn Runner>, ManagerError>;

    /// Whether the backend can be reached and serve requests; the reason when it cannot.
    async fn backend_health(&self) -> Result<(), crate::executor::BackendError> {
        Ok(())
    }

    /// A used runner; idle and unknown ids are [`ManagerError::UnknownRunner`].
    fn runner(&self, id: &RunnerId) -> Result<Arc<dyn Runner>, ManagerError>;

    /// Gives a used runner back; it is destroyed.
    async fn return_runner(&self, id: &RunnerId) -> Result<(), ManagerError>;

    /// Counts per environment.
    fn statistics(&self) -> BTreeMap<EnvironmentId, EnvironmentStatistics> {
        self.environments()
            .iter()
            .map(|e| {
                let s = e.statistics();
                (s.id, s)
            })
            .collect()
    }

    /// Environments whose idle/pool ratio is below the configured alert threshold.
    fn depleting_environments(&self) -> Vec<EnvironmentId>;

    /// Environments that cannot get runners until their specification changes, with the reason.
    fn failed_environments(&self) -> Vec<(EnvironmentId, String)> {
        self.environments()
            .iter()
            .filter_map(|e| e.creation_failure().map(|reason| (e.spec().id, reason)))
            .collect()
    }
}
