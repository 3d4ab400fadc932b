//! [`EchoBackend`]: a custom backend in a few dozen lines. Its "runners" are ids in memory and
//! every execution prints its command back. It shows the minimum an [`ExecutorApi`] must do.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use runner_core::execution::{EVENT_BUFFER, STDIN_BUFFER};
use runner_core::{
    BackendError, BackendEvent, Creation, DestroyReason, EnvironmentId, EnvironmentSpec,
    ExecutionEvent, ExecutionHandle, ExecutionRequest, ExecutorApi, FileContent, FileError,
    FileHeader, FileUpdate, ListFilesRequest, RecordedState, RunnerId, RunnerInfo, RunnerRecord,
    RunnerState,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A backend whose executions echo their command. Not durable: a restart forgets everything.
#[derive(Debug, Default)]
pub struct EchoBackend {
    environments: Mutex<BTreeMap<EnvironmentId, EnvironmentSpec>>,
    runners: Mutex<HashSet<RunnerId>>,
}

impl EchoBackend {
    fn has(&self, id: &RunnerId) -> Result<(), BackendError> {
        let known = self
            .runners
            .lock()
            .map_err(|_| BackendError::Internal("poisoned".into()))?
            .contains(id);
        known
            .then_some(())
            .ok_or_else(|| BackendError::RunnerNotFound(id.clone()))
    }
}

#[async_trait]
impl ExecutorApi for EchoBackend {
    async fn register_environment(&self, spec: &EnvironmentSpec) -> Result<(), BackendError> {
        if let Ok(mut envs) = self.environments.lock() {
            envs.insert(spec.id, spec.clone());
        }
        Ok(())
    }

    async fn delete_environment(&self, id: EnvironmentId) -> Result<(), BackendError> {
        if let Ok(mut envs) = self.environments.lock() {
            envs.remove(&id);
        }
        Ok(())
    }

    async fn load_environments(&self) -> Result<Vec<EnvironmentSpec>, BackendError> {
        Ok(self
            .environments
            .lock()
            .map(|e| e.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn create_runner(&self, spec: &EnvironmentSpec) -> Result<Creation, BackendError> {
        let id = RunnerId::generate(spec.id);
        if let Ok(mut runners) = self.runners.lock() {
            runners.insert(id.clone());
        }
        Ok(Creation::Ready(RunnerInfo {
            id,
            environment: spec.id,
            mapped_ports: vec![],
        }))
    }

    async fn destroy_runner(&self, id: &RunnerId, _: &DestroyReason) -> Result<(), BackendError> {
        if let Ok(mut runners) = self.runners.lock() {
            runners.remove(id);
        }
        Ok(())
    }

    async fn mark_runner(&self, id: &RunnerId, _: &RunnerState) -> Result<(), BackendError> {
        self.has(id)
    }

    async fn load_runners(&self, env: EnvironmentId) -> Result<Vec<RunnerRecord>, BackendError> {
        let runners = self.runners.lock().map(|r| r.clone()).unwrap_or_default();
        Ok(runners
            .into_iter()
            .filter(|id| id.environment() == Some(env))
            .map(|id| RunnerRecord {
                info: RunnerInfo {
                    id,
                    environment: env,
                    mapped_ports: vec![],
                },
                // Nothing is durable here, so after a restart nothing can be trusted.
                state: RecordedState::Uncertain,
            })
            .collect())
    }

    async fn execute(
        &self,
        id: &RunnerId,
        request: &ExecutionRequest,
        cancel: CancellationToken,
    ) -> Result<ExecutionHandle, BackendError> {
        self.has(id)?;
        let (stdin, _stdin_rx) = mpsc::channel(STDIN_BUFFER);
        let (tx, events) = mpsc::channel(EVENT_BUFFER);
        let echo = Bytes::from(format!("{}\r\n", request.command));
        tokio::spawn(async move {
            if cancel.is_cancelled() {
                return;
            }
            let _ = tx.send(ExecutionEvent::Stdout(echo)).await;
            let _ = tx.send(ExecutionEvent::Exit(0)).await;
        });
        Ok(ExecutionHandle { stdin, events })
    }

    async fn update_files(&self, id: &RunnerId, _: &FileUpdate) -> Result<(), FileError> {
        Ok(self.has(id)?)
    }

    async fn list_files(
        &self,
        id: &RunnerId,
        _: &ListFilesRequest,
    ) -> Result<Vec<FileHeader>, FileError> {
        self.has(id)?;
        Ok(vec![])
    }

    async fn read_file(&self, id: &RunnerId, _: &str, _: bool) -> Result<FileContent, FileError> {
        self.has(id)?;
        Err(FileError::NotFound)
    }

    fn events(&self) -> BoxStream<'static, BackendEvent> {
        futures::stream::pending().boxed()
    }
}
