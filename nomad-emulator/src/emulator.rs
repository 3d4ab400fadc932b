//! The emulator instance: shared state, background actors, the HTTP server and its lifecycle.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::client::{self, Exit};
use crate::config::EmulatorConfig;
use crate::control::{Control, RecordedRequest};
use crate::events::Broker;
use crate::faults::Faults;
use crate::model::Node;
use crate::runtime::{AllocationRuntime, RuntimeEvent};
use crate::state::{State, Txn};
use crate::{api, persist, scheduler};

/// Why the emulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The state in `data_dir` could not be read.
    #[error("cannot load the state in {path}: {reason}")]
    Load {
        /// The file.
        path: String,
        /// The cause.
        reason: String,
    },
}

/// Per-connection controls the fault injector uses to drop a connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnCtx {
    pub reset: Arc<AtomicBool>,
    pub cancel: CancellationToken,
}

/// How many requests `Control::requests` keeps.
const REQUEST_LOG_LIMIT: usize = 100_000;

/// Everything the actors and handlers share.
#[derive(Debug)]
pub(crate) struct Inner {
    pub config: EmulatorConfig,
    state: Mutex<State>,
    pub runtime: Arc<dyn AllocationRuntime>,
    faults: Mutex<Faults>,
    held: Mutex<BTreeMap<String, u64>>,
    pub sched_tx: mpsc::UnboundedSender<String>,
    pub addr: SocketAddr,
    pub stall_tx: watch::Sender<bool>,
    pub paused_until: Mutex<Option<Instant>>,
    pub shutdown: CancellationToken,
    pub requests: Mutex<VecDeque<RecordedRequest>>,
    tasks: TaskTracker,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Inner {
    /// The cluster state (never held across an await).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        relock(&self.state)
    }
    /// The armed faults.
    pub fn faults(&self) -> MutexGuard<'_, Faults> {
        relock(&self.faults)
    }
    /// Allocations held pending: id to epoch.
    pub fn held(&self) -> MutexGuard<'_, BTreeMap<String, u64>> {
        relock(&self.held)
    }
    /// Runs a background task that ends with the emulator.
    pub fn spawn(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        let stop = self.shutdown.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = fut => {}
            }
        });
    }
    /// Sleeps `d`; false when the emulator shut down meanwhile.
    pub async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
    /// Records a request (bounded log).
    pub fn record(&self, r: RecordedRequest) {
        let mut log = relock(&self.requests);
        log.push_back(r);
        while log.len() > REQUEST_LOG_LIMIT {
            log.pop_front();
        }
    }
    /// Whether the server is in a simulated restart's downtime.
    pub fn paused(&self) -> bool {
        let mut p = relock(&self.paused_until);
        match *p {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *p = None;
                false
            }
            None => false,
        }
    }
    /// Pauses the HTTP API for `d`.
    pub fn pause_for(&self, d: Duration) {
        *relock(&self.paused_until) = Some(Instant::now() + d);
    }
}

/// A running emulator. Dropping it without [`NomadEmulator::shutdown`] stops it too.
#[derive(Debug)]
pub struct NomadEmulator {
    inner: Arc<Inner>,
}

/// A TCP stream that is reset (`SO_LINGER` 0) instead of closed when its connection is dropped
/// by a fault.
struct ResettableStream {
    inner: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ResettableStream {
    fn drop(&mut self) {
        if self.reset.load(Ordering::SeqCst) {
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn serve(listener: TcpListener, router: axum::Router, inner: Arc<Inner>) {
    loop {
        let (stream, _) = tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let ctx = ConnCtx {
            reset: Arc::new(AtomicBool::new(false)),
            cancel: CancellationToken::new(),
        };
        let io = TokioIo::new(ResettableStream {
            inner: stream,
            reset: ctx.reset.clone(),
        });
        let ctx2 = ctx.clone();
        let svc = router.clone().map_request(
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ctx2.clone());
                req
            },
        );
        let shutdown = inner.shutdown.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, TowerToHyperService::new(svc))
                .with_upgrades();
            tokio::select! {
                r = conn => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                _ = ctx.cancel.cancelled() => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

impl NomadEmulator {
    /// Binds `config.address:config.port`, loads or creates the cluster, and serves Nomad's API
    /// until [`NomadEmulator::shutdown`]. Allocations run on `runtime`.
    pub async fn start(
        config: EmulatorConfig,
        runtime: Arc<dyn AllocationRuntime>,
    ) -> Result<NomadEmulator, EmulatorError> {
        let want = SocketAddr::new(config.address, config.port);
        let listener = TcpListener::bind(want)
            .await
            .map_err(|source| EmulatorError::Bind { addr: want, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| EmulatorError::Bind { addr: want, source })?;
        let persisted = match &config.data_dir {
            Some(dir) => persist::load(dir).map_err(|reason| EmulatorError::Load {
                path: persist::file(dir).display().to_string(),
                reason,
            })?,
            None => None,
        };
        let broker = Broker::new(config.event_buffer_size, config.subscriber_buffer);
        let mut state = State::new(config.namespaces.clone(), broker, addr.to_string());
        let restored = persisted.is_some();
        if let Some(p) = persisted {
            state.restore(p);
        } else {
            let mut tx = Txn::new("NodeRegistration");
            for (i, spec) in config.nodes.iter().enumerate() {
                let id = crate::model::new_id();
                state.nodes.insert(
                    id.clone(),
                    Node {
                        id: id.clone(),
                        name: spec.name.clone(),
                        status: "ready".into(),
                        cpu_mhz: spec.cpu_mhz,
                        memory_mb: spec.memory_mb,
                        create_index: 0,
                        modify_index: 0,
                        status_updated_at: crate::model::now_ns() + i64::try_from(i).unwrap_or(0),
                    },
                );
                tx.node(&id);
            }
            state.commit(tx);
        }
        let (sched_tx, sched_rx) = mpsc::unbounded_channel();
        let (stall_tx, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            config,
            state: Mutex::new(state),
            runtime,
            faults: Mutex::new(Faults::default()),
            held: Mutex::new(BTreeMap::new()),
            sched_tx,
            addr,
            stall_tx,
            paused_until: Mutex::new(None),
            shutdown: CancellationToken::new(),
            requests: Mutex::new(VecDeque::new()),
            tasks: TaskTracker::new(),
        });
        inner.spawn(scheduler::run(inner.clone(), sched_rx));
        let mut runtime_events = inner.runtime.events();
        let inner2 = inner.clone();
        inner.spawn(async move {
            while let Some(ev) = runtime_events.next().await {
                match ev {
                    RuntimeEvent::TaskDied {
                        alloc_id,
                        exit_code,
                        oom_killed,
                    } => {
                        let exit = if oom_killed {
                            Exit::Oom
                        } else {
                            Exit::Crash(exit_code)
                        };
                        client::task_exit(&inner2, &alloc_id, exit);
                    }
                }
            }
        });
        if let Some(dir) = inner.config.data_dir.clone() {
            inner.spawn(persist::writer(inner.clone(), dir));
        }
        let router = api::router(inner.clone());
        tokio::spawn(serve(listener, router, inner.clone()));
        if restored {
            recover(&inner).await;
        }
        tracing::info!(%addr, "nomad emulator listening");
        Ok(NomadEmulator { inner })
    }

    /// `http://host:port`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// The address it listens on.
    pub fn address(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The fault-injection and observation handle.
    pub fn control(&self) -> Control {
        Control::new(self.inner.clone())
    }

    /// Stops serving, ends every stream and background task, and writes the state a last time.
    pub async fn shutdown(self) {
        self.inner.lock().broker.drop_all();
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        if let Some(dir) = &self.inner.config.data_dir {
            let snapshot = self.inner.lock().persisted();
            if let Err(e) = persist::save(dir, &snapshot) {
                tracing::warn!(error = %e, "final state write failed");
            }
        }
    }
}

impl Drop for NomadEmulator {
    fn drop(&mut self) {
        self.inner.shutdown.cancel();
    }
}

/// After a reload from `data_dir`: live allocations whose sandbox survived keep running, the
/// others failed with their task (then the reschedule policy applies); queued work resumes.
async fn recover(inner: &Arc<Inner>) {
    let surviving = inner.runtime.surviving().await;
    let (live, stopping, pending_evals) = {
        let st = inner.lock();
        let live: Vec<(String, String)> = st
            .allocs
            .values()
            .filter(|a| a.desired_status == "run" && !a.client_terminal())
            .map(|a| (a.id.clone(), a.client_status.clone()))
            .collect();
        let stopping: Vec<String> = st
            .allocs
            .values()
            .filter(|a| a.desired_status != "run" && !a.client_terminal())
            .map(|a| a.id.clone())
            .collect();
        let evals: Vec<(String, Option<i64>)> = st
            .evals
            .values()
            .filter(|e| e.status == "pending")
            .map(|e| (e.id.clone(), e.wait_until))
            .collect();
        (live, stopping, evals)
    };
    for (id, status) in live {
        if !surviving.contains(&id) {
            client::task_exit(inner, &id, Exit::SandboxLost);
            continue;
        }
        let launch = {
            let st = inner.lock();
            st.allocs
                .get(&id)
                .map(|a| (client::launch(a, "global"), a.epoch))
        };
        let Some((launch, epoch)) = launch else {
            continue;
        };
        match inner.runtime.start(&launch).await {
            Err(e) => {
                client::task_exit(inner, &id, Exit::DriverFailure(e.0));
            }
            Ok(()) if status != "running" => client::finish_start(inner, &id, epoch),
            Ok(()) => {}
        }
    }
    for id in stopping {
        client::stop(inner, id);
    }
    for (id, wait) in pending_evals {
        scheduler::enqueue(inner, id, wait);
    }
}
