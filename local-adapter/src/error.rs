//! Errors of the local backend's own operations (start-up, runner creation).

use std::io;
use std::path::PathBuf;

/// Why the local backend could not start or could not set up a runner.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The kernel or the machine lacks something the sandbox needs.
    #[error("missing kernel feature {feature}: {fix}")]
    MissingFeature {
        /// What is missing (e.g. "user namespaces").
        feature: &'static str,
        /// How to provide it.
        fix: String,
    },
    /// The data directory cannot be used.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The data directory's path is too long for the control sockets placed in it.
    #[error("data directory {0} has a path too long for unix sockets (at most 80 bytes)")]
    DataDirTooLong(PathBuf),
    /// The durable store failed.
    #[error("state store: {0}")]
    Store(String),
    /// A cgroup operation failed.
    #[error("cgroup {path}: {source}")]
    Cgroup {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The sandbox helper failed to start a runner.
    #[error("sandbox setup failed: {0}")]
    Sandbox(String),
    /// An I/O error with the given context.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// What failed.
        source: io::Error,
    },
}

impl LocalError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
