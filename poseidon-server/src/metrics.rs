//! Prometheus metrics at `GET /metrics`: request durations by route and status (a middleware
//! layer), runner counts per environment (read from the manager at scrape time), and how
//! execution streams ended.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::state::AppState;

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

type DurationFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 4.0, 10))
}

/// The server's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    durations: DurationFamily,
    idle: Family<EnvironmentLabels, Gauge>,
    used: Family<EnvironmentLabels, Gauge>,
    pool: Family<EnvironmentLabels, Gauge>,
    streams: Family<StreamLabels, Counter>,
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
        let streams = Family::default();
        registry.register(
            "execution_streams",
            "Execution streams by how they ended",
            streams.clone(),
        );
        Self {
            registry,
            durations,
            idle,
            used,
            pool,
            streams,
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
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            tracing::error!("encoding metrics failed");
        }
        out
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
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let elapsed = start.elapsed();
    state
        .metrics
        .observe(&method, &route, status, elapsed.as_secs_f64());
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
