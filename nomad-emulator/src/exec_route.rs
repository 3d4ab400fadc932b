//! `GET /v1/client/allocation/:id/exec` (nomad.md §1.10, §5.7): always upgrades (Nomad 2.x),
//! then authenticates, parses and checks the request and reports errors as close frames; a valid
//! session is handed to the runtime, which does the frame I/O.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::Value;

use crate::emulator::Inner;
use crate::runtime::ExecSession;

/// Close code for errors that map from HTTP 500.
const INTERNAL: u16 = 1011;
/// Close code for every other error.
const POLICY: u16 = 1008;
/// How long the `ws_handshake` frame may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn close(mut socket: WebSocket, code: u16, reason: String) {
    tracing::debug!(code, %reason, "exec refused");
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

/// Upgrades, then runs [`session`].
pub(crate) async fn handler(
    State(inner): State<Arc<Inner>>,
    Path(alloc_id): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    ws.on_upgrade(move |socket| session(inner, alloc_id, q, headers, socket))
}

fn param<'a>(q: &'a [(String, String)], k: &str) -> Option<&'a str> {
    q.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
}

async fn session(
    inner: Arc<Inner>,
    alloc_id: String,
    q: Vec<(String, String)>,
    headers: HeaderMap,
    mut socket: WebSocket,
) {
    // Authentication: the header, or the first frame when `ws_handshake=true`.
    if param(&q, "ws_handshake") == Some("true") {
        let frame = tokio::time::timeout(HANDSHAKE_TIMEOUT, socket.recv()).await;
        let token = match frame {
            Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<Value>(t.as_str())
                .ok()
                .filter(|v| v.get("version").and_then(Value::as_i64) == Some(1))
                .map(|v| {
                    v.get("auth_token")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                }),
            _ => None,
        };
        let Some(token) = token else {
            return close(socket, POLICY, "invalid handshake".into()).await;
        };
        if inner.config.token.as_ref().is_some_and(|t| *t != token) {
            return close(socket, POLICY, "Permission denied".into()).await;
        }
    } else if !crate::api::token_ok(&inner, &headers) {
        return close(socket, POLICY, "Permission denied".into()).await;
    }
    let argv: Vec<String> = match param(&q, "command") {
        None | Some("") => Vec::new(),
        Some(c) => match serde_json::from_str(c) {
            Ok(v) => v,
            Err(e) => {
                return close(
                    socket,
                    INTERNAL,
                    format!("failed to marshal command into json: {e}"),
                )
                .await;
            }
        },
    };
    let tty = match param(&q, "tty") {
        None | Some("") => false,
        Some(t) => match t.parse::<bool>() {
            Ok(b) => b,
            Err(e) => {
                return close(socket, INTERNAL, format!("tty value is not a boolean: {e}")).await;
            }
        },
    };
    let task = param(&q, "task").unwrap_or_default().to_owned();
    let check = {
        let st = inner.lock();
        match st.allocs.get(&alloc_id) {
            None => Err(format!("Unknown allocation \"{alloc_id}\"")),
            Some(a) if a.client_terminal() => Err(format!(
                "exec not possible, client status of allocation {alloc_id} is {}",
                a.client_status
            )),
            Some(_) if task.is_empty() => Err("must provide task name".into()),
            Some(a) if !a.task_names().contains(&task) => {
                Err(format!("unknown task name \"{task}\""))
            }
            Some(a) => {
                let ts = a.task_states.as_ref().and_then(|m| m.get(&task));
                match ts {
                    Some(ts) if ts.started_at.is_some() || ts.restarts > 0 => {
                        if ts.state != "running" {
                            Err(format!("task \"{task}\" is not running."))
                        } else if argv.is_empty() {
                            Err("command is not present".into())
                        } else {
                            Ok(())
                        }
                    }
                    _ => Err(format!("task \"{task}\" not started yet.")),
                }
            }
        }
    };
    if let Err(reason) = check {
        return close(socket, POLICY, reason).await;
    }
    let fault = inner.faults().take_exec(&alloc_id);
    inner
        .runtime
        .exec(
            socket,
            ExecSession {
                alloc_id,
                task,
                argv,
                tty,
                fault,
            },
        )
        .await;
}
