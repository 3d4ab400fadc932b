//! Poseidon HTTP API server (being written).
