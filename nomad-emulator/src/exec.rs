//! Nomad's alloc exec frame protocol (nomad.md §1.10, §5.7), between a WebSocket and a process.
//!
//! [`run_session`] is generic over the message stream and sink and over the process
//! ([`ExecIo`]), so it runs the same on an axum WebSocket with a sandboxed process and on
//! channels with in-memory pipes in unit tests. Every frame is a JSON text message:
//!
//! * client → server: `{"stdin":{"data":b64}}`, `{"stdin":{"close":true}}`,
//!   `{"tty_size":{"height":h,"width":w}}`, `{}` (heartbeat);
//! * server → client: `{"stdout":{"data":b64}}` / `{"stderr":{"data":b64}}` (≤ 1024 bytes
//!   each), then `{"stdout":{"close":true}}`, `{"stderr":{"close":true}}` (also with a terminal),
//!   then `{"exited":true,"result":{"exit_code":N}}` (`"result":{}` when N is 0); then the
//!   connection is dropped without a close frame.

pub mod frames;
pub mod websocket;

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::debug;

use crate::runtime::{ExecFault, SessionEnd};
use frames::{ClientFrame, ServerFrame};

/// Most bytes of process output one frame carries (Nomad's driver buffer).
pub const OUTPUT_CHUNK: usize = 1024;
/// Longest client frame accepted; a longer one ends the session with close code 1009. The Go
/// client sends stdin in chunks of at most 2048 bytes (under 3 KiB as base64 JSON).
pub const MAX_CLIENT_FRAME: usize = 64 << 10;
/// Most stdin bytes that may wait for the process to read them; beyond it the client's frames
/// are not read until the process catches up.
pub const MAX_PENDING_STDIN: usize = 256 << 10;
/// After the process exited, output still arriving is forwarded until the outputs are quiet
/// this long (background processes may hold them open)…
const DRAIN_QUIET: Duration = Duration::from_millis(100);
/// …but no longer than this after the exit.
const DRAIN_MAX: Duration = Duration::from_secs(1);
/// How long a session whose process went away without an exit status (its sandbox died) waits
/// for the runtime to say how it ends, before dropping the connection.
const LOST_PROCESS_GRACE: Duration = Duration::from_secs(5);

/// What the protocol reads from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A text message (a JSON frame).
    Text(String),
    /// A binary message; parsed as a JSON frame as well.
    Binary(Bytes),
    /// The client's close frame.
    Close,
    /// Pings, pongs: nothing to do.
    Other,
}

/// What the protocol writes to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// A JSON frame.
    Text(String),
    /// A close frame with this code and reason.
    Close(u16, String),
}

/// How a session ended: what the transport must do with the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Drop the connection without a close frame (after `exited`, on a reset, after a client
    /// went away).
    Drop,
    /// A close frame was sent: drop the connection.
    Closed,
}

/// The process side of a session: resize, kill, wait.
#[async_trait]
pub trait ExecProcess: Send + Sync {
    /// Resizes the terminal (ignored without one).
    fn resize(&self, rows: u16, cols: u16);
    /// Kills the process and everything it started; returns at once.
    fn kill(&self);
    /// Waits for the exit: `Some(code)` (128+S for a signal S), `None` when the process went
    /// away without a status (its sandbox died or it was killed).
    async fn wait(&self) -> Option<i32>;
}

/// A process as a session sees it.
pub struct ExecIo {
    /// Its stdin; `shutdown` ends the input (EOF, or `^D` on a terminal).
    pub stdin: Box<dyn AsyncWrite + Send + Unpin>,
    /// Its stdout (the terminal's output with a terminal).
    pub stdout: Box<dyn AsyncRead + Send + Unpin>,
    /// Its stderr; `None` with a terminal (merged into stdout).
    pub stderr: Option<Box<dyn AsyncRead + Send + Unpin>>,
    /// Resize, kill, wait.
    pub control: Box<dyn ExecProcess>,
}

impl std::fmt::Debug for ExecIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecIo")
            .field("stderr", &self.stderr.is_some())
            .finish_non_exhaustive()
    }
}

/// How a session should end when the runtime ends it.
pub type EndSignal = watch::Receiver<Option<SessionEnd>>;

/// Why the loop stopped early.
enum Stop {
    /// Drop the connection now (the process is already killed).
    Drop,
    /// A close frame went out.
    Closed,
}

struct Session<'a, I, O> {
    incoming: I,
    outgoing: O,
    control: &'a dyn ExecProcess,
    end: EndSignal,
    fault: Option<ExecFault>,
    frames_sent: usize,
}

impl<I, O, E> Session<'_, I, O>
where
    I: Stream<Item = Result<Incoming, E>> + Unpin,
    O: Sink<Outgoing> + Unpin,
{
    /// Sends one frame, unless the session must end: a reset (or a lost client) drops the
    /// connection, and the fault `DropAfterFrames(n)` drops it once `n` output frames went out.
    async fn send(&mut self, frame: ServerFrame) -> Result<(), Stop> {
        if let Some(ExecFault::DropAfterFrames(n)) = self.fault
            && self.frames_sent >= n
        {
            debug!(
                frames = self.frames_sent,
                "exec fault: dropping the connection"
            );
            self.control.kill();
            return Err(Stop::Drop);
        }
        let text = frame.to_json();
        let mut end = self.end.clone();
        let sent = tokio::select! {
            sent = self.outgoing.send(Outgoing::Text(text)) => sent.is_ok(),
            () = async {
                if end.wait_for(|e| matches!(e, Some(SessionEnd::Reset))).await.is_err() {
                    std::future::pending::<()>().await;
                }
            } => false,
        };
        if !sent {
            self.control.kill();
            return Err(Stop::Drop);
        }
        self.frames_sent += 1;
        Ok(())
    }

    async fn close(&mut self, code: u16, reason: String) -> Stop {
        self.control.kill();
        let _ = self.outgoing.send(Outgoing::Close(code, reason)).await;
        Stop::Closed
    }
}

/// Output being read from one of the process's streams.
async fn read_some(
    reader: &mut Option<Box<dyn AsyncRead + Send + Unpin>>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    match reader {
        Some(r) => r.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Runs one exec session until the process ends (then drained output, the close frames and
/// `exited`, or the fault), the runtime ends it (`end`), or the client goes away (then the
/// process is killed). Every outcome kills what is left of the process.
pub async fn run_session<I, O, E>(
    io: ExecIo,
    incoming: I,
    outgoing: O,
    fault: Option<ExecFault>,
    end: EndSignal,
) -> Ending
where
    I: Stream<Item = Result<Incoming, E>> + Unpin,
    O: Sink<Outgoing> + Unpin,
{
    let ExecIo {
        mut stdin,
        stdout,
        stderr,
        control,
    } = io;
    let mut session = Session {
        incoming,
        outgoing,
        control: control.as_ref(),
        end,
        fault,
        frames_sent: 0,
    };
    let result = pump(&mut session, &mut stdin, stdout, stderr).await;
    session.control.kill();
    match result {
        Ok(()) | Err(Stop::Drop) => Ending::Drop,
        Err(Stop::Closed) => Ending::Closed,
    }
}

async fn pump<I, O, E>(
    session: &mut Session<'_, I, O>,
    stdin: &mut Box<dyn AsyncWrite + Send + Unpin>,
    stdout: Box<dyn AsyncRead + Send + Unpin>,
    stderr: Option<Box<dyn AsyncRead + Send + Unpin>>,
) -> Result<(), Stop>
where
    I: Stream<Item = Result<Incoming, E>> + Unpin,
    O: Sink<Outgoing> + Unpin,
{
    if let Some(ExecFault::DropAfterFrames(0)) = session.fault {
        return Err(Stop::Drop);
    }
    let control = session.control;
    let mut out_r: Option<Box<dyn AsyncRead + Send + Unpin>> = Some(stdout);
    let mut err_r = stderr;
    let mut out_buf = vec![0u8; OUTPUT_CHUNK];
    let mut err_buf = vec![0u8; OUTPUT_CHUNK];
    let mut pending: VecDeque<Bytes> = VecDeque::new();
    let mut pending_bytes = 0usize;
    let mut stdin_state = StdinState::Open;
    let mut exit: Option<i32> = None;
    let mut exited_at = tokio::time::Instant::now();
    let mut quiet_until = tokio::time::Instant::now();
    let mut forced: Option<i32> = None;
    let mut end = session.end.clone();
    let mut end_open = true;
    // An end given before the session started applies at once.
    end.mark_changed();
    let wait = control.wait();
    tokio::pin!(wait);
    let mut waiting = true;
    loop {
        if exit.is_some() && out_r.is_none() && err_r.is_none() {
            break;
        }
        if stdin_state == StdinState::CloseRequested && pending.is_empty() {
            let _ = stdin.shutdown().await;
            stdin_state = StdinState::Closed;
        }
        enum Step {
            Client(Option<Result<Incoming, ()>>),
            Out(usize, std::io::Result<usize>),
            Wrote(std::io::Result<usize>),
            Exited(Option<i32>),
            End(Option<SessionEnd>),
            EndGone,
            Quiet,
        }
        let front = pending.front().cloned();
        let step = tokio::select! {
            biased;
            changed = end.changed(), if end_open => match changed {
                Ok(()) => Step::End(*end.borrow_and_update()),
                Err(_) => Step::EndGone,
            },
            r = read_some(&mut out_r, &mut out_buf) => Step::Out(0, r),
            r = read_some(&mut err_r, &mut err_buf) => Step::Out(1, r),
            code = &mut wait, if waiting => Step::Exited(code),
            r = stdin.write(front.as_deref().unwrap_or_default()), if front.is_some() => Step::Wrote(r),
            m = session.incoming.next(), if pending_bytes < MAX_PENDING_STDIN => {
                Step::Client(m.map(|r| r.map_err(|_| ())))
            }
            () = tokio::time::sleep_until(quiet_until), if exit.is_some() => Step::Quiet,
        };
        match step {
            Step::End(None) => {}
            Step::EndGone => end_open = false,
            Step::End(Some(SessionEnd::Reset)) => {
                control.kill();
                return Err(Stop::Drop);
            }
            Step::End(Some(SessionEnd::Exit(code))) => {
                // The process dies; its output drains and the session reports this code.
                control.kill();
                forced = Some(code);
            }
            Step::Out(i, Ok(n)) if n > 0 => {
                let buf = if i == 0 { &out_buf } else { &err_buf };
                let data = Bytes::copy_from_slice(&buf[..n]);
                let frame = if i == 0 {
                    ServerFrame::Stdout(data)
                } else {
                    ServerFrame::Stderr(data)
                };
                session.send(frame).await?;
            }
            Step::Out(0, _) => out_r = None,
            Step::Out(_, _) => err_r = None,
            Step::Wrote(Ok(n)) => {
                pending_bytes -= n;
                if let Some(front) = pending.pop_front()
                    && n < front.len()
                {
                    pending.push_front(front.slice(n..));
                }
            }
            Step::Wrote(Err(_)) => {
                // The process no longer reads its stdin: what waits is lost, as on a pipe.
                pending.clear();
                pending_bytes = 0;
            }
            Step::Exited(code) => {
                waiting = false;
                exit = match (forced, code) {
                    (Some(forced), _) => Some(forced),
                    (None, Some(code)) => Some(code),
                    (None, None) => {
                        // The sandbox went away under the process: the runtime says how the
                        // session ends (e.g. `exited` 128 after an OOM kill), else it is reset.
                        let decided =
                            tokio::time::timeout(LOST_PROCESS_GRACE, end.wait_for(Option::is_some))
                                .await;
                        match decided.ok().and_then(|r| r.ok().and_then(|e| *e)) {
                            Some(SessionEnd::Exit(code)) => Some(code),
                            _ => return Err(Stop::Drop),
                        }
                    }
                };
                exited_at = tokio::time::Instant::now();
            }
            Step::Client(None | Some(Err(()))) | Step::Client(Some(Ok(Incoming::Close))) => {
                debug!("exec client went away; killing the process");
                control.kill();
                return Err(Stop::Drop);
            }
            Step::Client(Some(Ok(Incoming::Other))) => {}
            Step::Client(Some(Ok(Incoming::Text(text)))) => {
                handle_frame(
                    session,
                    text.as_bytes(),
                    &mut pending,
                    &mut pending_bytes,
                    &mut stdin_state,
                )
                .await?;
            }
            Step::Client(Some(Ok(Incoming::Binary(data)))) => {
                handle_frame(
                    session,
                    &data,
                    &mut pending,
                    &mut pending_bytes,
                    &mut stdin_state,
                )
                .await?;
            }
            Step::Quiet => break,
        }
        if exit.is_some() {
            let now = tokio::time::Instant::now();
            let hard = exited_at + DRAIN_MAX;
            quiet_until = (now + DRAIN_QUIET).min(hard);
        }
    }
    let code = forced.or(exit).unwrap_or_default();
    session.send(ServerFrame::StdoutClosed).await?;
    session.send(ServerFrame::StderrClosed).await?;
    if let Some(ExecFault::CloseBeforeExit(close)) = session.fault {
        debug!(code = close, "exec fault: closing before the exit frame");
        return Err(session.close(close, String::new()).await);
    }
    session.send(ServerFrame::Exited(code)).await?;
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StdinState {
    Open,
    CloseRequested,
    Closed,
}

/// Applies one client frame: stdin data is queued (bounded), a close ends stdin once the queue
/// is written, a size resizes the terminal, `{}` is a heartbeat. An oversized or malformed
/// frame ends the session with a close frame.
async fn handle_frame<I, O, E>(
    session: &mut Session<'_, I, O>,
    raw: &[u8],
    pending: &mut VecDeque<Bytes>,
    pending_bytes: &mut usize,
    stdin_state: &mut StdinState,
) -> Result<(), Stop>
where
    I: Stream<Item = Result<Incoming, E>> + Unpin,
    O: Sink<Outgoing> + Unpin,
{
    if raw.len() > MAX_CLIENT_FRAME {
        return Err(session
            .close(
                1009,
                format!("exec frame too large (at most {MAX_CLIENT_FRAME} bytes)"),
            )
            .await);
    }
    let frame = match ClientFrame::parse(raw) {
        Ok(frame) => frame,
        Err(e) => {
            return Err(session
                .close(1008, format!("invalid exec frame: {e}"))
                .await);
        }
    };
    if let Some(size) = frame.tty_size {
        session.control.resize(size.height, size.width);
    }
    if let Some(data) = frame.stdin_data
        && !data.is_empty()
        && *stdin_state == StdinState::Open
    {
        *pending_bytes += data.len();
        pending.push_back(data);
    }
    if frame.stdin_close && *stdin_state == StdinState::Open {
        *stdin_state = StdinState::CloseRequested;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
