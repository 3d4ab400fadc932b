//! Shared helpers of the sandbox tests: an executor on a private data directory, and an
//! execution runner that collects the whole event stream.
#![allow(dead_code, missing_docs)]

use std::time::Duration;

use bytes::Bytes;
use local_adapter::{LocalConfig, LocalExecutor};
use runner_core::{
    DestroyReason, EnvironmentId, EnvironmentSpec, ExecutionEvent, ExecutionRequest, ExecutorApi,
    RunnerId,
};
use tokio_util::sync::CancellationToken;

#[ctor::ctor]
fn sandbox_hook() {
    local_adapter::sandbox_main_if_requested();
}

/// An executor on a private data directory. Dropping it (also when a test panics) destroys the
/// runners it created and shuts the executor down, so no sandbox or cgroup outlives a test.
pub struct Fixture {
    pub executor: LocalExecutor,
    pub dir: tempfile::TempDir,
    created: std::sync::Mutex<Vec<RunnerId>>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let executor = self.executor.clone();
        let runners = std::mem::take(&mut *self.created.lock().unwrap_or_else(|e| e.into_inner()));
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                for r in runners {
                    let _ = executor
                        .destroy_runner(&r, &DestroyReason::ApiRequest)
                        .await;
                }
                executor.shutdown().await;
            });
        });
        let _ = cleanup.join();
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn config(dir: &std::path::Path) -> LocalConfig {
    LocalConfig {
        data_dir: dir.to_path_buf(),
        default_memory_mb: 256,
        max_processes: 128,
        disk_limit_mb: 64,
        // Networking has tests of its own (network.rs); the others need no bridge.
        network: None,
        ..LocalConfig::default()
    }
}

impl Fixture {
    pub async fn new() -> Self {
        Self::with(|_| ()).await
    }

    /// An executor whose configuration `adjust` changes first.
    pub async fn with(adjust: impl FnOnce(&mut LocalConfig)) -> Self {
        init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = config(dir.path());
        adjust(&mut cfg);
        let executor = LocalExecutor::start(cfg).await.expect("start");
        Self {
            executor,
            dir,
            created: Default::default(),
        }
    }

    pub async fn runner(&self) -> RunnerId {
        self.runner_with(spec(100)).await
    }

    pub async fn runner_with(&self, spec: EnvironmentSpec) -> RunnerId {
        self.executor
            .create_runner(&spec)
            .await
            .expect("create runner")
            .into_info()
            .id
    }

    /// The host pid of a live runner's init (the holder of its network namespace).
    pub fn init_pid(&self, id: &RunnerId) -> Option<i32> {
        self.executor
            .network_namespace(id)?
            .to_str()?
            .strip_prefix("/proc/")?
            .split('/')
            .next()?
            .parse()
            .ok()
    }

    pub async fn destroy(&self, id: &RunnerId) {
        self.executor
            .destroy_runner(id, &DestroyReason::ApiRequest)
            .await
            .expect("destroy");
    }
}

pub fn spec(memory_mb: u32) -> EnvironmentSpec {
    EnvironmentSpec {
        id: EnvironmentId::new(7).unwrap(),
        image: "host".into(),
        prewarming_pool_size: 1,
        cpu_limit: 100,
        memory_limit: memory_mb,
        network_access: false,
        exposed_ports: vec![],
    }
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub terminal: Option<ExecutionEvent>,
}

impl Outcome {
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    pub fn code(&self) -> Option<u8> {
        match self.terminal {
            Some(ExecutionEvent::Exit(c)) => Some(c),
            _ => None,
        }
    }
}

pub fn request(cmd: &str) -> ExecutionRequest {
    ExecutionRequest::new(cmd)
}

/// Runs `request`, writes `input` (if any) then closes stdin, and collects every event until the
/// stream ends (or 60 s pass).
pub async fn run_with(
    executor: &LocalExecutor,
    runner: &RunnerId,
    request: ExecutionRequest,
    input: Option<&str>,
) -> Outcome {
    let handle = executor
        .execute(runner, &request, CancellationToken::new())
        .await
        .expect("execute");
    let stdin = handle.stdin;
    if let Some(input) = input {
        stdin
            .send(Bytes::from(input.to_string()))
            .await
            .expect("stdin");
    }
    let mut events = handle.events;
    let mut outcome = Outcome::default();
    let collect = async {
        while let Some(event) = events.recv().await {
            match event {
                ExecutionEvent::Stdout(b) => outcome.stdout.extend_from_slice(&b),
                ExecutionEvent::Stderr(b) => outcome.stderr.extend_from_slice(&b),
                terminal => {
                    assert!(outcome.terminal.is_none(), "two terminal events");
                    outcome.terminal = Some(terminal);
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), collect)
        .await
        .expect("execution did not end");
    drop(stdin);
    outcome
}

pub async fn run(executor: &LocalExecutor, runner: &RunnerId, cmd: &str) -> Outcome {
    run_with(executor, runner, request(cmd), None).await
}

/// The pids of every process in `/proc`.
pub fn pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// The fields of `/proc/<pid>/stat` after the command name: state, ppid, pgrp, session, …;
/// `None` when the process is gone.
pub fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    )
}
