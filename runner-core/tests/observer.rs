//! The manager reports its facts to a [`ManagerObserver`]: start-ups (from creation calls and
//! from the backend's ready events), each destruction once with its reason, each execution's
//! outcome once, and failed creations.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{env_id, eventually, spec};
use runner_core::fake::{FakeExecutor, Readiness};
use runner_core::{
    BackendError, DestroyReason, EnvironmentId, ExecutionEvent, ExecutionOutcome, ExecutionRequest,
    Manager, ManagerObserver, RunnerId, RunnerManager,
};

#[derive(Debug, Default)]
struct Recorder {
    started: Mutex<Vec<(EnvironmentId, Duration)>>,
    failed: Mutex<Vec<String>>,
    destroyed: Mutex<Vec<&'static str>>,
    executions: Mutex<Vec<ExecutionOutcome>>,
}

impl ManagerObserver for Recorder {
    fn runner_started(&self, _: &RunnerId, environment: EnvironmentId, startup: Duration) {
        self.started.lock().unwrap().push((environment, startup));
    }

    fn runner_creation_failed(&self, _: EnvironmentId, error: &BackendError) {
        self.failed.lock().unwrap().push(error.to_string());
    }

    fn runner_destroyed(&self, reason: &DestroyReason) {
        self.destroyed.lock().unwrap().push(reason.label());
    }

    fn execution_finished(&self, _: EnvironmentId, outcome: ExecutionOutcome, _: Duration) {
        self.executions.lock().unwrap().push(outcome);
    }
}

async fn observed(fake: &FakeExecutor) -> (Arc<RunnerManager>, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let manager =
        RunnerManager::with_observer(Arc::new(fake.clone()), common::config(), recorder.clone());
    manager.recover().await.unwrap();
    (manager, recorder)
}

fn request(command: &str) -> ExecutionRequest {
    ExecutionRequest {
        command: command.into(),
        time_limit: 0,
        privileged_execution: false,
        environment: Default::default(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_pending_runner_reports_the_start_up_of_its_ready_event() {
    let fake = FakeExecutor::new();
    fake.set_readiness(Readiness::Never);
    let (manager, recorder) = observed(&fake).await;
    manager.put_environment(spec(1, 1)).await.unwrap();
    eventually("a pending runner", || !fake.runners().is_empty()).await;
    assert!(recorder.started.lock().unwrap().is_empty(), "not ready yet");
    let id = fake.runners()[0].info.id.clone();
    fake.report_ready(&id, Duration::from_secs(7));
    eventually("ready", || !recorder.started.lock().unwrap().is_empty()).await;
    assert_eq!(
        *recorder.started.lock().unwrap(),
        vec![(env_id(1), Duration::from_secs(7))]
    );
}

#[tokio::test(start_paused = true)]
async fn destructions_and_executions_are_reported_once_each() {
    let fake = FakeExecutor::new();
    let (manager, recorder) = observed(&fake).await;
    fake.fail_next_creates(1);
    manager.put_environment(spec(1, 2)).await.unwrap();
    eventually("two idle", || common::idle(&manager, 1) == 2).await;
    assert_eq!(recorder.failed.lock().unwrap().len(), 1);
    assert_eq!(recorder.started.lock().unwrap().len(), 2);

    let runner = manager.claim(env_id(1), Duration::ZERO).await.unwrap();
    for command in ["exit 0", "exit 2"] {
        let id = runner.store_execution(request(command)).unwrap();
        let taken = runner.take_execution(id).unwrap();
        let mut execution = runner.start(taken).await.unwrap();
        while let Some(event) = execution.events.recv().await {
            if matches!(event, ExecutionEvent::Exit(_)) {
                break;
            }
        }
    }
    // Killed for memory while idle: a local reason, reported without a backend call.
    eventually("refilled", || common::idle(&manager, 1) == 2).await;
    let idle = fake
        .runners()
        .into_iter()
        .map(|r| r.info.id)
        .find(|id| id != runner.id())
        .unwrap();
    fake.stop_runner(&idle, DestroyReason::OomKilled);
    eventually("oom reported", || {
        recorder.destroyed.lock().unwrap().len() == 1
    })
    .await;
    manager.return_runner(runner.id()).await.unwrap();
    eventually("refilled again", || common::idle(&manager, 1) == 2).await;
    manager.delete_environment(env_id(1)).await.unwrap();

    eventually("executions", || {
        recorder.executions.lock().unwrap().len() == 2
    })
    .await;
    assert_eq!(
        *recorder.executions.lock().unwrap(),
        vec![ExecutionOutcome::ExitZero, ExecutionOutcome::ExitNonZero]
    );
    let mut destroyed = recorder.destroyed.lock().unwrap().clone();
    destroyed.sort_unstable();
    assert_eq!(
        destroyed,
        vec![
            "api_request",
            "environment_deleted",
            "environment_deleted",
            "oom_killed"
        ]
    );
    // Two at creation, one after the claim, one after the OOM kill.
    assert_eq!(recorder.started.lock().unwrap().len(), 4);
}
