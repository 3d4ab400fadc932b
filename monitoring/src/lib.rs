//! Metrics export for poseidon-rs: InfluxDB line protocol ([`Point`]) and a batching writer for
//! InfluxDB v2 ([`InfluxWriter`]).
//!
//! The writer is built for a request path: [`InfluxWriter::write`] never blocks and never lets
//! memory grow without bound. Points go into a bounded channel; when it is full they are
//! dropped and counted ([`InfluxWriter::dropped`]). A background task batches them and POSTs
//! each batch to `{url}/api/v2/write`, retrying a failed batch a few times before giving it up
//! with a warning. Measurement names follow openHPI Poseidon's (`poseidon_<route>`,
//! `poseidon_used_runners`, `poseidon_nomad_idle_runners`, `poseidon_poolsize`, …), so its
//! Grafana dashboards keep working; choosing them is the caller's business.

mod line_protocol;
mod writer;

pub use line_protocol::{EncodeError, FieldValue, Point};
pub use writer::{InfluxConfig, InfluxError, InfluxWriter, write_url};
