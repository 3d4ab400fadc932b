//! Where the manager's and the backend's facts become metrics: [`ServerObserver`] implements
//! runner-core's [`ManagerObserver`], [`InstrumentedExecutor`] wraps any [`ExecutorApi`] and
//! times every call by operation.
//!
//! Both record into the shared [`Metrics`]; the observer also writes Poseidon's InfluxDB point
//! for a runner start-up (`poseidon_nomad_idle_runners` with field `startup_duration`), the one
//! fact here Poseidon has a measurement for. Neither blocks: recording is an atomic update, and
//! an InfluxDB point is queued, never awaited.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use futures::stream::BoxStream;
use monitoring::{InfluxWriter, Point};
use runner_core::observe::backend_error_kind;
use runner_core::{
    BackendError, BackendEvent, Creation, DestroyReason, EnvironmentId, EnvironmentSpec,
    ExecutionHandle, ExecutionOutcome, ExecutionRequest, ExecutorApi, FileContent, FileError,
    FileHeader, FileUpdate, ListFilesRequest, ManagerObserver, RunnerId, RunnerRecord, RunnerState,
};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Records the manager's facts into [`Metrics`] (and start-ups into InfluxDB).
#[derive(Debug)]
pub struct ServerObserver {
    metrics: Arc<Metrics>,
    backend: &'static str,
    influx: Option<InfluxWriter>,
}

impl ServerObserver {
    /// An observer recording into `metrics`, labelling start-ups with `backend` (`local`,
    /// `nomad`, `fake`), writing start-up points to `influx` when set.
    pub fn new(metrics: Arc<Metrics>, backend: &'static str, influx: Option<InfluxWriter>) -> Self {
        Self {
            metrics,
            backend,
            influx,
        }
    }
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

impl ManagerObserver for ServerObserver {
    fn runner_started(&self, runner: &RunnerId, environment: EnvironmentId, startup: Duration) {
        self.metrics
            .runner_started(environment, self.backend, startup);
        if let Some(influx) = &self.influx {
            influx.write(
                Point::new("poseidon_nomad_idle_runners")
                    .tag("environment_id", environment.to_string())
                    .tag("runner_id", runner.as_str())
                    .field("startup_duration", nanos(startup)),
            );
        }
    }

    fn runner_creation_failed(&self, environment: EnvironmentId, error: &BackendError) {
        self.metrics
            .creation_failed(environment, backend_error_kind(error));
    }

    fn runner_destroyed(&self, reason: &DestroyReason) {
        self.metrics.runner_destroyed(reason.label());
    }

    fn execution_finished(
        &self,
        environment: EnvironmentId,
        outcome: ExecutionOutcome,
        duration: Duration,
    ) {
        self.metrics
            .execution_finished(environment, outcome.label(), duration);
    }
}

/// An [`ExecutorApi`] that forwards every call to `inner` and records its duration by
/// operation, and its failure by error kind, in [`Metrics`] (`backend_call_duration_seconds`,
/// `backend_call_errors_total`). Works over any backend; `events` is passed through untimed.
///
/// File operations count only backend failures ([`FileError::Backend`], and `partial` when
/// some paths of an update failed) as errors: a missing file or an invalid path is the client's.
#[derive(Debug)]
pub struct InstrumentedExecutor<E: ?Sized> {
    inner: Arc<E>,
    metrics: Arc<Metrics>,
    backend: &'static str,
}

impl<E: ?Sized> InstrumentedExecutor<E> {
    /// Wraps `inner`, labelling its calls with `backend` (`local`, `nomad`, `fake`).
    pub fn new(inner: Arc<E>, metrics: Arc<Metrics>, backend: &'static str) -> Self {
        Self {
            inner,
            metrics,
            backend,
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &Arc<E> {
        &self.inner
    }

    fn record<T>(
        &self,
        operation: &'static str,
        started: Instant,
        result: &Result<T, BackendError>,
    ) {
        let error = result.as_ref().err().map(backend_error_kind);
        self.metrics
            .backend_call(self.backend, operation, started.elapsed(), error);
    }

    fn record_files<T>(
        &self,
        operation: &'static str,
        started: Instant,
        result: &Result<T, FileError>,
    ) {
        let error = match result {
            Err(FileError::Backend(e)) => Some(backend_error_kind(e)),
            Err(FileError::Partial(_)) => Some("partial"),
            Ok(_) | Err(FileError::NotFound | FileError::InvalidPath(_)) => None,
        };
        self.metrics
            .backend_call(self.backend, operation, started.elapsed(), error);
    }
}

#[async_trait]
impl<E: ExecutorApi + ?Sized> ExecutorApi for InstrumentedExecutor<E> {
    async fn register_environment(&self, spec: &EnvironmentSpec) -> Result<(), BackendError> {
        let started = Instant::now();
        let result = self.inner.register_environment(spec).await;
        self.record("register_environment", started, &result);
        result
    }

    async fn delete_environment(&self, id: EnvironmentId) -> Result<(), BackendError> {
        let started = Instant::now();
        let result = self.inner.delete_environment(id).await;
        self.record("delete_environment", started, &result);
        result
    }

    async fn load_environments(&self) -> Result<Vec<EnvironmentSpec>, BackendError> {
        let started = Instant::now();
        let result = self.inner.load_environments().await;
        self.record("load_environments", started, &result);
        result
    }

    async fn create_runner(&self, spec: &EnvironmentSpec) -> Result<Creation, BackendError> {
        let started = Instant::now();
        let result = self.inner.create_runner(spec).await;
        self.record("create_runner", started, &result);
        result
    }

    async fn destroy_runner(
        &self,
        runner: &RunnerId,
        reason: &DestroyReason,
    ) -> Result<(), BackendError> {
        let started = Instant::now();
        let result = self.inner.destroy_runner(runner, reason).await;
        self.record("destroy_runner", started, &result);
        result
    }

    async fn mark_runner(
        &self,
        runner: &RunnerId,
        state: &RunnerState,
    ) -> Result<(), BackendError> {
        let started = Instant::now();
        let result = self.inner.mark_runner(runner, state).await;
        self.record("mark_runner", started, &result);
        result
    }

    async fn record_activity(
        &self,
        runner: &RunnerId,
        deadline: SystemTime,
    ) -> Result<(), BackendError> {
        let started = Instant::now();
        let result = self.inner.record_activity(runner, deadline).await;
        self.record("record_activity", started, &result);
        result
    }

    async fn load_runners(
        &self,
        environment: EnvironmentId,
    ) -> Result<Vec<RunnerRecord>, BackendError> {
        let started = Instant::now();
        let result = self.inner.load_runners(environment).await;
        self.record("load_runners", started, &result);
        result
    }

    async fn execute(
        &self,
        runner: &RunnerId,
        request: &ExecutionRequest,
        cancel: CancellationToken,
    ) -> Result<ExecutionHandle, BackendError> {
        let started = Instant::now();
        let result = self.inner.execute(runner, request, cancel).await;
        self.record("execute", started, &result);
        result
    }

    async fn update_files(&self, runner: &RunnerId, update: &FileUpdate) -> Result<(), FileError> {
        let started = Instant::now();
        let result = self.inner.update_files(runner, update).await;
        self.record_files("update_files", started, &result);
        result
    }

    async fn list_files(
        &self,
        runner: &RunnerId,
        request: &ListFilesRequest,
    ) -> Result<Vec<FileHeader>, FileError> {
        let started = Instant::now();
        let result = self.inner.list_files(runner, request).await;
        self.record_files("list_files", started, &result);
        result
    }

    async fn read_file(
        &self,
        runner: &RunnerId,
        path: &str,
        privileged: bool,
    ) -> Result<FileContent, FileError> {
        let started = Instant::now();
        let result = self.inner.read_file(runner, path, privileged).await;
        self.record_files("read_file", started, &result);
        result
    }

    async fn health(&self) -> Result<(), BackendError> {
        let started = Instant::now();
        let result = self.inner.health().await;
        self.record("health", started, &result);
        result
    }

    fn events(&self) -> BoxStream<'static, BackendEvent> {
        self.inner.events()
    }
}

/// Records the local backend's state store writes into [`Metrics`]
/// (`store_write_duration_seconds`).
#[derive(Debug)]
pub struct StoreObserver {
    metrics: Arc<Metrics>,
}

impl StoreObserver {
    /// An observer recording into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl storage::WriteObserver for StoreObserver {
    fn write_committed(&self, operation: &'static str, durable: bool, took: Duration) {
        self.metrics.store_write(operation, durable, took);
    }
}
