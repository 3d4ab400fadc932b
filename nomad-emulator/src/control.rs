//! Fault injection and observation (nomad.md §5.9): the Rust [`Control`] handle and the same
//! operations over HTTP under [`PREFIX`] (JSON bodies; the token rule of the API applies), so
//! black-box tests of another process can drive the emulator.
//!
//! Every injected fault is counted ([`Times`]) or one-shot; request faults that fired are
//! visible in [`Control::requests`] (`RecordedRequest::fault`).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::client::{self, Exit};
use crate::config::NodeSpec;
use crate::emulator::Inner;
use crate::events::EventBatch;
use crate::faults::{Match, RequestFault, Times};
use crate::model::{Eval, Node, new_id, now_ns};
use crate::runtime::{ExecFault, SessionEnd};
use crate::scheduler;
use crate::shapes;
use crate::state::Txn;

/// The path prefix of the HTTP control API.
pub const PREFIX: &str = "/emulator/v1";

/// One request the emulator received (control API requests are not recorded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedRequest {
    /// The HTTP method.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The raw query string.
    pub query: String,
    /// Every header as received.
    pub headers: Vec<(String, String)>,
    /// The body (lossy UTF-8).
    pub body: String,
    /// The request fault that fired on it, if any.
    pub fault: Option<RequestFault>,
}

/// `wait_for` ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("condition not met within {0:?}")]
pub struct WaitTimeout(pub Duration);

/// The control handle of one emulator. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Control {
    inner: Arc<Inner>,
}

impl Control {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Self { inner }
    }

    /// Answers the next `times` requests matching `m` with `status` and the plain-text `message`.
    pub fn fail_requests(&self, m: Match, times: Times, status: u16, message: impl Into<String>) {
        self.inner.faults().add_request(
            m,
            times,
            RequestFault::Fail {
                status,
                message: message.into(),
            },
        );
    }

    /// Delays the next `times` requests matching `m` by `delay`.
    pub fn delay_requests(&self, m: Match, times: Times, delay: Duration) {
        self.inner
            .faults()
            .add_request(m, times, RequestFault::Delay(delay));
    }

    /// Resets the connection of the next `times` requests matching `m` without an answer.
    pub fn drop_connection(&self, m: Match, times: Times) {
        self.inner
            .faults()
            .add_request(m, times, RequestFault::Drop);
    }

    /// Rejects the next `times` event-stream subscriptions with `status`.
    pub fn reject_event_streams(&self, times: Times, status: u16) {
        self.fail_requests(
            Match::path("/v1/event/stream"),
            times,
            status,
            "event stream rejected by fault injection",
        );
    }

    /// Ends every open event stream abruptly (the client sees EOF mid-body).
    pub fn drop_event_streams(&self) {
        self.inner.lock().broker.drop_all();
    }

    /// While `true`, open event streams send nothing, not even heartbeats.
    pub fn stall_event_streams(&self, stalled: bool) {
        self.inner.stall_tx.send_replace(stalled);
    }

    /// Forgets the buffered batches. A client resuming from an index that is gone starts at
    /// the oldest batch still available; it detects the gap because the first batch's `Index`
    /// is larger than the index it asked for (Nomad says nothing either).
    pub fn truncate_event_buffer(&self) {
        self.inner.lock().broker.truncate();
    }

    /// Keeps new allocations of jobs starting with `job_prefix` pending until released.
    pub fn hold_pending(&self, job_prefix: &str) {
        self.inner.faults().hold(job_prefix.to_owned());
    }

    /// Lets held allocations of jobs starting with `job_prefix` run.
    pub fn release_pending(&self, job_prefix: &str) {
        self.inner.faults().unhold(job_prefix);
        client::release(&self.inner, job_prefix);
    }

    /// The next `times` task starts of jobs starting with `job_prefix` fail with a
    /// `Driver Failure` event carrying `message`; the restart policy applies.
    pub fn fail_start(&self, job_prefix: &str, message: &str, times: Times) {
        self.inner
            .faults()
            .add_fail_start(job_prefix.to_owned(), message.to_owned(), times);
    }

    /// The allocation's task exits with `exit_code`; false when it is not live.
    pub fn crash_task(&self, alloc_id: &str, exit_code: i32) -> bool {
        client::task_exit(&self.inner, alloc_id, Exit::Crash(exit_code))
    }

    /// The allocation's task is OOM-killed (exec sessions get `oom_exec_exit_code`).
    pub fn oom_kill(&self, alloc_id: &str) -> bool {
        client::task_exit(&self.inner, alloc_id, Exit::Oom)
    }

    /// Restarts the allocation's task in place, as `nomad alloc restart` does.
    pub fn restart_task(&self, alloc_id: &str) -> bool {
        client::task_exit(&self.inner, alloc_id, Exit::UserRestart)
    }

    fn set_node(&self, node_id: &str, kind: &'static str, f: impl FnOnce(&mut Node)) -> bool {
        let mut st = self.inner.lock();
        let Some(n) = st.nodes.get_mut(node_id) else {
            return false;
        };
        f(n);
        n.status_updated_at = now_ns();
        let mut tx = Txn::new(kind);
        tx.node(node_id);
        st.commit(tx);
        true
    }

    /// The node goes `down`: its exec sessions are reset, `node-update` evaluations mark its
    /// allocations `lost` and place replacements elsewhere (blocked when there is no room).
    pub fn lose_node(&self, node_id: &str) -> bool {
        if !self.set_node(node_id, "NodeStreamEvent", |n| n.status = "down".into()) {
            return false;
        }
        let (allocs, evals) = {
            let mut st = self.inner.lock();
            let node_index = st.nodes.get(node_id).map_or(0, |n| n.modify_index);
            let mut jobs = std::collections::BTreeSet::new();
            let mut allocs = Vec::new();
            for a in st.allocs.values_mut() {
                if a.node_id == node_id && !a.is_terminal() {
                    a.epoch += 1;
                    allocs.push(a.id.clone());
                    jobs.insert((a.namespace.clone(), a.job_id.clone(), a.job_type.clone()));
                }
            }
            let mut tx = Txn::new("EvaluationUpdated");
            let mut evals = Vec::new();
            for (ns, job, ty) in jobs {
                let mut e = Eval::pending(&ns, &job, &ty, 50, "node-update");
                e.node_id = node_id.to_owned();
                e.node_modify_index = node_index;
                if let Some(j) = st.jobs.get(&(ns, job)) {
                    e.priority = j.priority();
                    e.job_modify_index = j.job_modify_index;
                }
                tx.eval(&e.id);
                evals.push(e.id.clone());
                st.evals.insert(e.id.clone(), e);
            }
            st.commit(tx);
            (allocs, evals)
        };
        for id in allocs {
            let inner = self.inner.clone();
            self.inner.spawn(async move {
                inner.runtime.end_sessions(&id, SessionEnd::Reset).await;
            });
        }
        for e in evals {
            scheduler::enqueue(&self.inner, e, None);
        }
        true
    }

    /// The node is `ready` again; blocked evaluations are retried.
    pub fn restore_node(&self, node_id: &str) -> bool {
        let ok = self.set_node(node_id, "NodeStreamEvent", |n| n.status = "ready".into());
        if ok {
            scheduler::unblock(&self.inner);
        }
        ok
    }

    /// Registers a new ready node; blocked evaluations are retried. Returns its ID.
    pub fn add_node(&self, spec: NodeSpec) -> String {
        let id = new_id();
        {
            let mut st = self.inner.lock();
            st.nodes.insert(
                id.clone(),
                Node {
                    id: id.clone(),
                    name: spec.name,
                    status: "ready".into(),
                    cpu_mhz: spec.cpu_mhz,
                    memory_mb: spec.memory_mb,
                    create_index: 0,
                    modify_index: 0,
                    status_updated_at: now_ns(),
                },
            );
            let mut tx = Txn::new("NodeRegistration");
            tx.node(&id);
            st.commit(tx);
        }
        scheduler::unblock(&self.inner);
        id
    }

    /// Sets a node's schedulable capacity (0 makes placements fail); blocked evaluations are
    /// retried.
    pub fn set_capacity(&self, node_id: &str, cpu_mhz: u64, memory_mb: u64) -> bool {
        let ok = self.set_node(node_id, "NodeRegistration", |n| {
            n.cpu_mhz = cpu_mhz;
            n.memory_mb = memory_mb;
        });
        if ok {
            scheduler::unblock(&self.inner);
        }
        ok
    }

    /// The nodes, as `GET /v1/node/:id` shows them, in creation order.
    pub fn nodes(&self) -> Vec<Value> {
        let st = self.inner.lock();
        let mut nodes: Vec<_> = st.nodes.values().collect();
        nodes.sort_by_key(|n| n.create_index);
        nodes
            .into_iter()
            .map(|n| shapes::node(n, &st.http_addr))
            .collect()
    }

    /// Simulates a server restart: every event stream ends, the event buffer is forgotten (the
    /// raft index and the state stay), and the API answers `503 No cluster leader` for
    /// `downtime`.
    pub fn restart_server(&self, downtime: Duration) {
        {
            let mut st = self.inner.lock();
            st.broker.drop_all();
            st.broker.truncate();
        }
        self.inner.pause_for(downtime);
    }

    /// The next `times` exec sessions (of `alloc_id`, or any) close normally with `code`
    /// instead of sending `exited`.
    pub fn exec_close_before_exit(&self, alloc_id: Option<&str>, times: Times, code: u16) {
        self.inner.faults().add_exec(
            alloc_id.map(str::to_owned),
            ExecFault::CloseBeforeExit(code),
            times,
        );
    }

    /// The next `times` exec sessions (of `alloc_id`, or any) are dropped after `frames`
    /// output frames.
    pub fn exec_drop_after_frames(&self, alloc_id: Option<&str>, times: Times, frames: usize) {
        self.inner.faults().add_exec(
            alloc_id.map(str::to_owned),
            ExecFault::DropAfterFrames(frames),
            times,
        );
    }

    /// Every request received so far (oldest first).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner
            .requests
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every event batch committed so far (not only the buffered ones).
    pub fn events(&self) -> Vec<EventBatch> {
        self.inner.lock().broker.history()
    }

    /// The allocations of job `job_id` (any namespace) as `GET /v1/allocation/:id` shows them,
    /// newest first.
    pub fn allocs(&self, job_id: &str) -> Vec<Value> {
        let st = self.inner.lock();
        let mut allocs: Vec<_> = st.allocs.values().filter(|a| a.job_id == job_id).collect();
        allocs.sort_by_key(|a| std::cmp::Reverse(a.create_index));
        allocs.into_iter().map(|a| shapes::alloc(a, true)).collect()
    }

    /// The job `job_id` (any namespace) as `GET /v1/job/:id` shows it.
    pub fn job(&self, job_id: &str) -> Option<Value> {
        let st = self.inner.lock();
        st.jobs.values().find(|j| j.id == job_id).map(shapes::job)
    }

    /// The evaluations of job `job_id`, oldest first.
    pub fn evals(&self, job_id: &str) -> Vec<Value> {
        let st = self.inner.lock();
        let mut evals: Vec<_> = st.evals.values().filter(|e| e.job_id == job_id).collect();
        evals.sort_by_key(|e| e.create_index);
        evals.into_iter().map(shapes::eval).collect()
    }

    /// The current raft index.
    pub fn index(&self) -> u64 {
        self.inner.lock().index
    }

    /// Waits until `pred` holds (checked after every commit and every 20 ms), at most `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&Control) -> bool,
    ) -> Result<(), WaitTimeout> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.inner.lock().index_tx.subscribe();
        loop {
            if pred(self) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(WaitTimeout(timeout));
            }
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}

// ---- HTTP control API ----

type Shared = Arc<Inner>;

/// A JSON body parsed whatever its `Content-Type` (as Nomad does); an empty body is `{}`.
struct LooseJson<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S>
    for LooseJson<T>
{
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let bytes = if bytes.is_empty() {
            axum::body::Bytes::from_static(b"{}")
        } else {
            bytes
        };
        serde_json::from_slice(&bytes)
            .map(LooseJson)
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()).into_response())
    }
}

fn ok() -> Response {
    Json(json!({"ok": true})).into_response()
}

fn not_found(what: &str) -> Response {
    (StatusCode::NOT_FOUND, format!("{what} not found")).into_response()
}

/// Body of `POST /emulator/v1/faults/requests`.
#[derive(Debug, Deserialize)]
struct RequestFaultBody {
    #[serde(default)]
    method: Option<String>,
    path: String,
    #[serde(default)]
    times: Option<u32>,
    /// `fail` (default), `delay` or `drop`.
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    delay_ms: Option<u64>,
}

async fn add_request_fault(
    State(inner): State<Shared>,
    LooseJson(b): LooseJson<RequestFaultBody>,
) -> Response {
    let c = Control::new(inner);
    let m = Match {
        method: b.method,
        path: b.path,
    };
    let times = Times(b.times.unwrap_or(1));
    match b.action.as_deref().unwrap_or("fail") {
        "fail" => c.fail_requests(
            m,
            times,
            b.status.unwrap_or(500),
            b.message.unwrap_or_else(|| "injected fault".into()),
        ),
        "delay" => c.delay_requests(m, times, Duration::from_millis(b.delay_ms.unwrap_or(0))),
        "drop" => c.drop_connection(m, times),
        other => {
            return (StatusCode::BAD_REQUEST, format!("unknown action {other:?}")).into_response();
        }
    }
    ok()
}

#[derive(Debug, Deserialize)]
struct StallBody {
    stalled: bool,
}

#[derive(Debug, Deserialize)]
struct RejectBody {
    #[serde(default)]
    times: Option<u32>,
    #[serde(default)]
    status: Option<u16>,
}

#[derive(Debug, Deserialize)]
struct PrefixBody {
    job_prefix: String,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    times: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
struct CrashBody {
    #[serde(default)]
    exit_code: Option<i32>,
}

#[derive(Debug, Deserialize)]
struct NodeBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    cpu: Option<u64>,
    #[serde(default)]
    memory_mb: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct RestartBody {
    #[serde(default)]
    downtime_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct ExecFaultBody {
    #[serde(default)]
    alloc_id: Option<String>,
    #[serde(default)]
    times: Option<u32>,
    #[serde(default)]
    close_before_exit: Option<u16>,
    #[serde(default)]
    drop_after_frames: Option<usize>,
}

async fn alloc_action(
    State(inner): State<Shared>,
    Path((id, action)): Path<(String, String)>,
    LooseJson(body): LooseJson<CrashBody>,
) -> Response {
    let c = Control::new(inner);
    let done = match action.as_str() {
        "oom" => c.oom_kill(&id),
        "crash" => c.crash_task(&id, body.exit_code.unwrap_or(1)),
        "restart" => c.restart_task(&id),
        _ => return not_found("action"),
    };
    if done {
        ok()
    } else {
        not_found("live allocation")
    }
}

async fn node_action(
    State(inner): State<Shared>,
    Path((id, action)): Path<(String, String)>,
    LooseJson(body): LooseJson<NodeBody>,
) -> Response {
    let c = Control::new(inner);
    let done = match action.as_str() {
        "lose" => c.lose_node(&id),
        "restore" => c.restore_node(&id),
        "capacity" => {
            let cpu = body.cpu.unwrap_or(0);
            let mem = body.memory_mb.unwrap_or(0);
            c.set_capacity(&id, cpu, mem)
        }
        _ => return not_found("action"),
    };
    if done { ok() } else { not_found("node") }
}

/// The control API's routes.
pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route(
            "/emulator/v1/requests",
            get(|State(i): State<Shared>| async move { Json(Control::new(i).requests()) }).delete(
                |State(i): State<Shared>| async move {
                    if let Ok(mut r) = i.requests.lock() {
                        r.clear();
                    }
                    ok()
                },
            ),
        )
        .route(
            "/emulator/v1/events",
            get(|State(i): State<Shared>| async move { Json(Control::new(i).events()) }),
        )
        .route("/emulator/v1/faults/requests", post(add_request_fault))
        .route(
            "/emulator/v1/event-streams/drop",
            post(|State(i): State<Shared>| async move {
                Control::new(i).drop_event_streams();
                ok()
            }),
        )
        .route(
            "/emulator/v1/event-streams/stall",
            post(
                |State(i): State<Shared>, LooseJson(b): LooseJson<StallBody>| async move {
                    Control::new(i).stall_event_streams(b.stalled);
                    ok()
                },
            ),
        )
        .route(
            "/emulator/v1/event-streams/reject",
            post(
                |State(i): State<Shared>, LooseJson(b): LooseJson<RejectBody>| async move {
                    Control::new(i)
                        .reject_event_streams(Times(b.times.unwrap_or(1)), b.status.unwrap_or(500));
                    ok()
                },
            ),
        )
        .route(
            "/emulator/v1/event-buffer/truncate",
            post(|State(i): State<Shared>| async move {
                Control::new(i).truncate_event_buffer();
                ok()
            }),
        )
        .route(
            "/emulator/v1/jobs/hold",
            post(
                |State(i): State<Shared>, LooseJson(b): LooseJson<PrefixBody>| async move {
                    Control::new(i).hold_pending(&b.job_prefix);
                    ok()
                },
            ),
        )
        .route(
            "/emulator/v1/jobs/release",
            post(
                |State(i): State<Shared>, LooseJson(b): LooseJson<PrefixBody>| async move {
                    Control::new(i).release_pending(&b.job_prefix);
                    ok()
                },
            ),
        )
        .route(
            "/emulator/v1/jobs/fail-start",
            post(
                |State(i): State<Shared>, LooseJson(b): LooseJson<PrefixBody>| async move {
                    Control::new(i).fail_start(
                        &b.job_prefix,
                        b.message.as_deref().unwrap_or("Failed to start task"),
                        Times(b.times.unwrap_or(1)),
                    );
                    ok()
                },
            ),
        )
        .route("/emulator/v1/allocations/{id}/{action}", post(alloc_action))
        .route(
            "/emulator/v1/nodes",
            get(|State(i): State<Shared>| async move { Json(Control::new(i).nodes()) }).post(
                |State(i): State<Shared>, LooseJson(b): LooseJson<NodeBody>| async move {
                    let mut spec = NodeSpec::named(
                        b.name
                            .unwrap_or_else(|| format!("emu-node-{}", &new_id()[..8])),
                    );
                    if let Some(c) = b.cpu {
                        spec.cpu_mhz = c;
                    }
                    if let Some(m) = b.memory_mb {
                        spec.memory_mb = m;
                    }
                    Json(json!({"ID": Control::new(i).add_node(spec)}))
                },
            ),
        )
        .route("/emulator/v1/nodes/{id}/{action}", post(node_action))
        .route(
            "/emulator/v1/restart",
            post(
                |State(i): State<Shared>, LooseJson(b): LooseJson<RestartBody>| async move {
                    Control::new(i)
                        .restart_server(Duration::from_millis(b.downtime_ms.unwrap_or(200)));
                    ok()
                },
            ),
        )
        .route(
            "/emulator/v1/exec-faults",
            post(
                |State(i): State<Shared>, LooseJson(b): LooseJson<ExecFaultBody>| async move {
                    let c = Control::new(i);
                    let times = Times(b.times.unwrap_or(1));
                    if let Some(code) = b.close_before_exit {
                        c.exec_close_before_exit(b.alloc_id.as_deref(), times, code);
                    } else if let Some(n) = b.drop_after_frames {
                        c.exec_drop_after_frames(b.alloc_id.as_deref(), times, n);
                    } else {
                        return (
                            StatusCode::BAD_REQUEST,
                            "close_before_exit or drop_after_frames required",
                        )
                            .into_response();
                    }
                    ok()
                },
            ),
        )
}
