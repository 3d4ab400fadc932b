//! Code shared by the examples: a tiny custom [`runner_core::ExecutorApi`] backend and a helper
//! an embedding service might write, unit tested with runner-core's mockall mock in
//! `tests/with_mockall.rs`.

pub mod echo_backend;

use std::time::Duration;

use runner_core::{ExecutionEvent, ExecutionRequest, Manager, ManagerError};

/// What an embedding service might build on the core: claim a runner of `environment`, run one
/// command to completion, give the runner back, and return its stdout and exit code.
///
/// Fails with the manager's error when no runner is available or the runner disappears.
pub async fn run_once(
    manager: &dyn Manager,
    environment: runner_core::EnvironmentId,
    command: &str,
) -> Result<(String, Option<u8>), ManagerError> {
    let runner = manager.claim(environment, Duration::from_secs(60)).await?;
    let id = runner.store_execution(ExecutionRequest::new(command))?;
    let mut execution = runner.start_execution(id).await?;
    let mut stdout = String::new();
    let mut exit = None;
    while let Some(event) = execution.events.recv().await {
        match event {
            ExecutionEvent::Stdout(bytes) => stdout.push_str(&String::from_utf8_lossy(&bytes)),
            ExecutionEvent::Exit(code) => exit = Some(code),
            _ => {}
        }
    }
    manager.return_runner(runner.id()).await?;
    Ok((stdout, exit))
}
