//! Property test: random sequences of claims, returns, backend losses, restarts and resizes keep
//! the pool invariants.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use runner_core::fake::FakeExecutor;
use runner_core::{BackendEvent, DestroyReason, Manager, ManagerError, RunnerId, RunnerManager};

#[derive(Debug, Clone)]
enum Op {
    Claim,
    Return(usize),
    StopIdle(usize),
    StopUsed(usize),
    Restart,
    Resize(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Claim),
        2 => any::<usize>().prop_map(Op::Return),
        1 => any::<usize>().prop_map(Op::StopIdle),
        1 => any::<usize>().prop_map(Op::StopUsed),
        1 => Just(Op::Restart),
        1 => (0u32..6).prop_map(Op::Resize),
    ]
}

async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

async fn check(
    fake: &FakeExecutor,
    manager: &RunnerManager,
    held: &[RunnerId],
    target: u32,
) -> Result<(), TestCaseError> {
    let stats = manager.environment(env_id(1)).unwrap().statistics();
    prop_assert_eq!(stats.prewarming_pool_size, target);
    prop_assert_eq!(stats.idle_runners, target, "pool converges to its target");
    prop_assert_eq!(stats.used_runners as usize, held.len());
    for id in held {
        prop_assert!(manager.runner(id).is_ok(), "held runner {} addressable", id);
        prop_assert!(fake.runner(id).is_some(), "held runner {} exists", id);
    }
    prop_assert_eq!(
        fake.runners().len(),
        target as usize + held.len(),
        "no runner leaked or counted twice (idle and used are disjoint)"
    );
    Ok(())
}

async fn scenario(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let fake = FakeExecutor::new();
    let mut manager: Arc<RunnerManager> = started(&fake, config()).await;
    let mut target = 3;
    manager.put_environment(spec(1, target)).await.unwrap();
    settle().await;
    let mut held: Vec<RunnerId> = Vec::new();
    let mut ever_claimed: HashSet<RunnerId> = HashSet::new();
    for op in ops {
        match op {
            Op::Claim => match manager.claim(env_id(1), Duration::ZERO).await {
                Ok(runner) => {
                    prop_assert!(
                        ever_claimed.insert(runner.id().clone()),
                        "runner {} handed out twice",
                        runner.id()
                    );
                    held.push(runner.id().clone());
                }
                Err(ManagerError::NoIdleRunner(_)) => prop_assert_eq!(target, 0),
                Err(other) => return Err(TestCaseError::fail(other.to_string())),
            },
            Op::Return(i) if !held.is_empty() => {
                let id = held.remove(i % held.len());
                manager.return_runner(&id).await.unwrap();
            }
            Op::StopIdle(i) => {
                let idle: Vec<_> = fake
                    .runners()
                    .into_iter()
                    .map(|r| r.info.id)
                    .filter(|id| !held.contains(id))
                    .collect();
                if !idle.is_empty() {
                    let victim = idle[i % idle.len()].clone();
                    fake.lose_runner(&victim);
                    fake.emit(BackendEvent::RunnerStopped {
                        runner: victim,
                        reason: DestroyReason::Stopped("lost".into()),
                    });
                }
            }
            Op::StopUsed(i) if !held.is_empty() => {
                let victim = held.remove(i % held.len());
                fake.lose_runner(&victim);
                fake.emit(BackendEvent::RunnerStopped {
                    runner: victim.clone(),
                    reason: DestroyReason::OomKilled,
                });
                settle().await;
                prop_assert!(manager.runner(&victim).is_err());
            }
            Op::Restart => {
                manager.shutdown().await;
                manager = started(&fake, config()).await;
            }
            Op::Resize(n) => {
                target = n;
                manager.put_environment(spec(1, target)).await.unwrap();
            }
            Op::Return(_) | Op::StopUsed(_) => {}
        }
        settle().await;
        check(&fake, &manager, &held, target).await?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn pool_invariants_hold_under_random_events(ops in proptest::collection::vec(op(), 1..30)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(scenario(ops))?;
    }
}
