//! The router: Poseidon's API v1 under `/api/v1`, plus `/metrics` and the OpenAPI document.
//!
//! Handlers stay small: they parse input (naming the field at fault), call the [`Manager`] and
//! let [`ApiError`] pick the status.
//!
//! [`Manager`]: runner_core::Manager

pub mod environments;
pub mod runners;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::dto::{EnvironmentStatisticsEntry, EnvironmentStatisticsMap};
use crate::error::ApiError;
use crate::state::AppState;
use crate::{auth, metrics, openapi};

/// The API's base path.
pub const BASE: &str = "/api/v1";

/// The whole HTTP application over `state`.
pub fn app(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/api/v1/statistics/execution-environments", get(statistics))
        .route("/api/v1/runners", post(runners::provide))
        .route(
            "/api/v1/runners/{runner_id}",
            axum::routing::delete(runners::delete),
        )
        .route(
            "/api/v1/runners/{runner_id}/files",
            get(runners::list_files).patch(runners::update_files),
        )
        .route(
            "/api/v1/runners/{runner_id}/files/raw",
            get(runners::file_content),
        )
        .route(
            "/api/v1/runners/{runner_id}/execute",
            post(runners::execute),
        )
        .route(
            "/api/v1/runners/{runner_id}/websocket",
            get(runners::websocket),
        )
        .route("/api/v1/execution-environments", get(environments::list))
        .route(
            "/api/v1/execution-environments/{environment_id}",
            get(environments::get)
                .put(environments::put)
                .delete(environments::delete),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    let public = Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/version", get(version))
        .route("/api/v1/openapi.json", get(openapi::openapi_json))
        .route("/metrics", get(metrics::metrics_route));
    let body_limit = state.settings.body_limit;
    protected
        .merge(public)
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::track_requests,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Whether the service is healthy: 503 `NOMAD_UNREACHABLE` while the backend cannot be reached,
/// 503 `PREWARMING_POOL_DEPLETING` while a prewarming pool is below the alert threshold.
#[utoipa::path(get, path = "/health", tag = "miscellaneous",
    responses(
        (status = 204, description = "Everything okay"),
        (status = 503, description = "The backend cannot be reached or a prewarming pool is depleting", body = crate::error::InternalServerError),
    ))]
pub async fn health(State(state): State<Arc<AppState>>) -> Result<StatusCode, ApiError> {
    if let Err(error) = state.manager.backend_health().await {
        return Err(ApiError::BackendDown(format!(
            "the runner backend cannot be reached: {error}"
        )));
    }
    let depleting = state.manager.depleting_environments();
    if depleting.is_empty() {
        return Ok(StatusCode::NO_CONTENT);
    }
    let ids: Vec<String> = depleting.iter().map(ToString::to_string).collect();
    Err(ApiError::Depleting(format!(
        "the prewarming pool is depleting: environments {}",
        ids.join(", ")
    )))
}

/// The release of this server, as a JSON string.
#[utoipa::path(get, path = "/version", tag = "miscellaneous",
    responses((status = 200, description = "The release information", body = String)))]
pub async fn version(State(state): State<Arc<AppState>>) -> Response {
    if state.settings.release.is_empty() {
        return StatusCode::NOT_FOUND.into_response();
    }
    Json(state.settings.release.clone()).into_response()
}

/// Idle and used runners per environment, keyed by environment id.
#[utoipa::path(get, path = "/statistics/execution-environments", tag = "miscellaneous",
    security(("poseidonAuthToken" = [])),
    responses(
        (status = 200, description = "Statistics of all execution environments", body = BTreeMap<String, EnvironmentStatisticsEntry>),
        (status = 401, description = "Client could not be authenticated"),
    ))]
pub async fn statistics(State(state): State<Arc<AppState>>) -> Json<EnvironmentStatisticsMap> {
    let map: BTreeMap<String, EnvironmentStatisticsEntry> = state
        .manager
        .statistics()
        .into_iter()
        .map(|(id, stats)| (id.to_string(), stats.into()))
        .collect();
    Json(map)
}
