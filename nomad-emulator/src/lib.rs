//! A stand-in Nomad agent for tests and demos (nomad.md §5).
//!
//! It answers the part of Nomad's HTTP API that Poseidon uses exactly as a Nomad agent in dev mode
//! would, streams Nomad's events, serves alloc exec over WebSocket, and runs each allocation as a
//! real local sandbox. Faults can be injected from Rust or over a small HTTP control API.
//!
//! ```no_run
//! # async fn demo(runtime: std::sync::Arc<dyn nomad_emulator::runtime::AllocationRuntime>) {
//! use nomad_emulator::{EmulatorConfig, NomadEmulator};
//! let emu = NomadEmulator::start(EmulatorConfig::for_tests(), runtime).await.unwrap();
//! let url = emu.base_url(); // http://127.0.0.1:<port>
//! emu.control().fail_requests(nomad_emulator::Match::path("/v1/jobs").method("PUT"),
//!     nomad_emulator::Times(2), 500, "rpc error: No cluster leader");
//! emu.shutdown().await;
//! # }
//! ```

mod api;
pub mod blocking;
mod canonical;
pub mod cli;
mod client;
pub mod config;
pub mod control;
mod emulator;
pub mod events;
pub mod exec;
mod exec_route;
pub mod faults;
mod model;
mod persist;
pub mod runtime;
pub mod sandbox;
mod scheduler;
mod shapes;
mod state;
mod stream;

pub use config::{EmulatorConfig, NodeSpec};
pub use control::{Control, RecordedRequest, WaitTimeout};
pub use emulator::{EmulatorError, NomadEmulator};
pub use events::{Event, EventBatch};
pub use faults::{Match, RequestFault, Times};
