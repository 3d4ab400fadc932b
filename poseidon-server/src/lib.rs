//! Poseidon's HTTP API v1 as a library: the axum application ([`app`]), its configuration, the
//! execution WebSocket protocol, and the server loop with TLS and graceful shutdown.
//!
//! The binary (`main.rs`) only parses arguments, loads the configuration, builds a backend and
//! calls [`serve::run`]. Tests drive [`app`] over real sockets.

pub mod auth;
pub mod config;
pub mod dto;
pub mod error;
pub mod file_update;
pub mod input;
pub mod metrics;
pub mod observe;
pub mod openapi;
pub mod request_log;
pub mod routes;
pub mod serve;
pub mod state;
pub mod systemd;
pub mod telemetry;
pub mod ws;

pub use error::ApiError;
pub use routes::app;
pub use state::{ApiSettings, AppState};
