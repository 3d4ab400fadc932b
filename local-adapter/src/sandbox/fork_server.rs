//! The fork server: a helper process that starts runners' helpers by forking instead of
//! executing the binary again.
//!
//! The executor starts it once, from this binary, with [`super::MARKER`] set to
//! [`FORK_SERVER`]. It stays single-threaded and small, and serves requests on its stdin, a unix
//! stream socket: each request is a [`SandboxSpec`] with the write end of a pipe attached. For
//! each one it forks a helper whose stdout is that pipe and whose stdin and stderr are
//! `/dev/null`, exactly what a freshly executed helper would get, and goes back to reading.
//! The helper then builds the runner as before ([`super::run_helper`]).
//!
//! Forking a process of a few megabytes costs a fraction of executing the server's large
//! binary again (the dynamic loader, the allocator's and the runtime's start-up).
//!
//! The fork server exits when its socket closes (the executor dropped it or the server died).
//! It is not a subreaper, so a runner's init, orphaned when its helper exits, goes to the
//! server as before. The kernel reaps the helpers (`SIGCHLD` is ignored here; every helper
//! restores the default first, as it waits for children of its own).
#![allow(unsafe_code)]

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::sys::signal::{SigHandler, Signal, signal};
use nix::unistd::{ForkResult, fork};

use super::SandboxSpec;
use crate::protocol::recv_with_fds;

/// The value of [`super::MARKER`] that starts the fork server.
pub(crate) const FORK_SERVER: &str = "fork-server";

/// Serves fork requests on stdin until it closes; never returns.
pub(crate) fn serve() -> ! {
    // SAFETY: fd 0 is the socket the executor passed as stdin; nothing else in this process
    // owns it.
    let requests = UnixStream::from(unsafe { OwnedFd::from_raw_fd(0) });
    // SAFETY: ignoring SIGCHLD installs no handler; the process is single-threaded.
    if unsafe { signal(Signal::SIGCHLD, SigHandler::SigIgn) }.is_err() {
        std::process::exit(1);
    }
    loop {
        let (spec, reply) = match recv_with_fds::<SandboxSpec>(&requests, 1) {
            Ok((spec, mut fds)) => match fds.pop() {
                Some(reply) => (spec, reply),
                None => continue,
            },
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => std::process::exit(0),
            // Out of step with the executor: it starts a new fork server when a send fails.
            Err(_) => std::process::exit(1),
        };
        // SAFETY: this process is single-threaded, so the child may run arbitrary code.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                if let Err(e) = become_helper(&reply) {
                    let _ = writeln!(std::fs::File::from(reply), "error fork server: {e}");
                    std::process::exit(1)
                }
                // Only its copy on stdout stays: the init inherits whatever the helper holds.
                drop(reply);
                std::process::exit(super::run_helper(spec))
            }
            Ok(ForkResult::Parent { .. }) => drop(reply),
            Err(e) => {
                let _ = writeln!(
                    std::fs::File::from(reply),
                    "error fork the sandbox helper: {e}"
                );
            }
        }
    }
}

/// In the forked child: the stdio a freshly executed helper has (the reply pipe as stdout,
/// `/dev/null` in place of the request socket), and `SIGCHLD` back to its default.
fn become_helper(reply: &OwnedFd) -> io::Result<()> {
    // SAFETY: restoring the default disposition installs no handler.
    unsafe { signal(Signal::SIGCHLD, SigHandler::SigDfl) }.map_err(io::Error::from)?;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    // SAFETY: dup2 onto the standard descriptors, which this process owns; the request socket
    // (fd 0) is closed by it, and the reply pipe's own descriptor is closed on exec or exit.
    let duplicated =
        unsafe { libc::dup2(null.as_raw_fd(), 0) == 0 && libc::dup2(reply.as_raw_fd(), 1) == 1 };
    if duplicated {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
