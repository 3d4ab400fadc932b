//! What every handler shares: the manager, the API settings, metrics and the open streams.

use std::sync::Arc;

use monitoring::{InfluxWriter, Point};
use runner_core::{Manager, SpecBounds};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;

/// Settings of the HTTP layer (from the configuration).
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// The `Poseidon-Token` required on authenticated routes; `None` disables auth.
    pub token: Option<String>,
    /// Whether the server speaks TLS (`websocketUrl` then uses `wss`).
    pub tls: bool,
    /// What `/version` answers.
    pub release: String,
    /// The largest request body in bytes.
    pub body_limit: usize,
    /// Most `delete` plus `copy` entries in one file request.
    pub max_file_entries: usize,
    /// Bounds environment specifications must respect.
    pub bounds: SpecBounds,
    /// `host:port` used for `websocketUrl` when a request has no `Host` header.
    pub fallback_host: String,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            token: None,
            tls: false,
            release: env!("CARGO_PKG_VERSION").to_string(),
            body_limit: 64 * 1024 * 1024,
            max_file_entries: crate::file_update::DEFAULT_MAX_FILE_ENTRIES,
            bounds: SpecBounds::default(),
            fallback_host: "127.0.0.1:7200".into(),
        }
    }
}

/// Open execution streams, so shutdown can wait for them and then end them.
#[derive(Debug, Clone, Default)]
pub struct Streams {
    /// Tracks every running stream task.
    pub tracker: TaskTracker,
    /// Fired when the shutdown grace period is over.
    pub cancel: CancellationToken,
}

/// The state behind every handler.
#[derive(Debug)]
pub struct AppState {
    /// The runner manager.
    pub manager: Arc<dyn Manager>,
    /// HTTP settings.
    pub settings: ApiSettings,
    /// Prometheus metrics, shared with the manager's observer and the instrumented backend.
    pub metrics: Arc<Metrics>,
    /// Open WebSocket streams.
    pub streams: Streams,
    /// The InfluxDB export, when `influxdb.url` is set.
    pub influx: Option<InfluxWriter>,
}

impl AppState {
    /// State over `manager` with `settings`.
    pub fn new(manager: Arc<dyn Manager>, settings: ApiSettings) -> Arc<Self> {
        Self::with_influx(manager, settings, None)
    }

    /// State over `manager` with `settings` that also writes metric points to `influx`.
    pub fn with_influx(
        manager: Arc<dyn Manager>,
        settings: ApiSettings,
        influx: Option<InfluxWriter>,
    ) -> Arc<Self> {
        Self::with_metrics(manager, settings, influx, Arc::new(Metrics::new()))
    }

    /// State over `manager` with `settings`, writing to `influx` and recording into `metrics`
    /// (created before the manager, so that its observer and the instrumented backend record
    /// into the same registry `/metrics` renders).
    pub fn with_metrics(
        manager: Arc<dyn Manager>,
        settings: ApiSettings,
        influx: Option<InfluxWriter>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            manager,
            settings,
            metrics,
            streams: Streams::default(),
            influx,
        })
    }

    /// Queues `point` for InfluxDB; without an InfluxDB export it is only trace-logged.
    pub fn write_point(&self, point: Point) {
        match &self.influx {
            Some(writer) => writer.write(point),
            None => tracing::trace!(?point, "metric point (no InfluxDB configured)"),
        }
    }
}
