//! `/execution-environments`: list, show, create or replace, delete.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_LENGTH;
use axum::response::{IntoResponse, Response};
use runner_core::{EnvironmentId, EnvironmentSpec, PutOutcome};
use serde_json::Value;

use crate::dto::{ExecutionEnvironment, ExecutionEnvironmentList};
use crate::error::ApiError;
use crate::input::{self, PathParam, RawBody};
use crate::state::AppState;

type QueryMap = Result<Query<HashMap<String, String>>, QueryRejection>;

fn query(q: QueryMap) -> Result<HashMap<String, String>, ApiError> {
    q.map(|Query(m)| m)
        .map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))
}

fn fetch_flag(q: QueryMap) -> Result<bool, ApiError> {
    input::query_bool(query(q)?.get("fetch"), "fetch", false)
}

/// Parses the path id: non-digits are a 404 (Poseidon's route only matches `[0-9]+`), with a
/// message as design §1 gives every client error; digits out of range are a 400.
fn environment_id(text: &str) -> Result<EnvironmentId, ApiError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::NotFound(format!(
            "execution environment not found: `{text}` is not an environment id (a non-negative integer)"
        )));
    }
    text.parse().map_err(|_| {
        ApiError::field(
            "executionEnvironmentId",
            format!("must be at most {}", EnvironmentId::MAX),
        )
    })
}

/// The 404 of an unknown (well-formed) environment id; design §1 gives client errors a message.
fn environment_not_found() -> ApiError {
    ApiError::NotFound("execution environment not found".into())
}

/// All execution environments.
#[utoipa::path(get, path = "/execution-environments", tag = "execution environment",
    security(("poseidonAuthToken" = [])),
    params(("fetch" = Option<bool>, Query, description = "Ignored: this server's store is authoritative")),
    responses(
        (status = 200, description = "All execution environments", body = ExecutionEnvironmentList),
        (status = 400, description = "Invalid query", body = crate::error::ClientError),
        (status = 401, description = "Client could not be authenticated"),
    ))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    q: QueryMap,
) -> Result<Json<ExecutionEnvironmentList>, ApiError> {
    fetch_flag(q)?;
    let execution_environments = state
        .manager
        .environments()
        .iter()
        .map(|e| e.spec().into())
        .collect();
    Ok(Json(ExecutionEnvironmentList {
        execution_environments,
    }))
}

/// One execution environment; 404 with a message when unknown.
#[utoipa::path(get, path = "/execution-environments/{executionEnvironmentId}", tag = "execution environment",
    security(("poseidonAuthToken" = [])),
    params(
        ("executionEnvironmentId" = u64, Path, description = "Id of the execution environment"),
        ("fetch" = Option<bool>, Query, description = "Ignored: this server's store is authoritative"),
    ),
    responses(
        (status = 200, description = "The execution environment", body = ExecutionEnvironment),
        (status = 400, description = "Invalid id or query", body = crate::error::ClientError),
        (status = 401, description = "Client could not be authenticated"),
        (status = 404, description = "The entity with the given identifier does not exist", body = crate::error::ClientError),
    ))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam,
    q: QueryMap,
) -> Result<Json<ExecutionEnvironment>, ApiError> {
    let id = environment_id(&id)?;
    fetch_flag(q)?;
    let environment = state
        .manager
        .environment(id)
        .ok_or_else(environment_not_found)?;
    Ok(Json(environment.spec().into()))
}

/// Creates (201) or replaces (204) an environment; the id comes from the path.
#[utoipa::path(put, path = "/execution-environments/{executionEnvironmentId}", tag = "execution environment",
    security(("poseidonAuthToken" = [])),
    params(("executionEnvironmentId" = u64, Path, description = "Id of the execution environment")),
    request_body = ExecutionEnvironment,
    responses(
        (status = 201, description = "The execution environment did not exist and was created"),
        (status = 204, description = "The execution environment was replaced"),
        (status = 400, description = "Invalid specification", body = crate::error::ClientError),
        (status = 401, description = "Client could not be authenticated"),
    ))]
pub async fn put(
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let id = environment_id(&id)?;
    let spec = parse_spec(id, &body)?;
    spec.validate(&state.settings.bounds)?;
    let status = match state.manager.put_environment(spec).await? {
        PutOutcome::Created => StatusCode::CREATED,
        PutOutcome::Replaced => StatusCode::NO_CONTENT,
    };
    tracing::info!(environment_id = %id, status = status.as_u16(), "environment stored");
    if let Some(environment) = state.manager.environment(id) {
        state.write_point(crate::metrics::pool_size_point(
            id,
            environment.statistics().prewarming_pool_size,
        ));
    }
    if status == StatusCode::CREATED {
        Ok((status, [(CONTENT_LENGTH, "0")]).into_response())
    } else {
        Ok(status.into_response())
    }
}

/// Deletes an environment and all its runners; 404 with a message when unknown.
#[utoipa::path(delete, path = "/execution-environments/{executionEnvironmentId}", tag = "execution environment",
    security(("poseidonAuthToken" = [])),
    params(("executionEnvironmentId" = u64, Path, description = "Id of the execution environment")),
    responses(
        (status = 204, description = "The execution environment was deleted"),
        (status = 400, description = "Invalid id", body = crate::error::ClientError),
        (status = 401, description = "Client could not be authenticated"),
        (status = 404, description = "The entity with the given identifier does not exist", body = crate::error::ClientError),
    ))]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam,
) -> Result<StatusCode, ApiError> {
    let id = environment_id(&id)?;
    match state.manager.delete_environment(id).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(runner_core::ManagerError::UnknownEnvironment(_)) => Err(environment_not_found()),
        Err(e) => Err(e.into()),
    }
}

fn parse_spec(id: EnvironmentId, body: &[u8]) -> Result<EnvironmentSpec, ApiError> {
    let map = input::json_object(body)?;
    let u32_field = |field: &str| -> Result<u32, ApiError> {
        let value = input::opt_uint(&map, field, u64::from(u32::MAX))?.unwrap_or(0);
        u32::try_from(value).map_err(|_| ApiError::field(field, "is too large"))
    };
    let image = input::req_string(&map, "image")?;
    let prewarming_pool_size = u32_field("prewarmingPoolSize")?;
    let cpu_limit = u32_field("cpuLimit")?;
    let memory_limit = u32_field("memoryLimit")?;
    let network_access = input::opt_bool(&map, "networkAccess")?;
    let exposed_ports = match map.get("exposedPorts") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                let port = input::uint(item, "exposedPorts", 65535)?;
                if port == 0 {
                    return Err(ApiError::field(
                        "exposedPorts",
                        "ports must be between 1 and 65535",
                    ));
                }
                u16::try_from(port).map_err(|_| {
                    ApiError::field("exposedPorts", "ports must be between 1 and 65535")
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::field("exposedPorts", "must be an array of ports")),
    };
    Ok(EnvironmentSpec {
        id,
        image,
        prewarming_pool_size,
        cpu_limit,
        memory_limit,
        network_access,
        exposed_ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> EnvironmentId {
        EnvironmentId::new(1).expect("valid")
    }

    fn err(body: &str) -> String {
        parse_spec(id(), body.as_bytes())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn spec_errors_name_the_field() {
        assert!(err(r#"{"image":"x","memoryLimit":-5}"#).starts_with("memoryLimit"));
        assert!(err(r#"{"image":"x","cpuLimit":"a"}"#).starts_with("cpuLimit"));
        assert!(
            err(r#"{"image":"x","prewarmingPoolSize":1e40}"#).starts_with("prewarmingPoolSize")
        );
        assert!(err(r#"{"image":"x","exposedPorts":[0]}"#).starts_with("exposedPorts"));
        assert!(err(r#"{"image":"x","exposedPorts":[70000]}"#).starts_with("exposedPorts"));
        assert!(err(r#"{"image":"x","networkAccess":"yes"}"#).starts_with("networkAccess"));
        assert!(err(r#"{"image":5}"#).starts_with("image"));
        assert!(err(r#"{}"#).starts_with("image"));
    }

    #[test]
    fn spec_takes_the_path_id_and_defaults_missing_numbers() {
        let spec =
            parse_spec(id(), br#"{"id":99,"image":"x","exposedPorts":null}"#).expect("valid");
        assert_eq!(spec.id, id());
        assert_eq!(spec.prewarming_pool_size, 0);
        assert!(spec.exposed_ports.is_empty());
    }

    #[test]
    fn path_ids_follow_poseidon() {
        assert!(matches!(environment_id("abc"), Err(ApiError::NotFound(_))));
        assert!(matches!(environment_id("-1"), Err(ApiError::NotFound(_))));
        assert!(matches!(
            environment_id("99999999999999999999"),
            Err(ApiError::BadRequest(_))
        ));
        assert_eq!(environment_id("7").ok().map(EnvironmentId::get), Some(7));
    }
}
