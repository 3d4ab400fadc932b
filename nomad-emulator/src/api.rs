//! Nomad's HTTP API (nomad.md §5.4): router, the request pipeline (downtime, recording, faults,
//! token) and the handlers of jobs, allocations, evaluations, nodes and the status endpoints.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde_json::{Value, json};

use crate::blocking::{block, parse_go_duration};
use crate::canonical::{self, canonicalize, spec_changed};
use crate::control::{self, RecordedRequest};
use crate::emulator::{ConnCtx, Inner};
use crate::faults::RequestFault;
use crate::model::{Eval, JobRecord, now_ns};
use crate::scheduler;
use crate::shapes;
use crate::state::{Table, Txn};
use crate::{client, exec_route, stream};

type Shared = Arc<Inner>;

/// An error answer: a status and Nomad's plain-text message.
#[derive(Debug)]
pub(crate) struct ApiError(pub StatusCode, pub String);

impl ApiError {
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, m.into())
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self(StatusCode::NOT_FOUND, m.into())
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self(StatusCode::INTERNAL_SERVER_ERROR, m.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        text(self.0, self.1)
    }
}

/// A plain-text answer.
pub(crate) fn text(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The query parameters every endpoint understands.
#[derive(Debug, Default, Clone)]
pub(crate) struct Params {
    pub all: Vec<(String, String)>,
    pub namespace: Option<String>,
    pub prefix: String,
    pub index: Option<u64>,
    pub wait: Option<Duration>,
    pub pretty: bool,
}

impl Params {
    pub fn parse(q: Vec<(String, String)>) -> Result<Self, ApiError> {
        let mut p = Params::default();
        for (k, v) in &q {
            match k.as_str() {
                "namespace" if !v.is_empty() => p.namespace = Some(v.clone()),
                "prefix" => p.prefix = v.clone(),
                "index" => {
                    p.index = Some(
                        v.parse()
                            .map_err(|_| ApiError::bad_request("Invalid index"))?,
                    );
                }
                "wait" => {
                    p.wait = Some(
                        parse_go_duration(v)
                            .ok_or_else(|| ApiError::bad_request("Invalid wait time"))?,
                    );
                }
                "pretty" => p.pretty = v.is_empty() || v == "true" || v == "1",
                _ => {}
            }
        }
        p.all = q;
        Ok(p)
    }
    pub fn flag(&self, k: &str) -> Option<bool> {
        self.all
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.is_empty() || v == "true" || v == "1")
    }
    pub fn ns(&self) -> String {
        self.namespace.clone().unwrap_or_else(|| "default".into())
    }
    fn ns_matches(&self, ns: &str) -> bool {
        let want = self.ns();
        want == "*" || want == ns
    }
}

fn json_body(v: &Value, pretty: bool) -> Body {
    let s = if pretty {
        serde_json::to_string_pretty(v)
    } else {
        serde_json::to_string(v)
    };
    Body::from(s.unwrap_or_else(|_| "null".into()))
}

/// A read answer with Nomad's query-meta headers.
pub(crate) fn read_response(index: u64, v: &Value, pretty: bool) -> Response {
    let mut r = Response::new(json_body(v, pretty));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert("X-Nomad-Index", HeaderValue::from(index));
    h.insert("X-Nomad-KnownLeader", HeaderValue::from_static("true"));
    h.insert("X-Nomad-LastContact", HeaderValue::from_static("0"));
    r
}

/// A write answer with `X-Nomad-Index`.
fn write_response(index: u64, v: &Value) -> Response {
    let mut r = Response::new(json_body(v, false));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert("X-Nomad-Index", HeaderValue::from(index));
    r
}

/// Whether the request carries the configured token (`X-Nomad-Token` or a bearer token).
pub(crate) fn token_ok(inner: &Inner, headers: &HeaderMap) -> bool {
    let Some(want) = &inner.config.token else {
        return true;
    };
    let got = headers
        .get("X-Nomad-Token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_owned)
        });
    got.as_deref() == Some(want.as_str())
}

/// Largest request body the emulator reads.
const BODY_LIMIT: usize = 32 << 20;

/// The pipeline in front of Nomad's routes: downtime, recording, faults, token.
async fn pipeline(State(inner): State<Shared>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    if path.starts_with(control::PREFIX) {
        if !token_ok(&inner, req.headers()) {
            return text(StatusCode::FORBIDDEN, "Permission denied".into());
        }
        return next.run(req).await;
    }
    if inner.paused() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "No cluster leader".into());
    }
    let method = req.method().to_string();
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, BODY_LIMIT).await else {
        return text(StatusCode::BAD_REQUEST, "Request body too large".into());
    };
    let fault = inner.faults().take_request(&method, &path);
    inner.record(RecordedRequest {
        method: method.clone(),
        path: path.clone(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: String::from_utf8_lossy(&bytes).into_owned(),
        fault: fault.clone(),
    });
    match fault {
        Some(RequestFault::Fail { status, message }) => {
            return text(
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                message,
            );
        }
        Some(RequestFault::Delay(d)) if !inner.sleep(d).await => {
            return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down".into());
        }
        Some(RequestFault::Drop) => {
            if let Some(ctx) = parts.extensions.get::<ConnCtx>() {
                ctx.reset.store(true, std::sync::atomic::Ordering::SeqCst);
                ctx.cancel.cancel();
                std::future::pending::<()>().await;
            }
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "connection dropped".into(),
            );
        }
        Some(RequestFault::Delay(_)) | None => {}
    }
    let is_exec = path.starts_with("/v1/client/allocation/") && path.ends_with("/exec");
    if !is_exec && !token_ok(&inner, &parts.headers) {
        return text(StatusCode::FORBIDDEN, "Permission denied".into());
    }
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    if resp.status() == StatusCode::METHOD_NOT_ALLOWED {
        return text(StatusCode::METHOD_NOT_ALLOWED, "Invalid method".into());
    }
    resp
}

/// The whole router: Nomad's routes, the control API, the pipeline.
pub(crate) fn router(inner: Shared) -> Router {
    Router::new()
        .route("/v1/jobs", get(list_jobs).put(register).post(register))
        .route("/v1/jobs/parse", any(parse_job))
        .route("/v1/job/{id}", get(read_job).delete(deregister))
        .route("/v1/job/{id}/allocations", get(job_allocations))
        .route("/v1/job/{id}/evaluations", get(job_evaluations))
        .route("/v1/allocations", get(list_allocations))
        .route("/v1/allocation/{id}", get(read_allocation))
        .route(
            "/v1/allocation/{id}/stop",
            post(stop_allocation).put(stop_allocation),
        )
        .route("/v1/evaluation/{id}", get(read_evaluation))
        .route("/v1/node/{id}", get(read_node))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/namespaces", get(list_namespaces))
        .route("/v1/namespace/{name}", get(read_namespace))
        .route("/v1/status/leader", get(leader))
        .route("/v1/agent/self", get(agent_self))
        .route("/v1/event/stream", get(stream::handler))
        .route("/v1/client/allocation/{id}/exec", get(exec_route::handler))
        .merge(control::routes())
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(middleware::from_fn_with_state(inner.clone(), pipeline))
        .with_state(inner)
}

type Q = Query<Vec<(String, String)>>;

fn params(q: Q) -> Result<Params, ApiError> {
    Params::parse(q.0)
}

async fn parse_job() -> ApiError {
    ApiError(
        StatusCode::NOT_IMPLEMENTED,
        "HCL parsing is not supported by the nomad emulator".into(),
    )
}

fn field<'a>(m: &'a Value, k: &str) -> Option<&'a Value> {
    m.get(k).filter(|v| !v.is_null())
}

async fn register(State(inner): State<Shared>, q: Q, body: Bytes) -> Result<Response, ApiError> {
    let p = params(q)?;
    let req: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let req = canonical::normalize_keys(req);
    let Some(job) = field(&req, "Job").cloned() else {
        return Err(ApiError::bad_request("Job must be specified"));
    };
    let id = match job.get("ID").or_else(|| job.get("id")) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(ApiError::bad_request("Job ID hasn't been provided")),
    };
    let ns = p
        .namespace
        .clone()
        .or_else(|| {
            field(&req, "Namespace")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .or_else(|| {
            field(&job, "Namespace")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    let spec = canonicalize(job, &ns).map_err(|e| ApiError::bad_request(e.0))?;
    let enforce = field(&req, "EnforceIndex")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let want_index = field(&req, "JobModifyIndex")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let (eval_id, index, job_modify_index) = {
        let mut st = inner.lock();
        if !st.namespaces.contains(&ns) {
            return Err(ApiError::internal(format!(
                "job \"{id}\" is in nonexistent namespace \"{ns}\""
            )));
        }
        let key = (ns.clone(), id.clone());
        let existing = st.jobs.get(&key).cloned();
        if enforce {
            match &existing {
                Some(j) if want_index == 0 => {
                    let _ = j;
                    return Err(ApiError::internal(
                        "Enforcing job modify index 0: job already exists".to_owned(),
                    ));
                }
                Some(j) if j.job_modify_index != want_index => {
                    return Err(ApiError::internal(format!(
                        "Enforcing job modify index {want_index}: job exists with conflicting job modify index: {}",
                        j.job_modify_index
                    )));
                }
                None if want_index != 0 => {
                    return Err(ApiError::internal(format!(
                        "Enforcing job modify index {want_index}: job does not exist"
                    )));
                }
                _ => {}
            }
        }
        let next = st.index + 1;
        let changed = existing
            .as_ref()
            .is_none_or(|j| j.stop || spec_changed(&j.spec, &spec));
        let mut eval = Eval::pending(&ns, &id, "service", 50, "job-register");
        let mut tx;
        let jmi;
        if changed {
            let rec = JobRecord {
                namespace: ns.clone(),
                id: id.clone(),
                version: existing.as_ref().map_or(0, |j| j.version + 1),
                status: existing
                    .as_ref()
                    .map_or("pending".into(), |j| j.status.clone()),
                stop: false,
                create_index: existing.as_ref().map_or(0, |j| j.create_index),
                modify_index: next,
                job_modify_index: next,
                submit_time: now_ns(),
                queued: existing
                    .as_ref()
                    .map(|j| j.queued.clone())
                    .unwrap_or_default(),
                spec,
            };
            jmi = next;
            tx = Txn::new("JobRegistered");
            tx.job(&ns, &id);
            st.jobs.insert(key.clone(), rec);
        } else {
            jmi = existing.as_ref().map_or(0, |j| j.job_modify_index);
            tx = Txn::new("EvaluationUpdated");
        }
        let rec = st.jobs.get(&key).cloned();
        if let Some(rec) = &rec {
            eval.job_type = rec.job_type();
            eval.priority = rec.priority();
            eval.job_modify_index = rec.job_modify_index;
        }
        tx.eval(&eval.id);
        let eval_id = eval.id.clone();
        st.evals.insert(eval_id.clone(), eval);
        let index = st.commit(tx).unwrap_or(st.index);
        (eval_id, index, jmi)
    };
    scheduler::enqueue(&inner, eval_id.clone(), None);
    Ok(write_response(
        index,
        &json!({"EvalID": eval_id, "EvalCreateIndex": index, "JobModifyIndex": job_modify_index,
                "Warnings": "", "Index": index, "LastContact": 0, "KnownLeader": false}),
    ))
}

async fn list_jobs(State(inner): State<Shared>, q: Q) -> Result<Response, ApiError> {
    let p = params(q)?;
    let index = block(&inner, Table::Jobs, p.index, p.wait).await;
    let with_meta = p.flag("meta").unwrap_or(false);
    let st = inner.lock();
    let mut jobs: Vec<&JobRecord> = st
        .jobs
        .values()
        .filter(|j| p.ns_matches(&j.namespace) && j.id.starts_with(&p.prefix))
        .collect();
    jobs.sort_by(|a, b| (&a.id, &a.namespace).cmp(&(&b.id, &b.namespace)));
    let out: Vec<Value> = jobs
        .into_iter()
        .map(|j| shapes::job_stub(j, &st.job_allocs(&j.namespace, &j.id), with_meta))
        .collect();
    Ok(read_response(index, &Value::Array(out), p.pretty))
}

async fn read_job(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    q: Q,
) -> Result<Response, ApiError> {
    let p = params(q)?;
    let index = block(&inner, Table::Jobs, p.index, p.wait).await;
    let st = inner.lock();
    let rec = st
        .jobs
        .get(&(p.ns(), id))
        .ok_or_else(|| ApiError::not_found("job not found"))?;
    Ok(read_response(index, &shapes::job(rec), p.pretty))
}

async fn deregister(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    q: Q,
) -> Result<Response, ApiError> {
    let p = params(q)?;
    let purge = p.flag("purge").unwrap_or(false);
    let ns = p.ns();
    let (eval_id, index) = {
        let mut st = inner.lock();
        let key = (ns.clone(), id.clone());
        let Some(rec) = st.jobs.get(&key).cloned() else {
            let index = st.index;
            return Ok(write_response(
                index,
                &json!({"EvalID": "", "EvalCreateIndex": 0, "JobModifyIndex": 0, "Index": 0,
                        "LastContact": 0, "KnownLeader": false}),
            ));
        };
        let next = st.index + 1;
        let mut tx = Txn::new("JobDeregistered");
        if purge {
            let mut last = rec.clone();
            last.modify_index = next;
            let last_json = shapes::job(&last);
            st.jobs.remove(&key);
            tx.job_deleted(&ns, &id, last_json);
        } else {
            if let Some(j) = st.jobs.get_mut(&key) {
                j.stop = true;
                j.job_modify_index = next;
                j.version += 1;
            }
            tx.job(&ns, &id);
        }
        let mut eval = Eval::pending(&ns, &id, &rec.job_type(), rec.priority(), "job-deregister");
        eval.job_modify_index = next;
        tx.eval(&eval.id);
        let eval_id = eval.id.clone();
        st.evals.insert(eval_id.clone(), eval);
        let index = st.commit(tx).unwrap_or(st.index);
        (eval_id, index)
    };
    scheduler::enqueue(&inner, eval_id.clone(), None);
    Ok(write_response(
        index,
        &json!({"EvalID": eval_id, "EvalCreateIndex": index, "JobModifyIndex": index,
                "VolumeEvalID": "", "VolumeEvalIndex": 0,
                "Index": index, "LastContact": 0, "KnownLeader": false}),
    ))
}

async fn job_allocations(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    q: Q,
) -> Result<Response, ApiError> {
    let p = params(q)?;
    let index = block(&inner, Table::Allocs, p.index, p.wait).await;
    let st = inner.lock();
    let mut allocs = st.job_allocs(&p.ns(), &id);
    allocs.sort_by_key(|a| std::cmp::Reverse(a.create_index));
    let out: Vec<Value> = allocs
        .iter()
        .map(|a| shapes::alloc_stub(a, false, true))
        .collect();
    Ok(read_response(index, &Value::Array(out), p.pretty))
}

async fn job_evaluations(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    q: Q,
) -> Result<Response, ApiError> {
    let p = params(q)?;
    let index = block(&inner, Table::Evals, p.index, p.wait).await;
    let st = inner.lock();
    let ns = p.ns();
    let mut evals: Vec<_> = st
        .evals
        .values()
        .filter(|e| e.job_id == id && e.namespace == ns)
        .collect();
    evals.sort_by_key(|a| std::cmp::Reverse(a.create_index));
    let out: Vec<Value> = evals.into_iter().map(shapes::eval).collect();
    Ok(read_response(index, &Value::Array(out), p.pretty))
}

async fn list_allocations(State(inner): State<Shared>, q: Q) -> Result<Response, ApiError> {
    let p = params(q)?;
    let index = block(&inner, Table::Allocs, p.index, p.wait).await;
    let resources = p.flag("resources").unwrap_or(false);
    let task_states = p.flag("task_states").unwrap_or(true);
    let st = inner.lock();
    let mut allocs: Vec<_> = st
        .allocs
        .values()
        .filter(|a| p.ns_matches(&a.namespace) && a.id.starts_with(&p.prefix))
        .collect();
    allocs.sort_by_key(|a| std::cmp::Reverse(a.create_index));
    let out: Vec<Value> = allocs
        .into_iter()
        .map(|a| shapes::alloc_stub(a, resources, task_states))
        .collect();
    Ok(read_response(index, &Value::Array(out), p.pretty))
}

async fn read_allocation(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    q: Q,
) -> Result<Response, ApiError> {
    let p = params(q)?;
    let index = block(&inner, Table::Allocs, p.index, p.wait).await;
    let st = inner.lock();
    let a = st
        .allocs
        .get(&id)
        .ok_or_else(|| ApiError::not_found("alloc not found"))?;
    Ok(read_response(index, &shapes::alloc(a, true), p.pretty))
}

async fn stop_allocation(
    State(inner): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (eval_id, index, needs_stop) = {
        let mut st = inner.lock();
        let Some(a) = st.allocs.get_mut(&id) else {
            return Err(ApiError::not_found("alloc not found"));
        };
        let needs_stop = a.desired_status == "run" && !a.client_terminal();
        a.desired_status = "stop".into();
        a.desired_description = "alloc was stopped by the user".into();
        a.epoch += 1;
        let mut eval = Eval::pending(&a.namespace, &a.job_id, &a.job_type, 50, "alloc-stop");
        let mut tx = Txn::new("AllocationUpdateDesiredStatus");
        tx.alloc(&id);
        tx.eval(&eval.id);
        let key = (a.namespace.clone(), a.job_id.clone());
        if let Some(j) = st.jobs.get(&key) {
            eval.priority = j.priority();
            eval.job_modify_index = j.job_modify_index;
        }
        let eval_id = eval.id.clone();
        st.evals.insert(eval_id.clone(), eval);
        let index = st.commit(tx).unwrap_or(st.index);
        (eval_id, index, needs_stop)
    };
    if needs_stop {
        client::stop(&inner, id);
    }
    scheduler::enqueue(&inner, eval_id.clone(), None);
    Ok(write_response(
        index,
        &json!({"EvalID": eval_id, "Index": index}),
    ))
}

async fn read_evaluation(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    q: Q,
) -> Result<Response, ApiError> {
    let p = params(q)?;
    let index = block(&inner, Table::Evals, p.index, p.wait).await;
    let st = inner.lock();
    let e = st
        .evals
        .get(&id)
        .ok_or_else(|| ApiError::not_found("eval not found"))?;
    Ok(read_response(index, &shapes::eval(e), p.pretty))
}

async fn read_node(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    q: Q,
) -> Result<Response, ApiError> {
    let p = params(q)?;
    let index = block(&inner, Table::Nodes, p.index, p.wait).await;
    let st = inner.lock();
    let n = st
        .nodes
        .get(&id)
        .ok_or_else(|| ApiError::not_found("node not found"))?;
    Ok(read_response(
        index,
        &shapes::node(n, &st.http_addr),
        p.pretty,
    ))
}

async fn list_nodes(State(inner): State<Shared>, q: Q) -> Result<Response, ApiError> {
    let p = params(q)?;
    let index = block(&inner, Table::Nodes, p.index, p.wait).await;
    let st = inner.lock();
    let mut nodes: Vec<_> = st
        .nodes
        .values()
        .filter(|n| n.id.starts_with(&p.prefix))
        .collect();
    nodes.sort_by_key(|n| n.create_index);
    let out: Vec<Value> = nodes
        .into_iter()
        .map(|n| shapes::node_stub(n, &st.http_addr))
        .collect();
    Ok(read_response(index, &Value::Array(out), p.pretty))
}

fn namespace_json(name: &str) -> Value {
    json!({"Name": name, "Description": if name == "default" { "Default shared namespace" } else { "" },
           "Quota": "", "Meta": null, "Capabilities": null, "NodePoolConfiguration": null,
           "VaultConfiguration": null, "ConsulConfiguration": null, "CreateIndex": 1, "ModifyIndex": 1})
}

async fn list_namespaces(State(inner): State<Shared>, q: Q) -> Result<Response, ApiError> {
    let p = params(q)?;
    let st = inner.lock();
    let out: Vec<Value> = st
        .namespaces
        .iter()
        .filter(|n| n.starts_with(&p.prefix))
        .map(|n| namespace_json(n))
        .collect();
    Ok(read_response(1, &Value::Array(out), p.pretty))
}

async fn read_namespace(
    State(inner): State<Shared>,
    Path(name): Path<String>,
    q: Q,
) -> Result<Response, ApiError> {
    let p = params(q)?;
    let st = inner.lock();
    if !st.namespaces.contains(&name) {
        return Err(ApiError::not_found("namespace not found"));
    }
    Ok(read_response(1, &namespace_json(&name), p.pretty))
}

async fn leader(method: Method) -> Response {
    let _ = method;
    read_response(1, &json!("127.0.0.1:4647"), false)
}

async fn agent_self(State(inner): State<Shared>) -> Response {
    read_response(
        1,
        &json!({"config": {"Region": "global", "Datacenter": "dc1", "Version": {"Version": "2.0.6"}},
                "member": {"Name": "emu", "Addr": inner.addr.ip().to_string(), "Port": 4648,
                           "Tags": {"region": "global", "dc": "dc1"}, "Status": "alive"},
                "stats": null}),
        false,
    )
}
