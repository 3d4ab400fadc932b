//! The exec protocol on an axum WebSocket.

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::{SinkExt, StreamExt};

use super::{EndSignal, Ending, ExecIo, Incoming, Outgoing, run_session};
use crate::runtime::ExecFault;

fn incoming(message: Message) -> Incoming {
    match message {
        Message::Text(text) => Incoming::Text(text.as_str().to_owned()),
        Message::Binary(data) => Incoming::Binary(data),
        Message::Close(_) => Incoming::Close,
        Message::Ping(_) | Message::Pong(_) => Incoming::Other,
    }
}

fn outgoing(message: Outgoing) -> Message {
    match message {
        Outgoing::Text(text) => Message::Text(text.into()),
        Outgoing::Close(code, reason) => Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })),
    }
}

/// Runs a session on `socket` (see [`run_session`]) and then drops the connection: without a
/// close frame after `exited`, a reset or a client gone, right after the close frame otherwise.
pub async fn serve(
    socket: WebSocket,
    io: ExecIo,
    fault: Option<ExecFault>,
    end: EndSignal,
) -> Ending {
    let (sink, stream) = socket.split();
    let stream = stream.map(|m| m.map(incoming));
    let sink = sink.with(|m: Outgoing| futures::future::ready(Ok::<_, axum::Error>(outgoing(m))));
    let sink = Box::pin(sink);
    run_session(io, stream, sink, fault, end).await
    // Both halves drop here: the TCP connection closes without a WebSocket close frame.
}

/// Sends a close frame with `code` and `reason` (an error after the upgrade, as Nomad 2.x
/// reports them) and drops the connection.
pub async fn close_with(mut socket: WebSocket, code: u16, reason: &str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}
