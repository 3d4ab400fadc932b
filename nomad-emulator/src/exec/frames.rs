//! The JSON frames of alloc exec (nomad.md §1.10): parsing the client's, encoding the server's.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A terminal size from a `tty_size` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct TtySize {
    /// Rows.
    #[serde(default)]
    pub height: u16,
    /// Columns.
    #[serde(default)]
    pub width: u16,
}

/// One client frame, decoded. `{}` (a heartbeat) has every field empty.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientFrame {
    /// Bytes for the process's stdin.
    pub stdin_data: Option<Bytes>,
    /// Whether the client ends stdin.
    pub stdin_close: bool,
    /// A new terminal size.
    pub tty_size: Option<TtySize>,
}

#[derive(Deserialize)]
struct RawStdin {
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    close: bool,
}

#[derive(Deserialize)]
struct RawClientFrame {
    #[serde(default)]
    stdin: Option<RawStdin>,
    #[serde(default)]
    tty_size: Option<TtySize>,
}

/// Why a client frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Not the JSON of an exec frame.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// `stdin.data` is not base64.
    #[error("stdin data is not base64: {0}")]
    Base64(#[from] base64::DecodeError),
}

impl ClientFrame {
    /// Decodes a frame; unknown fields are ignored, as Go's decoder does.
    pub fn parse(raw: &[u8]) -> Result<ClientFrame, FrameError> {
        let frame: RawClientFrame = serde_json::from_slice(raw)?;
        let mut out = ClientFrame {
            tty_size: frame.tty_size,
            ..ClientFrame::default()
        };
        if let Some(stdin) = frame.stdin {
            if let Some(data) = stdin.data {
                out.stdin_data = Some(Bytes::from(STANDARD.decode(data)?));
            }
            out.stdin_close = stdin.close;
        }
        Ok(out)
    }
}

/// One server frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// `{"stdout":{"data":b64}}`.
    Stdout(Bytes),
    /// `{"stderr":{"data":b64}}`.
    Stderr(Bytes),
    /// `{"stdout":{"close":true}}`.
    StdoutClosed,
    /// `{"stderr":{"close":true}}`.
    StderrClosed,
    /// `{"exited":true,"result":{"exit_code":N}}`, with `"result":{}` when N is 0.
    Exited(i32),
}

#[derive(Serialize)]
struct RawOutput {
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    close: bool,
}

#[derive(Serialize)]
struct RawResult {
    #[serde(skip_serializing_if = "is_zero")]
    exit_code: i32,
}

fn is_zero(code: &i32) -> bool {
    *code == 0
}

#[derive(Serialize)]
struct RawServerFrame {
    #[serde(skip_serializing_if = "Option::is_none")]
    stdout: Option<RawOutput>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stderr: Option<RawOutput>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    exited: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<RawResult>,
}

impl ServerFrame {
    /// The frame's JSON text.
    pub fn to_json(&self) -> String {
        let data = |d: &Bytes| RawOutput {
            data: Some(STANDARD.encode(d)),
            close: false,
        };
        let closed = || RawOutput {
            data: None,
            close: true,
        };
        let mut raw = RawServerFrame {
            stdout: None,
            stderr: None,
            exited: false,
            result: None,
        };
        match self {
            ServerFrame::Stdout(d) => raw.stdout = Some(data(d)),
            ServerFrame::Stderr(d) => raw.stderr = Some(data(d)),
            ServerFrame::StdoutClosed => raw.stdout = Some(closed()),
            ServerFrame::StderrClosed => raw.stderr = Some(closed()),
            ServerFrame::Exited(code) => {
                raw.exited = true;
                raw.result = Some(RawResult { exit_code: *code });
            }
        }
        // Serializing these plain structs cannot fail.
        serde_json::to_string(&raw).unwrap_or_else(|_| "{}".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_frames_have_nomads_shapes() {
        assert_eq!(
            ServerFrame::Stdout(Bytes::from_static(b"hello\n")).to_json(),
            r#"{"stdout":{"data":"aGVsbG8K"}}"#
        );
        assert_eq!(
            ServerFrame::Stderr(Bytes::from_static(b"x")).to_json(),
            r#"{"stderr":{"data":"eA=="}}"#
        );
        assert_eq!(
            ServerFrame::StdoutClosed.to_json(),
            r#"{"stdout":{"close":true}}"#
        );
        assert_eq!(
            ServerFrame::StderrClosed.to_json(),
            r#"{"stderr":{"close":true}}"#
        );
        assert_eq!(
            ServerFrame::Exited(3).to_json(),
            r#"{"exited":true,"result":{"exit_code":3}}"#
        );
        assert_eq!(
            ServerFrame::Exited(0).to_json(),
            r#"{"exited":true,"result":{}}"#
        );
    }

    #[test]
    fn client_frames_decode_and_bad_ones_are_errors() {
        let f = ClientFrame::parse(br#"{"stdin":{"data":"aGVsbG8K"}}"#).unwrap();
        assert_eq!(f.stdin_data.as_deref(), Some(&b"hello\n"[..]));
        assert!(!f.stdin_close);
        let f = ClientFrame::parse(br#"{"stdin":{"close":true}}"#).unwrap();
        assert!(f.stdin_close && f.stdin_data.is_none());
        let f = ClientFrame::parse(br#"{"tty_size":{"height":50,"width":132}}"#).unwrap();
        assert_eq!(
            f.tty_size,
            Some(TtySize {
                height: 50,
                width: 132
            })
        );
        assert_eq!(ClientFrame::parse(b"{}").unwrap(), ClientFrame::default());
        assert!(ClientFrame::parse(b"not json").is_err());
        assert!(ClientFrame::parse(br#"{"stdin":{"data":"%%%"}}"#).is_err());
        assert!(ClientFrame::parse(br#"{"tty_size":{"height":-1}}"#).is_err());
    }
}
