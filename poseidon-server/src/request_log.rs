//! A span per request, with a request id echoed in `X-Request-Id`.
//!
//! The span (`request`) carries `request_id`, `method`, `route` and, where the path names them,
//! `runner_id`, `environment_id` and `execution_id`; every log line of the request (and of the
//! execution stream it opens) is inside it, so the JSON formatter prints them on each line and
//! Sentry tags its events with them. A client's own `X-Request-Id` is kept when it is sane (1 to
//! [`MAX_REQUEST_ID`] characters of `A-Za-z0-9-_.:`); otherwise the server makes one.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use runner_core::{ExecutionId, RunnerId};
use tracing::Instrument;
use tracing::field::Empty;

/// The header carrying the request id, in requests and responses.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest request id accepted from a client.
pub const MAX_REQUEST_ID: usize = 128;

/// The longest path id copied into the span (ids are far shorter; a longer one is garbage).
const MAX_PATH_ID: usize = 64;

/// Whether a client's request id may be used as it is.
pub fn is_sane_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// A new request id: this process's random prefix and a counter (unique, cheap, sortable).
fn generate_request_id() -> HeaderValue {
    static PREFIX: OnceLock<String> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let uuid = uuid::Uuid::new_v4().simple().to_string();
        uuid[..12].to_string()
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let id = format!("{prefix}-{n}");
    // Hex digits, a dash and decimal digits are always a valid header value.
    HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Middleware: opens the request's span, runs the request in it and echoes the request id.
pub async fn request_span(request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .filter(|v| is_sane_request_id(v.as_bytes()))
        .cloned()
        .unwrap_or_else(generate_request_id);
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str);
    let method = request.method().as_str();
    let sentry_name = crate::telemetry::sentry_enabled().then(|| format!("{method} {route}"));
    let span = tracing::info_span!(
        "request",
        request_id = id.to_str().unwrap_or_default(),
        method,
        route,
        runner_id = Empty,
        environment_id = Empty,
        execution_id = Empty,
        "sentry.op" = "http.server",
        "sentry.name" = sentry_name.as_deref(),
    );
    record_path_ids(&span, route, request.uri());
    let mut response = next.run(request).instrument(span).await;
    response.headers_mut().insert(REQUEST_ID.clone(), id);
    response
}

/// Records the runner, environment and execution a request's path and query name.
fn record_path_ids(span: &tracing::Span, route: &str, uri: &axum::http::Uri) {
    // `/api/v1/runners/{id}/…` and `/api/v1/execution-environments/{id}`: the id is segment 4.
    let Some(path_id) = uri
        .path()
        .split('/')
        .nth(4)
        .filter(|s| !s.is_empty() && s.len() <= MAX_PATH_ID)
    else {
        return;
    };
    if route.starts_with("/api/v1/runners/{runner_id}") {
        span.record("runner_id", path_id);
        if let Some(environment) = RunnerId::from(path_id).environment() {
            span.record("environment_id", environment.get());
        }
        if let Some(execution) = uri.query().and_then(|q| {
            q.split('&')
                .filter_map(|pair| pair.strip_prefix("executionID="))
                .find_map(|v| v.parse::<ExecutionId>().ok())
        }) {
            span.record("execution_id", tracing::field::display(execution));
        }
    } else if route.starts_with("/api/v1/execution-environments/{environment_id}")
        && let Ok(environment) = path_id.parse::<u64>()
    {
        span.record("environment_id", environment);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sane_request_ids_are_kept() {
        assert!(is_sane_request_id(b"abc-123_x.y:z"));
        assert!(!is_sane_request_id(b""));
        assert!(!is_sane_request_id(b"a b"));
        assert!(!is_sane_request_id(b"a\"b"));
        assert!(!is_sane_request_id(&[b'a'; MAX_REQUEST_ID + 1]));
        assert!(is_sane_request_id(&[b'a'; MAX_REQUEST_ID]));
    }

    #[test]
    fn generated_ids_are_unique_and_sane() {
        let a = generate_request_id();
        let b = generate_request_id();
        assert_ne!(a, b);
        assert!(is_sane_request_id(a.as_bytes()), "{a:?}");
    }
}
