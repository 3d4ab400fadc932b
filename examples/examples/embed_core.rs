//! Embedding runner-core in another service: a manager over the in-memory fake backend.
//!
//! `cargo run -p examples --example embed_core`
#![allow(clippy::print_stdout)]

use std::time::Duration;

use runner_core::fake::FakeExecutor;
use runner_core::{EnvironmentId, EnvironmentSpec, Manager, ManagerConfig, RunnerManager};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let manager = RunnerManager::new(
        std::sync::Arc::new(FakeExecutor::new()),
        ManagerConfig::default(),
    );
    manager.recover().await?;
    let id = EnvironmentId::new(10).ok_or_else(|| anyhow::anyhow!("bad id"))?;
    manager
        .put_environment(EnvironmentSpec {
            id,
            image: "demo".into(),
            prewarming_pool_size: 2,
            cpu_limit: 100,
            memory_limit: 128,
            network_access: false,
            exposed_ports: vec![],
        })
        .await?;
    while manager
        .environment(id)
        .is_some_and(|e| e.statistics().idle_runners < 2)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (stdout, exit) =
        examples::run_once(manager.as_ref(), id, "echo hello from the core").await?;
    print!("{stdout}");
    println!("exit code: {exit:?}");
    manager.shutdown().await;
    Ok(())
}
