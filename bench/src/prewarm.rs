//! `prewarm`: the time to create one local runner (through the local backend, in process) vs a
//! bare namespace sandbox set-up + exec (`unshare` with the same namespaces, running `true`).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use local_adapter::{LocalConfig, LocalExecutor};
use runner_core::{DestroyReason, EnvironmentId, EnvironmentSpec, ExecutorApi};

use crate::scenarios::Effort;
use crate::stats::{Report, Samples};

fn bare_sandbox() -> anyhow::Result<Duration> {
    let start = Instant::now();
    let status = Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "--mount",
            "--pid",
            "--fork",
            "--net",
            "--ipc",
            "--uts",
            "true",
        ])
        .status()
        .context("running unshare")?;
    if !status.success() {
        bail!("unshare failed");
    }
    Ok(start.elapsed())
}

/// Runs the scenario.
pub async fn prewarm(effort: Effort) -> anyhow::Result<Report> {
    let datadir = tempfile::Builder::new()
        .prefix("poseidon-bench-prewarm-")
        .tempdir_in(std::env::temp_dir())?;
    let backend = LocalExecutor::start(LocalConfig {
        data_dir: datadir.path().to_path_buf(),
        ..LocalConfig::default()
    })
    .await?;
    let spec = EnvironmentSpec {
        id: EnvironmentId::new(7).context("id")?,
        image: "bench".into(),
        prewarming_pool_size: 1,
        cpu_limit: 1000,
        memory_limit: 256,
        network_access: false,
        exposed_ports: vec![],
    };
    backend.register_environment(&spec).await?;
    let (mut subject, mut baseline) = (Samples::default(), Samples::default());
    let rounds = if effort.quick { 10 } else { 60 };
    for round in 0..rounds + 3 {
        let start = Instant::now();
        let runner = backend.create_runner(&spec).await?.into_info();
        let took = start.elapsed();
        backend
            .destroy_runner(&runner.id, &DestroyReason::ApiRequest)
            .await?;
        let base = tokio::task::spawn_blocking(bare_sandbox).await??;
        if round >= 3 {
            subject.push(took);
            baseline.push(base);
        }
    }
    backend.delete_environment(spec.id).await?;
    backend.shutdown().await;
    Ok(Report {
        scenario: "prewarm",
        p50_ms: subject.p50(),
        p99_ms: subject.p99(),
        per_s: 1e3 / subject.p50().max(1e-9),
        baseline_p50_ms: baseline.p50(),
        ratio: subject.p50() / baseline.p50().max(1e-9),
        note: format!("{rounds} runners; baseline: unshare (6 namespaces) + exec true"),
        footprint: None,
    })
}
