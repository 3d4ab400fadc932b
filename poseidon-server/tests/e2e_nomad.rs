//! End to end on Nomad: the `poseidon-server` binary with its Nomad backend against a
//! `nomad-emulator` each test starts (allocations run as sandboxes on this machine; needs root),
//! with the same test bodies as `e2e_local.rs` (tests/e2e/shared.rs), over HTTP and WebSocket.
//!
//! Every test starts its own server on a fresh data directory and an ephemeral port, and removes
//! its environments before stopping it (runners deliberately survive a server stop).

mod common;

#[ctor::ctor]
fn sandbox_hook() {
    // The emulator's sandboxes re-execute this test binary as their init.
    local_adapter::sandbox_main_if_requested();
}

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::process::{ServerProcess, spawn};
use common::{TOKEN, Transcript, connect, read_all};
use serde_json::{Value, json};

const BACKEND: Backend = Backend::Nomad;

include!("e2e/shared.rs");
