//! The router: Poseidon's API v1 under `/api/v1`, plus `/metrics` and the OpenAPI document.
//! Everything but `/health` and `/version` needs the token when one is configured (design §1),
//! the metrics and the OpenAPI document included.
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
use axum::http::{Method, StatusCode, Uri};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::dto::{EnvironmentStatisticsEntry, EnvironmentStatisticsMap};
use crate::error::ApiError;
use crate::state::AppState;
use crate::{auth, metrics, openapi, request_log};

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
        .route("/api/v1/openapi.json", get(openapi::openapi_json))
        .route("/metrics", get(metrics::metrics_route))
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
        .route("/api/v1/version", get(version));
    let body_limit = state.settings.body_limit;
    protected
        .merge(public)
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::track_requests,
        ))
        .layer(middleware::from_fn(request_log::request_span))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// 404 `{"message"}` for a path no route matches.
async fn unknown_route(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route {method} {}", uri.path()))
}

/// 405 `{"message"}` for a known path with a method it does not take.
async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{} does not take the method {method}", uri.path()))
}

/// Whether the service is healthy: 503 `NOMAD_UNREACHABLE` while the backend cannot be reached,
/// 503 `PREWARMING_POOL_DEPLETING` while an environment cannot get runners or a prewarming pool
/// is below the alert threshold.
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
    let failed = state.manager.failed_environments();
    let depleting: Vec<String> = state
        .manager
        .depleting_environments()
        .iter()
        .filter(|id| !failed.iter().any(|(f, _)| f == *id))
        .map(ToString::to_string)
        .collect();
    if depleting.is_empty() && failed.is_empty() {
        return Ok(StatusCode::NO_CONTENT);
    }
    // An environment whose runners cannot be created is reported whatever the threshold: its
    // pool stays empty until an operator acts.
    let mut problems: Vec<String> = failed
        .iter()
        .map(|(id, reason)| format!("environment {id} cannot get runners: {reason}"))
        .collect();
    if !depleting.is_empty() {
        problems.push(format!(
            "the prewarming pool is depleting: environments {}",
            depleting.join(", ")
        ));
    }
    Err(ApiError::Depleting(problems.join("; ")))
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
        .environments()
        .iter()
        .map(|env| {
            let stats = env.statistics();
            let key = stats.id.to_string();
            let mut entry = EnvironmentStatisticsEntry::from(stats);
            entry.creation_error = env.creation_failure();
            (key, entry)
        })
        .collect();
    Json(map)
}
