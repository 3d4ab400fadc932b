//! `ExecutorApi` on this machine: every runner is a Linux sandbox (namespaces, ID-mapped
//! read-only system directories, a size-limited private writable layer, cgroup limits, seccomp),
//! the embedded default backend of poseidon-rs. No Docker, no Nomad.
//!
//! # What an embedder must do
//! Runners' inits come from this very binary: each executor re-executes it once from
//! `/proc/self/exe`, with a marker in its environment, as the sandbox fork server, which forks
//! a helper (and so an init) per runner. Every binary that uses [`LocalExecutor`] must therefore
//! call [`sandbox_main_if_requested`] before anything else in `main` (before starting a runtime
//! or any thread):
//!
//! ```text
//! fn main() {
//!     local_adapter::sandbox_main_if_requested();
//!     // … start tokio, then `LocalExecutor::start(config).await` …
//! }
//! ```
//!
//! Test binaries have no `main` of their own: call it from a constructor that runs before the
//! test harness, e.g. with the `ctor` crate:
//!
//! ```text
//! #[ctor::ctor]
//! fn sandbox_hook() {
//!     local_adapter::sandbox_main_if_requested();
//! }
//! ```
//!
//! [`LocalExecutor::start`] makes the process the child subreaper (`PR_SET_CHILD_SUBREAPER`) so
//! that it reaps the inits it destroys; an embedder that double-forks processes of its own must
//! reap them too.
//!
//! The process must run as root (it creates user namespaces with an id range, ID-mapped mounts
//! and cgroups). Runners are not children of the server in any lasting way: they survive a
//! `kill -9` of it, and the next [`LocalExecutor::start`] on the same data directory reattaches to
//! them and removes whatever did not survive.
//!
//! # Images
//! [`LocalConfig::images`] maps an environment's `image` to a root filesystem directory (built,
//! without Docker, e.g. with `debootstrap --variant=minbase bookworm /srv/rootfs/python`, then
//! `chroot /srv/rootfs/python apt-get install python3`). An image without an entry runs on the
//! host's allow-listed system directories ([`rootfs::HOST_ALLOW_LIST`]) with a generated `/etc`.

pub mod cgroup;
pub mod config;
pub mod error;
mod executor;
mod protocol;
pub mod rootfs;
mod sandbox;

pub use cgroup::{CgroupDriver, Limits, NoCgroups, V1Driver, V2Driver};
pub use config::{CgroupChoice, LocalConfig};
pub use error::LocalError;
pub use executor::LocalExecutor;
pub use executor::spawn::{
    MAX_ARGS, ProcessControl, ProcessOutput, ProcessStdin, SpawnExit, SpawnRequest, SpawnedProcess,
};

/// Runs the runner helper and exits if this process was started as one; returns at once
/// otherwise. Call it first in `main` (and from a constructor in test binaries).
pub fn sandbox_main_if_requested() {
    sandbox::run_if_requested();
}
