//! [`SandboxRuntime`]: every allocation runs as a runner of the local backend (a Linux sandbox
//! with real memory, CPU and process limits, OOM kills and isolation), and every exec session
//! as a process spawned in it.
//!
//! Which runner belongs to which allocation is kept in `<data_dir>/allocations.json`; the local
//! backend reattaches its runners when it starts on the same data directory, so allocations
//! survive a restart of the emulator ([`AllocationRuntime::surviving`]).

mod forward;
mod process;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use axum::extract::ws::WebSocket;
use futures::StreamExt;
use futures::stream::BoxStream;
use local_adapter::{LocalConfig, LocalExecutor, SpawnRequest};
use runner_core::{
    BackendError, BackendEvent, DestroyReason, EnvironmentId, EnvironmentSpec, ExecutorApi,
    RunnerId,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::exec;
use crate::runtime::{
    AllocationRuntime, ExecSession, RuntimeError, RuntimeEvent, SessionEnd, TaskLaunch,
};
use forward::Forwarder;

/// The exit code reported for a task whose sandbox the kernel killed for memory (SIGKILL).
pub const OOM_EXIT_CODE: i32 = 137;
/// The exit code reported for a task whose sandbox died for another reason.
pub const DIED_EXIT_CODE: i32 = 1;

/// Configuration of [`SandboxRuntime`].
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Where the runtime keeps its allocation records and the local backend its state (in
    /// `<data_dir>/local`, whose path must stay short enough for unix sockets).
    pub data_dir: PathBuf,
    /// Image name → root filesystem directory, as [`LocalConfig::images`]; an image without an
    /// entry (and a task without an image) runs on the host's allow-listed directories.
    pub images: BTreeMap<String, PathBuf>,
    /// The local backend's other settings (limits, cgroups, networking); its `data_dir` and
    /// `images` are replaced by the fields above.
    pub local: LocalConfig,
}

impl SandboxConfig {
    /// A configuration with the local backend's defaults.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            images: BTreeMap::new(),
            local: LocalConfig::default(),
        }
    }
}

/// What is kept on disk about an allocation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct AllocRecord {
    runner: String,
    environment: u64,
    env: BTreeMap<String, String>,
}

#[derive(Debug)]
struct Alloc {
    record: AllocRecord,
    forwarders: Vec<Forwarder>,
}

#[derive(Debug)]
struct Inner {
    executor: LocalExecutor,
    records: PathBuf,
    allocs: Mutex<HashMap<String, Alloc>>,
    /// Serializes starts and stops (creating a runner takes a moment; a second start of the same
    /// allocation must find the first one's runner).
    lifecycle: tokio::sync::Mutex<()>,
    sessions: Mutex<HashMap<String, SessionsOf>>,
    next_session: AtomicU64,
}

/// The running exec sessions of one allocation: how to end each.
type SessionsOf = HashMap<u64, watch::Sender<Option<SessionEnd>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Allocations as local sandboxes (see the module documentation). Cheap to clone.
#[derive(Debug, Clone)]
pub struct SandboxRuntime {
    inner: Arc<Inner>,
}

fn runtime_error(what: &str, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError(format!("{what}: {e}"))
}

/// The environment an allocation's runner belongs to: one per allocation (FNV-1a of its id).
fn environment_of(alloc_id: &str) -> Result<EnvironmentId, RuntimeError> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in alloc_id.as_bytes() {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    EnvironmentId::new(hash & EnvironmentId::MAX)
        .ok_or_else(|| RuntimeError("no environment id for the allocation".into()))
}

impl SandboxRuntime {
    /// Starts the local backend on `<data_dir>/local` (reattaching the runners of an earlier
    /// run) and loads the allocation records.
    pub async fn start(config: SandboxConfig) -> Result<SandboxRuntime, RuntimeError> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| runtime_error("creating the data directory", e))?;
        let mut local = config.local;
        local.data_dir = config.data_dir.join("local");
        local.images = config.images;
        let executor = LocalExecutor::start(local)
            .await
            .map_err(|e| runtime_error("starting the local backend", e))?;
        let records = config.data_dir.join("allocations.json");
        let loaded: HashMap<String, AllocRecord> = match std::fs::read(&records) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| runtime_error("reading the allocation records", e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(runtime_error("reading the allocation records", e)),
        };
        let allocs = loaded
            .into_iter()
            .map(|(id, record)| {
                (
                    id,
                    Alloc {
                        record,
                        forwarders: Vec::new(),
                    },
                )
            })
            .collect();
        Ok(SandboxRuntime {
            inner: Arc::new(Inner {
                executor,
                records,
                allocs: Mutex::new(allocs),
                lifecycle: tokio::sync::Mutex::new(()),
                sessions: Mutex::new(HashMap::new()),
                next_session: AtomicU64::new(0),
            }),
        })
    }

    /// The local backend the allocations run on.
    pub fn executor(&self) -> &LocalExecutor {
        &self.inner.executor
    }

    /// The runner an allocation runs in, if it has one.
    pub fn runner_of(&self, alloc_id: &str) -> Option<RunnerId> {
        lock(&self.inner.allocs)
            .get(alloc_id)
            .map(|a| RunnerId::from(a.record.runner.as_str()))
    }

    /// Stops the local backend's background work (runners stay, as after a crash).
    pub async fn shutdown(&self) {
        let forwarders: Vec<Forwarder> = lock(&self.inner.allocs)
            .values_mut()
            .flat_map(|a| std::mem::take(&mut a.forwarders))
            .collect();
        drop(forwarders);
        self.inner.executor.shutdown().await;
    }

    /// Writes the records (under the lifecycle lock).
    fn persist(&self) -> Result<(), RuntimeError> {
        let records: HashMap<String, AllocRecord> = lock(&self.inner.allocs)
            .iter()
            .map(|(id, a)| (id.clone(), a.record.clone()))
            .collect();
        let bytes = serde_json::to_vec_pretty(&records)
            .map_err(|e| runtime_error("encoding the allocation records", e))?;
        let tmp = self.inner.records.with_extension("json.tmp");
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &self.inner.records))
            .map_err(|e| runtime_error("writing the allocation records", e))
    }

    async fn runner_alive(&self, record: &AllocRecord) -> bool {
        let Some(environment) = EnvironmentId::new(record.environment) else {
            return false;
        };
        match self.inner.executor.load_runners(environment).await {
            Ok(runners) => runners.iter().any(|r| r.info.id.as_str() == record.runner),
            Err(_) => false,
        }
    }

    /// Creates the allocation's runner; networking falls back to loopback only (with a
    /// warning) when the local backend has none.
    async fn create(&self, launch: &TaskLaunch) -> Result<runner_core::RunnerInfo, RuntimeError> {
        let executor = &self.inner.executor;
        let mut spec = EnvironmentSpec {
            id: environment_of(&launch.alloc_id)?,
            image: launch.image.clone().unwrap_or_default(),
            prewarming_pool_size: 0,
            cpu_limit: launch.cpu_mhz,
            memory_limit: launch.memory_max_mb.unwrap_or(0).max(launch.memory_mb),
            network_access: launch.network,
            exposed_ports: launch.ports.iter().map(|p| p.to).collect(),
        };
        if let Err(e) = executor.register_environment(&spec).await {
            if !matches!(e, BackendError::InvalidRequest(_))
                || (!spec.network_access && spec.exposed_ports.is_empty())
            {
                return Err(runtime_error("registering the environment", e));
            }
            warn!(alloc_id = %launch.alloc_id, error = %e, "the local backend has no networking; the allocation runs with loopback only and its ports are not reachable");
            spec.network_access = false;
            spec.exposed_ports.clear();
            executor
                .register_environment(&spec)
                .await
                .map_err(|e| runtime_error("registering the environment", e))?;
        }
        let created = executor
            .create_runner(&spec)
            .await
            .map_err(|e| runtime_error("creating the sandbox", e))?;
        Ok(created.into_info())
    }

    async fn destroy(&self, record: &AllocRecord) {
        let runner = RunnerId::from(record.runner.as_str());
        if let Err(e) = self
            .inner
            .executor
            .destroy_runner(&runner, &DestroyReason::ApiRequest)
            .await
        {
            warn!(runner_id = %runner, error = %e, "destroying an allocation's sandbox failed");
        }
        if let Some(environment) = EnvironmentId::new(record.environment) {
            let _ = self.inner.executor.delete_environment(environment).await;
        }
    }

    fn register_session(&self, alloc_id: &str) -> (u64, watch::Receiver<Option<SessionEnd>>) {
        let id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        lock(&self.inner.sessions)
            .entry(alloc_id.to_string())
            .or_default()
            .insert(id, tx);
        (id, rx)
    }

    fn forget_session(&self, alloc_id: &str, id: u64) {
        let mut sessions = lock(&self.inner.sessions);
        if let Some(of_alloc) = sessions.get_mut(alloc_id) {
            of_alloc.remove(&id);
            if of_alloc.is_empty() {
                sessions.remove(alloc_id);
            }
        }
    }
}

#[async_trait]
impl AllocationRuntime for SandboxRuntime {
    async fn start(&self, launch: &TaskLaunch) -> Result<(), RuntimeError> {
        let _serial = self.inner.lifecycle.lock().await;
        let existing = lock(&self.inner.allocs)
            .get(&launch.alloc_id)
            .map(|a| (a.record.clone(), a.forwarders.is_empty()));
        let mapped = match existing {
            Some((record, needs_forwarders)) if self.runner_alive(&record).await => {
                let mut record = record;
                record.env = launch.env.clone();
                if let Some(a) = lock(&self.inner.allocs).get_mut(&launch.alloc_id) {
                    a.record = record.clone();
                }
                self.persist()?;
                if !needs_forwarders || launch.ports.is_empty() {
                    return Ok(());
                }
                // Recovered after a restart: its ports need their forwarders again.
                let environment = EnvironmentId::new(record.environment)
                    .ok_or_else(|| RuntimeError("bad environment record".into()))?;
                self.inner
                    .executor
                    .load_runners(environment)
                    .await
                    .map_err(|e| runtime_error("loading the sandbox", e))?
                    .into_iter()
                    .find(|r| r.info.id.as_str() == record.runner)
                    .map(|r| r.info.mapped_ports)
                    .unwrap_or_default()
            }
            stale => {
                if let Some((record, _)) = stale {
                    // Its sandbox died: remove what is left before making a new one.
                    self.destroy(&record).await;
                }
                let info = self.create(launch).await?;
                let record = AllocRecord {
                    runner: info.id.to_string(),
                    environment: info.environment.get(),
                    env: launch.env.clone(),
                };
                lock(&self.inner.allocs).insert(
                    launch.alloc_id.clone(),
                    Alloc {
                        record: record.clone(),
                        forwarders: Vec::new(),
                    },
                );
                if let Err(e) = self.persist() {
                    lock(&self.inner.allocs).remove(&launch.alloc_id);
                    self.destroy(&record).await;
                    return Err(e);
                }
                debug!(alloc_id = %launch.alloc_id, runner_id = %info.id, "allocation sandbox created");
                info.mapped_ports
            }
        };
        let mut forwarders = Vec::new();
        for port in &launch.ports {
            let Some(target) = mapped.iter().find(|m| m.exposed_port == port.to) else {
                continue;
            };
            let forwarder =
                Forwarder::start(&port.host_ip, port.host_port, target.host_address.clone())
                    .await
                    .map_err(|e| {
                        runtime_error(
                            &format!(
                                "forwarding {}:{} to the task's port {}",
                                port.host_ip, port.host_port, port.to
                            ),
                            e,
                        )
                    })?;
            forwarders.push(forwarder);
        }
        if let Some(a) = lock(&self.inner.allocs).get_mut(&launch.alloc_id) {
            a.forwarders = forwarders;
        }
        Ok(())
    }

    async fn end_sessions(&self, alloc_id: &str, end: SessionEnd) {
        if let Some(of_alloc) = lock(&self.inner.sessions).get(alloc_id) {
            for session in of_alloc.values() {
                session.send_replace(Some(end));
            }
        }
    }

    async fn stop(&self, alloc_id: &str) {
        self.end_sessions(alloc_id, SessionEnd::Reset).await;
        let _serial = self.inner.lifecycle.lock().await;
        let removed = lock(&self.inner.allocs).remove(alloc_id);
        let Some(alloc) = removed else {
            return;
        };
        drop(alloc.forwarders);
        if let Err(e) = self.persist() {
            warn!(alloc_id, error = %e, "forgetting a stopped allocation failed");
        }
        self.destroy(&alloc.record).await;
    }

    async fn exec(&self, socket: WebSocket, session: ExecSession) {
        let found = lock(&self.inner.allocs)
            .get(&session.alloc_id)
            .map(|a| a.record.clone());
        let Some(record) = found else {
            let reason = format!("task {:?} is not running.", session.task);
            exec::websocket::close_with(socket, 1008, &reason).await;
            return;
        };
        let request = SpawnRequest {
            argv: session.argv.clone(),
            tty: session.tty,
            // Nomad runs exec as the task's user: root in Poseidon's images.
            privileged: true,
            env: record.env.into_iter().collect(),
        };
        let runner = RunnerId::from(record.runner.as_str());
        let process = match self.inner.executor.spawn(&runner, request).await {
            Ok(p) => p,
            Err(e) => {
                let code = if matches!(e, BackendError::InvalidRequest(_)) {
                    1008
                } else {
                    1011
                };
                exec::websocket::close_with(socket, code, &e.to_string()).await;
                return;
            }
        };
        let (id, end) = self.register_session(&session.alloc_id);
        let io = process::exec_io(process);
        let ending = exec::websocket::serve(socket, io, session.fault, end).await;
        debug!(alloc_id = %session.alloc_id, ?ending, "exec session ended");
        self.forget_session(&session.alloc_id, id);
    }

    async fn surviving(&self) -> Vec<String> {
        let records: Vec<(String, AllocRecord)> = lock(&self.inner.allocs)
            .iter()
            .map(|(id, a)| (id.clone(), a.record.clone()))
            .collect();
        let mut alive = Vec::new();
        for (id, record) in records {
            if self.runner_alive(&record).await {
                alive.push(id);
            }
        }
        alive.sort();
        alive
    }

    fn events(&self) -> BoxStream<'static, RuntimeEvent> {
        let inner = Arc::downgrade(&self.inner);
        self.inner
            .executor
            .events()
            .filter_map(move |event| {
                let inner = inner.clone();
                async move {
                    let BackendEvent::RunnerStopped { runner, reason } = event else {
                        return None;
                    };
                    let inner = inner.upgrade()?;
                    let alloc_id = lock(&inner.allocs)
                        .iter()
                        .find(|(_, a)| a.record.runner == runner.as_str())
                        .map(|(id, _)| id.clone())?;
                    let oom_killed = reason == DestroyReason::OomKilled;
                    warn!(alloc_id, runner_id = %runner, %reason, "an allocation's sandbox died");
                    Some(RuntimeEvent::TaskDied {
                        alloc_id,
                        exit_code: if oom_killed {
                            OOM_EXIT_CODE
                        } else {
                            DIED_EXIT_CODE
                        },
                        oom_killed,
                    })
                }
            })
            .boxed()
    }
}
