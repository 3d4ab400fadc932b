//! The API's error answers: [`ApiError`] turns domain errors into Poseidon's statuses and bodies.
//!
//! Client errors carry `{"message"}` (unknown routes and ids included), server errors
//! `{"message","errorCode"}`; only 401 has an empty body. Nothing here ever answers a 5xx the contract does not
//! list for a client's mistake.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use runner_core::{BackendError, FileError, ManagerError, ValidationError};
use serde::Serialize;
use utoipa::ToSchema;

/// The machine-readable codes of server errors (CodeOcean branches on these names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// The backend cannot be reached.
    NomadUnreachable,
    /// No idle runner is available right now.
    NomadOverload,
    /// The backend failed.
    NomadInternalServerError,
    /// Some prewarming pool is below the alert threshold.
    PrewarmingPoolDepleting,
    /// Anything else.
    Unknown,
}

/// A client error body (`ClientError` in Poseidon's spec).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ClientError {
    /// Why the request could not be handled.
    pub message: String,
}

/// A server error body (`InternalServerError` in Poseidon's spec).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InternalServerError {
    /// Why the request could not be handled.
    pub message: String,
    /// What kind of failure it was.
    pub error_code: ErrorCode,
}

/// Every non-success answer of the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401 with an empty body.
    #[error("unauthorized")]
    Unauthorized,
    /// 400 `{"message"}`.
    #[error("{0}")]
    BadRequest(String),
    /// 404 `{"message"}`.
    #[error("{0}")]
    NotFound(String),
    /// 405 `{"message"}`: a known route with another method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 410 `{"message"}`: the runner is unknown, idle or gone.
    #[error("{0}")]
    RunnerGone(String),
    /// 413 `{"message"}`.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 424 `{"message"}`: a file is missing or may not be read.
    #[error("file not found or insufficient permissions")]
    FailedFileDependency,
    /// 500 `{"message","errorCode"}`.
    #[error("{message}")]
    Internal {
        /// The message.
        message: String,
        /// The code.
        code: ErrorCode,
    },
    /// 503 `{"message","errorCode":"PREWARMING_POOL_DEPLETING"}`.
    #[error("{0}")]
    Depleting(String),
    /// 503 `{"message","errorCode":"NOMAD_UNREACHABLE"}`: the backend cannot be reached.
    #[error("{0}")]
    BackendDown(String),
}

impl ApiError {
    /// A 400 naming `field`.
    pub fn field(field: &str, problem: impl std::fmt::Display) -> Self {
        Self::BadRequest(format!("{field}: {problem}"))
    }

    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::RunnerGone(_) => StatusCode::GONE,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::FailedFileDependency => StatusCode::FAILED_DEPENDENCY,
            Self::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Depleting(_) | Self::BackendDown(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match self {
            Self::Unauthorized => status.into_response(),
            Self::Internal { message, code } => {
                tracing::warn!(%message, ?code, "request failed");
                let body = InternalServerError {
                    message,
                    error_code: code,
                };
                (status, Json(body)).into_response()
            }
            Self::Depleting(message) => {
                let body = InternalServerError {
                    message,
                    error_code: ErrorCode::PrewarmingPoolDepleting,
                };
                (status, Json(body)).into_response()
            }
            Self::BackendDown(message) => {
                let body = InternalServerError {
                    message,
                    error_code: ErrorCode::NomadUnreachable,
                };
                (status, Json(body)).into_response()
            }
            other => {
                let body = ClientError {
                    message: other.to_string(),
                };
                (status, Json(body)).into_response()
            }
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        let message = e.to_string();
        match e {
            BackendError::RunnerNotFound(_) => Self::RunnerGone(message),
            BackendError::EnvironmentNotFound(_) => Self::NotFound(message),
            BackendError::InvalidRequest(_) | BackendError::Unavailable(_) => {
                Self::BadRequest(message)
            }
            BackendError::Unreachable(_) => Self::Internal {
                message,
                code: ErrorCode::NomadUnreachable,
            },
            BackendError::Overloaded(_) => Self::Internal {
                message,
                code: ErrorCode::NomadOverload,
            },
            BackendError::Internal(_) => Self::Internal {
                message,
                code: ErrorCode::NomadInternalServerError,
            },
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        Self::BadRequest(e.to_string())
    }
}

impl From<FileError> for ApiError {
    fn from(e: FileError) -> Self {
        match e {
            FileError::NotFound => Self::FailedFileDependency,
            FileError::Partial(_) => Self::Internal {
                message: e.to_string(),
                code: ErrorCode::Unknown,
            },
            FileError::InvalidPath(_) => Self::BadRequest(e.to_string()),
            FileError::Backend(b) => b.into(),
        }
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> Self {
        let message = e.to_string();
        match e {
            ManagerError::UnknownEnvironment(_) => Self::NotFound(message),
            ManagerError::NoIdleRunner(_) => Self::Internal {
                message,
                code: ErrorCode::NomadOverload,
            },
            ManagerError::UnknownRunner(_) => Self::RunnerGone(message),
            ManagerError::UnknownExecution => Self::NotFound(message),
            ManagerError::InvalidSpec(_)
            | ManagerError::InvalidExecution(_)
            | ManagerError::TooManyPendingExecutions(_)
            | ManagerError::PendingExecutionsTooLarge { .. } => Self::BadRequest(message),
            ManagerError::Files(f) => f.into(),
            ManagerError::Backend(b) => b.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runner_core::{EnvironmentId, FileFailure, RunnerId};

    #[test]
    fn domain_errors_map_to_the_contract_statuses() {
        let env = EnvironmentId::new(3).expect("valid id");
        let cases: Vec<(ManagerError, StatusCode)> = vec![
            (ManagerError::UnknownEnvironment(env), StatusCode::NOT_FOUND),
            (
                ManagerError::NoIdleRunner(env),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (
                ManagerError::UnknownRunner(RunnerId::from("x")),
                StatusCode::GONE,
            ),
            (ManagerError::UnknownExecution, StatusCode::NOT_FOUND),
            (FileError::NotFound.into(), StatusCode::FAILED_DEPENDENCY),
            (
                FileError::Partial(vec![FileFailure {
                    path: "a".into(),
                    reason: "b".into(),
                }])
                .into(),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (
                FileError::InvalidPath("\0".into()).into(),
                StatusCode::BAD_REQUEST,
            ),
        ];
        for (error, status) in cases {
            assert_eq!(ApiError::from(error).status(), status);
        }
    }

    #[test]
    fn overload_and_partial_copy_carry_their_codes() {
        let env = EnvironmentId::new(3).expect("valid id");
        assert!(matches!(
            ApiError::from(ManagerError::NoIdleRunner(env)),
            ApiError::Internal {
                code: ErrorCode::NomadOverload,
                ..
            }
        ));
        assert!(matches!(
            ApiError::from(ManagerError::Files(FileError::Partial(vec![]))),
            ApiError::Internal {
                code: ErrorCode::Unknown,
                ..
            }
        ));
    }
}
