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

/// Creates TCP sockets inside one runner's network namespace, for as long as it lives.
///
/// One long-lived thread per runner joins the namespace once and answers requests for fresh
/// sockets; a socket keeps the namespace it was created in wherever it is used afterwards. The
/// thread ends when the factory (every clone) is dropped, so a runner costs one thread, however
/// many connections its exposed ports carry.
#[derive(Debug, Clone)]
pub(crate) struct SocketFactory {
    requests: std::sync::mpsc::Sender<oneshot::Sender<io::Result<std::net::TcpStream>>>,
}

impl SocketFactory {
    /// Starts the thread for the namespace `netns`.
    pub(crate) fn start(netns: Arc<OwnedFd>) -> io::Result<Self> {
        let (requests, queue) =
            std::sync::mpsc::channel::<oneshot::Sender<io::Result<std::net::TcpStream>>>();
        std::thread::Builder::new()
            .name("netns-sockets".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let joined = setns(&*netns, CloneFlags::CLONE_NEWNET);
                drop(netns);
                while let Ok(answer) = queue.recv() {
                    let socket = joined
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
                }
            })?;
        Ok(Self { requests })
    }

    /// A TCP socket (IPv4, non-blocking, not yet connected) inside the namespace.
    pub(crate) async fn tcp_socket(&self) -> io::Result<TcpSocket> {
        let (answer, result) = oneshot::channel();
        self.requests
            .send(answer)
            .map_err(|_| io::Error::other("the namespace thread has ended"))?;
        let stream = result
            .await
            .map_err(|_| io::Error::other("the namespace thread ended without an answer"))??;
        Ok(TcpSocket::from_std_stream(stream))
    }
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
