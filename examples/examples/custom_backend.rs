//! A custom backend: the manager drives `EchoBackend` exactly like the real ones.
//!
//! `cargo run -p examples --example custom_backend`
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Duration;

use examples::echo_backend::EchoBackend;
use runner_core::{EnvironmentId, EnvironmentSpec, Manager, ManagerConfig, RunnerManager};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let manager = RunnerManager::new(Arc::new(EchoBackend::default()), ManagerConfig::default());
    manager.recover().await?;
    let id = EnvironmentId::new(1).ok_or_else(|| anyhow::anyhow!("bad id"))?;
    manager
        .put_environment(EnvironmentSpec {
            id,
            image: "echo".into(),
            prewarming_pool_size: 1,
            cpu_limit: 0,
            memory_limit: 0,
            network_access: false,
            exposed_ports: vec![],
        })
        .await?;
    while manager
        .environment(id)
        .is_some_and(|e| e.statistics().idle_runners < 1)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (stdout, exit) = examples::run_once(manager.as_ref(), id, "anything at all").await?;
    print!("{stdout}");
    println!("exit code: {exit:?}");
    Ok(())
}
