//! What the store's writes cost: median and p99 latency of a durable used-mark
//! (`set_runner_state` to `Used`), an eventual deadline refresh (`refresh_deadline`) and a durable
//! `put_runner`, on a file in Cargo's target tmp directory (the work tree's filesystem, so fsync
//! is real, unlike on a tmpfs `/tmp`).
//!
//! Run with `cargo bench -p storage`; `STORAGE_BENCH_SAMPLES` overrides the sample count.

#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant, SystemTime};

use runner_core::{EnvironmentId, MappedPort, RunnerId, RunnerState, UsedState};
use storage::{StateStore, StoredRunner};

const DEFAULT_SAMPLES: usize = 500;
const WARMUP: usize = 20;
const RUNNERS: usize = 100;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let samples = std::env::var("STORAGE_BENCH_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SAMPLES);
    let dir = tempfile::Builder::new()
        .prefix("commit-cost")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    let store = StateStore::open(&dir.path().join("state.redb"))?;
    let env = EnvironmentId::new(1).ok_or("environment id out of range")?;
    let ids: Vec<RunnerId> = (0..RUNNERS)
        .map(|i| RunnerId::new(format!("1-pool-{i:04}")))
        .collect();
    for id in &ids {
        store.put_runner(&record(id.clone(), env, RunnerState::Idle))?;
    }

    println!(
        "store file in {}, {samples} samples each (after {WARMUP} warm-up writes)",
        dir.path().display()
    );
    println!(
        "{:<44} {:>10} {:>10} {:>10}",
        "write", "median", "p99", "mean"
    );

    let used_mark = measure(samples, |i| {
        let state = RunnerState::Used(UsedState {
            inactivity_timeout: Duration::from_secs(60),
            deadline: Some(SystemTime::now() + Duration::from_secs(60)),
        });
        store.set_runner_state(&ids[i % RUNNERS], &state)
    })?;
    report("set_runner_state(Used)   durable", &used_mark);

    let refresh = measure(samples, |i| {
        store.refresh_deadline(
            &ids[i % RUNNERS],
            SystemTime::now() + Duration::from_secs(60),
        )
    })?;
    report("refresh_deadline         eventual", &refresh);

    let put = measure(samples, |i| {
        store.put_runner(&record(
            RunnerId::new(format!("1-new-{i:06}")),
            env,
            RunnerState::Idle,
        ))
    })?;
    report("put_runner (insert)      durable", &put);

    let flush = measure(samples.min(100), |_| store.flush())?;
    report("flush (empty commit)     durable", &flush);

    store.close()?;
    Ok(())
}

fn record(id: RunnerId, environment: EnvironmentId, state: RunnerState) -> StoredRunner {
    StoredRunner {
        backend_data: format!(
            "{{\"sandbox\":\"{id}\",\"pid\":12345,\"cgroup\":\"/sys/fs/cgroup/poseidon/{id}\"}}"
        )
        .into_bytes(),
        id,
        environment,
        state,
        mapped_ports: vec![MappedPort {
            exposed_port: 8080,
            host_address: "127.0.0.1:40001".into(),
        }],
    }
}

/// Latencies of `samples` calls of `op(i)`, sorted, after `WARMUP` unmeasured ones.
fn measure<E: std::error::Error + 'static>(
    samples: usize,
    mut op: impl FnMut(usize) -> Result<(), E>,
) -> Result<Vec<Duration>, E> {
    for i in 0..WARMUP {
        op(i)?;
    }
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples {
        let start = Instant::now();
        op(WARMUP + i)?;
        times.push(start.elapsed());
    }
    times.sort_unstable();
    Ok(times)
}

fn report(name: &str, sorted: &[Duration]) {
    let Some(last) = sorted.len().checked_sub(1) else {
        println!("{name:<44} no samples");
        return;
    };
    let median = sorted[last / 2];
    let p99 = sorted[last * 99 / 100];
    let mean = sorted.iter().sum::<Duration>() / u32::try_from(sorted.len()).unwrap_or(u32::MAX);
    println!(
        "{name:<44} {:>10} {:>10} {:>10}",
        micros(median),
        micros(p99),
        micros(mean)
    );
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}
