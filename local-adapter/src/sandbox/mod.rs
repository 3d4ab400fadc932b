//! The sandbox side: everything that runs in a runner's helper and init process.
//!
//! The server never forks itself into a namespace. It re-executes its own binary
//! (`/proc/self/exe`) once with [`MARKER`] set to [`fork_server::FORK_SERVER`];
//! [`crate::sandbox_main_if_requested`] (called first in `main`, or from a constructor in test
//! binaries) sees the marker and runs the [fork server](fork_server), which forks one helper per
//! runner. The helper joins the runner's cgroups, unshares the namespaces and forks the runner's
//! init. The init
//! builds the root filesystem, enters the user namespace, installs the seccomp filter and then
//! serves its control socket until it is killed. It has no parent-death signal: runners outlive
//! a `kill -9` of the server.

pub(crate) mod fileops;
pub(crate) mod fork_server;
pub(crate) mod init;
pub(crate) mod leader;
pub(crate) mod seccomp;
pub(crate) mod setup;

use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cgroup::ExecKill;

/// Environment variable that turns a process started from this binary into the fork server
/// (with the value [`fork_server::FORK_SERVER`]; any other value ends the process).
pub(crate) const MARKER: &str = "POSEIDON_LOCAL_SANDBOX_HELPER";

/// The uid/gid of the unprivileged `user` inside a runner.
pub(crate) const USER_ID: u32 = 1000;

/// How many ids a runner's user namespace maps.
pub(crate) const ID_RANGE: u32 = 65_536;

/// The uid/gid of the init in the runner's user namespace: one id above the range executions
/// can take (`0..ID_RANGE`), mapped to the runner's unique namespace-owner id on the host. The
/// init holds its capabilities in that namespace, while executions and file operations run in
/// a child namespace that maps only `0..ID_RANGE`: even sandbox root there has neither the
/// init's ids nor any capability over it (no `prlimit`, `renice`, `kill`, `ptrace`, …).
pub(crate) const INIT_ID: u32 = ID_RANGE;

/// Everything the helper needs to build one runner (sent as JSON on its stdin).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SandboxSpec {
    pub runner_id: String,
    /// The control socket to bind (a host path).
    pub socket: PathBuf,
    /// An empty host directory used as mount point while building the root (only inside the
    /// runner's private mount namespace).
    pub staging: PathBuf,
    /// Host uid/gid of the sandbox's root; `ID_RANGE` ids are mapped from it.
    pub uid_base: u32,
    /// Host uid that owns the runner's user namespace (unique per runner, never used by a
    /// process outside the namespace): the runner's per-user kernel limits are charged to it.
    pub ns_owner: u32,
    pub root: RootSpec,
    pub disk_limit_mb: u32,
    pub shm_limit_mb: u32,
    pub procs_files: Vec<PathBuf>,
    pub exec_parent: Option<PathBuf>,
    pub exec_kill: ExecKill,
    pub max_open_files: u64,
    pub max_file_size: u64,
}

/// Where the runner's root filesystem comes from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum RootSpec {
    /// The host's allow-listed directories, read-only, plus a generated `/etc` (lower layer of
    /// an overlay, already owned by the sandbox's root).
    Host { allow: Vec<PathBuf>, etc: PathBuf },
    /// An image directory as the lower layer of an overlay over the whole root.
    Image {
        dir: PathBuf,
        passwd: String,
        group: String,
    },
}

/// Runs the fork server if this process was started as one; returns otherwise.
pub(crate) fn run_if_requested() {
    let Some(mode) = std::env::var_os(MARKER) else {
        return;
    };
    if mode != fork_server::FORK_SERVER {
        std::process::exit(2);
    }
    close_inherited_descriptors();
    fork_server::serve();
}

/// Builds the runner `spec` describes, reporting on stdout; returns the helper's exit code.
pub(crate) fn run_helper(spec: SandboxSpec) -> i32 {
    match helper(spec) {
        Ok(()) => 0,
        Err(message) => report_error(&message),
    }
}

fn report_error(message: &str) -> i32 {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "error {}", message.replace('\n', " "));
    let _ = out.flush();
    1
}

/// Closes every descriptor above stderr. Whatever started the server may have left descriptors
/// open without close-on-exec (a socket-activated listener, a harness's pipe); the helper, the
/// init and every execution would otherwise inherit them, handing host files or sockets to code
/// in the runner.
#[allow(unsafe_code)]
fn close_inherited_descriptors() {
    // SAFETY: close_range(2) on descriptors this freshly exec'd, still single-threaded process
    // holds no Rust object for (stdin, stdout and stderr stay).
    let closed = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if closed != 0 {
        for fd in 3..4096 {
            // SAFETY: as above, one descriptor at a time where close_range is missing.
            unsafe {
                libc::close(fd);
            }
        }
    }
}

fn helper(spec: SandboxSpec) -> Result<(), String> {
    setup::join_cgroups(&spec).map_err(|e| e.to_string())?;
    // Created before the pid namespace, so the helper sees its holder's pid as /proc shows it.
    let userns =
        setup::create_user_namespace(spec.uid_base, spec.ns_owner).map_err(|e| e.to_string())?;
    // Bound before the network namespace exists, so the socket belongs to the host's: it never
    // shows up, with its host path, in the runner's `/proc/net/unix`.
    let listener = setup::bind_control_socket(&spec.socket).map_err(|e| e.to_string())?;
    setup::unshare_namespaces().map_err(|e| e.to_string())?;
    setup::fork_init(spec, userns, listener).map_err(|e| e.to_string())
}
