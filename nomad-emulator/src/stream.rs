//! `GET /v1/event/stream` (nomad.md §5.6): NDJSON batches, `{}` first and as heartbeat, replay
//! from the buffer, and abrupt ends (drop faults, overflow, restarts) the client sees as EOF.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::api::{ApiError, text};
use crate::emulator::Inner;
use crate::events::{EventBatch, Filter};

struct StreamState {
    first: bool,
    replay: VecDeque<Arc<EventBatch>>,
    rx: mpsc::Receiver<Arc<EventBatch>>,
    abort: CancellationToken,
    shutdown: CancellationToken,
    stall: watch::Receiver<bool>,
    heartbeat: tokio::time::Interval,
}

fn line(b: &EventBatch) -> Bytes {
    let mut v = serde_json::to_vec(b).unwrap_or_else(|_| b"{}".to_vec());
    v.push(b'\n');
    Bytes::from(v)
}

/// The error that ends a body abruptly (hyper then closes the connection mid-body).
fn broken() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "event stream dropped",
    )
}

async fn next_chunk(s: &mut StreamState) -> Option<Result<Bytes, std::io::Error>> {
    if s.first {
        s.first = false;
        return Some(Ok(Bytes::from_static(b"{}\n")));
    }
    loop {
        if s.abort.is_cancelled() || s.shutdown.is_cancelled() {
            return Some(Err(broken()));
        }
        if *s.stall.borrow() {
            tokio::select! {
                _ = s.abort.cancelled() => {}
                _ = s.shutdown.cancelled() => {}
                r = s.stall.changed() => if r.is_err() { return Some(Err(broken())) },
            }
            // Heartbeats missed while stalled are not sent afterwards.
            s.heartbeat.reset();
            continue;
        }
        if let Some(b) = s.replay.pop_front() {
            return Some(Ok(line(&b)));
        }
        tokio::select! {
            biased;
            _ = s.abort.cancelled() => return Some(Err(broken())),
            _ = s.shutdown.cancelled() => return Some(Err(broken())),
            r = s.stall.changed() => if r.is_err() { return Some(Err(broken())) },
            b = s.rx.recv() => match b {
                Some(b) => return Some(Ok(line(&b))),
                None => return Some(Err(broken())),
            },
            _ = s.heartbeat.tick() => return Some(Ok(Bytes::from_static(b"{}\n"))),
        }
    }
}

/// Subscribes and streams.
pub(crate) async fn handler(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let mut index = 0u64;
    let mut topics = Vec::new();
    let mut namespace = "default".to_owned();
    for (k, v) in q {
        match k.as_str() {
            "index" => {
                index = v
                    .parse()
                    .map_err(|e| ApiError::bad_request(format!("Unable to parse index: {e}")))?;
            }
            "topic" => topics.push(v),
            "namespace" if !v.is_empty() => namespace = v,
            _ => {}
        }
    }
    let topics = Filter::parse_topics(&topics).map_err(ApiError::bad_request)?;
    let filter = Filter {
        namespaces: (namespace != "*").then(|| BTreeSet::from([namespace])),
        topics,
    };
    let sub = inner.lock().broker.subscribe(filter, index);
    let period = inner
        .config
        .heartbeat_interval
        .max(std::time::Duration::from_millis(1));
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = StreamState {
        first: true,
        replay: sub.replay,
        rx: sub.rx,
        abort: sub.abort,
        shutdown: inner.shutdown.clone(),
        stall: inner.stall_tx.subscribe(),
        heartbeat,
    };
    let body = futures::stream::unfold(state, |mut s| async move {
        let chunk = next_chunk(&mut s).await?;
        let end = chunk.is_err();
        if end {
            // Yield the error once, then end.
            s.abort.cancel();
        }
        Some((chunk, s))
    });
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    let _ = text;
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}
