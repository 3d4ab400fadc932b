//! [`UsedRunner`]: a runner a client holds.
//!
//! Every operation restarts the inactivity timer first. Once destroyed, every operation fails
//! with [`ManagerError::UnknownRunner`], operations in flight are abandoned, and running
//! executions end with the message of the destroy reason.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::execution::{ExecutionLimits, ExecutionReport, StopFailed, forward_execution};
use super::{ManagerConfig, RunnerManager};
use crate::destroy::DestroyReason;
use crate::error::ManagerError;
use crate::execution::{EVENT_BUFFER, Execution, ExecutionRequest, TakenExecution};
use crate::executor::{ExecutorApi, MappedPort, RunnerInfo};
use crate::files::{FileContent, FileHeader, FileUpdate, ListFilesRequest};
use crate::ids::{EnvironmentId, ExecutionId, RunnerId};
use crate::observe::{ExecutionOutcome, ManagerObserver};
use crate::timer::InactivityTimer;
use crate::traits::Runner;

/// The parts of [`ManagerConfig`] a runner needs.
#[derive(Debug, Clone)]
pub(super) struct RunnerSettings {
    execution_ttl: Duration,
    max_pending: usize,
    max_pending_bytes: usize,
    limits: ExecutionLimits,
    observer: Arc<dyn ManagerObserver>,
}

impl RunnerSettings {
    pub(super) fn new(config: &ManagerConfig, observer: Arc<dyn ManagerObserver>) -> Self {
        Self {
            execution_ttl: config.execution_ttl,
            max_pending: config.max_pending_executions,
            max_pending_bytes: config.max_pending_bytes,
            limits: ExecutionLimits {
                output_limit: config.output_limit,
                stop_grace: config.stop_grace,
            },
            observer,
        }
    }
}

/// A claimed runner.
#[derive(Debug)]
pub struct UsedRunner {
    info: RunnerInfo,
    backend: Arc<dyn ExecutorApi>,
    timer: Arc<InactivityTimer>,
    pending: Mutex<HashMap<ExecutionId, (ExecutionRequest, Instant)>>,
    destroyed: watch::Sender<Option<DestroyReason>>,
    /// Cancelled when the runner is destroyed; in-flight operations stop waiting.
    gone: CancellationToken,
    settings: RunnerSettings,
    last_recorded: Mutex<Option<Instant>>,
    manager: Weak<RunnerManager>,
}

impl UsedRunner {
    pub(super) fn new(
        info: RunnerInfo,
        inactivity_timeout: Duration,
        remaining: Option<Duration>,
        backend: Arc<dyn ExecutorApi>,
        settings: RunnerSettings,
        manager: Weak<RunnerManager>,
    ) -> Arc<Self> {
        Arc::new(Self {
            info,
            backend,
            timer: InactivityTimer::new(inactivity_timeout, remaining),
            pending: Mutex::new(HashMap::new()),
            destroyed: watch::channel(None).0,
            gone: CancellationToken::new(),
            settings,
            last_recorded: Mutex::new(None),
            manager,
        })
    }

    pub(super) fn start_timer(&self, on_expire: impl FnOnce() + Send + 'static) {
        self.timer.spawn(on_expire);
    }

    pub(super) fn stop_timer(&self) {
        self.timer.stop();
    }

    /// Time until the inactivity timeout fires, if it ever does.
    pub fn remaining(&self) -> Option<Duration> {
        self.timer.remaining()
    }

    /// The runner as the backend describes it.
    pub fn info(&self) -> &RunnerInfo {
        &self.info
    }

    /// Why the runner was destroyed, if it was.
    pub fn destroy_reason(&self) -> Option<DestroyReason> {
        self.destroyed.borrow().clone()
    }

    pub(super) fn mark_destroyed(&self, reason: DestroyReason) {
        self.timer.stop();
        self.lock_pending().clear();
        self.destroyed.send_replace(Some(reason));
        self.gone.cancel();
    }

    fn lock_pending(&self) -> MutexGuard<'_, HashMap<ExecutionId, (ExecutionRequest, Instant)>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fails if the runner is destroyed; otherwise restarts the inactivity timer and records
    /// the new deadline with the backend (at most once a second).
    fn touch(&self) -> Result<(), ManagerError> {
        if self.gone.is_cancelled() {
            return Err(ManagerError::UnknownRunner(self.info.id.clone()));
        }
        let Some(remaining) = self.timer.restart() else {
            return Ok(());
        };
        let now = Instant::now();
        {
            let mut last = self
                .last_recorded
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
                return Ok(());
            }
            *last = Some(now);
        }
        let backend = Arc::clone(&self.backend);
        let id = self.info.id.clone();
        let deadline = SystemTime::now() + remaining;
        tokio::spawn(async move {
            if let Err(err) = backend.record_activity(&id, deadline).await {
                debug!(runner_id = %id, error = %err, "recording runner activity failed");
            }
        });
        Ok(())
    }

    /// Runs `operation` unless the runner is destroyed first.
    async fn guarded<T>(
        &self,
        operation: impl Future<Output = Result<T, ManagerError>>,
    ) -> Result<T, ManagerError> {
        tokio::select! {
            () = self.gone.cancelled() => Err(ManagerError::UnknownRunner(self.info.id.clone())),
            result = operation => result,
        }
    }
}

#[async_trait]
impl Runner for UsedRunner {
    fn id(&self) -> &RunnerId {
        &self.info.id
    }

    fn environment(&self) -> EnvironmentId {
        self.info.environment
    }

    fn mapped_ports(&self) -> Vec<MappedPort> {
        self.info.mapped_ports.clone()
    }

    fn store_execution(&self, request: ExecutionRequest) -> Result<ExecutionId, ManagerError> {
        request.validate()?;
        self.touch()?;
        let now = Instant::now();
        let mut pending = self.lock_pending();
        pending.retain(|_, (_, expires)| *expires > now);
        if pending.len() >= self.settings.max_pending {
            return Err(ManagerError::TooManyPendingExecutions(self.info.id.clone()));
        }
        let stored: usize = pending.values().map(|(r, _)| r.stored_size()).sum();
        if stored.saturating_add(request.stored_size()) > self.settings.max_pending_bytes {
            return Err(ManagerError::PendingExecutionsTooLarge {
                runner: self.info.id.clone(),
                limit: self.settings.max_pending_bytes,
            });
        }
        let id = ExecutionId::generate();
        pending.insert(id, (request, now + self.settings.execution_ttl));
        Ok(id)
    }

    fn take_execution(&self, id: ExecutionId) -> Result<TakenExecution, ManagerError> {
        let request = {
            let mut pending = self.lock_pending();
            match pending.remove(&id) {
                Some((request, expires)) if expires > Instant::now() => request,
                _ => return Err(ManagerError::UnknownExecution),
            }
        };
        self.touch()?;
        Ok(TakenExecution { id, request })
    }

    async fn start(&self, taken: TakenExecution) -> Result<Execution, ManagerError> {
        let TakenExecution { id, request } = taken;
        request.validate()?;
        self.touch()?;
        let cancel = CancellationToken::new();
        // Reported once: a failed start here, else by the forwarder when the execution ends.
        let report = ExecutionReport {
            observer: Arc::clone(&self.settings.observer),
            environment: self.info.environment,
            started: Instant::now(),
        };
        let handle = match self
            .guarded(async {
                Ok(self
                    .backend
                    .execute(&self.info.id, &request, cancel.clone())
                    .await?)
            })
            .await
        {
            Ok(handle) => handle,
            Err(err) => {
                report.finish(ExecutionOutcome::Error);
                return Err(err);
            }
        };
        let (events_tx, events_rx) = tokio::sync::mpsc::channel(EVENT_BUFFER);
        info!(runner_id = %self.info.id, execution_id = %id, "execution started");
        tokio::spawn(forward_execution(
            handle.events,
            events_tx,
            cancel,
            request.time_limit(),
            self.destroyed.subscribe(),
            self.settings.limits.clone(),
            (self.stop_request(), report),
        ));
        Ok(Execution {
            stdin: handle.stdin,
            events: events_rx,
        })
    }

    async fn update_files(&self, update: FileUpdate) -> Result<(), ManagerError> {
        self.touch()?;
        self.guarded(async { Ok(self.backend.update_files(&self.info.id, &update).await?) })
            .await
    }

    async fn list_files(&self, request: ListFilesRequest) -> Result<Vec<FileHeader>, ManagerError> {
        self.touch()?;
        self.guarded(async { Ok(self.backend.list_files(&self.info.id, &request).await?) })
            .await
    }

    async fn read_file(&self, path: &str, privileged: bool) -> Result<FileContent, ManagerError> {
        self.touch()?;
        self.guarded(async {
            Ok(self
                .backend
                .read_file(&self.info.id, path, privileged)
                .await?)
        })
        .await
    }
}

impl UsedRunner {
    /// What the forwarder calls when a cancelled execution does not end: destroy this runner.
    fn stop_request(&self) -> StopFailed {
        let manager = self.manager.clone();
        let id = self.info.id.clone();
        Box::new(move || {
            Box::pin(async move {
                if let Some(manager) = manager.upgrade() {
                    tracing::warn!(runner_id = %id, "execution did not stop; destroying its runner");
                    let _ = manager
                        .destroy_used(&id, DestroyReason::CannotStopExecution)
                        .await;
                }
            })
        })
    }
}
