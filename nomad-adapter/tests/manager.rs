//! The runner manager of runner-core on the Nomad adapter and the nomad-emulator: the pool
//! converges after OOM kills, crashes and stream breaks, no runner goes to two clients, and no
//! job leaks.

mod common;

#[ctor::ctor]
fn sandbox_hook() {
    local_adapter::sandbox_main_if_requested();
}

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::sandboxes::Sandboxes;
use nomad_adapter::api::NomadApi;
use nomad_adapter::{HttpNomadApi, NomadConfig, NomadExecutor};
use nomad_emulator::{EmulatorConfig, NomadEmulator};
use runner_core::{EnvironmentId, EnvironmentSpec, Manager, ManagerConfig, RunnerManager};

fn spec() -> EnvironmentSpec {
    EnvironmentSpec {
        id: EnvironmentId::new(30).unwrap(),
        image: "img".into(),
        prewarming_pool_size: 3,
        cpu_limit: 20,
        memory_limit: 128,
        network_access: false,
        exposed_ports: vec![],
    }
}

/// Waits until the pool is full again, nothing is pending, the jobs are exactly the idle and
/// used runners, and none of `gone` is among them.
async fn converged(manager: &Arc<RunnerManager>, api: &HttpNomadApi, used: usize, gone: &[String]) {
    let reached = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let stats = manager.statistics();
            let s = &stats[&spec().id];
            let jobs = api.list_jobs("30-").await.unwrap();
            if s.idle_runners == 3
                && s.pending_runners == 0
                && jobs.len() == 3 + used
                && jobs.iter().all(|j| !gone.contains(&j.id))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if reached.is_err() {
        let jobs = api.list_jobs("30-").await.unwrap();
        panic!(
            "the pool did not converge: {:?}, {} runner jobs for {used} used",
            manager.statistics(),
            jobs.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pool_converges_after_faults_and_no_runner_goes_to_two_clients() {
    common::init_tracing();
    let sandboxes = Sandboxes::start().await;
    let emu = NomadEmulator::start(EmulatorConfig::for_tests(), sandboxes.runtime())
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = NomadConfig {
        address: emu.base_url(),
        datadir: data.path().to_path_buf(),
        heartbeatseconds: 0.5,
        ..NomadConfig::default()
    };
    let api = HttpNomadApi::new(&config).unwrap();
    let backend = NomadExecutor::connect(config).await.unwrap();
    let manager = RunnerManager::new(
        Arc::new(backend),
        ManagerConfig {
            startup_timeout: Duration::from_secs(10),
            ..ManagerConfig::default()
        },
    );
    manager.recover().await.unwrap();
    manager.put_environment(spec()).await.unwrap();
    converged(&manager, &api, 0, &[]).await;

    let c = emu.control();
    let mut handed_out = HashSet::new();
    let mut held = Vec::new();
    for round in 0..3 {
        // Two clients claim at once.
        let (a, b) = tokio::join!(
            manager.claim(spec().id, Duration::ZERO),
            manager.claim(spec().id, Duration::ZERO)
        );
        for runner in [a.unwrap(), b.unwrap()] {
            assert!(
                handed_out.insert(runner.id().clone()),
                "runner {} was handed out twice",
                runner.id()
            );
            held.push(runner);
        }
        // Faults on the idle runners (once the pool is full again) and the stream.
        converged(&manager, &api, held.len(), &[]).await;
        let idle: Vec<String> = api
            .list_jobs("30-")
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .filter(|id| held.iter().all(|r| r.id().as_str() != id))
            .collect();
        let alloc = |job: &str| {
            c.allocs(job)
                .iter()
                .max_by_key(|a| a["CreateIndex"].as_u64())
                .and_then(|a| a["ID"].as_str().map(str::to_string))
        };
        assert!(idle.len() >= 2, "idle runner jobs: {idle:?}");
        if round == 1 {
            c.drop_event_streams();
        }
        assert!(c.oom_kill(&alloc(&idle[0]).unwrap()));
        assert!(c.crash_task(&alloc(&idle[1]).unwrap(), 2));
        converged(&manager, &api, held.len(), &idle[..2]).await;
    }
    // Returning the runners destroys them; the pool stays full and nothing leaks.
    for runner in held.drain(..) {
        manager.return_runner(runner.id()).await.unwrap();
    }
    converged(&manager, &api, 0, &[]).await;
    manager.shutdown().await;
    drop(sandboxes);
}
