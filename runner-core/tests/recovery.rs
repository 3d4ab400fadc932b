//! Recovery after a restart of the manager: used runners keep their files and remaining timeout,
//! idle ones refill the pool, uncertain and duplicate ones are destroyed, nothing is handed out
//! twice.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use futures::StreamExt;
use runner_core::fake::FakeExecutor;
use runner_core::{
    BackendEvent, DestroyReason, FileCopy, FileUpdate, Manager, ManagerError, MockExecutorApi,
    RecordedState, RunnerInfo, RunnerManager, RunnerRecord, UsedState,
};

#[tokio::test(start_paused = true)]
async fn restart_reattaches_used_runners_with_files_and_refills_idle_ones() {
    let fake = FakeExecutor::new();
    let before = started(&fake, config()).await;
    before.put_environment(spec(1, 3)).await.unwrap();
    eventually("pool filled", || idle(&before, 1) == 3).await;
    let runner = before
        .claim(env_id(1), Duration::from_secs(600))
        .await
        .unwrap();
    runner
        .update_files(FileUpdate {
            delete: vec![],
            copy: vec![FileCopy {
                path: "main.py".into(),
                content: "print(1)".into(),
            }],
        })
        .await
        .unwrap();
    eventually("refilled and marked", || {
        idle(&before, 1) == 3
            && matches!(
                fake.runner(runner.id()).map(|r| r.recorded),
                Some(RecordedState::Used(_))
            )
    })
    .await;
    before.shutdown().await;
    drop(before);

    let after = started(&fake, config()).await;
    let again = after.runner(runner.id()).expect("used runner reattached");
    assert_eq!(used(&after, 1), 1);
    assert_eq!(idle(&after, 1), 3);
    assert_eq!(fake.runners().len(), 4, "nothing leaked, nothing recreated");
    let files = again
        .list_files(runner_core::ListFilesRequest {
            path: ".".into(),
            recursive: true,
            privileged: false,
        })
        .await
        .unwrap();
    assert_eq!(files.len(), 1, "files survive");
    let remaining = after_runner_remaining(&after, runner.id());
    assert!(remaining > Duration::from_secs(590) && remaining <= Duration::from_secs(600));
}

fn after_runner_remaining(manager: &RunnerManager, id: &runner_core::RunnerId) -> Duration {
    let env = manager.environment(env_id(1)).unwrap();
    assert!(env.statistics().used_runners >= 1);
    manager
        .used_runner(id)
        .and_then(|r| r.remaining())
        .expect("runner with a timeout")
}

#[tokio::test(start_paused = true)]
async fn restored_runners_keep_their_remaining_timeout() {
    let fake = FakeExecutor::new();
    let before = started(&fake, config()).await;
    before.put_environment(spec(1, 1)).await.unwrap();
    eventually("pool filled", || idle(&before, 1) == 1).await;
    let runner = before
        .claim(env_id(1), Duration::from_secs(60))
        .await
        .unwrap();
    let id = runner.id().clone();
    before.shutdown().await;
    drop((before, runner));
    // The server was down for 55 of the 60 seconds.
    fake.set_recorded(
        &id,
        RecordedState::Used(UsedState {
            inactivity_timeout: Duration::from_secs(60),
            deadline: Some(SystemTime::now() + Duration::from_secs(5)),
        }),
    );
    let after = started(&fake, config()).await;
    assert!(after.runner(&id).is_ok());
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(after.runner(&id).is_ok());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        after.runner(&id).is_err(),
        "expired after the remaining 5 s"
    );
    eventually("destroyed", || fake.runner(&id).is_none()).await;
}

#[tokio::test(start_paused = true)]
async fn runners_that_expired_while_down_are_destroyed() {
    let fake = FakeExecutor::new();
    let before = started(&fake, config()).await;
    before.put_environment(spec(1, 1)).await.unwrap();
    eventually("pool filled", || idle(&before, 1) == 1).await;
    let id = before
        .claim(env_id(1), Duration::from_secs(5))
        .await
        .unwrap()
        .id()
        .clone();
    before.shutdown().await;
    drop(before);
    fake.set_recorded(
        &id,
        RecordedState::Used(UsedState {
            inactivity_timeout: Duration::from_secs(5),
            deadline: Some(SystemTime::now() - Duration::from_secs(1)),
        }),
    );
    let after = started(&fake, config()).await;
    assert!(after.runner(&id).is_err());
    eventually("destroyed", || fake.runner(&id).is_none()).await;
    assert!(
        fake.destroyed()
            .contains(&(id, DestroyReason::InactivityTimeout))
    );
}

#[tokio::test(start_paused = true)]
async fn uncertain_runners_are_never_pooled() {
    let fake = FakeExecutor::new();
    let before = started(&fake, config()).await;
    before.put_environment(spec(1, 2)).await.unwrap();
    eventually("pool filled", || idle(&before, 1) == 2).await;
    before.shutdown().await;
    drop(before);
    let uncertain: HashSet<_> = fake.runners().into_iter().map(|r| r.info.id).collect();
    for id in &uncertain {
        fake.set_recorded(id, RecordedState::Uncertain);
    }
    let after = started(&fake, config()).await;
    eventually("pool refilled with fresh runners", || idle(&after, 1) == 2).await;
    let now: HashSet<_> = fake.runners().into_iter().map(|r| r.info.id).collect();
    assert!(
        now.is_disjoint(&uncertain),
        "uncertain runners were destroyed"
    );
    for id in &uncertain {
        assert!(matches!(
            after.runner(id),
            Err(ManagerError::UnknownRunner(_))
        ));
    }
}

#[tokio::test(start_paused = true)]
async fn surplus_idle_runners_are_destroyed_on_recovery() {
    let fake = FakeExecutor::new();
    let before = started(&fake, config()).await;
    before.put_environment(spec(1, 4)).await.unwrap();
    eventually("pool filled", || idle(&before, 1) == 4).await;
    before.shutdown().await;
    drop(before);
    // The environment shrank while the manager was down.
    let backend: &dyn runner_core::ExecutorApi = &fake;
    backend.register_environment(&spec(1, 2)).await.unwrap();
    let after = started(&fake, config()).await;
    assert_eq!(idle(&after, 1), 2);
    eventually("surplus destroyed", || fake.runners().len() == 2).await;
}

#[tokio::test(start_paused = true)]
async fn duplicate_records_are_destroyed_not_handed_out() {
    let duplicate = RunnerInfo {
        id: "1-dup".into(),
        environment: env_id(1),
        mapped_ports: vec![],
    };
    let single = RunnerInfo {
        id: "1-single".into(),
        environment: env_id(1),
        mapped_ports: vec![],
    };
    let mut mock = MockExecutorApi::new();
    mock.expect_load_environments()
        .returning(|| Ok(vec![spec(1, 2)]));
    let records = vec![
        RunnerRecord {
            info: duplicate.clone(),
            state: RecordedState::Idle,
        },
        RunnerRecord {
            info: duplicate.clone(),
            state: RecordedState::Idle,
        },
        RunnerRecord {
            info: single.clone(),
            state: RecordedState::Idle,
        },
    ];
    mock.expect_load_runners()
        .returning(move |_| Ok(records.clone()));
    mock.expect_events()
        .returning(|| futures::stream::pending().boxed());
    let (destroyed_tx, mut destroyed_rx) = tokio::sync::mpsc::unbounded_channel();
    mock.expect_destroy_runner().returning(move |id, reason| {
        let _ = destroyed_tx.send((id.clone(), reason.clone()));
        Ok(())
    });
    mock.expect_create_runner()
        .returning(|_| Err(runner_core::BackendError::Overloaded("test".into())));
    mock.expect_mark_runner().returning(|_, _| Ok(()));
    let manager = RunnerManager::new(Arc::new(mock), config());
    manager.recover().await.unwrap();
    assert_eq!(
        destroyed_rx.recv().await,
        Some((duplicate.id.clone(), DestroyReason::Replaced))
    );
    let claimed = manager.claim(env_id(1), Duration::ZERO).await.unwrap();
    assert_eq!(claimed.id(), &single.id);
    assert!(manager.claim(env_id(1), Duration::ZERO).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn resynchronisation_drops_runners_the_backend_lost() {
    let fake = FakeExecutor::new();
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 2)).await.unwrap();
    eventually("pool filled", || idle(&manager, 1) == 2).await;
    let held = manager.claim(env_id(1), Duration::ZERO).await.unwrap();
    eventually("refilled", || idle(&manager, 1) == 2).await;
    let idle_id = fake
        .runners()
        .into_iter()
        .map(|r| r.info.id)
        .find(|id| id != held.id())
        .unwrap();
    fake.lose_runner(held.id());
    fake.lose_runner(&idle_id);
    fake.emit(BackendEvent::Resynchronize);
    eventually("lost used runner dropped", || {
        manager.runner(held.id()).is_err()
    })
    .await;
    eventually("pool refilled", || {
        idle(&manager, 1) == 2 && fake.runners().len() == 2
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_stopped_idle_runner_leaves_the_pool_and_is_replaced() {
    let fake = FakeExecutor::new();
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 2)).await.unwrap();
    eventually("pool filled", || idle(&manager, 1) == 2).await;
    let victim = fake.runners()[0].info.id.clone();
    fake.lose_runner(&victim);
    fake.emit(BackendEvent::RunnerStopped {
        runner: victim.clone(),
        reason: DestroyReason::Stopped("allocation failed".into()),
    });
    eventually("replaced", || {
        idle(&manager, 1) == 2 && fake.runner(&victim).is_none() && fake.runners().len() == 2
    })
    .await;
    let mut claimed = HashSet::new();
    for _ in 0..2 {
        let runner = manager.claim(env_id(1), Duration::ZERO).await.unwrap();
        claimed.insert(runner.id().clone());
    }
    assert!(!claimed.contains(&victim));
}

#[tokio::test(start_paused = true)]
async fn a_slow_reload_neither_revives_destroyed_runners_nor_drops_new_ones() {
    let fake = FakeExecutor::new();
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 3)).await.unwrap();
    eventually("pool filled", || idle(&manager, 1) == 3).await;
    fake.set_load_delay(Duration::from_secs(5));
    fake.emit(BackendEvent::Resynchronize);
    tokio::time::sleep(Duration::from_millis(100)).await; // the reload has taken its snapshot
    // While the backend answers slowly: one runner is claimed and returned (refills are slow
    // now, so the pool has room for it), and another is claimed and kept.
    fake.set_create_delay(Duration::from_secs(3_600));
    let gone = manager
        .claim(env_id(1), Duration::ZERO)
        .await
        .unwrap()
        .id()
        .clone();
    manager.return_runner(&gone).await.unwrap();
    let kept = manager.claim(env_id(1), Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await; // the reload finishes
    assert!(fake.runner(&gone).is_none());
    assert!(
        manager.runner(kept.id()).is_ok(),
        "a runner claimed meanwhile stays claimed"
    );
    assert_eq!(idle(&manager, 1), 1, "only the untouched runner is idle");
    let last = manager
        .claim(env_id(1), Duration::ZERO)
        .await
        .unwrap()
        .id()
        .clone();
    assert_ne!(last, gone, "the destroyed runner was not pooled again");
    assert!(
        fake.runner(&last).is_some(),
        "the pooled runner exists on the backend"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_a_claims_used_mark() {
    let fake = FakeExecutor::new();
    let manager = started(&fake, config()).await;
    manager.put_environment(spec(1, 1)).await.unwrap();
    eventually("pool filled", || idle(&manager, 1) == 1).await;
    fake.set_mark_delay(Duration::from_secs(2));
    let runner = manager
        .claim(env_id(1), Duration::from_secs(60))
        .await
        .unwrap();
    manager.shutdown().await;
    assert!(
        matches!(
            fake.runner(runner.id()).map(|r| r.recorded),
            Some(RecordedState::Used(_))
        ),
        "the used-mark was recorded before shutdown returned"
    );
}
