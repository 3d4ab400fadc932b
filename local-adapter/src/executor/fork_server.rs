//! The executor's side of the [fork server](crate::sandbox::fork_server): starts it on first use,
//! hands it one runner's specification at a time, and starts it again when it is gone.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tracing::warn;

use crate::error::LocalError;
use crate::protocol::send_with_fds;
use crate::sandbox::fork_server::FORK_SERVER;
use crate::sandbox::{MARKER, SandboxSpec};

/// Settings for mimalloc (the server binary's allocator), read by the fork server and so by every
/// helper and runner init, which are its forks: freed memory goes back to the system at once,
/// arenas are committed as they are used, and no transparent huge pages (a huge page touched
/// once stays, split, as 512 small ones). An init keeps only what it uses resident, which is
/// every runner's idle memory and what each fork of the init copies (file operations,
/// executions). Without mimalloc they are ignored.
const ALLOCATOR_ENV: [(&str, &str); 3] = [
    ("MIMALLOC_PURGE_DELAY", "0"),
    ("MIMALLOC_ARENA_EAGER_COMMIT", "0"),
    ("MIMALLOC_ALLOW_THP", "0"),
];

/// Longest a stopping fork server may take to end by itself.
const STOP_TIMEOUT: Duration = Duration::from_secs(1);

/// Longest a request may wait to be written to the fork server's socket.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts runners' helpers through one fork server process. Shared by all of an executor's
/// runner creations; a request only holds its lock while it is written.
#[derive(Debug, Default)]
pub(crate) struct ForkServer {
    running: Mutex<Option<Running>>,
}

/// A started fork server: its process and the executor's end of its request socket.
#[derive(Debug)]
struct Running {
    requests: UnixStream,
    process: Child,
}

impl ForkServer {
    /// Has a helper forked for `spec` and returns the read end of the pipe on which the helper,
    /// then the runner's init, report (`pid <host pid>`, `ready` or `error <message>`, a line
    /// each). The pipe ends without a report when the helper could not start. Blocks briefly.
    pub(crate) fn launch(&self, spec: &SandboxSpec) -> Result<OwnedFd, LocalError> {
        let (reports, reply) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| LocalError::io("creating the helper's report pipe", e.into()))?;
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        // A fork server that died (killed, or out of step) is found by the failed send and
        // replaced once.
        for attempt in 0..2 {
            let server = match running.as_mut() {
                Some(server) => server,
                None => running.insert(Running::start()?),
            };
            match send_with_fds(&server.requests, spec, &[reply.as_fd()]) {
                Ok(()) => return Ok(reports),
                Err(e) => {
                    if attempt == 0 {
                        warn!(runner_id = %spec.runner_id, error = %e, "the sandbox fork server is gone; starting it again");
                    }
                    *running = None;
                }
            }
        }
        Err(LocalError::Sandbox(
            "the sandbox fork server does not take requests (is \
             local_adapter::sandbox_main_if_requested() called first in main?)"
                .into(),
        ))
    }

    /// Ends the fork server, if one runs; the next [`launch`](Self::launch) starts another.
    pub(crate) fn stop(&self) {
        drop(
            self.running
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
    }
}

impl Running {
    fn start() -> Result<Self, LocalError> {
        let (requests, theirs) = UnixStream::pair()
            .map_err(|e| LocalError::io("creating the fork server's socket", e))?;
        requests
            .set_write_timeout(Some(SEND_TIMEOUT))
            .map_err(|e| LocalError::io("creating the fork server's socket", e))?;
        // The magic link works even when the binary was replaced on disk since it started.
        let process = Command::new("/proc/self/exe")
            .env_clear()
            .env(MARKER, FORK_SERVER)
            .envs(ALLOCATOR_ENV)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| LocalError::io("starting the sandbox fork server", e))?;
        Ok(Self { requests, process })
    }
}

impl Drop for Running {
    /// Closing the socket ends the fork server (after the child it forked ahead); the kill
    /// covers one that does not end in time.
    fn drop(&mut self) {
        let _ = self.requests.shutdown(std::net::Shutdown::Both);
        let deadline = std::time::Instant::now() + STOP_TIMEOUT;
        while matches!(self.process.try_wait(), Ok(None)) {
            if std::time::Instant::now() >= deadline {
                let _ = self.process.kill();
                let _ = self.process.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
