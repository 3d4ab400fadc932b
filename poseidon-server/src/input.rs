//! Reading request input: bodies with a size and time bound, and JSON objects field by field so
//! that every rejection names the field at fault.
//!
//! Bodies are parsed into [`serde_json::Value`] first and then checked key by key; unknown keys
//! are ignored (as Poseidon does). Nothing here panics on any input.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path};
use axum::http::Request;
use axum::http::request::Parts;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// How long reading a request body may take (Poseidon's `ReadTimeout`).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(15);

/// A request body read completely, within the configured size limit and [`BODY_READ_TIMEOUT`].
#[derive(Debug)]
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request<Body>, state: &S) -> Result<Self, Self::Rejection> {
        let read = Bytes::from_request(req, state);
        match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
            Err(_) => Err(ApiError::BadRequest(
                "request body not received in time".into(),
            )),
            Ok(Ok(bytes)) => Ok(Self(bytes)),
            Ok(Err(rejection)) => {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    Err(ApiError::PayloadTooLarge(
                        "request body is larger than the configured limit".into(),
                    ))
                } else {
                    Err(ApiError::BadRequest(format!(
                        "request body could not be read: {}",
                        rejection.body_text()
                    )))
                }
            }
        }
    }
}

/// A path parameter decoded as text; an undecodable one (e.g. `%FF`) is a 400 with a message.
#[derive(Debug)]
pub struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::BadRequest(format!(
                "invalid path parameter: {}",
                rejection.body_text()
            ))),
        }
    }
}

/// Parses `body` as a JSON object.
pub fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest("request body is empty".into()));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::BadRequest(
            "request body must be a JSON object".into(),
        )),
        Err(e) => Err(ApiError::BadRequest(format!("invalid JSON: {e}"))),
    }
}

/// The value of `field`, treating `null` like a missing key.
fn present<'a>(map: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    map.get(field).filter(|v| !v.is_null())
}

/// A required key.
pub fn required<'a>(map: &'a Map<String, Value>, field: &str) -> Result<&'a Value, ApiError> {
    present(map, field).ok_or_else(|| ApiError::field(field, "is required"))
}

/// A non-negative integer up to `max`; `None` when the key is absent or `null`.
pub fn opt_uint(map: &Map<String, Value>, field: &str, max: u64) -> Result<Option<u64>, ApiError> {
    present(map, field).map(|v| uint(v, field, max)).transpose()
}

/// A required non-negative integer up to `max`.
pub fn req_uint(map: &Map<String, Value>, field: &str, max: u64) -> Result<u64, ApiError> {
    uint(required(map, field)?, field, max)
}

/// Checks that `value` is an integer in `0..=max`.
pub fn uint(value: &Value, field: &str, max: u64) -> Result<u64, ApiError> {
    match value {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                if u <= max {
                    Ok(u)
                } else {
                    Err(ApiError::field(field, format!("must be at most {max}")))
                }
            } else if n.as_i64().is_some() || n.as_f64().is_some_and(|f| f < 0.0) {
                Err(ApiError::field(field, "must not be negative"))
            } else {
                Err(ApiError::field(field, "must be an integer"))
            }
        }
        _ => Err(ApiError::field(field, "must be an integer")),
    }
}

/// An optional boolean, `false` when absent or `null`.
pub fn opt_bool(map: &Map<String, Value>, field: &str) -> Result<bool, ApiError> {
    match present(map, field) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::field(field, "must be a boolean")),
    }
}

/// A required boolean.
pub fn req_bool(map: &Map<String, Value>, field: &str) -> Result<bool, ApiError> {
    match required(map, field)? {
        Value::Bool(b) => Ok(*b),
        _ => Err(ApiError::field(field, "must be a boolean")),
    }
}

/// A required string.
pub fn req_string(map: &Map<String, Value>, field: &str) -> Result<String, ApiError> {
    match required(map, field)? {
        Value::String(s) => Ok(s.clone()),
        _ => Err(ApiError::field(field, "must be a string")),
    }
}

/// Parses a query-string boolean as Go's `strconv.ParseBool` does.
pub fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// A boolean query parameter: `default` when absent or empty, 400 naming it when unparsable.
pub fn query_bool(value: Option<&String>, field: &str, default: bool) -> Result<bool, ApiError> {
    match value.map(String::as_str) {
        None | Some("") => Ok(default),
        Some(text) => parse_bool(text)
            .ok_or_else(|| ApiError::field(field, "must be a boolean (true or false)")),
    }
}

/// Checks a file path given by a client: not empty, no NUL, no replacement characters left by
/// an invalid percent-encoding.
pub fn file_path(path: &str, field: &str) -> Result<(), ApiError> {
    if path.is_empty() {
        return Err(ApiError::field(field, "must not be empty"));
    }
    if path.contains('\0') {
        return Err(ApiError::field(field, "must not contain NUL bytes"));
    }
    if path.contains('\u{FFFD}') {
        return Err(ApiError::field(field, "must be valid UTF-8"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn integers_are_checked_with_the_field_name() {
        let m = obj(json!({"a": -1, "b": 1.5, "c": "x", "d": 7, "e": 1e300}));
        let msg = |r: Result<u64, ApiError>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(msg(req_uint(&m, "a", 10)), "a: must not be negative");
        assert_eq!(msg(req_uint(&m, "b", 10)), "b: must be an integer");
        assert_eq!(msg(req_uint(&m, "c", 10)), "c: must be an integer");
        assert_eq!(msg(req_uint(&m, "d", 5)), "d: must be at most 5");
        assert_eq!(msg(req_uint(&m, "e", 5)), "e: must be an integer");
        assert_eq!(msg(req_uint(&m, "z", 5)), "z: is required");
        assert_eq!(req_uint(&m, "d", 10).ok(), Some(7));
        assert_eq!(opt_uint(&m, "z", 10).ok(), Some(None));
    }

    #[test]
    fn bodies_must_be_json_objects() {
        assert!(json_object(b"").is_err());
        assert!(json_object(b"  ").is_err());
        assert!(json_object(b"[]").is_err());
        assert!(json_object(b"{\"a\":").is_err());
        assert!(json_object(b"{\"a\":1}").is_ok());
    }

    #[test]
    fn query_booleans_follow_go() {
        assert_eq!(query_bool(None, "x", true).ok(), Some(true));
        assert_eq!(
            query_bool(Some(&"F".to_string()), "x", true).ok(),
            Some(false)
        );
        assert!(query_bool(Some(&"maybe".to_string()), "x", true).is_err());
    }
}
