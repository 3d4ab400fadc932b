//! `ExecutorApi` on HashiCorp Nomad: runners as Nomad jobs, as Poseidon runs them (nomad.md).
//!
//! [`NomadExecutor::connect`] connects to Nomad, follows its event stream and implements
//! [`runner_core::ExecutorApi`]. See the crate's README for which calls go through
//! nomad-client-rs and which through the crate's own code.

pub mod api;
pub mod command;
pub mod config;
pub mod error;
pub mod exec;
mod executor;
pub mod files;
pub mod jobs;
pub mod stream;
pub mod tls;
pub mod tracker;

pub use api::{HttpNomadApi, NomadApi};
pub use config::{DnsConfig, NetworkConfig, NomadConfig, TlsConfig};
pub use error::{ApiError, NomadError};
pub use executor::NomadExecutor;
