//! The scenarios. Each measures its subject and its baseline in the same run, interleaved, so
//! machine noise hits both alike.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::server::Api;
use crate::stats::{Report, Samples};

/// How much work a run does.
#[derive(Debug, Clone, Copy)]
pub struct Effort {
    /// Short smoke run.
    pub quick: bool,
}

impl Effort {
    pub fn pick(self, quick: usize, full: usize) -> usize {
        if self.quick { quick } else { full }
    }
}

/// Bare fork+exec of `bash -c true`, the floor of every execution.
fn bare_bash_true() -> anyhow::Result<Duration> {
    let start = Instant::now();
    let status = Command::new("bash").args(["-c", "true"]).status()?;
    if !status.success() {
        bail!("bash -c true failed");
    }
    Ok(start.elapsed())
}

/// `execute`: POST execute + WebSocket `start`…`exit` for `true`, vs bare `bash -c true`.
pub async fn execute(api: &Api, effort: Effort) -> anyhow::Result<Report> {
    let env = 100;
    api.put_environment(env, 1).await?;
    api.wait_idle(env, 1, Duration::from_secs(60)).await?;
    let runner = api.claim(env).await?.context("no runner")?;
    for _ in 0..20 {
        api.execute(&runner, "true").await?;
        bare_bash_true()?;
    }
    let (mut subject, mut baseline) = (Samples::default(), Samples::default());
    let mut steps: [Samples; 4] = Default::default();
    let rounds = effort.pick(50, 500);
    for _ in 0..rounds {
        let start = Instant::now();
        let (code, took) = api.execute_timed(&runner, "true").await?;
        subject.push(start.elapsed());
        for (samples, d) in steps
            .iter_mut()
            .zip([took.post, took.upgrade, took.start, took.exit])
        {
            samples.push(d);
        }
        if code != 0 {
            bail!("true exited with {code}");
        }
        baseline.push(tokio::task::spawn_blocking(bare_bash_true).await??);
    }
    api.delete_runner(&runner).await?;
    api.delete_environment(env).await?;
    Ok(Report {
        scenario: "execute",
        p50_ms: subject.p50(),
        p99_ms: subject.p99(),
        per_s: 1e3 / subject.p50().max(1e-9),
        baseline_p50_ms: baseline.p50(),
        ratio: subject.p50() / baseline.p50().max(1e-9),
        note: format!(
            "{rounds} executions; baseline: bare fork+exec of `bash -c true`; step p50s: \
             POST {:.2} ms, upgrade {:.2} ms, start {:.2} ms, exit {:.2} ms",
            steps[0].p50(),
            steps[1].p50(),
            steps[2].p50(),
            steps[3].p50()
        ),
        footprint: None,
    })
}

/// `claim`: claim + DELETE pairs from a warm pool at 64 concurrent clients (successful claims
/// only), vs `GET /health` at the same concurrency, in alternating rounds.
pub async fn claim(api: &Api, effort: Effort) -> anyhow::Result<Report> {
    const CLIENTS: usize = 64;
    let per_client = 4;
    let pool = (CLIENTS * per_client + 44) as u32;
    let env = 101;
    api.put_environment(env, pool).await?;
    let (mut subject, mut baseline) = (Samples::default(), Samples::default());
    let mut overloaded = 0usize;
    let mut claim_time = Duration::ZERO;
    for _ in 0..effort.pick(2, 8) {
        api.wait_idle(env, u64::from(pool), Duration::from_secs(300))
            .await?;
        let started = Instant::now();
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let api = api.clone();
                tokio::spawn(async move {
                    let mut samples = Samples::default();
                    let mut misses = 0;
                    for _ in 0..per_client {
                        let start = Instant::now();
                        match api.claim(env).await? {
                            Some(runner) => {
                                samples.push(start.elapsed());
                                api.delete_runner(&runner).await?;
                            }
                            None => misses += 1,
                        }
                    }
                    anyhow::Ok((samples, misses))
                })
            })
            .collect();
        for task in tasks {
            let (samples, misses) = task.await??;
            subject.extend(samples);
            overloaded += misses;
        }
        claim_time += started.elapsed();
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let api = api.clone();
                tokio::spawn(async move {
                    let mut samples = Samples::default();
                    for _ in 0..per_client {
                        let start = Instant::now();
                        api.health().await?;
                        samples.push(start.elapsed());
                    }
                    anyhow::Ok(samples)
                })
            })
            .collect();
        for task in tasks {
            baseline.extend(task.await??);
        }
    }
    api.delete_environment(env).await?;
    Ok(Report {
        scenario: "claim",
        p50_ms: subject.p50(),
        p99_ms: subject.p99(),
        per_s: subject.len() as f64 / claim_time.as_secs_f64().max(1e-9),
        baseline_p50_ms: baseline.p50(),
        ratio: subject.p99() / baseline.p99().max(1e-9),
        note: format!(
            "{} claims, {overloaded} overloaded; ratio = p99 claim / p99 health ({:.3} ms)",
            subject.len(),
            baseline.p99()
        ),
        footprint: None,
    })
}

/// `throughput`: executions of `true` per second with 32 clients, vs bare `bash -c true` per
/// second from 32 threads, alternating 1 s (quick) or 2 s slices.
pub async fn throughput(api: &Api, effort: Effort) -> anyhow::Result<Report> {
    const CLIENTS: usize = 32;
    let env = 102;
    api.put_environment(env, CLIENTS as u32).await?;
    api.wait_idle(env, CLIENTS as u64, Duration::from_secs(120))
        .await?;
    let mut runners = Vec::new();
    for _ in 0..CLIENTS {
        runners.push(api.claim(env).await?.context("no runner")?);
    }
    let slice = Duration::from_secs(effort.pick(1, 2) as u64);
    let slices = effort.pick(2, 5);
    let (mut subject, mut baseline) = (Samples::default(), Samples::default());
    let (mut subject_count, mut baseline_count) = (0u64, 0u64);
    let (mut subject_time, mut baseline_time) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..slices {
        let start = Instant::now();
        let tasks: Vec<_> = runners
            .iter()
            .cloned()
            .map(|runner| {
                let api = api.clone();
                tokio::spawn(async move {
                    let mut samples = Samples::default();
                    while start.elapsed() < slice {
                        let t = Instant::now();
                        api.execute(&runner, "true").await?;
                        samples.push(t.elapsed());
                    }
                    anyhow::Ok(samples)
                })
            })
            .collect();
        for task in tasks {
            let samples = task.await??;
            subject_count += samples.len() as u64;
            subject.extend(samples);
        }
        subject_time += start.elapsed();

        let start = Instant::now();
        let done = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let done = Arc::clone(&done);
                std::thread::spawn(move || {
                    let mut samples = Samples::default();
                    while start.elapsed() < slice {
                        if let Ok(d) = bare_bash_true() {
                            samples.push(d);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    samples
                })
            })
            .collect();
        for thread in threads {
            baseline.extend(
                thread
                    .join()
                    .map_err(|_| anyhow::anyhow!("thread panicked"))?,
            );
        }
        baseline_time += start.elapsed();
        baseline_count += done.load(Ordering::Relaxed);
    }
    for runner in &runners {
        api.delete_runner(runner).await?;
    }
    api.delete_environment(env).await?;
    let per_s = subject_count as f64 / subject_time.as_secs_f64();
    let baseline_per_s = baseline_count as f64 / baseline_time.as_secs_f64();
    Ok(Report {
        scenario: "throughput",
        p50_ms: subject.p50(),
        p99_ms: subject.p99(),
        per_s,
        baseline_p50_ms: baseline.p50(),
        ratio: per_s / baseline_per_s.max(1e-9),
        note: format!(
            "{CLIENTS} clients; ratio = executions/s / bare bash/s ({baseline_per_s:.0}/s)"
        ),
        footprint: None,
    })
}

/// `files`: PATCH 100 × 1 KiB files then list them, vs writing the same files into a directory
/// on the data directory's filesystem and listing it.
pub async fn files(api: &Api, effort: Effort) -> anyhow::Result<Report> {
    let env = 103;
    api.put_environment(env, 1).await?;
    api.wait_idle(env, 1, Duration::from_secs(60)).await?;
    let runner = api.claim(env).await?.context("no runner")?;
    let scratch = tempfile::tempdir_in(std::env::temp_dir())?;
    let (mut subject, mut baseline) = (Samples::default(), Samples::default());
    let rounds = effort.pick(10, 100);
    for round in 0..rounds + 3 {
        let dir = format!("r{round}");
        let files: Vec<(String, Vec<u8>)> = (0..100)
            .map(|i| (format!("{dir}/f{i}.txt"), vec![b'a' + (i % 26) as u8; 1024]))
            .collect();
        let start = Instant::now();
        api.copy_files(&runner, &files).await?;
        let listed = api.list_files(&runner, &dir).await?;
        let took = start.elapsed();
        if listed < 100 {
            bail!("listed {listed} of 100 files");
        }
        let local = scratch.path().join(&dir);
        let start = Instant::now();
        std::fs::create_dir_all(&local)?;
        for (path, content) in &files {
            std::fs::write(scratch.path().join(path), content)?;
        }
        let count = std::fs::read_dir(&local)?.count();
        let base = start.elapsed();
        if count != 100 {
            bail!("wrote {count} of 100 files");
        }
        if round >= 3 {
            subject.push(took);
            baseline.push(base);
        }
    }
    api.delete_runner(&runner).await?;
    api.delete_environment(env).await?;
    Ok(Report {
        scenario: "files",
        p50_ms: subject.p50(),
        p99_ms: subject.p99(),
        per_s: 1e3 / subject.p50().max(1e-9),
        baseline_p50_ms: baseline.p50(),
        ratio: subject.p50() / baseline.p50().max(1e-9),
        note: format!("{rounds} rounds of 100 × 1 KiB + listing; baseline: direct writes"),
        footprint: None,
    })
}
