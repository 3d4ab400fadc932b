//! A stand-in Nomad agent for tests and demos (nomad.md §5).
//!
//! It answers the part of Nomad's HTTP API that Poseidon uses exactly as a Nomad agent in dev mode
//! would, streams Nomad's events, serves alloc exec over WebSocket, and runs each allocation as a
//! real local sandbox. Faults can be injected from Rust or over a small HTTP control API.

pub mod exec;
pub mod runtime;
pub mod sandbox;
