//! The backend seam for slow, event-driven backends: two-phase creation, bounded claim waits,
//! start-up timeouts, independent refills, environment events and backend health.

mod common;

use std::time::Duration;

use common::*;
use runner_core::fake::{FakeExecutor, Readiness};
use runner_core::{BackendEvent, DestroyReason, Manager, ManagerConfig, ManagerError};

fn statistics(manager: &runner_core::RunnerManager, id: u64) -> runner_core::EnvironmentStatistics {
    manager
        .environment(env_id(id))
        .expect("environment")
        .statistics()
}

#[tokio::test(start_paused = true)]
async fn a_claim_right_after_creating_an_environment_waits_for_its_first_runner() {
    let fake = FakeExecutor::new();
    fake.set_create_delay(Duration::from_millis(300));
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 2)).await.unwrap();
    let started_at = tokio::time::Instant::now();
    let runner = manager
        .claim(env_id(1), Duration::ZERO)
        .await
        .expect("the claim waits for the runner under way");
    assert!(started_at.elapsed() < Duration::from_secs(1));
    assert!(fake.runner(runner.id()).is_some());
}

#[tokio::test(start_paused = true)]
async fn the_claim_wait_is_bounded() {
    let fake = FakeExecutor::new();
    fake.set_readiness(Readiness::Never);
    let config = ManagerConfig {
        claim_wait: Duration::from_millis(1_500),
        ..config()
    };
    let manager = started(&fake, config).await;
    manager.put_environment(spec(1, 2)).await.unwrap();
    let started_at = tokio::time::Instant::now();
    let err = manager.claim(env_id(1), Duration::ZERO).await.unwrap_err();
    assert!(matches!(err, ManagerError::NoIdleRunner(_)), "{err}");
    let waited = started_at.elapsed();
    assert!(
        waited >= Duration::from_millis(1_500) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_empty_pool_with_nothing_under_way_fails_at_once() {
    let fake = FakeExecutor::new();
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 0)).await.unwrap();
    let started_at = tokio::time::Instant::now();
    let err = manager.claim(env_id(1), Duration::ZERO).await.unwrap_err();
    assert!(matches!(err, ManagerError::NoIdleRunner(_)), "{err}");
    assert_eq!(started_at.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn pending_creations_count_toward_the_pool_and_become_idle_when_ready() {
    let fake = FakeExecutor::new();
    fake.set_readiness(Readiness::Never);
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 3)).await.unwrap();
    eventually("three creations accepted", || fake.runners().len() == 3).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        fake.create_attempts(),
        3,
        "pending runners count toward the target"
    );
    let stats = statistics(&manager, 1);
    assert_eq!((stats.idle_runners, stats.pending_runners), (0, 3));
    // A pending runner is never handed out.
    let config_wait = manager.config().claim_wait;
    assert!(manager.claim(env_id(1), Duration::ZERO).await.is_err());
    assert!(config_wait > Duration::ZERO);
    for runner in fake.runners() {
        fake.report_ready(&runner.info.id, Duration::from_secs(1));
    }
    eventually("all ready", || idle(&manager, 1) == 3).await;
    assert_eq!(statistics(&manager, 1).pending_runners, 0);
    assert_eq!(fake.create_attempts(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_ready_event_wakes_a_waiting_claim() {
    let fake = FakeExecutor::new();
    fake.set_readiness(Readiness::After(Duration::from_millis(700)));
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 1)).await.unwrap();
    let runner = manager
        .claim(env_id(1), Duration::ZERO)
        .await
        .expect("ready in time");
    assert!(fake.runner(runner.id()).is_some());
}

#[tokio::test(start_paused = true)]
async fn a_runner_not_ready_within_the_startup_timeout_is_replaced() {
    let fake = FakeExecutor::new();
    fake.set_readiness(Readiness::Never);
    let config = ManagerConfig {
        startup_timeout: Duration::from_secs(10),
        ..config()
    };
    let manager = started(&fake, config).await;
    manager.put_environment(spec(1, 1)).await.unwrap();
    eventually("creation accepted", || fake.runners().len() == 1).await;
    let first = fake.runners()[0].info.id.clone();
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert!(fake.destroyed().is_empty(), "not before the timeout");
    eventually("destroyed after the timeout", || {
        fake.destroyed()
            .iter()
            .any(|(id, reason)| *id == first && *reason == DestroyReason::StartupTimeout)
    })
    .await;
    let stats = statistics(&manager, 1);
    assert!(stats.failing);
    assert!(
        stats
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("start-up timeout")),
        "{stats:?}"
    );
    eventually("replaced", || {
        fake.runners().iter().any(|r| r.info.id != first)
    })
    .await;
    // Once a replacement becomes ready, the environment is healthy again.
    fake.set_readiness(Readiness::AtOnce);
    for runner in fake.runners() {
        fake.report_ready(&runner.info.id, Duration::from_secs(1));
    }
    eventually("ready", || idle(&manager, 1) == 1).await;
    assert!(!statistics(&manager, 1).failing);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_environment_does_not_starve_another() {
    let fake = FakeExecutor::new();
    fake.stall_creations(env_id(1));
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 50)).await.unwrap();
    manager.put_environment(spec(2, 20)).await.unwrap();
    eventually("the healthy pool filled", || idle(&manager, 2) == 20).await;
    assert_eq!(idle(&manager, 1), 0);
}

#[tokio::test(start_paused = true)]
async fn failing_creations_are_reported_in_the_statistics() {
    let fake = FakeExecutor::new();
    fake.fail_next_creates(1_000);
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 1)).await.unwrap();
    eventually("failing", || statistics(&manager, 1).failing).await;
    let stats = statistics(&manager, 1);
    assert!(
        stats
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("injected creation failure")),
        "{stats:?}"
    );
    fake.fail_next_creates(0);
    eventually("recovered", || idle(&manager, 1) == 1).await;
    let stats = statistics(&manager, 1);
    assert!(!stats.failing && stats.last_error.is_none(), "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn an_early_ready_event_is_not_lost() {
    // The ready event overtakes the creation call's answer.
    let fake = FakeExecutor::new();
    fake.set_readiness(Readiness::After(Duration::ZERO));
    fake.set_create_delay(Duration::ZERO);
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 2)).await.unwrap();
    eventually("pool filled", || idle(&manager, 1) == 2).await;
}

#[tokio::test(start_paused = true)]
async fn a_stop_event_for_a_pending_runner_replaces_it() {
    let fake = FakeExecutor::new();
    fake.set_readiness(Readiness::Never);
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 1)).await.unwrap();
    eventually("creation accepted", || fake.runners().len() == 1).await;
    let first = fake.runners()[0].info.id.clone();
    fake.lose_runner(&first);
    fake.emit(BackendEvent::RunnerStopped {
        runner: first.clone(),
        reason: DestroyReason::Stopped("allocation failed".into()),
    });
    eventually("replaced", || {
        fake.create_attempts() == 2 && fake.runners().len() == 1
    })
    .await;
    assert!(statistics(&manager, 1).failing);
}

#[tokio::test(start_paused = true)]
async fn environments_appear_and_vanish_by_backend_events() {
    let fake = FakeExecutor::new();
    let manager = started(&fake, config()).await;
    fake.emit(BackendEvent::EnvironmentAppeared(spec(7, 2)));
    eventually("adopted and filled", || idle(&manager, 7) == 2).await;
    let held = manager.claim(env_id(7), Duration::ZERO).await.unwrap();
    fake.emit(BackendEvent::EnvironmentVanished(env_id(7)));
    eventually("forgotten", || manager.environment(env_id(7)).is_none()).await;
    eventually("every runner destroyed", || fake.runners().is_empty()).await;
    assert!(manager.runner(held.id()).is_err());
}

#[tokio::test(start_paused = true)]
async fn backend_health_is_reported() {
    let fake = FakeExecutor::new();
    let manager = started(&fake, config()).await;
    assert!(manager.backend_health().await.is_ok());
    fake.set_unhealthy(Some("connection refused"));
    let err = manager.backend_health().await.unwrap_err();
    assert!(err.to_string().contains("connection refused"), "{err}");
    fake.set_unhealthy(None);
    assert!(manager.backend_health().await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn deleting_an_environment_destroys_its_pending_runners() {
    let fake = FakeExecutor::new();
    fake.set_readiness(Readiness::Never);
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 3)).await.unwrap();
    eventually("creations accepted", || fake.runners().len() == 3).await;
    manager.delete_environment(env_id(1)).await.unwrap();
    eventually("pending runners destroyed", || fake.runners().is_empty()).await;
    // A late ready event for a destroyed runner changes nothing.
    for (id, _) in fake.destroyed() {
        fake.emit(BackendEvent::RunnerReady {
            runner: id,
            startup: Duration::from_secs(1),
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(manager.environment(env_id(1)).is_none());
}
