//! Nomad's alloc-exec WebSocket (nomad.md §1.10): the JSON frame codec, a session driver generic
//! over any `Sink`/`Stream` of WebSocket messages (tested with channels), and the connection.
//!
//! A session ends with [`SessionEnd::Exited`] only when the `exited` frame arrived; a stream
//! that closes or breaks before it is an error, never exit 0 (Poseidon reports 0 there).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Largest stdin chunk per frame (as the Go client).
const STDIN_CHUNK: usize = 2048;
/// How often a `{}` heartbeat is sent.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// Largest frame accepted from the server.
const MAX_FRAME: usize = 4 << 20;

/// One decoded server frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Output on stdout.
    Stdout(Bytes),
    /// Output on stderr.
    Stderr(Bytes),
    /// The command exited with this code.
    Exited(i32),
    /// Nothing to do (heartbeat, close markers).
    Nothing,
}

#[derive(Deserialize)]
struct OutIo {
    #[serde(default)]
    data: Option<String>,
}

#[derive(Deserialize)]
struct ExitResult {
    #[serde(default)]
    exit_code: i32,
}

#[derive(Deserialize)]
struct Out {
    #[serde(default)]
    stdout: Option<OutIo>,
    #[serde(default)]
    stderr: Option<OutIo>,
    #[serde(default)]
    exited: bool,
    #[serde(default)]
    result: Option<ExitResult>,
}

/// Decodes one text frame into what it carries (a frame may carry output and the exit).
pub fn decode(text: &str) -> Result<Vec<Frame>, String> {
    let out: Out = serde_json::from_str(text).map_err(|e| format!("bad exec frame: {e}"))?;
    let mut frames = Vec::new();
    for (io, stderr) in [(out.stdout, false), (out.stderr, true)] {
        if let Some(data) = io.and_then(|io| io.data).filter(|d| !d.is_empty()) {
            let bytes = Bytes::from(
                B64.decode(data.as_bytes())
                    .map_err(|e| format!("bad base64 in exec frame: {e}"))?,
            );
            frames.push(if stderr {
                Frame::Stderr(bytes)
            } else {
                Frame::Stdout(bytes)
            });
        }
    }
    if out.exited {
        frames.push(Frame::Exited(out.result.map_or(0, |r| r.exit_code)));
    }
    if frames.is_empty() {
        frames.push(Frame::Nothing);
    }
    Ok(frames)
}

/// `{"stdin":{"data":…}}`
pub fn stdin_frame(data: &[u8]) -> String {
    serde_json::json!({"stdin": {"data": B64.encode(data)}}).to_string()
}

/// `{"stdin":{"close":true}}`
pub fn stdin_close_frame() -> String {
    r#"{"stdin":{"close":true}}"#.to_string()
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The `exited` frame arrived.
    Exited(i32),
    /// The server refused or ended the session without an exit code (close frame, EOF, error).
    Broken(String),
    /// The output receiver went away (the execution was abandoned).
    Abandoned,
}

/// What a session does with stdin.
#[derive(Debug)]
pub enum Stdin {
    /// Forward these bytes; when the sender is dropped, send end-of-file (on a terminal `^D`,
    /// since Nomad's handling of `stdin.close` on a TTY is not established).
    Forward {
        /// The bytes.
        rx: mpsc::Receiver<Bytes>,
        /// Whether the session has a terminal.
        tty: bool,
    },
    /// Send the bytes and then end-of-file (a tar archive for a file copy).
    Feed(Bytes),
    /// Never send anything (Nomad may abort a command on an early end-of-file).
    Never,
}

/// Drives one session: forwards stdin, hands output to `out` as `(is_stderr, bytes)`, and
/// returns how it ended.
pub async fn drive<W, R, E>(
    mut sink: W,
    mut stream: R,
    stdin: Stdin,
    out: mpsc::Sender<(bool, Bytes)>,
) -> SessionEnd
where
    W: Sink<Message> + Unpin,
    <W as Sink<Message>>::Error: std::fmt::Display,
    R: Stream<Item = Result<Message, E>> + Unpin,
    E: std::fmt::Display,
{
    let (mut rx, tty) = match stdin {
        Stdin::Forward { rx, tty } => (Some(rx), tty),
        Stdin::Feed(bytes) => {
            for chunk in bytes.chunks(STDIN_CHUNK) {
                if let Err(e) = sink.send(Message::text(stdin_frame(chunk))).await {
                    return SessionEnd::Broken(format!("sending stdin: {e}"));
                }
            }
            if let Err(e) = sink.send(Message::text(stdin_close_frame())).await {
                return SessionEnd::Broken(format!("closing stdin: {e}"));
            }
            (None, false)
        }
        Stdin::Never => (None, false),
    };
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.tick().await;
    loop {
        tokio::select! {
            message = stream.next() => {
                let text = match message {
                    None => return SessionEnd::Broken("the exec stream ended before the exit code".into()),
                    Some(Err(e)) => return SessionEnd::Broken(format!("the exec stream broke before the exit code: {e}")),
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(frame))) => {
                        let reason = frame.map(|f| format!("{} {}", u16::from(f.code), f.reason)).unwrap_or_default();
                        return SessionEnd::Broken(format!("the exec stream closed before the exit code: {reason}"));
                    }
                    Some(Ok(_)) => continue,
                };
                let frames = match decode(text.as_str()) {
                    Ok(f) => f,
                    Err(e) => return SessionEnd::Broken(e),
                };
                for frame in frames {
                    match frame {
                        Frame::Stdout(b) => if out.send((false, b)).await.is_err() { return SessionEnd::Abandoned },
                        Frame::Stderr(b) => if out.send((true, b)).await.is_err() { return SessionEnd::Abandoned },
                        Frame::Exited(code) => {
                            let _ = sink.close().await;
                            return SessionEnd::Exited(code);
                        }
                        Frame::Nothing => {}
                    }
                }
            }
            input = async { match rx.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                match input {
                    Some(bytes) => {
                        for chunk in bytes.chunks(STDIN_CHUNK) {
                            if sink.send(Message::text(stdin_frame(chunk))).await.is_err() {
                                rx = None;
                                break;
                            }
                        }
                    }
                    None => {
                        rx = None;
                        // On a terminal, end-of-file is ^D through the line discipline (what
                        // `stdin.close` does to a TTY in docker is not established).
                        let frame = if tty { stdin_frame(b"\x04") } else { stdin_close_frame() };
                        let _ = sink.send(Message::text(frame)).await;
                    }
                }
            }
            _ = heartbeat.tick() => {
                let _ = sink.send(Message::text("{}")).await;
            }
            () = out.closed() => return SessionEnd::Abandoned,
        }
    }
}

/// Where and how exec sessions connect.
#[derive(Debug, Clone)]
pub struct ExecTarget {
    /// `ws://host:port` or `wss://host:port`.
    pub base: String,
    /// The namespace.
    pub namespace: String,
    /// The ACL token, if any.
    pub token: Option<String>,
    /// TLS for `wss`.
    pub tls: Arc<rustls::ClientConfig>,
}

impl ExecTarget {
    /// From the HTTP base URL.
    pub fn new(
        http_base: &str,
        namespace: &str,
        token: Option<String>,
        tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        let base = if let Some(rest) = http_base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = http_base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            http_base.to_string()
        };
        Self {
            base,
            namespace: namespace.to_string(),
            token,
            tls,
        }
    }

    /// Opens a session running `argv` in `task` of `alloc`, and starts driving it; the
    /// returned receiver yields the output, the join handle how it ended.
    pub async fn open(
        &self,
        alloc: &str,
        task: &str,
        argv: &[String],
        tty: bool,
        stdin: Stdin,
        out: mpsc::Sender<(bool, Bytes)>,
    ) -> Result<tokio::task::JoinHandle<SessionEnd>, String> {
        let command = serde_json::to_string(argv).map_err(|e| e.to_string())?;
        let mut url =
            reqwest::Url::parse(&format!("{}/v1/client/allocation/{alloc}/exec", self.base))
                .map_err(|e| format!("exec url: {e}"))?;
        url.query_pairs_mut()
            .append_pair("command", &command)
            .append_pair("task", task)
            .append_pair("tty", if tty { "true" } else { "false" })
            .append_pair("namespace", &self.namespace);
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| format!("exec request: {e}"))?;
        if let Some(token) = &self.token {
            let value = token
                .parse()
                .map_err(|_| "the nomad token is not a valid header value".to_string())?;
            request.headers_mut().insert("X-Nomad-Token", value);
        }
        let mut config = WebSocketConfig::default();
        config.max_message_size = Some(MAX_FRAME);
        config.max_frame_size = Some(MAX_FRAME);
        let connect = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(config),
            false,
            Some(tokio_tungstenite::Connector::Rustls(self.tls.clone())),
        );
        let (socket, _) = tokio::time::timeout(Duration::from_secs(30), connect)
            .await
            .map_err(|_| "connecting the exec stream timed out".to_string())?
            .map_err(|e| format!("connecting the exec stream: {e}"))?;
        let (sink, stream) = socket.split();
        Ok(tokio::spawn(drive(sink, stream, stdin, out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc as fmpsc;

    #[test]
    fn frames_decode_as_nomad_sends_them() {
        assert_eq!(
            decode(r#"{"stdout":{"data":"aGVsbG8K"}}"#).unwrap(),
            vec![Frame::Stdout(Bytes::from_static(b"hello\n"))]
        );
        assert_eq!(
            decode(r#"{"stderr":{"close":true}}"#).unwrap(),
            vec![Frame::Nothing]
        );
        assert_eq!(
            decode(r#"{"exited":true,"result":{"exit_code":3}}"#).unwrap(),
            vec![Frame::Exited(3)]
        );
        // Exit code 0 arrives as an empty result.
        assert_eq!(
            decode(r#"{"exited":true,"result":{}}"#).unwrap(),
            vec![Frame::Exited(0)]
        );
        assert_eq!(decode("{}").unwrap(), vec![Frame::Nothing]);
        assert!(decode("nope").is_err());
        assert!(decode(r#"{"stdout":{"data":"!!"}}"#).is_err());
        assert_eq!(stdin_frame(b"\x1c"), r#"{"stdin":{"data":"HA=="}}"#);
    }

    type Server = (
        fmpsc::UnboundedReceiver<Message>,
        fmpsc::UnboundedSender<Result<Message, String>>,
    );

    fn session(
        stdin: Stdin,
    ) -> (
        Server,
        mpsc::Receiver<(bool, Bytes)>,
        tokio::task::JoinHandle<SessionEnd>,
    ) {
        let (to_server, from_client) = fmpsc::unbounded::<Message>();
        let (to_client, from_server) = fmpsc::unbounded::<Result<Message, String>>();
        let (out_tx, out_rx) = mpsc::channel(16);
        let sink = to_server.sink_map_err(|e| e.to_string());
        let handle = tokio::spawn(drive(sink, from_server, stdin, out_tx));
        ((from_client, to_client), out_rx, handle)
    }

    #[tokio::test]
    async fn output_then_exit_is_an_exit_and_stdin_is_forwarded_then_closed() {
        let (stdin_tx, stdin_rx) = mpsc::channel(4);
        let ((mut from_client, to_client), mut out, handle) = session(Stdin::Forward {
            rx: stdin_rx,
            tty: true,
        });
        stdin_tx.send(Bytes::from_static(b"hi\n")).await.unwrap();
        assert_eq!(
            from_client.next().await.unwrap(),
            Message::text(r#"{"stdin":{"data":"aGkK"}}"#)
        );
        drop(stdin_tx);
        assert_eq!(
            from_client.next().await.unwrap(),
            Message::text(stdin_frame(b"\x04"))
        );
        for frame in [
            r#"{"stdout":{"data":"aGkNCg=="}}"#,
            r#"{"stderr":{"data":"ZXJy"}}"#,
            r#"{"stdout":{"close":true}}"#,
            r#"{"exited":true,"result":{"exit_code":42}}"#,
        ] {
            to_client.unbounded_send(Ok(Message::text(frame))).unwrap();
        }
        assert_eq!(handle.await.unwrap(), SessionEnd::Exited(42));
        assert_eq!(
            out.recv().await.unwrap(),
            (false, Bytes::from_static(b"hi\r\n"))
        );
        assert_eq!(
            out.recv().await.unwrap(),
            (true, Bytes::from_static(b"err"))
        );
    }

    #[tokio::test]
    async fn a_stream_that_ends_before_exited_is_an_error_not_exit_0() {
        let ((_from_client, to_client), _out, handle) = session(Stdin::Never);
        to_client
            .unbounded_send(Ok(Message::text(r#"{"stdout":{"close":true}}"#)))
            .unwrap();
        to_client
            .unbounded_send(Ok(Message::Close(Some(
                tokio_tungstenite::tungstenite::protocol::CloseFrame {
                    code: 1000.into(),
                    reason: "".into(),
                },
            ))))
            .unwrap();
        assert!(
            matches!(handle.await.unwrap(), SessionEnd::Broken(m) if m.contains("closed before"))
        );

        let ((_c, to_client), _out, handle) = session(Stdin::Never);
        drop(to_client);
        assert!(
            matches!(handle.await.unwrap(), SessionEnd::Broken(m) if m.contains("ended before"))
        );

        let ((_c, to_client), _out, handle) = session(Stdin::Never);
        to_client
            .unbounded_send(Err("connection reset".into()))
            .unwrap();
        assert!(matches!(handle.await.unwrap(), SessionEnd::Broken(m) if m.contains("reset")));
    }

    #[tokio::test]
    async fn fed_stdin_is_chunked_and_closed() {
        let data = Bytes::from(vec![b'x'; STDIN_CHUNK + 10]);
        let ((mut from_client, to_client), _out, handle) = session(Stdin::Feed(data));
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(from_client.next().await.unwrap());
        }
        assert_eq!(got[2], Message::text(stdin_close_frame()));
        to_client
            .unbounded_send(Ok(Message::text(r#"{"exited":true,"result":{}}"#)))
            .unwrap();
        assert_eq!(handle.await.unwrap(), SessionEnd::Exited(0));
    }
}
