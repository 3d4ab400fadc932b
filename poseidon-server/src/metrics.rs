//! Prometheus metrics at `GET /metrics`: request durations by route and status (a middleware
//! layer), runner counts per environment (read from the manager at scrape time), how execution
//! streams ended, and what [`crate::observe`] records (runner start-ups, destructions by reason,
//! executions by outcome, backend calls, failed creations, open WebSocket connections).
//!
//! Every label set is bounded: environment ids (as many as the operator's environments), fixed
//! sets of reasons, outcomes, operations and error kinds; never a runner or execution id.
//! Updates on hot paths are a read-locked map lookup with a label set that borrows or copies
//! (no allocation) and an atomic operation.
//!
//! The same middleware writes Poseidon's InfluxDB points (design §6) when `influxdb.url` is set:
//! per request `poseidon_<routeName>` with field `duration` (ns) and tag `status` (runner routes
//! add `runner_id` and `environment_id`); [`report_statistics`] writes `poseidon_used_runners`
//! and `poseidon_nomad_idle_runners` periodically and [`pool_size_point`] is written whenever an
//! environment is stored.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use runner_core::{EnvironmentId, RunnerId};

use crate::state::AppState;
use monitoring::Point;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EnvironmentLabels {
    environment_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StreamLabels {
    end: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StartupLabels {
    environment_id: u64,
    backend: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ExecutionLabels {
    environment_id: u64,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BackendCallLabels {
    backend: &'static str,
    operation: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BackendErrorLabels {
    backend: &'static str,
    operation: &'static str,
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CreationFailureLabels {
    environment_id: u64,
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StoreLabels {
    operation: &'static str,
    durability: &'static str,
}

type DurationFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 4.0, 10))
}

/// 1 ms to about 9 minutes: runner start-ups (local: milliseconds; Nomad: seconds to minutes).
fn startup_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 3.0, 13))
}

/// 1 ms to about 35 minutes: executions (a `sleep infinity` ends with its runner's timeout).
fn execution_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 12))
}

/// 100 µs to about 26 s: backend calls and store writes.
fn call_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 4.0, 10))
}

/// The server's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    durations: DurationFamily,
    idle: Family<EnvironmentLabels, Gauge>,
    used: Family<EnvironmentLabels, Gauge>,
    pool: Family<EnvironmentLabels, Gauge>,
    creation_failed: Family<EnvironmentLabels, Gauge>,
    pending: Family<EnvironmentLabels, Gauge>,
    streams: Family<StreamLabels, Counter>,
    startup: HistogramFamily<StartupLabels>,
    destroyed: Family<ReasonLabels, Counter>,
    executions: Family<ExecutionLabels, Counter>,
    execution_duration: HistogramFamily<OutcomeLabels>,
    backend_calls: HistogramFamily<BackendCallLabels>,
    backend_errors: Family<BackendErrorLabels, Counter>,
    creation_failures: Family<CreationFailureLabels, Counter>,
    websockets: Gauge,
    store_writes: HistogramFamily<StoreLabels>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("poseidon");
        let durations = DurationFamily::new_with_constructor(duration_histogram);
        registry.register(
            "http_request_duration_seconds",
            "HTTP request durations by route and status",
            durations.clone(),
        );
        let idle = Family::default();
        registry.register("idle_runners", "Idle runners per environment", idle.clone());
        let used = Family::default();
        registry.register("used_runners", "Used runners per environment", used.clone());
        let pool = Family::default();
        registry.register(
            "prewarming_pool_size",
            "Configured prewarming pool size per environment",
            pool.clone(),
        );
        let creation_failed = Family::default();
        registry.register(
            "environment_creation_failed",
            "1 while an environment's runners cannot be created until it is changed",
            creation_failed.clone(),
        );
        let streams = Family::default();
        registry.register(
            "execution_streams",
            "Execution streams by how they ended",
            streams.clone(),
        );
        let pending = Family::default();
        registry.register(
            "pending_runners",
            "Runner creations under way (requested, or accepted and not yet ready) per environment",
            pending.clone(),
        );
        let startup = HistogramFamily::new_with_constructor(startup_histogram as fn() -> Histogram);
        registry.register(
            "runner_startup_duration_seconds",
            "Time from a runner's creation request until it can execute commands",
            startup.clone(),
        );
        let destroyed = Family::default();
        registry.register(
            "runners_destroyed",
            "Runners destroyed (or lost by the backend), by reason",
            destroyed.clone(),
        );
        let executions = Family::default();
        registry.register(
            "executions",
            "Executions ended, by environment and outcome",
            executions.clone(),
        );
        let execution_duration =
            HistogramFamily::new_with_constructor(execution_histogram as fn() -> Histogram);
        registry.register(
            "execution_duration_seconds",
            "Time from an execution's start until its end, by outcome",
            execution_duration.clone(),
        );
        let backend_calls =
            HistogramFamily::new_with_constructor(call_histogram as fn() -> Histogram);
        registry.register(
            "backend_call_duration_seconds",
            "Duration of calls to the runner backend, by backend and operation",
            backend_calls.clone(),
        );
        let backend_errors = Family::default();
        registry.register(
            "backend_call_errors",
            "Failed calls to the runner backend, by backend, operation and error kind",
            backend_errors.clone(),
        );
        let creation_failures = Family::default();
        registry.register(
            "runner_creation_failures",
            "Failed runner creations of the refill loop, by environment and error kind",
            creation_failures.clone(),
        );
        let websockets = Gauge::default();
        registry.register(
            "websocket_connections",
            "Open execution WebSocket connections",
            websockets.clone(),
        );
        let store_writes =
            HistogramFamily::new_with_constructor(call_histogram as fn() -> Histogram);
        registry.register(
            "store_write_duration_seconds",
            "Duration of writes to the local backend's state store, by operation and durability",
            store_writes.clone(),
        );
        Self {
            registry,
            durations,
            idle,
            used,
            pool,
            creation_failed,
            pending,
            streams,
            startup,
            destroyed,
            executions,
            execution_duration,
            backend_calls,
            backend_errors,
            creation_failures,
            websockets,
            store_writes,
        }
    }

    /// Records a runner's start-up duration.
    pub fn runner_started(
        &self,
        environment: EnvironmentId,
        backend: &'static str,
        startup: Duration,
    ) {
        self.startup
            .get_or_create(&StartupLabels {
                environment_id: environment.get(),
                backend,
            })
            .observe(startup.as_secs_f64());
    }

    /// Counts a runner destruction by its reason's label.
    pub fn runner_destroyed(&self, reason: &'static str) {
        self.destroyed.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Counts an ended execution and records its duration.
    pub fn execution_finished(
        &self,
        environment: EnvironmentId,
        outcome: &'static str,
        duration: Duration,
    ) {
        self.executions
            .get_or_create(&ExecutionLabels {
                environment_id: environment.get(),
                outcome,
            })
            .inc();
        self.execution_duration
            .get_or_create(&OutcomeLabels { outcome })
            .observe(duration.as_secs_f64());
    }

    /// Records one backend call; `error` is the failed call's error kind.
    pub fn backend_call(
        &self,
        backend: &'static str,
        operation: &'static str,
        took: Duration,
        error: Option<&'static str>,
    ) {
        self.backend_calls
            .get_or_create(&BackendCallLabels { backend, operation })
            .observe(took.as_secs_f64());
        if let Some(kind) = error {
            self.backend_errors
                .get_or_create(&BackendErrorLabels {
                    backend,
                    operation,
                    kind,
                })
                .inc();
        }
    }

    /// Counts a failed runner creation of the refill loop.
    pub fn creation_failed(&self, environment: EnvironmentId, kind: &'static str) {
        self.creation_failures
            .get_or_create(&CreationFailureLabels {
                environment_id: environment.get(),
                kind,
            })
            .inc();
    }

    /// Records one write to the state store.
    pub fn store_write(&self, operation: &'static str, durable: bool, took: Duration) {
        let durability = if durable { "durable" } else { "eventual" };
        self.store_writes
            .get_or_create(&StoreLabels {
                operation,
                durability,
            })
            .observe(took.as_secs_f64());
    }

    /// Counts an execution WebSocket as open until the returned guard is dropped.
    pub fn websocket_opened(self: &Arc<Self>) -> WebSocketGuard {
        self.websockets.inc();
        WebSocketGuard {
            metrics: Arc::clone(self),
        }
    }

    /// Counts an ended execution stream (`completed`, `client_gone`, `shutdown`,
    /// `start_failed`, `invalid_input`).
    pub fn stream_ended(&self, end: &'static str) {
        self.streams.get_or_create(&StreamLabels { end }).inc();
    }

    fn observe(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.durations
            .get_or_create(&RequestLabels {
                method: method.to_string(),
                route: route.to_string(),
                status,
            })
            .observe(seconds);
    }

    /// The text exposition, with runner counts refreshed from `state`'s manager.
    pub fn render(&self, state: &AppState) -> String {
        self.idle.clear();
        self.used.clear();
        self.pool.clear();
        self.creation_failed.clear();
        self.pending.clear();
        for env in state.manager.environments() {
            let labels = EnvironmentLabels {
                environment_id: env.spec().id.to_string(),
            };
            let failed = env.creation_failure().is_some();
            self.creation_failed
                .get_or_create(&labels)
                .set(i64::from(failed));
        }
        for (id, stats) in state.manager.statistics() {
            let labels = EnvironmentLabels {
                environment_id: id.to_string(),
            };
            self.idle
                .get_or_create(&labels)
                .set(i64::from(stats.idle_runners));
            self.used
                .get_or_create(&labels)
                .set(i64::from(stats.used_runners));
            self.pool
                .get_or_create(&labels)
                .set(i64::from(stats.prewarming_pool_size));
            self.pending
                .get_or_create(&labels)
                .set(i64::from(stats.pending_runners));
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            tracing::error!("encoding metrics failed");
        }
        out
    }
}

/// Keeps an execution WebSocket counted as open (see [`Metrics::websocket_opened`]).
#[derive(Debug)]
pub struct WebSocketGuard {
    metrics: Arc<Metrics>,
}

impl Drop for WebSocketGuard {
    fn drop(&mut self) {
        self.metrics.websockets.dec();
    }
}

/// Middleware recording every request's duration by matched route and status.
pub async fn track_requests(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    // Label values come from a fixed set: a client inventing methods must not grow the registry.
    let method = match *request.method() {
        Method::GET
        | Method::POST
        | Method::PUT
        | Method::PATCH
        | Method::DELETE
        | Method::HEAD
        | Method::OPTIONS => request.method().as_str().to_string(),
        _ => "other".to_string(),
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let influx = state
        .influx
        .is_some()
        .then(|| influx_route(request.method(), &route))
        .flatten()
        .map(|name| {
            let size = request
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            (name, request.uri().path().to_string(), size)
        });
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let elapsed = start.elapsed();
    state
        .metrics
        .observe(&method, &route, status, elapsed.as_secs_f64());
    if let Some((name, path, size)) = influx {
        let tags = response.extensions().get::<RunnerTags>().cloned();
        write_request_point(&state, name, &path, size, status, elapsed, tags);
    }
    tracing::debug!(%method, %route, status, duration_ms = elapsed.as_millis() as u64, "request");
    response
}

/// `GET /metrics`.
pub async fn metrics_route(State(state): State<Arc<AppState>>) -> Response {
    let body = state.metrics.render(&state);
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Tags a handler knows and the path does not show (the runner `POST /runners` claimed, the
/// environment of a runner it deleted); the InfluxDB point of the request carries them.
#[derive(Debug, Clone)]
pub struct RunnerTags {
    /// The runner.
    pub runner_id: String,
    /// Its environment.
    pub environment_id: EnvironmentId,
}

/// Poseidon's route name for the InfluxDB measurement `poseidon_<name>`; `None` for routes
/// Poseidon does not have (`/metrics`, the OpenAPI document, unmatched paths).
pub fn influx_route(method: &Method, route: &str) -> Option<&'static str> {
    let name = match (method.as_str(), route) {
        ("GET", "/api/v1/health") => "/health",
        ("GET", "/api/v1/version") => "/version",
        ("GET", "/api/v1/statistics/execution-environments") => "/execution-environments",
        ("POST", "/api/v1/runners") => "provideRunner",
        ("DELETE", "/api/v1/runners/{runner_id}") => "deleteRunner",
        ("GET", "/api/v1/runners/{runner_id}/files") => "/files_list",
        ("PATCH", "/api/v1/runners/{runner_id}/files") => "/files",
        ("GET", "/api/v1/runners/{runner_id}/files/raw") => "/files/raw",
        ("POST", "/api/v1/runners/{runner_id}/execute") => "/execute",
        ("GET", "/api/v1/runners/{runner_id}/websocket") => "/websocket",
        ("GET", "/api/v1/execution-environments") => "list",
        ("GET", "/api/v1/execution-environments/{environment_id}") => "get",
        ("PUT", "/api/v1/execution-environments/{environment_id}") => "createOrUpdate",
        ("DELETE", "/api/v1/execution-environments/{environment_id}") => "delete",
        _ => return None,
    };
    Some(name)
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn write_request_point(
    state: &AppState,
    name: &'static str,
    path: &str,
    request_size: Option<u64>,
    status: u16,
    elapsed: Duration,
    tags: Option<RunnerTags>,
) {
    let mut point = Point::new(format!("poseidon_{name}"))
        .tag("status", status.to_string())
        .field("duration", nanos(elapsed));
    // `/api/v1/runners/{id}/…` and `/api/v1/execution-environments/{id}`: the id is segment 4.
    let path_id = path.split('/').nth(4).filter(|s| !s.is_empty());
    if let Some(tags) = &tags {
        point = point
            .tag("runner_id", tags.runner_id.clone())
            .tag("environment_id", tags.environment_id.to_string());
    } else if path.starts_with("/api/v1/runners/")
        && let Some(id) = path_id
    {
        let runner = RunnerId::from(id);
        let environment = state
            .manager
            .runner(&runner)
            .ok()
            .map(|r| r.environment())
            .or_else(|| runner.environment());
        point = point.tag("runner_id", id);
        if let Some(environment) = environment {
            point = point.tag("environment_id", environment.to_string());
        }
    } else if path.starts_with("/api/v1/execution-environments/")
        && let Some(id) = path_id
    {
        point = point.tag("environment_id", id);
    }
    if name == "/files"
        && let Some(size) = request_size
    {
        point = point.field("request_size", size);
    }
    state.write_point(point);
    // Runner counts on change, as Poseidon's monitored storages do on every add and delete.
    if (200..300).contains(&status)
        && let Some(tags) = tags
    {
        let event = if name == "provideRunner" {
            "creation"
        } else {
            "deletion"
        };
        write_runner_counts(state, Some(tags.environment_id), event);
    }
}

/// `poseidon_poolsize`: an environment's prewarming pool size, written whenever it is set.
pub fn pool_size_point(environment: EnvironmentId, size: u32) -> Point {
    Point::new("poseidon_poolsize")
        .tag("environment_id", environment.to_string())
        .field("prewarming_pool_size", size)
}

/// Writes `poseidon_used_runners` and `poseidon_nomad_idle_runners` (tag `environment_id`,
/// field `count`, tag `event_type`) for `only` or, when `None`, for every environment.
pub fn write_runner_counts(state: &AppState, only: Option<EnvironmentId>, event_type: &str) {
    for (id, stats) in state.manager.statistics() {
        if only.is_some_and(|o| o != id) {
            continue;
        }
        let environment = id.to_string();
        state.write_point(
            Point::new("poseidon_used_runners")
                .tag("environment_id", environment.clone())
                .tag("event_type", event_type)
                .field("count", stats.used_runners),
        );
        state.write_point(
            Point::new("poseidon_nomad_idle_runners")
                .tag("environment_id", environment)
                .tag("event_type", event_type)
                .field("count", stats.idle_runners),
        );
    }
}

/// Writes the runner counts and pool sizes of every environment now and then every `every`,
/// until the task is aborted; does nothing without an InfluxDB export.
pub async fn report_statistics(state: Arc<AppState>, every: Duration) {
    if state.influx.is_none() {
        return;
    }
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        write_runner_counts(&state, None, "periodically");
    }
}
