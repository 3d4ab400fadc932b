//! [`LocalExecutor::spawn`]: a process in a runner with its argv as given and raw descriptors,
//! the lower-level sibling of `ExecutorApi::execute` (which runs `bash -c` with events).
//!
//! The init starts the process exactly as it starts an execution (its own session, its own
//! cgroup, the execution user namespace, `user` unless privileged, the same rlimits and seccomp
//! filter); only the argv and the standard descriptors differ. The control connection stays
//! open while the process runs: the init reports the exit on it, and closing it makes the init
//! kill the process's whole tree.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use runner_core::execution::{MAX_ARG_BYTES, MAX_EXEC_BYTES, MAX_VARIABLES};
use runner_core::{BackendError, DestroyReason, RunnerId};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{
    ControlError, LocalExecutor, Runner, async_fd, blocking, internal, report_process_limit,
    send_request,
};
use crate::protocol::{MAX_REQUEST, Request, Response, recv_with_fds};
use runner_core::BackendEvent;
use tokio::sync::mpsc;

/// The most arguments a spawn may have.
pub const MAX_ARGS: usize = 4096;

/// A process to start in a runner with [`LocalExecutor::spawn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnRequest {
    /// The program and its arguments, passed to `execve` verbatim; `argv[0]` is looked up in the
    /// process's `PATH` unless it contains a `/`. Non-empty, no NUL byte, each argument shorter
    /// than [`MAX_ARG_BYTES`], at most [`MAX_ARGS`] arguments, and together with `env` within
    /// [`MAX_EXEC_BYTES`].
    pub argv: Vec<String>,
    /// `true`: a new terminal (80×24) is the process's controlling terminal and its stdin,
    /// stdout and stderr (merged); echo, `\r\n` and `^C`/`^\` come from its line discipline.
    /// `false`: stdin, stdout and stderr are three pipes and there is no terminal at all.
    pub tty: bool,
    /// Run as root of the sandbox instead of `user` (uid 1000).
    pub privileged: bool,
    /// Variables set on top of the sandbox's defaults (`PATH`, `HOME`, `LANG`, `TERM`,
    /// `CODEOCEAN`), later entries winning. Names are non-empty without `=` or NUL, values
    /// without NUL; at most [`MAX_VARIABLES`].
    pub env: Vec<(String, String)>,
}

impl SpawnRequest {
    /// Checks the bounds [`SpawnRequest`] documents.
    pub fn validate(&self) -> Result<(), BackendError> {
        let invalid = |m: String| Err(BackendError::InvalidRequest(m));
        if self.argv.is_empty() {
            return invalid("argv: must not be empty".into());
        }
        if self.argv.len() > MAX_ARGS {
            return invalid(format!("argv: at most {MAX_ARGS} arguments are allowed"));
        }
        if self.env.len() > MAX_VARIABLES {
            return invalid(format!(
                "environment: at most {MAX_VARIABLES} variables are allowed"
            ));
        }
        let mut total = 0;
        for (i, arg) in self.argv.iter().enumerate() {
            if arg.contains('\0') {
                return invalid(format!("argv[{i}]: contains a NUL byte"));
            }
            if arg.len() + 1 > MAX_ARG_BYTES {
                return invalid(format!(
                    "argv[{i}]: must be at most {} bytes long",
                    MAX_ARG_BYTES - 1
                ));
            }
            total += arg.len() + 1;
        }
        for (name, value) in &self.env {
            if name.is_empty() || name.contains('=') || name.contains('\0') || value.contains('\0')
            {
                return invalid(format!("environment: invalid variable {name:?}"));
            }
            let entry = name.len() + value.len() + 2;
            if entry > MAX_ARG_BYTES {
                return invalid(format!(
                    "environment: variable {name:?} must be at most {} bytes long",
                    MAX_ARG_BYTES - 1
                ));
            }
            total += entry;
        }
        if total > MAX_EXEC_BYTES {
            return invalid(format!(
                "argv and environment: must be at most {MAX_EXEC_BYTES} bytes together"
            ));
        }
        Ok(())
    }
}

/// How a spawned process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpawnExit {
    /// It exited with this code; a process killed by signal S reports 128+S.
    Exited(u8),
    /// [`ProcessControl::kill`] (or dropping the control) killed its tree.
    Killed,
    /// The runner's process table was full: the command never ran. The runner is reported
    /// stopped with [`DestroyReason::ProcessLimitReached`].
    ProcessLimit,
    /// The runner went away under it (destroyed, or its init died: why, when known).
    RunnerGone(Option<DestroyReason>),
}

impl SpawnExit {
    /// The code a shell would report: the exit code, 137 (SIGKILL) for a killed process or a
    /// lost runner, 128 + SIGKILL for a runner killed for memory as well.
    pub fn code(&self) -> i32 {
        match self {
            SpawnExit::Exited(code) => i32::from(*code),
            SpawnExit::Killed | SpawnExit::ProcessLimit | SpawnExit::RunnerGone(_) => 137,
        }
    }
}

/// A process started with [`LocalExecutor::spawn`], split into parts that can be used from
/// different tasks. Dropping [`SpawnedProcess::control`] kills the process's tree.
#[derive(Debug)]
pub struct SpawnedProcess {
    /// Its stdin (the terminal with `tty`).
    pub stdin: ProcessStdin,
    /// Its stdout (the terminal, carrying stdout and stderr, with `tty`).
    pub stdout: ProcessOutput,
    /// Its stderr; `None` with `tty`.
    pub stderr: Option<ProcessOutput>,
    /// Resize, kill and wait.
    pub control: ProcessControl,
}

/// The writing side of a spawned process's stdin.
///
/// `poll_shutdown` (e.g. `AsyncWriteExt::shutdown`) ends the input: without a terminal it closes
/// the pipe (EOF); with one it writes the terminal's EOF character (`^D`) once, which ends the
/// input of a program reading at the start of a line. Dropping it closes the pipe (and does
/// nothing to a terminal).
#[derive(Debug)]
pub struct ProcessStdin {
    fd: Option<AsyncFd<OwnedFd>>,
    tty: bool,
    eof_sent: bool,
}

/// The reading side of a spawned process's stdout or stderr. Reads return 0 once every writer
/// is gone (a terminal's hang-up counts as the end).
#[derive(Debug)]
pub struct ProcessOutput {
    fd: AsyncFd<OwnedFd>,
}

/// Resizes, kills and waits for a spawned process. Dropping it kills the process's tree.
#[derive(Debug)]
pub struct ProcessControl {
    terminal: Option<Arc<OwnedFd>>,
    kill: CancellationToken,
    _kill_on_drop: DropGuard,
    exit: watch::Receiver<Option<SpawnExit>>,
}

impl ProcessControl {
    /// Sets the terminal's size (`TIOCSWINSZ`; the foreground job gets `SIGWINCH`). An error
    /// of kind `InvalidInput` for a process without a terminal.
    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        let Some(terminal) = &self.terminal else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the process has no terminal",
            ));
        };
        rustix::termios::tcsetwinsize(
            terminal.as_ref(),
            rustix::termios::Winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            },
        )
        .map_err(io::Error::from)
    }

    /// Kills the process and everything it started (its cgroup and session, as a cancelled
    /// execution). Returns at once; [`ProcessControl::wait`] then reports
    /// [`SpawnExit::Killed`] unless the process had already exited.
    pub fn kill(&self) {
        self.kill.cancel();
    }

    /// Waits until the process has exited (or was killed, or the runner went away).
    pub async fn wait(&self) -> SpawnExit {
        let mut exit = self.exit.clone();
        match exit.wait_for(Option::is_some).await {
            Ok(value) => value.clone().unwrap_or(SpawnExit::RunnerGone(None)),
            Err(_) => SpawnExit::RunnerGone(None),
        }
    }

    /// How the process ended, if it has.
    pub fn try_exit(&self) -> Option<SpawnExit> {
        self.exit.borrow().clone()
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    rustix::fs::fcntl_setfl(fd, rustix::fs::OFlags::NONBLOCK).map_err(io::Error::from)
}

impl LocalExecutor {
    /// Starts `request.argv` in `runner` with raw standard descriptors (see [`SpawnRequest`]).
    ///
    /// The process runs with every restriction of an execution: its own session and cgroup, the
    /// runner's execution user namespace (root of the sandbox when privileged, `user`
    /// otherwise), rlimits and seccomp filter, working directory `/workspace` (`/` when it does
    /// not exist). Errors: [`BackendError::RunnerNotFound`], [`BackendError::InvalidRequest`]
    /// for a request outside the bounds, [`BackendError::Internal`] when the init refused or
    /// could not fork (a full process table is also reported as the runner stopping).
    pub async fn spawn(
        &self,
        runner: &RunnerId,
        request: SpawnRequest,
    ) -> Result<SpawnedProcess, BackendError> {
        let r = self.runner(runner)?;
        request.validate()?;
        let tty = request.tty;
        let message = Request::Spawn {
            argv: request.argv,
            tty,
            privileged: request.privileged,
            env: request.env,
        };
        // JSON may escape control characters to six bytes each: refuse what the init would.
        let encoded = serde_json::to_vec(&message).map_err(internal)?;
        if encoded.len() > MAX_REQUEST {
            return Err(BackendError::InvalidRequest(format!(
                "argv and environment: encoded they must be at most {MAX_REQUEST} bytes"
            )));
        }
        let socket = r.handle.socket.clone();
        let expected = if tty { 1 } else { 3 };
        let started = blocking(
            move || -> Result<Option<(UnixStream, Vec<OwnedFd>)>, ControlError> {
                let conn = send_request(&socket, &message)?;
                let (response, fds): (Response, _) =
                    recv_with_fds(&conn, 3).map_err(ControlError::Unresponsive)?;
                conn.set_read_timeout(None)?;
                conn.set_write_timeout(None)?;
                match response {
                    Response::Started if fds.len() == expected => Ok(Some((conn, fds))),
                    Response::ProcessLimit => Ok(None),
                    Response::Error { message } => Err(BackendError::Internal(message).into()),
                    other => Err(internal(format!("unexpected answer {other:?}")).into()),
                }
            },
        )
        .await?;
        let Some((conn, fds)) = self.control(&r, started)? else {
            report_process_limit(&self.inner.events_tx, &r);
            return Err(BackendError::Internal(
                DestroyReason::ProcessLimitReached.to_string(),
            ));
        };
        for fd in &fds {
            set_nonblocking(fd).map_err(internal)?;
        }
        conn.set_nonblocking(true).map_err(internal)?;
        let conn = tokio::net::UnixStream::from_std(conn).map_err(internal)?;
        let mut fds = fds.into_iter();
        let (stdin, stdout, stderr, terminal) = if tty {
            let master = fds.next().ok_or_else(|| internal("missing descriptors"))?;
            let reader = master.try_clone().map_err(internal)?;
            let resizer = master.try_clone().map_err(internal)?;
            (master, reader, None, Some(Arc::new(resizer)))
        } else {
            let (Some(stdin), Some(stdout), Some(stderr)) = (fds.next(), fds.next(), fds.next())
            else {
                return Err(internal("missing descriptors"));
            };
            (stdin, stdout, Some(stderr), None)
        };
        let kill = CancellationToken::new();
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(watch_exit(
            conn,
            kill.clone(),
            exit_tx,
            r.clone(),
            self.inner.events_tx.clone(),
        ));
        Ok(SpawnedProcess {
            stdin: ProcessStdin {
                fd: Some(async_fd(stdin).map_err(internal)?),
                tty,
                eof_sent: false,
            },
            stdout: ProcessOutput {
                fd: async_fd(stdout).map_err(internal)?,
            },
            stderr: match stderr {
                Some(fd) => Some(ProcessOutput {
                    fd: async_fd(fd).map_err(internal)?,
                }),
                None => None,
            },
            control: ProcessControl {
                terminal,
                _kill_on_drop: kill.clone().drop_guard(),
                kill,
                exit: exit_rx,
            },
        })
    }
}

/// Holds the control connection until the init reports the exit, or kills the tree by closing
/// it when `kill` is cancelled.
async fn watch_exit(
    mut conn: tokio::net::UnixStream,
    kill: CancellationToken,
    exit: watch::Sender<Option<SpawnExit>>,
    runner: Arc<Runner>,
    backend_events: mpsc::UnboundedSender<BackendEvent>,
) {
    let report = async {
        let mut len = [0u8; 4];
        conn.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len > 4096 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "answer too long",
            ));
        }
        let mut body = vec![0u8; len];
        conn.read_exact(&mut body).await?;
        serde_json::from_slice::<Response>(&body)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    };
    let outcome = tokio::select! {
        () = kill.cancelled() => SpawnExit::Killed,
        answer = report => match answer {
            Ok(Response::Exit { code }) => SpawnExit::Exited(code),
            Ok(Response::ProcessLimit) => {
                report_process_limit(&backend_events, &runner);
                SpawnExit::ProcessLimit
            }
            _ => SpawnExit::RunnerGone(why_gone(&runner).await),
        },
    };
    // Dropping the connection here is what makes the init kill the tree after a kill.
    drop(conn);
    exit.send_replace(Some(outcome));
}

/// Why the runner went away, once its watcher knows (the connection breaks a moment before).
async fn why_gone(runner: &Runner) -> Option<DestroyReason> {
    for _ in 0..100 {
        if let Some(reason) = runner.died.get() {
            return Some(reason.clone());
        }
        if runner.destroying.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

impl AsyncRead for ProcessOutput {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|inner| {
                rustix::io::read(inner.get_ref(), &mut *unfilled).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // A terminal whose last slave descriptor closed reads EIO: the end.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => {
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for ProcessStdin {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let Some(fd) = &self.fd else {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        };
        loop {
            let mut guard = ready!(fd.poll_write_ready(cx))?;
            match guard
                .try_io(|inner| rustix::io::write(inner.get_ref(), data).map_err(io::Error::from))
            {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.tty {
            self.fd = None;
            return Poll::Ready(Ok(()));
        }
        if self.eof_sent {
            return Poll::Ready(Ok(()));
        }
        let written = ready!(self.as_mut().poll_write(cx, &[4]))?;
        if written == 1 {
            self.eof_sent = true;
        }
        Poll::Ready(Ok(()))
    }
}
