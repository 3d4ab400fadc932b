//! `soak`: many executions of `true` against one server, watching the server's RSS, open fds
//! and descendant processes for growth. Opt-in (`--soak` or `--scenario soak`): the default
//! 100 000 executions take minutes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::footprint::{Footprint, Sample};
use crate::server::Api;
use crate::stats::{Report, Samples};

/// Executions of a full soak.
pub const FULL_EXECUTIONS: usize = 100_000;
/// Executions of a `--quick` soak.
pub const QUICK_EXECUTIONS: usize = 400;
/// Concurrent clients, each executing on its own runner.
const CLIENTS: usize = 4;
/// Progress lines (and samples) over the measured part.
const PROGRESS_STEPS: usize = 10;

/// Executions before the start sample: 1 % of the run, at least 200, at most half of it, so
/// lazily grown state (connection pools, allocator arenas, caches) is in place when measured.
fn warm_up(executions: usize) -> usize {
    (executions / 100).max(200).min(executions / 2)
}

/// Runs `executions` executions of `true` from [`CLIENTS`] clients against the server `api`
/// whose process is `server_pid`. The footprint is sampled after the warm-up and at the end,
/// each time with no execution in flight; latency and rate cover the executions after the
/// warm-up. Progress goes to stderr every tenth.
pub async fn soak(api: &Api, server_pid: u32, executions: usize) -> anyhow::Result<Report> {
    let env = 104;
    api.put_environment(env, CLIENTS as u32).await?;
    api.wait_idle(env, CLIENTS as u64, Duration::from_secs(120))
        .await?;
    let mut runners = Vec::new();
    for _ in 0..CLIENTS {
        runners.push(api.claim(env).await?.context("no runner")?);
    }
    let warm_up = warm_up(executions);
    run(api, &runners, warm_up, |_| {}).await?;
    let start = settled(server_pid).await?;
    eprintln!("soak: {warm_up}/{executions} executions (warm-up done), {start}");

    let measured = executions - warm_up;
    let mut next_step = 1;
    let began = Instant::now();
    let subject = run(api, &runners, measured, |done| {
        if next_step < PROGRESS_STEPS && done * PROGRESS_STEPS >= measured * next_step {
            next_step = done * PROGRESS_STEPS / measured.max(1) + 1;
            match Sample::of(server_pid) {
                Ok(s) => eprintln!("soak: {}/{executions} executions, {s}", warm_up + done),
                Err(e) => eprintln!("soak: {}/{executions}: no sample: {e}", warm_up + done),
            }
        }
    })
    .await?;
    let took = began.elapsed();
    let end = settled(server_pid).await?;
    eprintln!("soak: {executions}/{executions} executions, {end}");

    for runner in &runners {
        api.delete_runner(runner).await?;
    }
    api.delete_environment(env).await?;
    let footprint = Footprint::between(start, end);
    Ok(Report {
        scenario: "soak",
        p50_ms: subject.p50(),
        p99_ms: subject.p99(),
        per_s: subject.len() as f64 / took.as_secs_f64().max(1e-9),
        baseline_p50_ms: 0.0,
        ratio: footprint.rss_end_kib as f64 / footprint.rss_start_kib.max(1) as f64,
        note: format!(
            "{executions} executions ({warm_up} warm-up), {CLIENTS} clients; {footprint}; \
             ratio = rss end / start"
        ),
        footprint: Some(footprint),
    })
}

/// Runs `count` executions of `true` spread over `runners`, one client per runner, calling
/// `progress` with the number done about every 100 ms; returns their latencies.
async fn run(
    api: &Api,
    runners: &[String],
    count: usize,
    mut progress: impl FnMut(usize),
) -> anyhow::Result<Samples> {
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = runners
        .iter()
        .cloned()
        .map(|runner| {
            let (api, next, done) = (api.clone(), Arc::clone(&next), Arc::clone(&done));
            tokio::spawn(async move {
                let mut samples = Samples::default();
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    let start = Instant::now();
                    let code = api.execute(&runner, "true").await?;
                    samples.push(start.elapsed());
                    if code != 0 {
                        bail!("true exited with {code} on runner {runner}");
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(samples)
            })
        })
        .collect();
    while !tasks.iter().all(|t| t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        progress(done.load(Ordering::Relaxed));
    }
    let mut all = Samples::default();
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(all)
}

/// A sample of `pid` once its open fds stop changing (the server closing the last
/// execution's sockets and pipes), or after 3 s.
async fn settled(pid: u32) -> anyhow::Result<Sample> {
    let mut last = Sample::of(pid).context("sampling the server")?;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = Sample::of(pid).context("sampling the server")?;
        if now.fds == last.fds && now.procs == last.procs {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warm_up_is_a_hundredth_at_least_200_at_most_half() {
        assert_eq!(warm_up(FULL_EXECUTIONS), 1_000);
        assert_eq!(warm_up(3_000), 200);
        assert_eq!(warm_up(QUICK_EXECUTIONS), 200);
        assert_eq!(warm_up(100), 50);
        assert_eq!(warm_up(1), 0);
    }
}
