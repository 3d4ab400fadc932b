//! The wire protocol between the server and a runner's init over its control socket.
//!
//! Each operation opens its own connection. A message is a 4-byte big-endian length followed by
//! that many bytes of JSON; raw payloads (file contents) follow their header unframed. The init
//! treats everything it receives as untrusted: sizes are bounded and malformed input closes the
//! connection.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Largest header the init accepts.
pub(crate) const MAX_REQUEST: usize = 1 << 20;
/// Largest answer the server accepts (a recursive listing can be long).
pub(crate) const MAX_RESPONSE: usize = 64 << 20;

/// What the server asks the init to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Request {
    /// Answer `Response::Ok` (liveness).
    Ping,
    /// Start `bash -c command`; the answer carries the PTY master and the stderr pipe.
    Exec {
        command: String,
        privileged: bool,
        env: Vec<(String, String)>,
    },
    /// Start `argv` as given (`argv[0]` looked up in `PATH`). With `tty`, a terminal is its
    /// stdin, stdout and stderr and the answer carries its master; without, the answer carries
    /// the stdin pipe's write end, then the stdout and stderr pipes' read ends.
    Spawn {
        argv: Vec<String>,
        tty: bool,
        privileged: bool,
        env: Vec<(String, String)>,
    },
    /// Delete, then write files; `copies[i].len` payload bytes follow the header in order.
    Update {
        delete: Vec<String>,
        copies: Vec<CopyHeader>,
    },
    /// List a path.
    List {
        path: String,
        recursive: bool,
        privileged: bool,
    },
    /// Read a file: `Response::File` then exactly `size` bytes.
    Read { path: String, privileged: bool },
}

/// One file of an update.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CopyHeader {
    pub path: String,
    pub len: u64,
}

/// One listed entry, as the init sees it (names already resolved).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Entry {
    pub name: String,
    pub entry_type: char,
    pub link_target: Option<String>,
    pub size: u64,
    pub modification_time: i64,
    pub permissions: String,
    pub owner: String,
    pub group: String,
}

/// One failed path of an update.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Failure {
    pub path: String,
    pub reason: String,
}

/// What the init answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub(crate) enum Response {
    Ok,
    /// The init took a file operation and handed it to a helper; the operation's own answer
    /// follows. It comes at once from a working init, so its absence means a broken one.
    Accepted,
    /// The execution started (fds attached); later `Exit` follows on the same connection.
    Started,
    /// The execution's main process ended with this code.
    Exit {
        code: u8,
    },
    Updated {
        failures: Vec<Failure>,
    },
    Listing {
        entries: Vec<Entry>,
    },
    File {
        size: u64,
    },
    NotFound,
    Error {
        message: String,
    },
    /// The runner's process table is full: the init, or an execution's session leader, could
    /// not fork. Instead of `Started`, or of `Exit` when the leader could not start the command.
    ProcessLimit,
}

/// Writes one framed message.
pub(crate) fn write_msg<T: Serialize>(w: &mut impl Write, msg: &T) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(io::Error::other)?;
    let mut buf = Vec::with_capacity(body.len() + 4);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)
}

/// Reads one framed message of at most `max` bytes.
pub(crate) fn read_msg<T: DeserializeOwned>(r: &mut impl Read, max: usize) -> io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message too long",
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Sends a framed message with file descriptors attached to its first byte.
pub(crate) fn send_with_fds<T: Serialize>(
    sock: &UnixStream,
    msg: &T,
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(io::Error::other)?;
    let mut buf = Vec::with_capacity(body.len() + 4);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [io::IoSlice::new(&buf[..1])];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let sent = sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(io::Error::from)?;
    if sent != 1 {
        return Err(io::Error::other("short sendmsg"));
    }
    (&*sock).write_all(&buf[1..])
}

/// Receives a framed message and the file descriptors attached to it (at most `max_fds`).
pub(crate) fn recv_with_fds<T: DeserializeOwned>(
    sock: &UnixStream,
    max_fds: usize,
) -> io::Result<(T, Vec<OwnedFd>)> {
    let mut first = [0u8; 1];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut fds = Vec::new();
    {
        let mut iov = [io::IoSliceMut::new(&mut first)];
        // A signal (e.g. SIGCHLD of a sandbox helper) interrupts a receive with a timeout even
        // when its handler asks for restarts.
        let msg = loop {
            match recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other.map_err(io::Error::from)?,
            }
        };
        if msg.bytes == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        for cmsg in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                for fd in received {
                    fds.push(unsafe_owned_fd(fd));
                }
            }
        }
    }
    if fds.len() > max_fds {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "too many fds"));
    }
    let mut rest = [0u8; 3];
    (&*sock).read_exact(&mut rest)?;
    let len = u32::from_be_bytes([first[0], rest[0], rest[1], rest[2]]) as usize;
    if len > MAX_RESPONSE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message too long",
        ));
    }
    let mut body = vec![0u8; len];
    (&*sock).read_exact(&mut body)?;
    let msg =
        serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((msg, fds))
}

#[allow(unsafe_code)]
fn unsafe_owned_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: called only with descriptors received through SCM_RIGHTS, which are new and owned
    // by nobody else in this process.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn framed_messages_round_trip_and_oversized_ones_are_refused() {
        let mut buf = Vec::new();
        write_msg(&mut buf, &Request::Ping).unwrap();
        let back: Request = read_msg(&mut buf.as_slice(), MAX_REQUEST).unwrap();
        assert!(matches!(back, Request::Ping));
        let mut huge = (u32::MAX).to_be_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(read_msg::<Request>(&mut huge.as_slice(), MAX_REQUEST).is_err());
    }

    #[test]
    fn fds_travel_with_their_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, _w) = nix::unistd::pipe().unwrap();
        send_with_fds(&a, &Response::Started, &[r.as_fd()]).unwrap();
        let (msg, fds): (Response, _) = recv_with_fds(&b, 2).unwrap();
        assert!(matches!(msg, Response::Started));
        assert_eq!(fds.len(), 1);
    }
}
