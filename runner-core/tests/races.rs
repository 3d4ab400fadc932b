//! Property test: claims, returns, environment deletion, runners stopping on their own, resizes
//! and backend resynchronisations (a reload that applies a snapshot of the backend's records
//! while claims, returns and creations go on) run *concurrently* on a multi-threaded runtime,
//! over a backend that reports runners ready at once or later. Whatever the interleaving, every
//! runner ends up in exactly one of pending / idle / used / destroyed, none is handed to two
//! clients, and a deleted environment leaves nothing behind.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use runner_core::fake::{FakeExecutor, Readiness};
use runner_core::{
    BackendEvent, DestroyReason, Manager, ManagerConfig, ManagerError, RunnerId, RunnerManager,
};

#[derive(Debug, Clone)]
enum Op {
    /// Claim and hold the runner.
    Claim,
    /// Claim and give the runner back at once.
    ClaimAndReturn,
    /// A runner (any, by index into the backend's list) stops on its own.
    Stop(usize),
    /// The pool size changes.
    Resize(u32),
    /// The environment is deleted.
    Delete,
    /// The backend asks for a resynchronisation: the manager reloads every environment's runners.
    Resync,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => Just(Op::Claim),
        3 => Just(Op::ClaimAndReturn),
        2 => any::<usize>().prop_map(Op::Stop),
        1 => (0u32..5).prop_map(Op::Resize),
        1 => Just(Op::Delete),
        1 => Just(Op::Resync),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    pool: u32,
    ready_later: bool,
    ops: Vec<(Op, u16)>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        1u32..5,
        any::<bool>(),
        proptest::collection::vec((op(), 0u16..2_000), 1..24),
    )
        .prop_map(|(pool, ready_later, mut ops)| {
            // A resize after a deletion would create the environment anew.
            if ops.iter().any(|(op, _)| matches!(op, Op::Delete)) {
                ops.retain(|(op, _)| !matches!(op, Op::Resize(_)));
            }
            Case {
                pool,
                ready_later,
                ops,
            }
        })
}

/// What one concurrent operation observed.
#[derive(Debug, Default)]
struct Outcome {
    claimed: Vec<RunnerId>,
    held: Vec<RunnerId>,
    stopped: Vec<RunnerId>,
    deleted: bool,
}

async fn run_op(manager: Arc<RunnerManager>, fake: FakeExecutor, op: Op, delay_us: u16) -> Outcome {
    tokio::time::sleep(Duration::from_micros(u64::from(delay_us))).await;
    let mut outcome = Outcome::default();
    match op {
        Op::Claim | Op::ClaimAndReturn => match manager.claim(env_id(1), Duration::ZERO).await {
            Ok(runner) => {
                let id = runner.id().clone();
                outcome.claimed.push(id.clone());
                if matches!(op, Op::ClaimAndReturn) {
                    let _ = manager.return_runner(&id).await;
                } else {
                    outcome.held.push(id);
                }
            }
            Err(ManagerError::NoIdleRunner(_) | ManagerError::UnknownEnvironment(_)) => {}
            Err(other) => panic!("unexpected claim error: {other}"),
        },
        Op::Stop(i) => {
            let runners = fake.runners();
            if !runners.is_empty() {
                let victim = runners[i % runners.len()].info.id.clone();
                fake.lose_runner(&victim);
                fake.emit(BackendEvent::RunnerStopped {
                    runner: victim.clone(),
                    reason: DestroyReason::Stopped("lost".into()),
                });
                outcome.stopped.push(victim);
            }
        }
        Op::Resize(n) => {
            let _ = manager.put_environment(spec(1, n)).await;
        }
        Op::Delete => {
            outcome.deleted = manager.delete_environment(env_id(1)).await.is_ok();
        }
        Op::Resync => fake.emit(BackendEvent::Resynchronize),
    }
    outcome
}

/// A runtime with four workers, so operations really interleave.
fn multi_threaded() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Polls `cond` in real time for up to five seconds.
async fn settles(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

async fn scenario(case: Case) -> Result<(), TestCaseError> {
    let fake = FakeExecutor::new();
    if case.ready_later {
        fake.set_readiness(Readiness::After(Duration::from_millis(2)));
    }
    let config = ManagerConfig {
        claim_wait: Duration::from_millis(50),
        ..config()
    };
    let manager = started(&fake, config).await;
    manager.put_environment(spec(1, case.pool)).await.unwrap();
    let pool = case.pool;
    prop_assert!(settles(|| idle(&manager, 1) == pool).await, "pool filled");

    let tasks: Vec<_> = case
        .ops
        .iter()
        .cloned()
        .map(|(op, delay)| tokio::spawn(run_op(Arc::clone(&manager), fake.clone(), op, delay)))
        .collect();
    let mut claimed = HashSet::new();
    let mut held = Vec::new();
    let mut stopped = HashSet::new();
    let mut deleted = false;
    for task in tasks {
        let outcome = task.await.expect("operation task");
        for id in outcome.claimed {
            let destroyed: Vec<_> = fake
                .destroyed()
                .into_iter()
                .filter(|(d, _)| *d == id)
                .map(|(_, r)| r)
                .collect();
            prop_assert!(
                claimed.insert(id.clone()),
                "runner {} handed out twice (destroyed: {:?}, on the backend: {})",
                id,
                destroyed,
                fake.runner(&id).is_some()
            );
        }
        held.extend(outcome.held);
        stopped.extend(outcome.stopped);
        deleted |= outcome.deleted;
    }

    if deleted {
        prop_assert!(manager.environment(env_id(1)).is_none());
        prop_assert!(
            settles(|| fake.runners().is_empty() && manager.used_count() == 0).await,
            "a deleted environment left runners behind: backend {:?}, used {}",
            fake.runners()
                .iter()
                .map(|r| r.info.id.clone())
                .collect::<Vec<_>>(),
            manager.used_count()
        );
        for id in &held {
            prop_assert!(
                manager.runner(id).is_err(),
                "runner {} outlived its environment",
                id
            );
        }
    } else {
        // Every runner on the backend is exactly one of idle, pending or used, and the counts
        // agree, once refills and destructions have settled.
        let consistent = settles(|| {
            let Some(env) = manager.environment(env_id(1)) else {
                return false;
            };
            let stats = env.statistics();
            let target = stats.prewarming_pool_size;
            stats.idle_runners == target
                && stats.pending_runners == 0
                && stats.used_runners as usize == manager.used_count()
                && fake.runners().len() == (stats.idle_runners + stats.used_runners) as usize
        })
        .await;
        let stats = manager.environment(env_id(1)).map(|e| e.statistics());
        let missing: Vec<_> = held
            .iter()
            .filter(|id| fake.runner(id).is_none())
            .map(|id| {
                let reasons: Vec<_> = fake
                    .destroyed()
                    .into_iter()
                    .filter(|(d, _)| d == id)
                    .map(|(_, r)| r)
                    .collect();
                (
                    id.clone(),
                    stopped.contains(id),
                    manager.runner(id).is_ok(),
                    reasons,
                )
            })
            .collect();
        prop_assert!(
            consistent,
            "inconsistent: {:?}, backend has {}, used {}; held runners missing on the backend (id, stopped, still used, destroy reasons): {:?}",
            stats,
            fake.runners().len(),
            manager.used_count(),
            missing
        );
        for id in &held {
            if stopped.contains(id) {
                prop_assert!(
                    manager.runner(id).is_err(),
                    "stopped runner {} still used",
                    id
                );
            } else {
                prop_assert!(manager.runner(id).is_ok(), "held runner {} lost", id);
                prop_assert!(
                    fake.runner(id).is_some(),
                    "held runner {} not on the backend",
                    id
                );
            }
        }
    }
    manager.shutdown().await;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn concurrent_operations_keep_every_runner_in_exactly_one_state(case in case()) {
        let runtime = multi_threaded();
        runtime.block_on(scenario(case))?;
    }
}

/// Regression: a claim racing an environment deletion. The claim used to take the runner from
/// the pool and register it as used later; a deletion in between missed it, so it outlived its
/// environment. Many rounds on a multi-threaded runtime, each asserting nothing is left.
#[test]
fn a_claim_racing_the_environment_deletion_leaves_nothing_behind() {
    let runtime = multi_threaded();
    runtime.block_on(async {
        for round in 0..100 {
            let fake = FakeExecutor::new();
            let manager = started(&fake, config()).await;
            manager.put_environment(spec(1, 4)).await.unwrap();
            assert!(settles(|| idle(&manager, 1) == 4).await);
            let claims: Vec<_> = (0..4)
                .map(|_| {
                    let manager = Arc::clone(&manager);
                    tokio::spawn(async move { manager.claim(env_id(1), Duration::ZERO).await })
                })
                .collect();
            let deletion = {
                let manager = Arc::clone(&manager);
                tokio::spawn(async move { manager.delete_environment(env_id(1)).await })
            };
            let mut held = Vec::new();
            for claim in claims {
                if let Ok(runner) = claim.await.unwrap() {
                    held.push(runner.id().clone());
                }
            }
            deletion.await.unwrap().unwrap();
            assert!(
                settles(|| fake.runners().is_empty() && manager.used_count() == 0).await,
                "round {round}: {} runners left on the backend, {} used",
                fake.runners().len(),
                manager.used_count()
            );
            for id in held {
                assert!(manager.runner(&id).is_err(), "round {round}: {id} survived");
            }
            manager.shutdown().await;
        }
    });
}

/// Regression: a runner stopping on its own while it is being claimed. The stop event used to
/// find the runner neither idle nor used and was dropped, so the client kept a dead runner that
/// still counted as used.
#[test]
fn a_stop_event_racing_a_claim_is_never_lost() {
    let runtime = multi_threaded();
    runtime.block_on(async {
        for round in 0..100 {
            let fake = FakeExecutor::new();
            let manager = started(&fake, config()).await;
            manager.put_environment(spec(1, 1)).await.unwrap();
            assert!(settles(|| idle(&manager, 1) == 1).await);
            let victim = fake.runners()[0].info.id.clone();
            let claim = {
                let manager = Arc::clone(&manager);
                tokio::spawn(async move { manager.claim(env_id(1), Duration::ZERO).await })
            };
            fake.lose_runner(&victim);
            fake.emit(BackendEvent::RunnerStopped {
                runner: victim.clone(),
                reason: DestroyReason::Stopped("lost".into()),
            });
            let claimed = claim.await.unwrap();
            // The claim got the victim (then destroyed by the event) or, after the event,
            // a replacement that the client still holds.
            let holds_replacement = usize::from(claimed.as_ref().is_ok_and(|r| *r.id() != victim));
            assert!(
                settles(|| manager.runner(&victim).is_err()
                    && manager.used_count() == holds_replacement
                    && idle(&manager, 1) == 1
                    && fake.runners().len() == 1 + holds_replacement)
                .await,
                "round {round}: claimed {:?}, used {}, idle {}",
                claimed.as_ref().map(|r| r.id().clone()),
                manager.used_count(),
                idle(&manager, 1)
            );
            manager.shutdown().await;
        }
    });
}
