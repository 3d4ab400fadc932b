//! Shared set-up for the manager's behaviour tests.
#![allow(dead_code, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use runner_core::fake::FakeExecutor;
use runner_core::{
    EnvironmentId, EnvironmentSpec, Manager, ManagerConfig, RunnerManager, SpecBounds,
};

pub fn env_id(n: u64) -> EnvironmentId {
    EnvironmentId::new(n).unwrap()
}

pub fn spec(id: u64, pool: u32) -> EnvironmentSpec {
    EnvironmentSpec {
        id: env_id(id),
        image: "python:3".into(),
        prewarming_pool_size: pool,
        cpu_limit: 100,
        memory_limit: 128,
        network_access: false,
        exposed_ports: vec![],
    }
}

pub fn config() -> ManagerConfig {
    ManagerConfig {
        bounds: SpecBounds {
            max_pool_size: 2_000,
            ..SpecBounds::default()
        },
        max_runners: 10_000,
        ..ManagerConfig::default()
    }
}

pub fn manager_with(fake: &FakeExecutor, config: ManagerConfig) -> Arc<RunnerManager> {
    RunnerManager::new(Arc::new(fake.clone()), config)
}

pub async fn started(fake: &FakeExecutor, config: ManagerConfig) -> Arc<RunnerManager> {
    let manager = manager_with(fake, config);
    manager.recover().await.unwrap();
    manager
}

/// Waits (tokio time) until `cond` holds, failing after a generous bound.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..2_000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

pub fn idle(manager: &RunnerManager, id: u64) -> u32 {
    manager
        .environment(env_id(id))
        .map_or(0, |e| e.statistics().idle_runners)
}

pub fn used(manager: &RunnerManager, id: u64) -> u32 {
    manager
        .environment(env_id(id))
        .map_or(0, |e| e.statistics().used_runners)
}
