//! `ExecutorApi` on HashiCorp Nomad: runners as Nomad jobs, as Poseidon runs them.

pub mod api;
pub mod command;
pub mod config;
pub mod error;
pub mod exec;
pub mod files;
pub mod jobs;
pub mod stream;
pub mod tls;
pub mod tracker;

pub use config::{NetworkConfig, NomadConfig, TlsConfig};
pub use error::{ApiError, NomadError};
