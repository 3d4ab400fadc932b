//! The fork server: a helper process that starts runners' helpers by forking instead of
//! executing the binary again.
//!
//! The executor starts it once, from this binary, with [`super::MARKER`] set to
//! [`FORK_SERVER`], and sends it requests on its stdin, a unix stream socket: each request is a
//! [`SandboxSpec`] with the write end of a pipe attached. The fork server stays single-threaded
//! and small, and keeps one child forked ahead: that child takes the next request from the
//! socket, tells the fork server it did (which forks the next one), and becomes that runner's
//! helper, with the pipe as stdout and `/dev/null` as stdin and stderr, exactly what a freshly
//! executed helper gets. The helper then builds the runner ([`super::run_helper`]).
//!
//! - Forking a process of a few megabytes costs a fraction of executing the server's large
//!   binary again (the dynamic loader, the allocator's and the runtime's start-up), and the fork
//!   happens before the request arrives.
//! - The fork server itself never reads a request: its memory, which every helper and runner
//!   init inherits, holds nothing of any runner.
//!
//! The fork server ends, after its waiting child, when the socket closes (the executor dropped
//! it or the server died). It is not a subreaper, so a runner's init, orphaned when its helper
//! exits, goes to the server as before. The kernel reaps the helpers (`SIGCHLD` is ignored here;
//! every helper restores the default first, as it waits for children of its own).
#![allow(unsafe_code)]

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{SigHandler, Signal, signal};
use nix::unistd::{ForkResult, fork};

use super::SandboxSpec;
use crate::protocol::recv_with_fds;

/// The value of [`super::MARKER`] that starts the fork server.
pub(crate) const FORK_SERVER: &str = "fork-server";

/// What a waiting child tells the fork server once it read from the socket.
const TOOK_REQUEST: u8 = b'1';
const SOCKET_ENDED: u8 = b'0';

/// How long the fork server waits before forking again after a failed fork.
const FORK_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Serves fork requests on stdin until it closes; never returns.
pub(crate) fn serve() -> ! {
    // SAFETY: fd 0 is the socket the executor passed as stdin; nothing else in this process
    // owns it.
    let requests = UnixStream::from(unsafe { OwnedFd::from_raw_fd(0) });
    // SAFETY: ignoring signals installs no handler; the process is single-threaded. A write to
    // a closed pipe or socket is an error to handle, not a signal that ends the process.
    if unsafe { signal(Signal::SIGCHLD, SigHandler::SigIgn) }.is_err()
        || unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) }.is_err()
    {
        std::process::exit(1);
    }
    let me = nix::unistd::getpid();
    loop {
        let Ok((told, tell)) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) else {
            std::thread::sleep(FORK_RETRY_PAUSE);
            continue;
        };
        // SAFETY: this process is single-threaded, so the child may run arbitrary code.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                drop(told);
                take_request(requests, tell, me)
            }
            Ok(ForkResult::Parent { child }) => {
                drop(tell);
                let mut answer = [0u8; 1];
                let read = loop {
                    match nix::unistd::read(&told, &mut answer) {
                        Err(Errno::EINTR) => continue,
                        other => break other,
                    }
                };
                if read != Ok(1) || answer[0] != TOOK_REQUEST {
                    // The socket ended (or the child died without reading): end once the child
                    // has, so it is not left to the server to reap. With SIGCHLD ignored, this
                    // wait returns when the child is gone.
                    let _ = nix::sys::wait::waitpid(child, None);
                    std::process::exit(0);
                }
            }
            Err(_) => std::thread::sleep(FORK_RETRY_PAUSE),
        }
    }
}

/// In the child forked ahead: waits for one request, tells the fork server, and becomes the
/// helper the request asks for.
fn take_request(requests: UnixStream, tell: OwnedFd, fork_server: nix::unistd::Pid) -> ! {
    // A fork server that is gone takes no more requests: its waiting child ends with it (the
    // executor then starts a new one), but not a helper that already has its request.
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err()
        || nix::unistd::getppid() != fork_server
    {
        std::process::exit(0)
    }
    let received = recv_with_fds::<SandboxSpec>(&requests, 1);
    let _ = nix::sys::prctl::set_pdeathsig(None);
    let answer = if received.is_ok() {
        TOOK_REQUEST
    } else {
        SOCKET_ENDED
    };
    let _ = nix::unistd::write(&tell, &[answer]);
    drop(tell);
    // A request without its pipe has no one to report to; a broken socket ends the fork server.
    let Ok((spec, mut fds)) = received else {
        std::process::exit(0)
    };
    let Some(reply) = fds.pop() else {
        std::process::exit(0)
    };
    // Its descriptor (0) becomes `/dev/null` in `become_helper`.
    let _ = requests.into_raw_fd();
    if let Err(e) = become_helper(&reply) {
        let _ = writeln!(std::fs::File::from(reply), "error fork server: {e}");
        std::process::exit(1)
    }
    // Only its copy on stdout stays: the init inherits whatever the helper holds.
    drop(reply);
    std::process::exit(super::run_helper(spec))
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
