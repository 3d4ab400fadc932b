//! The Nomad mode (`--backend nomad`): the server on its Nomad adapter against a `nomad-emulator`
//! in this process (allocations run as local sandboxes), measuring claim and execute latency and
//! counting the Nomad calls each costs from the emulator's request log.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nomad_emulator::runtime::AllocationRuntime;
use nomad_emulator::sandbox::{SandboxConfig, SandboxRuntime};
use nomad_emulator::{EmulatorConfig, NomadEmulator};

use crate::scenarios::Effort;
use crate::server::Api;
use crate::stats::{Report, Samples};

/// An emulated Nomad cluster for the run.
pub struct Cluster {
    emulator: NomadEmulator,
    runtime: SandboxRuntime,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts the emulator on 127.0.0.1:0 with Nomad-like but short delays.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("bench-emu")
            .tempdir_in("/tmp")?;
        let runtime = SandboxRuntime::start(SandboxConfig::new(dir.path()))
            .await
            .context("starting the emulator's sandbox runtime")?;
        let config = EmulatorConfig {
            port: 0,
            ..EmulatorConfig::for_tests()
        };
        let emulator = NomadEmulator::start(config, Arc::new(runtime.clone()))
            .await
            .context("starting the emulator")?;
        Ok(Self {
            emulator,
            runtime,
            dir,
        })
    }

    /// The variables that point a server at this cluster.
    pub fn server_vars(&self) -> Vec<(&'static str, String)> {
        let address = self.emulator.address();
        vec![
            ("POSEIDON_NOMAD_ENABLED", "true".into()),
            ("POSEIDON_NOMAD_ADDRESS", address.ip().to_string()),
            ("POSEIDON_NOMAD_PORT", address.port().to_string()),
            ("POSEIDON_NOMAD_HEARTBEATSECONDS", "1".into()),
            (
                "POSEIDON_NOMAD_UNPRIVILEGEDPREFIX",
                "setpriv --reuid=1000 --regid=1000 --clear-groups --".into(),
            ),
        ]
    }

    /// How many requests the emulator has seen.
    fn seen(&self) -> usize {
        self.emulator.control().requests().len()
    }

    /// The requests since `from`, counted by kind (`PUT /v1/jobs`, `exec`, …).
    fn calls_since(&self, from: usize) -> Calls {
        let mut calls = Calls::default();
        for request in self.emulator.control().requests().into_iter().skip(from) {
            if request.path.ends_with("/exec") {
                calls.exec += 1;
            } else if request.path == "/v1/event/stream" {
                calls.streams += 1;
            } else {
                *calls
                    .rest
                    .entry(format!("{} {}", request.method, shape(&request.path)))
                    .or_default() += 1;
            }
        }
        calls
    }

    /// Stops the emulator and removes every sandbox it left.
    pub async fn stop(self) {
        self.emulator.shutdown().await;
        for alloc in self.runtime.surviving().await {
            self.runtime.stop(&alloc).await;
        }
        self.runtime.shutdown().await;
        drop(self.dir);
    }
}

/// A request path with its ids replaced, e.g. `/v1/job/:id`.
fn shape(path: &str) -> String {
    let mut parts: Vec<&str> = path.split('/').collect();
    for i in 1..parts.len() {
        if matches!(parts[i - 1], "job" | "allocation" | "evaluation" | "node") {
            parts[i] = ":id";
        }
    }
    parts.join("/")
}

/// Nomad calls seen in a window.
#[derive(Debug, Default)]
struct Calls {
    rest: BTreeMap<String, usize>,
    exec: usize,
    streams: usize,
}

impl Calls {
    fn rest_total(&self) -> usize {
        self.rest.values().sum()
    }

    /// `n` operations' share: "1.00 REST (1.00 PUT /v1/jobs), 2.00 exec".
    fn per(&self, n: usize) -> String {
        let n = n.max(1) as f64;
        let detail: Vec<String> = self
            .rest
            .iter()
            .map(|(kind, count)| format!("{:.2} {kind}", *count as f64 / n))
            .collect();
        format!(
            "{:.2} REST [{}], {:.2} exec WebSockets, {} stream (re)connects",
            self.rest_total() as f64 / n,
            detail.join(", "),
            self.exec as f64 / n,
            self.streams
        )
    }
}

fn bare_bash_true() -> anyhow::Result<Duration> {
    let start = Instant::now();
    if !Command::new("bash")
        .args(["-c", "true"])
        .status()?
        .success()
    {
        bail!("bash -c true failed");
    }
    Ok(start.elapsed())
}

/// `nomad-claim`: sequential claims from a warm pool, vs `GET /health`; notes the Nomad calls
/// a claim causes: the claim itself, then (asynchronously) its used-mark and the pool's refill.
pub async fn claim(api: &Api, cluster: &Cluster, effort: Effort) -> anyhow::Result<Report> {
    let env = 110;
    let claims = effort.pick(10, 50);
    api.put_environment(env, claims as u32).await?;
    api.wait_idle(env, claims as u64, Duration::from_secs(300))
        .await?;
    let (mut subject, mut baseline) = (Samples::default(), Samples::default());
    let mut in_claims = Calls::default();
    let before = cluster.seen();
    let mut runners = Vec::new();
    for _ in 0..claims {
        let mark = cluster.seen();
        let start = Instant::now();
        let runner = api.claim(env).await?.context("the warm pool ran dry")?;
        subject.push(start.elapsed());
        let during = cluster.calls_since(mark);
        in_claims.exec += during.exec;
        for (kind, count) in during.rest {
            *in_claims.rest.entry(kind).or_default() += count;
        }
        runners.push(runner);
    }
    // The used-marks and refills follow the claims; let them land.
    api.wait_idle(env, claims as u64, Duration::from_secs(300))
        .await?;
    let after = cluster.calls_since(before);
    // `/health` asks Nomad for its leader: measured after the count.
    for _ in 0..claims {
        let start = Instant::now();
        api.health().await?;
        baseline.push(start.elapsed());
    }
    for runner in &runners {
        api.delete_runner(runner).await?;
    }
    api.delete_environment(env).await?;
    Ok(Report {
        scenario: "nomad-claim",
        p50_ms: subject.p50(),
        p99_ms: subject.p99(),
        per_s: 1e3 / subject.p50().max(1e-9),
        baseline_p50_ms: baseline.p50(),
        ratio: subject.p50() / baseline.p50().max(1e-9),
        note: format!(
            "{claims} claims; Nomad calls while a claim is answered (the previous claims' \
             used-marks and refills overlap): {}; per claim incl. its used-mark and the pool's \
             refill: {}",
            in_claims.per(claims),
            after.per(claims)
        ),
        footprint: None,
    })
}

/// `nomad-execute`: `true` through POST execute + WebSocket on a Nomad runner, vs bare
/// `bash -c true`; notes the Nomad calls per execution.
pub async fn execute(api: &Api, cluster: &Cluster, effort: Effort) -> anyhow::Result<Report> {
    let env = 111;
    api.put_environment(env, 1).await?;
    api.wait_idle(env, 1, Duration::from_secs(120)).await?;
    let runner = api.claim(env).await?.context("no runner")?;
    for _ in 0..5 {
        api.execute(&runner, "true").await?;
    }
    let (mut subject, mut baseline) = (Samples::default(), Samples::default());
    let rounds = effort.pick(20, 200);
    let before = cluster.seen();
    for _ in 0..rounds {
        let start = Instant::now();
        let code = api.execute(&runner, "true").await?;
        subject.push(start.elapsed());
        if code != 0 {
            bail!("true exited with {code}");
        }
        baseline.push(tokio::task::spawn_blocking(bare_bash_true).await??);
    }
    let calls = cluster.calls_since(before);
    api.delete_runner(&runner).await?;
    api.delete_environment(env).await?;
    Ok(Report {
        scenario: "nomad-execute",
        p50_ms: subject.p50(),
        p99_ms: subject.p99(),
        per_s: 1e3 / subject.p50().max(1e-9),
        baseline_p50_ms: baseline.p50(),
        ratio: subject.p50() / baseline.p50().max(1e-9),
        note: format!(
            "{rounds} executions; Nomad calls per execution: {}",
            calls.per(rounds)
        ),
        footprint: None,
    })
}
