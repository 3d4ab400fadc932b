//! `/runners`: claim, delete, files, execute and the execution WebSocket.
//!
//! Every `/runners/{id}/…` route addresses used runners only; an unknown or idle id is 410 after
//! the request body has been read (so clients never see a reset before their upload finished).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::{Extension, Json};
use futures::{SinkExt, StreamExt};
use runner_core::{
    EnvironmentId, ExecutionId, ExecutionRequest, ListFilesRequest, Runner, RunnerId,
    TakenExecution,
};
use serde_json::Value;
use tracing::Instrument;

use crate::dto::{
    ExecutionRequestDto, ExecutionResponse, FileListing, FileUpdateRequest, ProvideRunnerRequest,
    RunnerResponse,
};
use crate::error::ApiError;
use crate::input::{self, PathParam, RawBody};
use crate::metrics::RunnerTags;
use crate::state::AppState;
use crate::ws::{self, ClientFrame, ServerFrame, StreamEnd};

/// The longest inactivity timeout and time limit accepted, in seconds.
pub const MAX_SECONDS: u64 = u32::MAX as u64;

/// Bytes of outgoing frames buffered before a send waits for the client (backpressure).
const WRITE_BUFFER: usize = 32 * 1024;

/// The largest WebSocket message a client may send (stdin).
const MAX_CLIENT_MESSAGE: usize = 1 << 20;

type QueryMap = Result<Query<HashMap<String, String>>, QueryRejection>;

fn query(q: QueryMap) -> Result<HashMap<String, String>, ApiError> {
    q.map(|Query(m)| m)
        .map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))
}

fn used_runner(state: &AppState, id: &str) -> Result<Arc<dyn Runner>, ApiError> {
    Ok(state.manager.runner(&RunnerId::from(id))?)
}

/// Claims an idle runner of an environment.
#[utoipa::path(post, path = "/runners", tag = "runner",
    security(("poseidonAuthToken" = [])),
    request_body = ProvideRunnerRequest,
    responses(
        (status = 200, description = "A runner was reserved", body = RunnerResponse),
        (status = 400, description = "Invalid request", body = crate::error::ClientError),
        (status = 401, description = "Client could not be authenticated"),
        (status = 404, description = "Unknown execution environment", body = crate::error::ClientError),
        (status = 500, description = "No idle runner (NOMAD_OVERLOAD)", body = crate::error::InternalServerError),
    ))]
pub async fn provide(
    State(state): State<Arc<AppState>>,
    RawBody(body): RawBody,
) -> Result<(Extension<RunnerTags>, Json<RunnerResponse>), ApiError> {
    let map = input::json_object(&body)?;
    let environment = input::req_uint(&map, "executionEnvironmentId", EnvironmentId::MAX)?;
    let environment = EnvironmentId::new(environment)
        .ok_or_else(|| ApiError::field("executionEnvironmentId", "is out of range"))?;
    let timeout = input::opt_uint(&map, "inactivityTimeout", MAX_SECONDS)?.unwrap_or(0);
    let runner = state
        .manager
        .claim(environment, Duration::from_secs(timeout))
        .await?;
    tracing::info!(runner_id = %runner.id(), environment_id = %environment, "runner claimed");
    let tags = RunnerTags {
        runner_id: runner.id().to_string(),
        environment_id: environment,
    };
    Ok((
        Extension(tags),
        Json(RunnerResponse {
            runner_id: runner.id().to_string(),
            mapped_ports: runner.mapped_ports().into_iter().map(Into::into).collect(),
        }),
    ))
}

/// Gives a runner back; it is destroyed.
#[utoipa::path(delete, path = "/runners/{runnerId}", tag = "runner",
    security(("poseidonAuthToken" = [])),
    params(("runnerId" = String, Path, description = "The runner to destroy")),
    responses(
        (status = 204, description = "Success"),
        (status = 401, description = "Client could not be authenticated"),
        (status = 410, description = "The runner is not available any longer", body = crate::error::ClientError),
    ))]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam,
    RawBody(_drained): RawBody,
) -> Result<(Extension<RunnerTags>, StatusCode), ApiError> {
    let runner = used_runner(&state, &id)?;
    let tags = RunnerTags {
        runner_id: id.clone(),
        environment_id: runner.environment(),
    };
    state.manager.return_runner(runner.id()).await?;
    tracing::info!(runner_id = %id, "runner returned");
    Ok((Extension(tags), StatusCode::NO_CONTENT))
}

/// Deletes, then writes files.
#[utoipa::path(patch, path = "/runners/{runnerId}/files", tag = "runner",
    security(("poseidonAuthToken" = [])),
    params(("runnerId" = String, Path, description = "Runner on which the files should be placed")),
    request_body = FileUpdateRequest,
    responses(
        (status = 204, description = "All files were saved"),
        (status = 400, description = "Invalid request", body = crate::error::ClientError),
        (status = 401, description = "Client could not be authenticated"),
        (status = 410, description = "The runner is not available any longer", body = crate::error::ClientError),
        (status = 413, description = "The body is larger than the configured limit", body = crate::error::ClientError),
        (status = 500, description = "Some files could not be written (UNKNOWN)", body = crate::error::InternalServerError),
    ))]
pub async fn update_files(
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam,
    RawBody(body): RawBody,
) -> Result<StatusCode, ApiError> {
    let runner = used_runner(&state, &id)?;
    let update = crate::file_update::parse_file_update(&body, state.settings.max_file_entries)?;
    runner.update_files(update).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Lists files.
#[utoipa::path(get, path = "/runners/{runnerId}/files", tag = "runner",
    security(("poseidonAuthToken" = [])),
    params(
        ("runnerId" = String, Path, description = "The runner"),
        ("recursive" = Option<bool>, Query, description = "List recursively (default true)"),
        ("path" = Option<String>, Query, description = "Directory to list (default ./)"),
        ("privilegedExecution" = Option<bool>, Query, description = "List as root (default false)"),
    ),
    responses(
        (status = 200, description = "The listing", body = FileListing),
        (status = 400, description = "Invalid query", body = crate::error::ClientError),
        (status = 401, description = "Client could not be authenticated"),
        (status = 410, description = "The runner is not available any longer", body = crate::error::ClientError),
        (status = 424, description = "The file is not available", body = crate::error::ClientError),
    ))]
pub async fn list_files(
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam,
    q: QueryMap,
) -> Result<Json<FileListing>, ApiError> {
    let runner = used_runner(&state, &id)?;
    let q = query(q)?;
    let path = q
        .get("path")
        .filter(|p| !p.is_empty())
        .cloned()
        .unwrap_or_else(|| "./".into());
    input::file_path(&path, "path")?;
    // As Poseidon: an unparsable `recursive` means true.
    let recursive = q
        .get("recursive")
        .and_then(|v| input::parse_bool(v))
        .unwrap_or(true);
    let privileged = input::query_bool(q.get("privilegedExecution"), "privilegedExecution", false)?;
    let files = runner
        .list_files(ListFilesRequest {
            path,
            recursive,
            privileged,
        })
        .await?;
    Ok(Json(FileListing {
        files: files.into_iter().map(Into::into).collect(),
    }))
}

/// Downloads a file.
#[utoipa::path(get, path = "/runners/{runnerId}/files/raw", tag = "runner",
    security(("poseidonAuthToken" = [])),
    params(
        ("runnerId" = String, Path, description = "The runner"),
        ("path" = String, Query, description = "The file"),
        ("privilegedExecution" = Option<bool>, Query, description = "Read as root (default false)"),
    ),
    responses(
        (status = 200, description = "The file", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, description = "Invalid query", body = crate::error::ClientError),
        (status = 401, description = "Client could not be authenticated"),
        (status = 410, description = "The runner is not available any longer", body = crate::error::ClientError),
        (status = 424, description = "The file is not available", body = crate::error::ClientError),
    ))]
pub async fn file_content(
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam,
    q: QueryMap,
) -> Result<Response, ApiError> {
    let runner = used_runner(&state, &id)?;
    let q = query(q)?;
    let path = q
        .get("path")
        .cloned()
        .ok_or_else(|| ApiError::field("path", "is required"))?;
    input::file_path(&path, "path")?;
    let privileged = input::query_bool(q.get("privilegedExecution"), "privilegedExecution", false)?;
    let content = runner.read_file(&path, privileged).await?;
    let body = Body::from_stream(content.body.map(|chunk| {
        chunk.map_err(|e| {
            tracing::warn!(error = %e, "file download broke off");
            std::io::Error::other(e.to_string())
        })
    }));
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(CONTENT_LENGTH, HeaderValue::from(content.size));
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(CONTENT_DISPOSITION, content_disposition(&path));
    Ok(response)
}

fn content_disposition(path: &str) -> HeaderValue {
    let name: String = path
        .chars()
        .map(|c| match c {
            '"' | '\\' => '_',
            c if c.is_control() => '_',
            c => c,
        })
        .collect();
    HeaderValue::from_bytes(format!("attachment; filename=\"{name}\"").as_bytes())
        .unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

/// Stores an execution request and answers the WebSocket URL that starts it.
#[utoipa::path(post, path = "/runners/{runnerId}/execute", tag = "runner",
    security(("poseidonAuthToken" = [])),
    params(("runnerId" = String, Path, description = "Runner on which the command should be executed")),
    request_body = ExecutionRequestDto,
    responses(
        (status = 200, description = "The WebSocket URL to connect to", body = ExecutionResponse),
        (status = 400, description = "Invalid request", body = crate::error::ClientError),
        (status = 401, description = "Client could not be authenticated"),
        (status = 410, description = "The runner is not available any longer", body = crate::error::ClientError),
    ))]
pub async fn execute(
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Json<ExecutionResponse>, ApiError> {
    let runner = used_runner(&state, &id)?;
    let request = parse_execution_request(&body)?;
    let execution_id = runner.store_execution(request)?;
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or(&state.settings.fallback_host);
    let scheme = if state.settings.tls { "wss" } else { "ws" };
    let websocket_url =
        format!("{scheme}://{host}/api/v1/runners/{id}/websocket?executionID={execution_id}");
    tracing::debug!(runner_id = %id, %execution_id, "execution stored");
    Ok(Json(ExecutionResponse { websocket_url }))
}

/// Connects to a stored execution and streams it (see the WebSocket schema).
///
/// The runner (410) and the execution id (404) are checked before the upgrade; a start the
/// backend fails is reported in the stream as an `error` message, never as a 5xx.
#[utoipa::path(get, path = "/runners/{runnerId}/websocket", tag = "runner",
    security(("poseidonAuthToken" = [])),
    params(
        ("runnerId" = String, Path, description = "Runner on which the execution is created"),
        ("executionID" = String, Query, description = "The execution to connect to"),
    ),
    responses(
        (status = 101, description = "Switching protocols to WebSocket"),
        (status = 400, description = "Not a WebSocket upgrade", body = crate::error::ClientError),
        (status = 401, description = "Client could not be authenticated"),
        (status = 404, description = "Unknown execution id", body = crate::error::ClientError),
        (status = 410, description = "The runner is not available any longer", body = crate::error::ClientError),
    ))]
pub async fn websocket(
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam,
    q: QueryMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let runner = used_runner(&state, &id)?;
    let upgrade = upgrade.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let execution_id: ExecutionId = query(q)?
        .get("executionID")
        .and_then(|v| v.parse().ok())
        .ok_or(ApiError::NotFound("execution id unknown".into()))?;
    // Everything that can be answered with a status is checked before the upgrade; from here
    // on, failures are reported in the stream.
    let taken = runner.take_execution(execution_id)?;
    let tracker = state.streams.tracker.clone();
    let span = tracing::info_span!(
        "execution",
        runner_id = %id,
        environment_id = runner.environment().get(),
        execution_id = %execution_id,
    );
    let response =
        upgrade
            .write_buffer_size(WRITE_BUFFER)
            .max_message_size(MAX_CLIENT_MESSAGE)
            .max_frame_size(MAX_CLIENT_MESSAGE)
            .on_failed_upgrade(|e| tracing::warn!(error = %e, "websocket upgrade failed"))
            .on_upgrade(move |socket| {
                tracker.track_future(async move {
                let _open = state.metrics.websocket_opened();
                let end = stream(socket, runner, taken, &state).await;
                state.metrics.stream_ended(match end {
                    StreamEnd::Completed => "completed",
                    StreamEnd::ClientGone => "client_gone",
                    StreamEnd::Shutdown => "shutdown",
                    StreamEnd::StartFailed => "start_failed",
                    StreamEnd::InvalidInput => "invalid_input",
                });
                tracing::info!(runner_id = %id, %execution_id, ?end, "execution stream ended");
            }.instrument(span))
            });
    Ok(response)
}

async fn stream(
    socket: WebSocket,
    runner: Arc<dyn Runner>,
    taken: TakenExecution,
    state: &AppState,
) -> StreamEnd {
    let (sink, source) = socket.split();
    let sink = sink.with(|frame: ServerFrame| {
        futures::future::ready(Ok::<_, axum::Error>(match frame {
            ServerFrame::Message(m) => Message::Text(m.to_json().into()),
            ServerFrame::Close(code) => Message::Close(Some(CloseFrame {
                code,
                reason: "".into(),
            })),
        }))
    });
    let source = source.map(|frame| match frame {
        Ok(Message::Text(text)) => ClientFrame::Text(text.to_string()),
        Ok(Message::Close(_)) => ClientFrame::Close,
        // A message over MAX_CLIENT_MESSAGE (which the WebSocket layer must hold whole, so
        // accepting larger ones would unbound memory), invalid UTF-8, a protocol violation, or
        // a broken connection; for the last the stream's answer simply fails to send.
        Err(e) => ClientFrame::Invalid(e.to_string()),
        Ok(_) => ClientFrame::Other,
    });
    let execution_id = taken.id;
    let start = async move {
        let execution = runner.start(taken).await?;
        tracing::info!(runner_id = %runner.id(), %execution_id, "execution started");
        Ok::<_, runner_core::ManagerError>(execution)
    };
    ws::start_and_run(
        Box::pin(sink),
        Box::pin(source),
        start,
        state.streams.cancel.clone(),
    )
    .await
}

fn parse_execution_request(body: &[u8]) -> Result<ExecutionRequest, ApiError> {
    let map = input::json_object(body)?;
    let command = input::req_string(&map, "command")?;
    let time_limit = input::opt_uint(&map, "timeLimit", MAX_SECONDS)?.unwrap_or(0);
    let privileged_execution = input::opt_bool(&map, "privilegedExecution")?;
    let environment = match map.get("environment") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(vars)) => vars
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(ApiError::field(
                    &format!("environment.{k}"),
                    "must be a string",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::field("environment", "must be an object")),
    };
    let request = ExecutionRequest {
        command,
        time_limit,
        privileged_execution,
        environment,
    };
    request
        .validate()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err<T>(r: Result<T, ApiError>) -> String {
        r.err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn execution_requests_allow_quotes_and_name_bad_fields() {
        let r = parse_execution_request(
            br#"{"command":"echo 'hi'","environment":{"A":"b 'c' \"d\""},"timeLimit":3}"#,
        )
        .expect("valid");
        assert_eq!(r.command, "echo 'hi'");
        assert_eq!(r.environment["A"], "b 'c' \"d\"");
        assert!(err(parse_execution_request(br#"{"command":1}"#)).starts_with("command"));
        assert!(err(parse_execution_request(br#"{}"#)).starts_with("command"));
        assert!(
            err(parse_execution_request(
                br#"{"command":"x","timeLimit":-1}"#
            ))
            .starts_with("timeLimit")
        );
        assert!(
            err(parse_execution_request(
                br#"{"command":"x","environment":{"A":1}}"#
            ))
            .starts_with("environment.A")
        );
        assert!(
            err(parse_execution_request(
                br#"{"command":"x","environment":{"A=B":"1"}}"#
            ))
            .starts_with("environment")
        );
        assert!(
            err(parse_execution_request(b"{\"command\":\"a\\u0000b\"}")).starts_with("command")
        );
    }

    #[test]
    fn content_disposition_survives_odd_names() {
        assert_eq!(
            content_disposition("test.txt").to_str().ok(),
            Some("attachment; filename=\"test.txt\"")
        );
        assert!(content_disposition("a\"b\nc").to_str().is_ok());
    }
}
