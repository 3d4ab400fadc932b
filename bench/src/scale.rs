//! `scale`: runner-core's memory per idle runner and the cost of a claim with 100 vs 100 000
//! idle runners, over a backend that keeps nothing (no server, no sandbox).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use runner_core::{
    BackendError, BackendEvent, Creation, DestroyReason, EnvironmentId, EnvironmentSpec,
    ExecutionHandle, ExecutionRequest, ExecutorApi, FileContent, FileError, FileHeader, FileUpdate,
    ListFilesRequest, Manager, ManagerConfig, RunnerId, RunnerInfo, RunnerManager, RunnerRecord,
    RunnerState, SpecBounds,
};
use tokio_util::sync::CancellationToken;

/// A backend that keeps nothing per runner, so every byte measured belongs to runner-core.
#[derive(Debug)]
struct NullBackend;

#[async_trait]
impl ExecutorApi for NullBackend {
    async fn register_environment(&self, _: &EnvironmentSpec) -> Result<(), BackendError> {
        Ok(())
    }
    async fn delete_environment(&self, _: EnvironmentId) -> Result<(), BackendError> {
        Ok(())
    }
    async fn load_environments(&self) -> Result<Vec<EnvironmentSpec>, BackendError> {
        Ok(vec![])
    }
    async fn create_runner(&self, spec: &EnvironmentSpec) -> Result<Creation, BackendError> {
        Ok(Creation::Ready(RunnerInfo {
            id: RunnerId::generate(spec.id),
            environment: spec.id,
            mapped_ports: vec![],
        }))
    }
    async fn destroy_runner(&self, _: &RunnerId, _: &DestroyReason) -> Result<(), BackendError> {
        Ok(())
    }
    async fn mark_runner(&self, _: &RunnerId, _: &RunnerState) -> Result<(), BackendError> {
        Ok(())
    }
    async fn load_runners(&self, _: EnvironmentId) -> Result<Vec<RunnerRecord>, BackendError> {
        Ok(vec![])
    }
    async fn execute(
        &self,
        runner: &RunnerId,
        _: &ExecutionRequest,
        _: CancellationToken,
    ) -> Result<ExecutionHandle, BackendError> {
        Err(BackendError::RunnerNotFound(runner.clone()))
    }
    async fn update_files(&self, _: &RunnerId, _: &FileUpdate) -> Result<(), FileError> {
        Ok(())
    }
    async fn list_files(
        &self,
        _: &RunnerId,
        _: &ListFilesRequest,
    ) -> Result<Vec<FileHeader>, FileError> {
        Ok(vec![])
    }
    async fn read_file(&self, _: &RunnerId, _: &str, _: bool) -> Result<FileContent, FileError> {
        Err(FileError::NotFound)
    }
    fn events(&self) -> BoxStream<'static, BackendEvent> {
        futures::stream::pending().boxed()
    }
}

use crate::alloc::live_bytes;
use crate::scenarios::Effort;
use crate::stats::{Report, Samples};

fn spec(pool: u32) -> anyhow::Result<EnvironmentSpec> {
    Ok(EnvironmentSpec {
        id: EnvironmentId::new(1).context("id")?,
        image: "scale".into(),
        prewarming_pool_size: pool,
        cpu_limit: 0,
        memory_limit: 0,
        network_access: false,
        exposed_ports: vec![],
    })
}

struct Measured {
    claims: Samples,
    bytes_per_idle: f64,
}

async fn at_size(n: u32, rounds: usize) -> anyhow::Result<Measured> {
    const CLAIMS_PER_ROUND: usize = 50;
    let backend = NullBackend;
    let config = ManagerConfig {
        bounds: SpecBounds {
            max_pool_size: 200_000,
            ..SpecBounds::default()
        },
        max_runners: 400_000,
        refill_concurrency: 64,
        ..ManagerConfig::default()
    };
    let manager = RunnerManager::new(Arc::new(backend), config);
    manager.recover().await?;
    let id = EnvironmentId::new(1).context("id")?;
    let before = live_bytes();
    manager.put_environment(spec(n)?).await?;
    let idle = |m: &RunnerManager| m.environment(id).map_or(0, |e| e.statistics().idle_runners);
    while idle(&manager) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let bytes_per_idle = (live_bytes().saturating_sub(before)) as f64 / f64::from(n);
    let mut claims = Samples::default();
    for _ in 0..rounds {
        let mut held = Vec::with_capacity(CLAIMS_PER_ROUND);
        for _ in 0..CLAIMS_PER_ROUND {
            let start = Instant::now();
            let runner = manager.claim(id, Duration::ZERO).await?;
            claims.push(start.elapsed());
            held.push(runner);
        }
        for runner in held {
            manager.return_runner(runner.id()).await?;
        }
        while idle(&manager) < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    manager.shutdown().await;
    Ok(Measured {
        claims,
        bytes_per_idle,
    })
}

/// Runs the scenario on a runtime of its own.
pub fn scale(effort: Effort) -> anyhow::Result<Report> {
    // One thread: nothing (refills, timers) runs between the claims being timed.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let rounds = if effort.quick { 10 } else { 40 };
        let large_n = if effort.quick { 20_000 } else { 100_000 };
        // Interleave: small, large, small, large — each measured twice, samples pooled.
        let mut small = Samples::default();
        let mut large = Samples::default();
        let mut bytes = 0.0;
        for _ in 0..2 {
            small.extend(at_size(100, rounds).await?.claims);
            let measured = at_size(large_n, rounds).await?;
            bytes = measured.bytes_per_idle;
            large.extend(measured.claims);
        }
        Ok(Report {
            scenario: "scale",
            p50_ms: large.p50(),
            p99_ms: large.p99(),
            per_s: 1e3 / large.p50().max(1e-9),
            baseline_p50_ms: small.p50(),
            ratio: large.p50() / small.p50().max(1e-9),
            note: format!(
                "claim at {large_n} vs 100 idle runners; {bytes:.0} bytes of runner-core per idle runner"
            ),
            footprint: None,
        })
    })
}
