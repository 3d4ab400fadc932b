//! The durable embedded store for environment and runner records.
//!
//! [`StateStore`] keeps what the local backend must find again after a restart (SIGTERM or
//! `kill -9`): environments, runners with their mapped ports and the adapter's opaque sandbox
//! handle, and each runner's claimed/idle state with its inactivity timeout and deadline. It
//! knows nothing about sandboxes or pools; it never decides what a record means.
//!
//! # Why redb and not SQLite
//! - Pure Rust: no C toolchain or bundled `libsqlite3` to build, and no `unsafe` FFI boundary.
//! - ACID transactions whose commit is fsync'd before it returns, on copy-on-write B-trees with
//!   checksummed commit slots: a `kill -9` or power loss mid-commit leaves the previous commit
//!   intact, and the next open repairs to it (tested with a real SIGKILL in `tests/crash.rs`).
//! - Durability is chosen per transaction (`Durability::Immediate` or `None`), which is exactly
//!   the split this store needs between a claim's used-mark and a deadline refresh; SQLite's
//!   equivalent is the connection-wide `synchronous` pragma, switched around each statement.
//! - A typed key-value API is all the store needs: no SQL, no schema migrations beyond a
//!   version number.
//!
//! # Durability
//! | write | durability | why |
//! |---|---|---|
//! | [`StateStore::put_environment`], [`StateStore::remove_environment`] | durable | environments are the operator's configuration |
//! | [`StateStore::put_runner`], [`StateStore::remove_runner`] | durable | a lost record leaks a sandbox or resurrects a destroyed one |
//! | [`StateStore::set_runner_state`] | durable | a lost used-mark would hand a claimed runner out twice |
//! | [`StateStore::refresh_deadline`] | eventual | the hot path; a lost refresh only makes a used runner expire earlier |
//!
//! Durable means fsync'd before the call returns. Eventual means visible at once and on disk
//! with the next durable commit (any durable write, [`StateStore::flush`], [`StateStore::close`],
//! or an eventual write more than a second after the last durable commit).
//!
//! # What it costs
//! Measured by `cargo bench -p storage` (`benches/commit_cost.rs`), on a file on the same
//! filesystem as the work tree, one writer:
//!
//! | write | median, load ≈ 4 | p99, load ≈ 4 | median, load ≈ 9 | p99, load ≈ 9 |
//! |---|---|---|---|---|
//! | [`StateStore::set_runner_state`] to `Used` (durable) | 0.3–0.75 ms | 0.85–8.4 ms | 2.8–8.0 ms | 14–17 ms |
//! | [`StateStore::put_runner`] (durable insert) | 0.33–0.57 ms | 6.5–9.2 ms | 4.9–6.4 ms | 19–22 ms |
//! | [`StateStore::refresh_deadline`] (eventual) | 11 µs | 26–34 µs | 19–20 µs | 55–95 µs |
//! | [`StateStore::flush`] with nothing pending | 0.13–0.17 ms | 0.18–0.28 ms | 3.4–4.0 ms | 9–17 ms |
//!
//! (Runs of 500 samples on a virtio disk, 2 cores shared with parallel builds of other crates;
//! "load" is the load average during the run. Durable latency is fsync latency, so it tracks
//! the other builds' I/O; the eventual refresh stays in the tens of microseconds.) An eventual
//! refresh is 30–400 times cheaper than a durable write at the median, which is why the
//! per-operation deadline refresh is the one eventual write: a claim pays one fsync, an
//! operation on a claimed runner none.
//!
//! # Shutdown
//! [`StateStore::open`] durably writes an "open" marker that [`StateStore::close`] removes;
//! [`StateStore::previous_shutdown_was_clean`] reports whether the previous holder closed the
//! store, so a caller can treat records of a crashed run with suspicion.

mod error;
mod record;
mod store;

pub use error::StoreError;
pub use record::StoredRunner;
pub use store::{StateStore, WriteObserver};
