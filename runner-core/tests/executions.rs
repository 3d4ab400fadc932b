//! Executions, inactivity timeouts and destroy reasons, through the manager.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use runner_core::fake::FakeExecutor;
use runner_core::{
    BackendEvent, DestroyReason, ExecutionEvent, ExecutionFailure, ExecutionRequest, Manager,
    ManagerConfig, ManagerError, Runner, RunnerManager,
};

async fn claimed(
    config: ManagerConfig,
    timeout: Duration,
) -> (FakeExecutor, Arc<RunnerManager>, Arc<dyn Runner>) {
    let fake = FakeExecutor::new();
    let manager = started(&fake, config).await;
    manager.put_environment(spec(1, 1)).await.unwrap();
    eventually("pool filled", || idle(&manager, 1) == 1).await;
    let runner = manager.claim(env_id(1), timeout).await.unwrap();
    (fake, manager, runner)
}

async fn run(runner: &dyn Runner, request: ExecutionRequest) -> Vec<ExecutionEvent> {
    let id = runner.store_execution(request).unwrap();
    let mut execution = runner.start_execution(id).await.unwrap();
    let mut events = Vec::new();
    while let Some(event) = execution.events.recv().await {
        events.push(event);
    }
    events
}

fn last(events: &[ExecutionEvent]) -> &ExecutionEvent {
    events.last().expect("at least one event")
}

#[tokio::test(start_paused = true)]
async fn output_then_exactly_one_exit() {
    let (_fake, _m, runner) = claimed(config(), Duration::ZERO).await;
    let events = run(runner.as_ref(), ExecutionRequest::new("echo hi")).await;
    assert_eq!(
        events,
        vec![
            ExecutionEvent::Stdout(Bytes::from_static(b"hi\r\n")),
            ExecutionEvent::Exit(0)
        ]
    );
    let events = run(runner.as_ref(), ExecutionRequest::new("exit 42")).await;
    assert_eq!(events, vec![ExecutionEvent::Exit(42)]);
}

#[tokio::test(start_paused = true)]
async fn execution_ids_are_single_use_and_expire() {
    let config = ManagerConfig {
        execution_ttl: Duration::from_secs(10),
        ..config()
    };
    let (_fake, _m, runner) = claimed(config, Duration::ZERO).await;
    let id = runner
        .store_execution(ExecutionRequest::new("exit 0"))
        .unwrap();
    assert!(runner.start_execution(id).await.is_ok());
    assert!(matches!(
        runner.start_execution(id).await,
        Err(ManagerError::UnknownExecution)
    ));
    let id = runner
        .store_execution(ExecutionRequest::new("exit 0"))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(matches!(
        runner.start_execution(id).await,
        Err(ManagerError::UnknownExecution)
    ));
}

#[tokio::test(start_paused = true)]
async fn invalid_requests_are_refused_before_reaching_the_backend() {
    let (_fake, _m, runner) = claimed(config(), Duration::ZERO).await;
    let mut request = ExecutionRequest::new("env");
    request.environment.insert("BAD=NAME".into(), "x".into());
    assert!(matches!(
        runner.store_execution(request),
        Err(ManagerError::InvalidExecution(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn time_limit_ends_the_execution_with_timeout() {
    let (_fake, _m, runner) = claimed(config(), Duration::ZERO).await;
    let mut request = ExecutionRequest::new("sleep 100");
    request.time_limit = 1;
    let start = tokio::time::Instant::now();
    let events = run(runner.as_ref(), request).await;
    assert_eq!(events, vec![ExecutionEvent::Timeout]);
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn stdin_reaches_the_command() {
    let (_fake, _m, runner) = claimed(config(), Duration::ZERO).await;
    let id = runner
        .store_execution(ExecutionRequest::new("cat"))
        .unwrap();
    let mut execution = runner.start_execution(id).await.unwrap();
    execution
        .stdin
        .send(Bytes::from_static(b"hello\n"))
        .await
        .unwrap();
    assert_eq!(
        execution.events.recv().await,
        Some(ExecutionEvent::Stdout(Bytes::from_static(b"hello\n")))
    );
    drop(execution.stdin);
    assert_eq!(execution.events.recv().await, Some(ExecutionEvent::Exit(0)));
}

#[tokio::test(start_paused = true)]
async fn inactivity_timeout_ends_a_running_execution_with_timeout_and_destroys_the_runner() {
    let (fake, manager, runner) = claimed(config(), Duration::from_secs(2)).await;
    let start = tokio::time::Instant::now();
    let events = run(runner.as_ref(), ExecutionRequest::new("sleep infinity")).await;
    assert_eq!(last(&events), &ExecutionEvent::Timeout);
    assert!(start.elapsed() <= Duration::from_secs(3));
    assert!(matches!(
        manager.runner(runner.id()),
        Err(ManagerError::UnknownRunner(_))
    ));
    eventually("runner destroyed", || fake.runner(runner.id()).is_none()).await;
    assert!(
        fake.destroyed()
            .contains(&(runner.id().clone(), DestroyReason::InactivityTimeout))
    );
}

#[tokio::test(start_paused = true)]
async fn operations_restart_the_inactivity_timer() {
    let (fake, manager, runner) = claimed(config(), Duration::from_secs(5)).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        runner
            .list_files(runner_core::ListFilesRequest {
                path: "./".into(),
                recursive: true,
                privileged: false,
            })
            .await
            .unwrap();
    }
    assert!(
        manager.runner(runner.id()).is_ok(),
        "16 s of activity kept it"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(manager.runner(runner.id()).is_err(), "then it expired");
    eventually("destroyed on the backend", || {
        fake.runner(runner.id()).is_none()
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn zero_inactivity_timeout_never_expires() {
    let (_fake, manager, runner) = claimed(config(), Duration::ZERO).await;
    tokio::time::sleep(Duration::from_secs(100_000)).await;
    assert!(manager.runner(runner.id()).is_ok());
}

#[tokio::test(start_paused = true)]
async fn deleting_the_runner_ends_its_execution_as_stopped_as_expected() {
    let (_fake, manager, runner) = claimed(config(), Duration::ZERO).await;
    let id = runner
        .store_execution(ExecutionRequest::new("sleep infinity"))
        .unwrap();
    let mut execution = runner.start_execution(id).await.unwrap();
    manager.return_runner(runner.id()).await.unwrap();
    assert_eq!(
        execution.events.recv().await,
        Some(ExecutionEvent::Error(ExecutionFailure::StoppedAsExpected))
    );
    assert_eq!(execution.events.recv().await, None);
}

#[tokio::test(start_paused = true)]
async fn an_oom_kill_reported_by_the_backend_reaches_the_execution() {
    let (_fake, manager, runner) = claimed(config(), Duration::ZERO).await;
    let id = runner
        .store_execution(ExecutionRequest::new("sleep infinity"))
        .unwrap();
    let mut execution = runner.start_execution(id).await.unwrap();
    _fake.emit(BackendEvent::RunnerStopped {
        runner: runner.id().clone(),
        reason: DestroyReason::OomKilled,
    });
    assert_eq!(
        execution.events.recv().await,
        Some(ExecutionEvent::Error(ExecutionFailure::OomKilled))
    );
    assert!(manager.runner(runner.id()).is_err());
    assert_eq!(used(&manager, 1), 0);
}

#[tokio::test(start_paused = true)]
async fn a_backend_stream_ending_without_exit_is_an_error() {
    let (_fake, _m, runner) = claimed(config(), Duration::ZERO).await;
    let events = run(runner.as_ref(), ExecutionRequest::new("vanish")).await;
    assert_eq!(
        events,
        vec![ExecutionEvent::Error(ExecutionFailure::Failed)]
    );
}

#[tokio::test(start_paused = true)]
async fn the_output_cap_ends_the_execution_with_an_error_naming_it() {
    let config = ManagerConfig {
        output_limit: Some(1_000),
        ..config()
    };
    let (_fake, _m, runner) = claimed(config, Duration::ZERO).await;
    let events = run(runner.as_ref(), ExecutionRequest::new("yes")).await;
    let ExecutionEvent::Error(failure) = last(&events) else {
        panic!("expected an error, got {:?}", last(&events));
    };
    assert_eq!(failure, &ExecutionFailure::OutputLimitExceeded(1_000));
    assert!(failure.to_string().contains("1000"));
    let bytes: usize = events
        .iter()
        .map(|e| match e {
            ExecutionEvent::Stdout(b) => b.len(),
            _ => 0,
        })
        .sum();
    assert!(bytes <= 1_000);
}

#[tokio::test(start_paused = true)]
async fn a_slow_reader_applies_backpressure_instead_of_buffering() {
    let (_fake, _m, runner) = claimed(config(), Duration::ZERO).await;
    let id = runner
        .store_execution(ExecutionRequest::new("yes"))
        .unwrap();
    let mut execution = runner.start_execution(id).await.unwrap();
    // Nobody reads for a while: the producer must block on the bounded channels.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut buffered = 0;
    while let Ok(event) = execution.events.try_recv() {
        assert!(matches!(event, ExecutionEvent::Stdout(_)));
        buffered += 1;
    }
    let bound = runner_core::execution::EVENT_BUFFER;
    assert!(
        buffered <= bound,
        "{buffered} events buffered, bound {bound}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_clients_departure_cancels_the_execution() {
    let (fake, manager, runner) = claimed(config(), Duration::ZERO).await;
    let id = runner
        .store_execution(ExecutionRequest::new("yes"))
        .unwrap();
    let execution = runner.start_execution(id).await.unwrap();
    drop(execution);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        manager.runner(runner.id()).is_ok(),
        "a cancelled execution leaves the runner in place"
    );
    assert!(fake.runner(runner.id()).is_some());
}

#[tokio::test(start_paused = true)]
async fn several_executions_may_run_on_one_runner() {
    let (_fake, _m, runner) = claimed(config(), Duration::ZERO).await;
    let a = runner
        .store_execution(ExecutionRequest::new("cat"))
        .unwrap();
    let b = runner
        .store_execution(ExecutionRequest::new("echo b"))
        .unwrap();
    let mut first = runner.start_execution(a).await.unwrap();
    let events = {
        let mut second = runner.start_execution(b).await.unwrap();
        let mut events = Vec::new();
        while let Some(e) = second.events.recv().await {
            events.push(e);
        }
        events
    };
    assert_eq!(last(&events), &ExecutionEvent::Exit(0));
    drop(first.stdin);
    assert_eq!(first.events.recv().await, Some(ExecutionEvent::Exit(0)));
}

#[tokio::test(start_paused = true)]
async fn operations_on_a_destroyed_runner_fail_as_unknown() {
    let (_fake, manager, runner) = claimed(config(), Duration::ZERO).await;
    manager.return_runner(runner.id()).await.unwrap();
    assert!(matches!(
        runner.store_execution(ExecutionRequest::new("true")),
        Err(ManagerError::UnknownRunner(_))
    ));
    assert!(matches!(
        runner
            .update_files(runner_core::FileUpdate::default())
            .await,
        Err(ManagerError::UnknownRunner(_))
    ));
}
