//! The execution stream of design §2, independent of any WebSocket library.
//!
//! [`run_execution`] speaks the protocol over any `Sink<ServerFrame>` and `Stream<Item =
//! ClientFrame>`, so tests drive it with channels; the route adapts axum's socket to it. It sends
//! `start`, the output as produced, exactly one final message and a close 1000. Every buffer on
//! the way is bounded: a client that does not read makes `sink.send` wait, which stops reading
//! the execution's events, which stops the process. It never waits on stdin while output is
//! pending, so a process that does not read its input cannot deadlock the stream. Input that
//! cannot be read (a message over the size limit, a protocol violation) cancels the execution
//! and ends the stream with an `error`: whatever the client sends, the stream ends with one
//! final message and a close 1000, unless the client itself closed or went away.

use std::time::Duration;

use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};
use runner_core::{Execution, ExecutionEvent, ExecutionFailure};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// A message of the server to the client, as the WebSocket schema defines it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum WsMessage {
    /// The execution started.
    Start,
    /// Output on stdout.
    Stdout(String),
    /// Output on stderr.
    Stderr(String),
    /// The command exited with this code.
    Exit(u8),
    /// The time limit or the inactivity timeout ended the execution.
    Timeout,
    /// The execution ended abnormally.
    Error(String),
}

impl WsMessage {
    /// The JSON text of this message.
    pub fn to_json(&self) -> String {
        // Serialising this enum cannot fail: it has only strings and integers.
        serde_json::to_string(self)
            .unwrap_or_else(|_| r#"{"type":"error","data":"Error executing the request"}"#.into())
    }
}

/// A frame the server sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// A JSON text message.
    Message(WsMessage),
    /// A close frame with a code.
    Close(u16),
}

/// A frame the client sent, as far as the protocol cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// Raw stdin.
    Text(String),
    /// The client closes the connection.
    Close,
    /// The client's input could not be read (e.g. a message above the size limit, or a
    /// protocol violation); the text says why.
    Invalid(String),
    /// Anything else (binary, ping, pong): ignored.
    Other,
}

/// Most stdin bytes held for a process that is not reading its input.
const MAX_PENDING_INPUT: usize = 1 << 20;

/// Normal closure.
pub const CLOSE_NORMAL: u16 = 1000;
/// The server is going away (shutdown grace period over).
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// How long sending the close frame may wait for a client that does not read.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How an execution stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// A final message and a close 1000 were sent.
    Completed,
    /// The client closed or went away; the execution was cancelled.
    ClientGone,
    /// The server shut down before the execution ended.
    Shutdown,
    /// The backend could not start the execution: `start`, an `error` and a close 1000 were sent.
    StartFailed,
    /// The client's input could not be read: the execution was cancelled and ended with an
    /// `error` message and a close 1000.
    InvalidInput,
}

/// Decodes a byte stream as UTF-8 across chunk boundaries: an incomplete trailing sequence is
/// kept for the next chunk; only truly invalid bytes become U+FFFD.
#[derive(Debug, Default)]
pub struct Utf8Decoder {
    pending: Vec<u8>,
}

impl Utf8Decoder {
    /// Decodes `chunk`, keeping an incomplete trailing character for later.
    pub fn decode(&mut self, chunk: &[u8]) -> String {
        let mut buffer = std::mem::take(&mut self.pending);
        buffer.extend_from_slice(chunk);
        let mut out = String::with_capacity(buffer.len());
        let mut rest = buffer.as_slice();
        loop {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    out.push_str(text);
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        Some(len) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[len..];
                        }
                        None => {
                            self.pending = after.to_vec();
                            break;
                        }
                    }
                }
            }
        }
        out
    }

    /// Whatever is left at the end of the stream, replaced as invalid.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&rest).into_owned()
    }
}

/// Starts an execution on a connection that is already upgraded, then runs it as
/// [`run_execution`] does.
///
/// The upgrade has been answered by now, so a failed start is reported inside the stream (design
/// §2): `start`, then `{"type":"error","data":"Error executing the request"}`, then a close 1000.
pub async fn start_and_run<Si, St, F, E>(
    mut sink: Si,
    client: St,
    start: F,
    shutdown: CancellationToken,
) -> StreamEnd
where
    Si: Sink<ServerFrame> + Unpin,
    St: Stream<Item = ClientFrame> + Unpin,
    F: Future<Output = Result<Execution, E>>,
    E: std::fmt::Display,
{
    let started = tokio::select! {
        started = start => started,
        () = shutdown.cancelled() => {
            close(&mut sink, CLOSE_GOING_AWAY).await;
            return StreamEnd::Shutdown;
        }
    };
    match started {
        Ok(execution) => run_execution(sink, client, execution, shutdown).await,
        Err(error) => {
            tracing::warn!(%error, "the execution could not be started");
            for message in [
                WsMessage::Start,
                WsMessage::Error(ExecutionFailure::Failed.to_string()),
            ] {
                if sink.send(ServerFrame::Message(message)).await.is_err() {
                    return StreamEnd::ClientGone;
                }
            }
            close(&mut sink, CLOSE_NORMAL).await;
            StreamEnd::StartFailed
        }
    }
}

/// Runs one execution over a client connection until its final message (or until the client
/// leaves, or `shutdown` fires after the grace period). Dropping `execution` — on every return
/// path — cancels it if it still runs.
pub async fn run_execution<Si, St>(
    mut sink: Si,
    mut client: St,
    execution: Execution,
    shutdown: CancellationToken,
) -> StreamEnd
where
    Si: Sink<ServerFrame> + Unpin,
    St: Stream<Item = ClientFrame> + Unpin,
{
    let Execution { stdin, mut events } = execution;
    let mut stdin = Some(stdin);
    let mut stdout = Utf8Decoder::default();
    let mut stderr = Utf8Decoder::default();
    let mut pending_input: Option<Bytes> = None;

    if sink
        .send(ServerFrame::Message(WsMessage::Start))
        .await
        .is_err()
    {
        return StreamEnd::ClientGone;
    }

    let last = loop {
        tokio::select! {
            event = events.recv() => {
                let message = match event {
                    Some(ExecutionEvent::Stdout(bytes)) => {
                        let text = stdout.decode(&bytes);
                        if text.is_empty() { continue; }
                        WsMessage::Stdout(text)
                    }
                    Some(ExecutionEvent::Stderr(bytes)) => {
                        let text = stderr.decode(&bytes);
                        if text.is_empty() { continue; }
                        WsMessage::Stderr(text)
                    }
                    Some(ExecutionEvent::Exit(code)) => break WsMessage::Exit(code),
                    Some(ExecutionEvent::Timeout) => break WsMessage::Timeout,
                    Some(ExecutionEvent::Error(failure)) => break WsMessage::Error(failure.to_string()),
                    None => break WsMessage::Error(ExecutionFailure::Failed.to_string()),
                };
                if sink.send(ServerFrame::Message(message)).await.is_err() {
                    return StreamEnd::ClientGone;
                }
            }
            permit = reserve(stdin.clone()), if pending_input.is_some() => {
                match (permit, pending_input.take()) {
                    (Some(permit), Some(bytes)) => {
                        permit.send(bytes);
                    }
                    // The process closed its stdin: further input goes nowhere.
                    _ => stdin = None,
                }
            }
            // The client is read even while input waits for the process, so its close (or
            // departure) always cancels the execution; waiting input is bounded.
            frame = client.next() => {
                match frame {
                    Some(ClientFrame::Text(text)) => {
                        if stdin.is_some() && !text.is_empty() {
                            pending_input = match pending_input.take() {
                                None => Some(Bytes::from(text)),
                                Some(waiting) if waiting.len() + text.len() <= MAX_PENDING_INPUT => {
                                    let mut joined = Vec::with_capacity(waiting.len() + text.len());
                                    joined.extend_from_slice(&waiting);
                                    joined.extend_from_slice(text.as_bytes());
                                    Some(Bytes::from(joined))
                                }
                                // The process has not read a mebibyte of input: drop the excess.
                                Some(waiting) => Some(waiting),
                            };
                        }
                    }
                    Some(ClientFrame::Other) => {}
                    Some(ClientFrame::Close) => {
                        // Cancel first: answering the close may wait for a slow client.
                        drop(events);
                        close(&mut sink, CLOSE_NORMAL).await;
                        return StreamEnd::ClientGone;
                    }
                    Some(ClientFrame::Invalid(reason)) => {
                        drop(events);
                        let message = WsMessage::Error(format!("invalid input: {reason}"));
                        if sink.send(ServerFrame::Message(message)).await.is_err() {
                            return StreamEnd::ClientGone;
                        }
                        close(&mut sink, CLOSE_NORMAL).await;
                        return StreamEnd::InvalidInput;
                    }
                    None => return StreamEnd::ClientGone,
                }
            }
            () = shutdown.cancelled() => {
                drop(events);
                close(&mut sink, CLOSE_GOING_AWAY).await;
                return StreamEnd::Shutdown;
            }
        }
    };

    for (decoder, is_stdout) in [(&mut stdout, true), (&mut stderr, false)] {
        let rest = decoder.finish();
        if !rest.is_empty() {
            let message = if is_stdout {
                WsMessage::Stdout(rest)
            } else {
                WsMessage::Stderr(rest)
            };
            if sink.send(ServerFrame::Message(message)).await.is_err() {
                return StreamEnd::ClientGone;
            }
        }
    }
    if sink.send(ServerFrame::Message(last)).await.is_err() {
        return StreamEnd::ClientGone;
    }
    close(&mut sink, CLOSE_NORMAL).await;
    StreamEnd::Completed
}

/// Sends a close frame with `code` and flushes the sink, within [`CLOSE_TIMEOUT`].
///
/// When the client closed first, the WebSocket layer refuses a second close frame of ours but
/// has queued its answer to the client's close (RFC 6455 §5.5.1); closing the sink writes it.
async fn close<Si>(sink: &mut Si, code: u16)
where
    Si: Sink<ServerFrame> + Unpin,
{
    let closed = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let _ = sink.send(ServerFrame::Close(code)).await;
        let _ = sink.close().await;
    })
    .await;
    if closed.is_err() {
        tracing::debug!(code, "the client did not take the close frame in time");
    }
}

async fn reserve(
    stdin: Option<tokio::sync::mpsc::Sender<Bytes>>,
) -> Option<tokio::sync::mpsc::OwnedPermit<Bytes>> {
    stdin?.reserve_owned().await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc as fmpsc;
    use tokio::sync::mpsc;

    #[test]
    fn decoder_keeps_split_characters_whole() {
        let text = "héllo → 世界 🎉";
        let bytes = text.as_bytes();
        for split in 0..=bytes.len() {
            let mut d = Utf8Decoder::default();
            let mut out = d.decode(&bytes[..split]);
            out.push_str(&d.decode(&bytes[split..]));
            out.push_str(&d.finish());
            assert_eq!(out, text, "split at {split}");
        }
    }

    #[test]
    fn decoder_replaces_only_invalid_bytes() {
        let mut d = Utf8Decoder::default();
        assert_eq!(d.decode(b"a\xffb"), "a\u{FFFD}b");
        assert_eq!(d.decode(b"c\xe4"), "c");
        assert_eq!(d.decode(b"x"), "\u{FFFD}x");
        assert_eq!(d.decode(b"\xf0\x9f"), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }

    #[test]
    fn messages_serialise_as_the_schema_says() {
        assert_eq!(WsMessage::Start.to_json(), r#"{"type":"start"}"#);
        assert_eq!(WsMessage::Timeout.to_json(), r#"{"type":"timeout"}"#);
        assert_eq!(WsMessage::Exit(3).to_json(), r#"{"type":"exit","data":3}"#);
        assert_eq!(
            WsMessage::Stdout("a\"b".into()).to_json(),
            r#"{"type":"stdout","data":"a\"b"}"#
        );
        assert_eq!(
            WsMessage::Error("x".into()).to_json(),
            r#"{"type":"error","data":"x"}"#
        );
    }

    struct Harness {
        events: mpsc::Sender<ExecutionEvent>,
        stdin: mpsc::Receiver<Bytes>,
        client: fmpsc::Sender<ClientFrame>,
        server: fmpsc::Receiver<ServerFrame>,
        task: tokio::task::JoinHandle<StreamEnd>,
        shutdown: CancellationToken,
    }

    fn harness() -> Harness {
        let (events_tx, events_rx) = mpsc::channel(4);
        let (stdin_tx, stdin_rx) = mpsc::channel(1);
        let (client_tx, client_rx) = fmpsc::channel(4);
        let (server_tx, server_rx) = fmpsc::channel(4);
        let shutdown = CancellationToken::new();
        let execution = Execution {
            stdin: stdin_tx,
            events: events_rx,
        };
        let task = tokio::spawn(run_execution(
            server_tx,
            client_rx,
            execution,
            shutdown.clone(),
        ));
        Harness {
            events: events_tx,
            stdin: stdin_rx,
            client: client_tx,
            server: server_rx,
            task,
            shutdown,
        }
    }

    fn msg(m: WsMessage) -> ServerFrame {
        ServerFrame::Message(m)
    }

    #[tokio::test]
    async fn stream_sends_start_output_exit_and_close() {
        let mut h = harness();
        h.events
            .send(ExecutionEvent::Stdout(Bytes::from_static(b"hi \xe2\x82")))
            .await
            .expect("send");
        h.events
            .send(ExecutionEvent::Stdout(Bytes::from_static(b"\xac")))
            .await
            .expect("send");
        h.events
            .send(ExecutionEvent::Stderr(Bytes::from_static(b"oops")))
            .await
            .expect("send");
        h.events.send(ExecutionEvent::Exit(42)).await.expect("send");
        let frames: Vec<ServerFrame> = h.server.by_ref().collect().await;
        assert_eq!(
            frames,
            vec![
                msg(WsMessage::Start),
                msg(WsMessage::Stdout("hi ".into())),
                msg(WsMessage::Stdout("€".into())),
                msg(WsMessage::Stderr("oops".into())),
                msg(WsMessage::Exit(42)),
                ServerFrame::Close(CLOSE_NORMAL),
            ]
        );
        assert_eq!(h.task.await.ok(), Some(StreamEnd::Completed));
    }

    #[tokio::test]
    async fn destroy_reasons_arrive_as_the_final_message() {
        for (event, expected) in [
            (ExecutionEvent::Timeout, WsMessage::Timeout),
            (
                ExecutionEvent::Error(ExecutionFailure::OomKilled),
                WsMessage::Error("the allocation was OOM Killed".into()),
            ),
            (
                ExecutionEvent::Error(ExecutionFailure::StoppedAsExpected),
                WsMessage::Error("the allocation stopped as expected".into()),
            ),
        ] {
            let mut h = harness();
            h.events.send(event).await.expect("send");
            let frames: Vec<ServerFrame> = h.server.by_ref().collect().await;
            assert_eq!(
                frames,
                vec![
                    msg(WsMessage::Start),
                    msg(expected),
                    ServerFrame::Close(CLOSE_NORMAL)
                ]
            );
        }
    }

    #[tokio::test]
    async fn events_ending_without_a_final_event_report_an_error() {
        let mut h = harness();
        drop(h.events);
        let frames: Vec<ServerFrame> = h.server.by_ref().collect().await;
        assert_eq!(
            frames[1],
            msg(WsMessage::Error("Error executing the request".into()))
        );
    }

    #[tokio::test]
    async fn text_frames_become_stdin() {
        let mut h = harness();
        h.client
            .send(ClientFrame::Text("Hello\n".into()))
            .await
            .expect("send");
        assert_eq!(h.stdin.recv().await, Some(Bytes::from_static(b"Hello\n")));
        h.events.send(ExecutionEvent::Exit(0)).await.expect("send");
        let frames: Vec<ServerFrame> = h.server.by_ref().collect().await;
        assert_eq!(frames.len(), 3);
    }

    #[tokio::test]
    async fn a_failed_start_is_start_error_and_close() {
        let (server_tx, server_rx) = fmpsc::channel(4);
        let (_client_tx, client_rx) = fmpsc::channel::<ClientFrame>(4);
        let end = start_and_run(
            server_tx,
            client_rx,
            async { Err::<Execution, _>("fork: EAGAIN") },
            CancellationToken::new(),
        )
        .await;
        assert_eq!(end, StreamEnd::StartFailed);
        let frames: Vec<ServerFrame> = server_rx.collect().await;
        assert_eq!(
            frames,
            vec![
                msg(WsMessage::Start),
                msg(WsMessage::Error("Error executing the request".into())),
                ServerFrame::Close(CLOSE_NORMAL),
            ]
        );
    }

    #[tokio::test]
    async fn client_close_cancels_the_execution() {
        let mut h = harness();
        assert_eq!(h.server.next().await, Some(msg(WsMessage::Start)));
        h.client.send(ClientFrame::Close).await.expect("send");
        assert_eq!(h.task.await.ok(), Some(StreamEnd::ClientGone));
        // The execution was dropped: its event sender sees the receiver gone.
        assert!(h.events.send(ExecutionEvent::Exit(0)).await.is_err());
    }

    #[tokio::test]
    async fn unread_stdin_does_not_block_output() {
        let mut h = harness();
        for _ in 0..3 {
            h.client
                .send(ClientFrame::Text("x".into()))
                .await
                .expect("send");
        }
        h.events
            .send(ExecutionEvent::Stdout(Bytes::from_static(b"out")))
            .await
            .expect("send");
        assert_eq!(h.server.next().await, Some(msg(WsMessage::Start)));
        assert_eq!(
            h.server.next().await,
            Some(msg(WsMessage::Stdout("out".into())))
        );
        h.shutdown.cancel();
        assert_eq!(h.task.await.ok(), Some(StreamEnd::Shutdown));
    }

    #[tokio::test]
    async fn unreadable_input_cancels_and_ends_with_one_error_and_close() {
        let mut h = harness();
        assert_eq!(h.server.next().await, Some(msg(WsMessage::Start)));
        h.client
            .send(ClientFrame::Invalid("message too long".into()))
            .await
            .expect("send");
        let frames: Vec<ServerFrame> = h.server.by_ref().collect().await;
        assert_eq!(
            frames,
            vec![
                msg(WsMessage::Error("invalid input: message too long".into())),
                ServerFrame::Close(CLOSE_NORMAL),
            ]
        );
        assert_eq!(h.task.await.ok(), Some(StreamEnd::InvalidInput));
        assert!(h.events.send(ExecutionEvent::Exit(0)).await.is_err());
    }

    #[tokio::test]
    async fn client_close_cancels_even_while_stdin_is_backed_up() {
        let mut h = harness();
        assert_eq!(h.server.next().await, Some(msg(WsMessage::Start)));
        // The process never reads: one chunk fills the stdin channel, the rest waits.
        for _ in 0..20 {
            h.client
                .send(ClientFrame::Text("unread\n".into()))
                .await
                .expect("send");
        }
        h.client.send(ClientFrame::Close).await.expect("send");
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), h.task)
            .await
            .expect("the stream ends on close");
        assert_eq!(ended.ok(), Some(StreamEnd::ClientGone));
    }
}
