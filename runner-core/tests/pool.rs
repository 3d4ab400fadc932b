//! Prewarming pools: claims, refills, backoff, capacity and environment updates.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use runner_core::backoff::BackoffPolicy;
use runner_core::fake::FakeExecutor;
use runner_core::{DestroyReason, Manager, ManagerConfig, ManagerError, PutOutcome};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_never_return_the_same_runner_twice() {
    let fake = FakeExecutor::new();
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 300)).await.unwrap();
    eventually("pool filled", || idle(&manager, 1) == 300).await;

    let tasks: Vec<_> = (0..1_000)
        .map(|_| {
            let manager = Arc::clone(&manager);
            tokio::spawn(async move {
                manager
                    .claim(env_id(1), Duration::ZERO)
                    .await
                    .map(|r| r.id().clone())
            })
        })
        .collect();
    let mut claimed = HashSet::new();
    let mut overloaded = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(id) => assert!(claimed.insert(id.clone()), "runner {id} handed out twice"),
            Err(ManagerError::NoIdleRunner(_)) => overloaded += 1,
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    assert!(claimed.len() >= 300, "every pooled runner can be claimed");
    assert_eq!(claimed.len() + overloaded, 1_000);
    assert_eq!(used(&manager, 1) as usize, claimed.len());
}

#[tokio::test(start_paused = true)]
async fn claim_returns_overload_at_once_when_pool_is_empty() {
    let fake = FakeExecutor::new();
    fake.set_create_delay(Duration::from_secs(3_600));
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 2)).await.unwrap();
    let err = manager.claim(env_id(1), Duration::ZERO).await.unwrap_err();
    assert!(matches!(err, ManagerError::NoIdleRunner(_)));
    let err = manager.claim(env_id(9), Duration::ZERO).await.unwrap_err();
    assert!(matches!(err, ManagerError::UnknownEnvironment(_)));
}

#[tokio::test(start_paused = true)]
async fn refill_after_claims_converges_to_the_pool_size() {
    let fake = FakeExecutor::new();
    fake.set_create_delay(Duration::from_millis(50));
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 5)).await.unwrap();
    eventually("pool filled", || idle(&manager, 1) == 5).await;
    let mut held = Vec::new();
    for _ in 0..12 {
        if let Ok(r) = manager.claim(env_id(1), Duration::ZERO).await {
            held.push(r);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually("pool refilled", || idle(&manager, 1) == 5).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(idle(&manager, 1), 5, "refill never overshoots");
    assert_eq!(used(&manager, 1) as usize, held.len());
    assert_eq!(fake.runners().len(), 5 + held.len());
}

#[tokio::test(start_paused = true)]
async fn a_permanent_creation_failure_stops_the_refill_until_the_environment_changes() {
    let fake = FakeExecutor::new();
    fake.refuse_creates(Some("runner networking is not available"));
    let config = ManagerConfig {
        refill_concurrency: 1,
        ..config()
    };
    let manager = started(&fake, config).await;
    manager.put_environment(spec(1, 3)).await.unwrap();
    eventually("the failure is reported", || {
        !manager.failed_environments().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(
        fake.create_attempts(),
        1,
        "a permanent failure is not retried"
    );
    let failed = manager.failed_environments();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, env_id(1));
    assert!(
        failed[0].1.contains("runner networking is not available"),
        "{failed:?}"
    );
    let _ = manager.claim(env_id(1), Duration::ZERO).await.unwrap_err();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(fake.create_attempts(), 1, "a claim does not restart it");

    // A pool-size change keeps the failure: the specification still cannot be served.
    manager.put_environment(spec(1, 4)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(fake.create_attempts(), 1);

    fake.refuse_creates(None);
    let mut changed = spec(1, 3);
    changed.memory_limit = 256;
    manager.put_environment(changed).await.unwrap();
    assert!(manager.failed_environments().is_empty());
    eventually("the pool fills after the change", || idle(&manager, 1) == 3).await;
}

#[tokio::test(start_paused = true)]
async fn failing_backend_is_retried_with_capped_backoff_and_the_pool_converges() {
    let fake = FakeExecutor::new();
    fake.fail_next_creates(12);
    let config = ManagerConfig {
        refill_concurrency: 1,
        backoff: BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        },
        ..config()
    };
    let manager = started(&fake, config).await;
    let start = tokio::time::Instant::now();
    manager.put_environment(spec(1, 3)).await.unwrap();
    eventually("pool filled after the backend recovered", || {
        idle(&manager, 1) == 3
    })
    .await;
    let elapsed = start.elapsed();
    assert_eq!(fake.create_attempts(), 15, "12 failures then 3 successes");
    // Delays 0.1+0.2+0.4+0.8+1.6 then capped at 2 s for the other 7 failures: 17.1 s. Uncapped
    // doubling would need over 400 s.
    assert!(
        elapsed >= Duration::from_secs(17),
        "backed off: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(25),
        "delays are capped: {elapsed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn creations_run_with_bounded_concurrency() {
    let fake = FakeExecutor::new();
    fake.set_create_delay(Duration::from_millis(100));
    let config = ManagerConfig {
        refill_concurrency: 3,
        ..config()
    };
    let manager = started(&fake, config).await;
    manager.put_environment(spec(1, 20)).await.unwrap();
    eventually("pool filled", || idle(&manager, 1) == 20).await;
    assert!(
        fake.max_concurrent_creates() <= 3,
        "{}",
        fake.max_concurrent_creates()
    );
}

#[tokio::test(start_paused = true)]
async fn global_runner_cap_rejects_pools_and_bounds_refills() {
    let fake = FakeExecutor::new();
    let config = ManagerConfig {
        max_runners: 10,
        ..config()
    };
    let manager = started(&fake, config).await;
    manager.put_environment(spec(1, 8)).await.unwrap();
    let err = manager.put_environment(spec(2, 3)).await.unwrap_err();
    match err {
        ManagerError::InvalidSpec(v) => assert_eq!(v.field, "prewarmingPoolSize"),
        other => panic!("unexpected {other}"),
    }
    eventually("pool filled", || idle(&manager, 1) == 8).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(manager.claim(env_id(1), Duration::ZERO).await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(fake.runners().len(), 10, "refill stops at the cap");
}

#[tokio::test(start_paused = true)]
async fn pool_size_only_update_resizes_without_replacing() {
    let fake = FakeExecutor::new();
    let manager = started(&fake, config()).await;
    assert_eq!(
        manager.put_environment(spec(1, 4)).await.unwrap(),
        PutOutcome::Created
    );
    eventually("pool filled", || idle(&manager, 1) == 4).await;
    let before: HashSet<_> = fake.runners().into_iter().map(|r| r.info.id).collect();
    assert_eq!(
        manager.put_environment(spec(1, 6)).await.unwrap(),
        PutOutcome::Replaced
    );
    eventually("pool grown", || idle(&manager, 1) == 6).await;
    let after: HashSet<_> = fake.runners().into_iter().map(|r| r.info.id).collect();
    assert!(before.is_subset(&after), "no runner replaced on growth");
    manager.put_environment(spec(1, 2)).await.unwrap();
    eventually("pool shrunk", || fake.runners().len() == 2).await;
    assert_eq!(idle(&manager, 1), 2);
}

#[tokio::test(start_paused = true)]
async fn other_updates_replace_idle_runners_and_let_used_ones_run_on() {
    let fake = FakeExecutor::new();
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 3)).await.unwrap();
    eventually("pool filled", || idle(&manager, 1) == 3).await;
    let held = manager.claim(env_id(1), Duration::ZERO).await.unwrap();
    eventually("refilled", || idle(&manager, 1) == 3).await;
    let old_idle: HashSet<_> = fake
        .runners()
        .into_iter()
        .map(|r| r.info.id)
        .filter(|id| id != held.id())
        .collect();

    let mut changed = spec(1, 3);
    changed.memory_limit = 512;
    manager.put_environment(changed.clone()).await.unwrap();
    eventually("idle runners replaced", || {
        let now: HashSet<_> = fake.runners().into_iter().map(|r| r.info.id).collect();
        idle(&manager, 1) == 3 && now.is_disjoint(&old_idle)
    })
    .await;
    assert!(manager.runner(held.id()).is_ok(), "used runner runs on");
    assert!(fake.runner(held.id()).is_some());
    assert_eq!(manager.environment(env_id(1)).unwrap().spec(), changed);
    assert!(
        fake.destroyed()
            .iter()
            .all(|(_, reason)| *reason == DestroyReason::EnvironmentUpdated)
    );
}

#[tokio::test(start_paused = true)]
async fn deleting_an_environment_destroys_all_its_runners() {
    let fake = FakeExecutor::new();
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 3)).await.unwrap();
    manager.put_environment(spec(2, 1)).await.unwrap();
    eventually("pools filled", || {
        idle(&manager, 1) == 3 && idle(&manager, 2) == 1
    })
    .await;
    let held = manager.claim(env_id(1), Duration::ZERO).await.unwrap();
    manager.delete_environment(env_id(1)).await.unwrap();
    eventually("runners gone", || {
        fake.runners()
            .iter()
            .all(|r| r.info.environment == env_id(2))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fake.runners().len(), 1);
    assert!(matches!(
        manager.runner(held.id()),
        Err(ManagerError::UnknownRunner(_))
    ));
    assert!(manager.environment(env_id(1)).is_none());
    assert!(matches!(
        manager.delete_environment(env_id(1)).await,
        Err(ManagerError::UnknownEnvironment(_))
    ));
    assert!(fake.environments().iter().all(|e| e.id == env_id(2)));
}

#[tokio::test(start_paused = true)]
async fn a_transient_backend_failure_does_not_leave_a_deleted_environment_behind() {
    let fake = FakeExecutor::new();
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 1)).await.unwrap();
    fake.fail_next_environment_deletes(2);
    manager.delete_environment(env_id(1)).await.unwrap();
    assert!(manager.environment(env_id(1)).is_none());
    assert!(
        fake.environments().is_empty(),
        "the backend still holds the environment, so a restart would bring it back"
    );
}

#[tokio::test(start_paused = true)]
async fn returned_runners_are_destroyed_and_no_longer_addressable() {
    let fake = FakeExecutor::new();
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 1)).await.unwrap();
    eventually("pool filled", || idle(&manager, 1) == 1).await;
    let runner = manager.claim(env_id(1), Duration::ZERO).await.unwrap();
    let id = runner.id().clone();
    manager.return_runner(&id).await.unwrap();
    assert!(fake.runner(&id).is_none());
    assert!(
        fake.destroyed()
            .contains(&(id.clone(), DestroyReason::ApiRequest))
    );
    assert!(matches!(
        manager.return_runner(&id).await,
        Err(ManagerError::UnknownRunner(_))
    ));
    assert_eq!(used(&manager, 1), 0);
}

#[tokio::test(start_paused = true)]
async fn idle_runners_are_not_addressable() {
    let fake = FakeExecutor::new();
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 1)).await.unwrap();
    eventually("pool filled", || idle(&manager, 1) == 1).await;
    let idle_id = fake.runners()[0].info.id.clone();
    assert!(matches!(
        manager.runner(&idle_id),
        Err(ManagerError::UnknownRunner(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn a_claimed_runner_is_marked_used_on_the_backend() {
    let fake = FakeExecutor::new();
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 1)).await.unwrap();
    eventually("pool filled", || idle(&manager, 1) == 1).await;
    let runner = manager
        .claim(env_id(1), Duration::from_secs(60))
        .await
        .unwrap();
    eventually("used-mark recorded", || {
        matches!(
            fake.runner(runner.id()).map(|r| r.recorded),
            Some(runner_core::RecordedState::Used(u)) if u.inactivity_timeout == Duration::from_secs(60) && u.deadline.is_some()
        )
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn health_reports_depleting_pools_and_the_alert_reloads_them() {
    let fake = FakeExecutor::new();
    fake.set_create_delay(Duration::from_secs(3_600));
    let config = ManagerConfig {
        alert_threshold: 0.5,
        alert_reload_delay: Some(Duration::from_secs(5)),
        claim_wait: Duration::ZERO,
        ..config()
    };
    let manager = started(&fake, config).await;
    manager.put_environment(spec(1, 4)).await.unwrap();
    assert_eq!(manager.depleting_environments(), vec![env_id(1)]);
    tokio::time::sleep(Duration::from_millis(10)).await; // the slow creations are under way

    // Two runners exist on the backend that the manager has missed.
    fake.set_create_delay(Duration::ZERO);
    let backend: &dyn runner_core::ExecutorApi = &fake;
    for _ in 0..2 {
        backend.create_runner(&spec(1, 4)).await.unwrap();
    }
    // A failed claim on the depleted pool arms the alert; the reload happens after the delay.
    assert!(manager.claim(env_id(1), Duration::ZERO).await.is_err());
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(idle(&manager, 1), 0, "no reload before the delay");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(idle(&manager, 1), 2, "the reload found the missed runners");
    assert!(manager.depleting_environments().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_zero_threshold_never_reports_depletion() {
    let fake = FakeExecutor::new();
    fake.set_create_delay(Duration::from_secs(3_600));
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 4)).await.unwrap();
    assert!(manager.depleting_environments().is_empty());
}

#[tokio::test(start_paused = true)]
async fn pools_stopped_at_the_runner_cap_refill_when_runners_are_returned() {
    let fake = FakeExecutor::new();
    let config = ManagerConfig {
        max_runners: 10,
        ..config()
    };
    let manager = started(&fake, config).await;
    manager.put_environment(spec(1, 8)).await.unwrap();
    eventually("pool filled", || idle(&manager, 1) == 8).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(manager.claim(env_id(1), Duration::ZERO).await.unwrap());
    }
    eventually("refill stopped at the cap", || idle(&manager, 1) == 2).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(idle(&manager, 1), 2);
    for runner in held {
        manager.return_runner(runner.id()).await.unwrap();
    }
    eventually("pool refilled once capacity is free", || {
        idle(&manager, 1) == 8
    })
    .await;
}
