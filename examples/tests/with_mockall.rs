//! Testing code that embeds runner-core with the `MockExecutorApi` mockall mock.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use runner_core::execution::EVENT_BUFFER;
use runner_core::{
    EnvironmentId, EnvironmentSpec, ExecutionEvent, ExecutionHandle, Manager, ManagerConfig,
    ManagerError, MockExecutorApi, RunnerInfo, RunnerManager,
};
use tokio::sync::mpsc;

fn spec() -> EnvironmentSpec {
    EnvironmentSpec {
        id: EnvironmentId::new(3).unwrap(),
        image: "img".into(),
        prewarming_pool_size: 1,
        cpu_limit: 0,
        memory_limit: 0,
        network_access: false,
        exposed_ports: vec![],
    }
}

fn mock_with_one_runner() -> MockExecutorApi {
    let mut mock = MockExecutorApi::new();
    mock.expect_load_environments().returning(|| Ok(vec![]));
    mock.expect_events()
        .returning(|| futures::stream::pending().boxed());
    mock.expect_register_environment().returning(|_| Ok(()));
    mock.expect_create_runner().times(1..).returning(|s| {
        Ok(runner_core::Creation::Ready(RunnerInfo {
            id: runner_core::RunnerId::generate(s.id),
            environment: s.id,
            mapped_ports: vec![],
        }))
    });
    mock.expect_mark_runner().returning(|_, _| Ok(()));
    mock.expect_destroy_runner().returning(|_, _| Ok(()));
    mock
}

#[tokio::test]
async fn run_once_returns_stdout_and_exit_code() {
    let mut mock = mock_with_one_runner();
    mock.expect_execute()
        .withf(|_, request, _| request.command == "echo hi")
        .times(1)
        .returning(|_, _, _| {
            let (events_tx, events) = mpsc::channel(EVENT_BUFFER);
            let (stdin, _) = mpsc::channel(1);
            events_tx
                .try_send(ExecutionEvent::Stdout("hi\r\n".into()))
                .unwrap();
            events_tx.try_send(ExecutionEvent::Exit(0)).unwrap();
            Ok(ExecutionHandle { stdin, events })
        });
    let manager = RunnerManager::new(Arc::new(mock), ManagerConfig::default());
    manager.recover().await.unwrap();
    manager.put_environment(spec()).await.unwrap();
    for _ in 0..100 {
        if manager
            .environment(spec().id)
            .unwrap()
            .statistics()
            .idle_runners
            == 1
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (stdout, exit) = examples::run_once(manager.as_ref(), spec().id, "echo hi")
        .await
        .unwrap();
    assert_eq!(stdout, "hi\r\n");
    assert_eq!(exit, Some(0));
}

#[tokio::test]
async fn run_once_reports_an_empty_pool() {
    let mut mock = MockExecutorApi::new();
    mock.expect_load_environments().returning(|| Ok(vec![]));
    mock.expect_events()
        .returning(|| futures::stream::pending().boxed());
    mock.expect_register_environment().returning(|_| Ok(()));
    mock.expect_create_runner()
        .returning(|_| Err(runner_core::BackendError::Overloaded("full".into())));
    mock.expect_execute().never();
    let manager = RunnerManager::new(Arc::new(mock), ManagerConfig::default());
    manager.recover().await.unwrap();
    manager.put_environment(spec()).await.unwrap();
    let err = examples::run_once(manager.as_ref(), spec().id, "true")
        .await
        .unwrap_err();
    assert!(matches!(err, ManagerError::NoIdleRunner(_)));
}

#[tokio::test]
async fn the_custom_echo_backend_runs_under_the_manager() {
    let manager = RunnerManager::new(
        Arc::new(examples::echo_backend::EchoBackend::default()),
        ManagerConfig::default(),
    );
    manager.recover().await.unwrap();
    manager.put_environment(spec()).await.unwrap();
    for _ in 0..100 {
        if manager
            .environment(spec().id)
            .unwrap()
            .statistics()
            .idle_runners
            == 1
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (stdout, exit) = examples::run_once(manager.as_ref(), spec().id, "ls -l")
        .await
        .unwrap();
    assert_eq!(stdout, "ls -l\r\n");
    assert_eq!(exit, Some(0));
}
