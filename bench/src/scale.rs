//! `scale`: runner-core's memory per idle runner and the cost of a claim with 100 vs 100 000
//! idle runners, on the in-memory fake backend (no server, no sandbox).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use runner_core::fake::FakeExecutor;
use runner_core::{
    EnvironmentId, EnvironmentSpec, ExecutorApi, Manager, ManagerConfig, RunnerManager, SpecBounds,
};

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
    // What the fake backend itself keeps per runner, to subtract it.
    let fake_cost = {
        let probe = FakeExecutor::new();
        let before = live_bytes();
        for _ in 0..1_000 {
            probe.create_runner(&spec(n)?).await?;
        }
        (live_bytes().saturating_sub(before)) as f64 / 1_000.0
    };
    let fake = FakeExecutor::new();
    let config = ManagerConfig {
        bounds: SpecBounds {
            max_pool_size: 200_000,
            ..SpecBounds::default()
        },
        max_runners: 400_000,
        refill_concurrency: 64,
        ..ManagerConfig::default()
    };
    let manager = RunnerManager::new(Arc::new(fake.clone()), config);
    manager.recover().await?;
    let id = EnvironmentId::new(1).context("id")?;
    let before = live_bytes();
    manager.put_environment(spec(n)?).await?;
    let idle = |m: &RunnerManager| m.environment(id).map_or(0, |e| e.statistics().idle_runners);
    while idle(&manager) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let bytes_per_idle = (live_bytes().saturating_sub(before)) as f64 / f64::from(n) - fake_cost;
    let mut claims = Samples::default();
    for _ in 0..rounds {
        let mut held = Vec::with_capacity(CLAIMS_PER_ROUND);
        for _ in 0..CLAIMS_PER_ROUND {
            let start = Instant::now();
            let runner = manager.claim(id, Duration::ZERO)?;
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let rounds = if effort.quick { 4 } else { 20 };
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
        })
    })
}
