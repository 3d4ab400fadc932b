//! Errors of the Nomad backend and how they map onto [`BackendError`].

use runner_core::BackendError;

/// A failed call to Nomad's HTTP API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// No answer: connection refused, reset, timed out, TLS failure.
    #[error("nomad unreachable: {0}")]
    Unreachable(String),
    /// Nomad answered with a status outside 2xx and this text.
    #[error("nomad answered {status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// Nomad's plain-text reason.
        message: String,
    },
    /// The answer could not be read as the expected JSON.
    #[error("unreadable answer from nomad: {0}")]
    Unreadable(String),
}

impl ApiError {
    /// Whether retrying the same call may succeed (no answer, 5xx, 429).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable(_) => true,
            Self::Status { status, .. } => *status >= 500 || *status == 429,
            Self::Unreadable(_) => false,
        }
    }

    /// Whether Nomad said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Status { status: 404, .. })
    }
}

impl From<ApiError> for BackendError {
    fn from(e: ApiError) -> Self {
        match &e {
            ApiError::Unreachable(_) => BackendError::Unreachable(e.to_string()),
            ApiError::Status { status: 429, .. } => BackendError::Overloaded(e.to_string()),
            ApiError::Status { status: 503, .. } => BackendError::Unreachable(e.to_string()),
            ApiError::Status { status: 400, .. } => BackendError::InvalidRequest(e.to_string()),
            _ => BackendError::Internal(e.to_string()),
        }
    }
}

/// Why [`crate::NomadExecutor::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum NomadError {
    /// The configuration cannot work (bad TLS files, bad address).
    #[error("invalid nomad configuration: {0}")]
    Config(String),
    /// Nomad could not be reached or refused the first calls.
    #[error("nomad unreachable: {0}")]
    Unreachable(String),
    /// The data directory (clean-shutdown marker) cannot be used.
    #[error("nomad data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

impl From<NomadError> for BackendError {
    fn from(e: NomadError) -> Self {
        match e {
            NomadError::Unreachable(m) => BackendError::Unreachable(m),
            other => BackendError::Internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_map_to_what_the_manager_should_do() {
        let status = |status: u16| ApiError::Status {
            status,
            message: "x".into(),
        };
        assert!(matches!(
            BackendError::from(ApiError::Unreachable("refused".into())),
            BackendError::Unreachable(_)
        ));
        assert!(matches!(
            BackendError::from(status(429)),
            BackendError::Overloaded(_)
        ));
        assert!(matches!(
            BackendError::from(status(500)),
            BackendError::Internal(_)
        ));
        assert!(status(500).is_transient() && !status(404).is_transient());
        assert!(status(404).is_not_found());
    }
}
