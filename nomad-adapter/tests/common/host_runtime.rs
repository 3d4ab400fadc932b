//! An `AllocationRuntime` for the emulator that runs exec sessions as host processes (a terminal
//! through util-linux `script`), with Nomad's frames and the emulator's session faults. The
//! adapter `cd`s into its configured working directory itself, so allocations need no sandbox
//! here; the local-sandbox runtime of the emulator gives each allocation its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::ws::{Message, WebSocket};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::stream::BoxStream;
use futures::{SinkExt, StreamExt};
use nomad_emulator::runtime::{
    AllocationRuntime, ExecFault, ExecSession, RuntimeError, RuntimeEvent, SessionEnd, TaskLaunch,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

#[derive(Debug, Default)]
pub struct HostRuntime {
    allocs: Mutex<HashMap<String, Vec<mpsc::UnboundedSender<SessionEnd>>>>,
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl HostRuntime {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn end_all(&self, alloc_id: &str, end: SessionEnd) {
        if let Some(sessions) = self.allocs.lock().unwrap().get_mut(alloc_id) {
            for s in sessions.drain(..) {
                let _ = s.send(end);
            }
        }
    }
}

#[async_trait]
impl AllocationRuntime for HostRuntime {
    async fn start(&self, launch: &TaskLaunch) -> Result<(), RuntimeError> {
        self.allocs
            .lock()
            .unwrap()
            .entry(launch.alloc_id.clone())
            .or_default();
        Ok(())
    }

    async fn end_sessions(&self, alloc_id: &str, end: SessionEnd) {
        self.end_all(alloc_id, end);
    }

    async fn stop(&self, alloc_id: &str) {
        self.end_all(alloc_id, SessionEnd::Reset);
        self.allocs.lock().unwrap().remove(alloc_id);
    }

    async fn exec(&self, socket: WebSocket, session: ExecSession) {
        let (end_tx, end_rx) = mpsc::unbounded_channel();
        self.allocs
            .lock()
            .unwrap()
            .entry(session.alloc_id.clone())
            .or_default()
            .push(end_tx);
        run(socket, session, end_rx).await;
    }

    async fn surviving(&self) -> Vec<String> {
        self.allocs.lock().unwrap().keys().cloned().collect()
    }

    fn events(&self) -> BoxStream<'static, RuntimeEvent> {
        futures::stream::pending().boxed()
    }
}

fn kill_group(pgid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-9", "--", &format!("-{pgid}")])
        .stderr(std::process::Stdio::null())
        .status();
}

async fn run(
    socket: WebSocket,
    session: ExecSession,
    mut end_rx: mpsc::UnboundedReceiver<SessionEnd>,
) {
    let (mut sink, mut stream) = socket.split();
    let argv = session.argv;
    let mut command = if session.tty {
        let line = argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ");
        let mut c = tokio::process::Command::new("script");
        c.args(["-qfec", &line, "/dev/null"]);
        c
    } else {
        let mut c = tokio::process::Command::new(&argv[0]);
        c.args(&argv[1..]);
        c
    };
    command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let Ok(mut child) = command.spawn() else {
        return;
    };
    let pgid = child.id().unwrap_or(0);
    let mut stdin = child.stdin.take();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (out_tx, mut out_rx) = mpsc::channel::<String>(64);
    let pipe = |mut r: Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                name: &'static str,
                tx: mpsc::Sender<String>| async move {
        let mut buf = vec![0u8; 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let frame = json!({ name: {"data": B64.encode(&buf[..n])} }).to_string();
                    if tx.send(frame).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let readers = tokio::spawn({
        let a = pipe(Box::new(stdout), "stdout", out_tx.clone());
        let b = pipe(Box::new(stderr), "stderr", out_tx);
        async move {
            tokio::join!(a, b);
        }
    });
    let mut frames_sent = 0usize;
    let mut forced: Option<i32> = None;
    loop {
        tokio::select! {
            frame = out_rx.recv() => match frame {
                Some(f) => {
                    if let Some(ExecFault::DropAfterFrames(n)) = session.fault
                        && frames_sent >= n
                    {
                        kill_group(pgid);
                        readers.abort();
                        return;
                    }
                    if sink.send(Message::Text(f.into())).await.is_err() {
                        kill_group(pgid);
                        return;
                    }
                    frames_sent += 1;
                }
                None => break,
            },
            end = end_rx.recv() => match end {
                Some(SessionEnd::Exit(code)) => {
                    kill_group(pgid);
                    forced = Some(code);
                }
                Some(SessionEnd::Reset) | None => {
                    kill_group(pgid);
                    readers.abort();
                    return;
                }
            },
            input = stream.next() => match input {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                    if let Some(data) = v["stdin"]["data"].as_str()
                        && let (Some(s), Ok(bytes)) = (stdin.as_mut(), B64.decode(data))
                    {
                        let _ = s.write_all(&bytes).await;
                    }
                    if v["stdin"]["close"] == Value::Bool(true) {
                        stdin = None;
                    }
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => {
                    kill_group(pgid);
                    readers.abort();
                    return;
                }
            },
        }
    }
    let status = child.wait().await.ok();
    let code = forced.unwrap_or_else(|| {
        status
            .and_then(|s| {
                s.code()
                    .or_else(|| std::os::unix::process::ExitStatusExt::signal(&s).map(|s| 128 + s))
            })
            .unwrap_or(0)
    });
    let _ = sink
        .send(Message::Text(r#"{"stdout":{"close":true}}"#.into()))
        .await;
    let _ = sink
        .send(Message::Text(r#"{"stderr":{"close":true}}"#.into()))
        .await;
    if let Some(ExecFault::CloseBeforeExit(c)) = session.fault {
        let _ = sink
            .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                code: c,
                reason: "".into(),
            })))
            .await;
        return;
    }
    let result = if code == 0 {
        json!({})
    } else {
        json!({"exit_code": code})
    };
    let _ = sink
        .send(Message::Text(
            json!({"exited": true, "result": result}).to_string().into(),
        ))
        .await;
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}
