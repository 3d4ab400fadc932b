//! Doing things inside a runner's network namespace from this multi-threaded process.
//!
//! A thread may join another network namespace with `setns(CLONE_NEWNET)`, and a socket keeps the
//! namespace it was created in. This module does that only on fresh, short-lived std threads
//! (never on a tokio worker or blocking-pool thread, which would carry the namespace into
//! unrelated work) and in a child process between `fork` and `exec`.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
use nix::sys::stat::Mode;
use tokio::net::TcpSocket;
use tokio::sync::oneshot;

use crate::error::NetworkError;

/// Opens a network namespace file (e.g. `/proc/<pid>/ns/net`). Holding the descriptor pins the
/// namespace itself, so a recycled pid can never redirect traffic into another process's network.
pub(crate) fn open_netns(path: &Path) -> Result<OwnedFd, NetworkError> {
    open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).map_err(|errno| {
        NetworkError::Namespace {
            path: path.to_owned(),
            source: errno.into(),
        }
    })
}

/// A TCP socket (IPv4, non-blocking, not yet connected) created inside the namespace `netns`.
///
/// A fresh thread joins the namespace, creates the socket and ends; the socket stays in the
/// namespace wherever it is used afterwards.
pub(crate) async fn tcp_socket_in(netns: Arc<OwnedFd>) -> io::Result<TcpSocket> {
    let (answer, result) = oneshot::channel();
    std::thread::Builder::new()
        .name("netns-socket".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let socket = setns(&*netns, CloneFlags::CLONE_NEWNET)
                .and_then(|()| {
                    socket(
                        AddressFamily::Inet,
                        SockType::Stream,
                        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                        None,
                    )
                })
                .map(std::net::TcpStream::from)
                .map_err(io::Error::from);
            // The receiver is gone only when the connection was cancelled meanwhile.
            let _ = answer.send(socket);
        })?;
    let stream = result
        .await
        .map_err(|_| io::Error::other("the namespace thread ended without an answer"))??;
    Ok(TcpSocket::from_std_stream(stream))
}

/// Makes `command` run inside the network namespace `netns` (which must stay open until the
/// command has been spawned).
pub(crate) fn run_inside(command: &mut tokio::process::Command, netns: &OwnedFd) {
    let fd = netns.as_raw_fd();
    // SAFETY: the closure runs in the forked child before `exec`; it only calls `setns`, a plain
    // system call that is async-signal-safe, allocates nothing and touches no lock. `fd` is open
    // in the child because the parent keeps `netns` open until `spawn` returns (the descriptor
    // is close-on-exec, so it disappears with the `exec` only).
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
}
