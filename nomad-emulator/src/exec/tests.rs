//! The frame protocol on channels and in-memory pipes, without a sandbox.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;

/// A process made of in-memory pipes; the test plays the process.
struct Fake {
    exit: watch::Sender<Option<Option<i32>>>,
    killed: AtomicBool,
    sizes: Mutex<Vec<(u16, u16)>>,
}

struct FakeControl(Arc<Fake>);

#[async_trait]
impl ExecProcess for FakeControl {
    fn resize(&self, rows: u16, cols: u16) {
        self.0.sizes.lock().unwrap().push((rows, cols));
    }
    fn kill(&self) {
        self.0.killed.store(true, Ordering::SeqCst);
        self.0.exit.send_if_modified(|e| {
            if e.is_none() {
                *e = Some(None);
                true
            } else {
                false
            }
        });
    }
    async fn wait(&self) -> Option<i32> {
        let mut rx = self.0.exit.subscribe();
        let exit = *rx.wait_for(Option::is_some).await.unwrap();
        exit.flatten()
    }
}

/// The process's ends of its pipes.
struct Proc {
    fake: Arc<Fake>,
    stdin: DuplexStream,
    stdout: Option<DuplexStream>,
    stderr: Option<DuplexStream>,
}

impl Proc {
    /// Writes output, closes both outputs and exits with `code`.
    async fn finish(&mut self, out: &[u8], err: &[u8], code: i32) {
        self.stdout.as_mut().unwrap().write_all(out).await.unwrap();
        if let Some(stderr) = self.stderr.as_mut() {
            stderr.write_all(err).await.unwrap();
        }
        self.stdout = None;
        self.stderr = None;
        self.fake.exit.send_replace(Some(Some(code)));
    }
}

struct Client {
    to_server: mpsc::Sender<Result<Incoming, ()>>,
    from_server: mpsc::Receiver<Outgoing>,
    end: watch::Sender<Option<SessionEnd>>,
    session: tokio::task::JoinHandle<Ending>,
}

impl Client {
    async fn send(&mut self, text: &str) {
        use futures::SinkExt;
        self.to_server
            .send(Ok(Incoming::Text(text.to_string())))
            .await
            .unwrap();
    }

    /// Every frame until the session ends, and how it ended.
    async fn rest(mut self) -> (Vec<Outgoing>, Ending) {
        let mut frames = Vec::new();
        let collect = async {
            while let Some(frame) = self.from_server.next().await {
                frames.push(frame);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), collect)
            .await
            .expect("the session did not end");
        let ending = self.session.await.unwrap();
        drop(self.to_server);
        (frames, ending)
    }
}

fn start(tty: bool, fault: Option<ExecFault>) -> (Client, Proc) {
    let (exit, _) = watch::channel(None);
    let fake = Arc::new(Fake {
        exit,
        killed: AtomicBool::new(false),
        sizes: Mutex::new(Vec::new()),
    });
    let (stdin_server, stdin_proc) = tokio::io::duplex(1 << 16);
    let (stdout_server, stdout_proc) = tokio::io::duplex(1 << 16);
    let (stderr_server, stderr_proc) = tokio::io::duplex(1 << 16);
    let io = ExecIo {
        stdin: Box::new(stdin_server),
        stdout: Box::new(stdout_server),
        stderr: if tty {
            None
        } else {
            Some(Box::new(stderr_server))
        },
        control: Box::new(FakeControl(fake.clone())),
    };
    let (to_server, incoming) = mpsc::channel(16);
    let (outgoing, from_server) = mpsc::channel(16);
    let (end, end_rx) = watch::channel(None);
    let session = tokio::spawn(run_session(io, incoming, outgoing, fault, end_rx));
    (
        Client {
            to_server,
            from_server,
            end,
            session,
        },
        Proc {
            fake,
            stdin: stdin_proc,
            stdout: Some(stdout_proc),
            stderr: if tty { None } else { Some(stderr_proc) },
        },
    )
}

fn text(frame: ServerFrame) -> Outgoing {
    Outgoing::Text(frame.to_json())
}

#[tokio::test]
async fn output_then_closes_then_exited_then_a_drop() {
    let (client, mut proc) = start(false, None);
    proc.finish(b"hi", b"err\n", 3).await;
    let (frames, ending) = client.rest().await;
    assert_eq!(ending, Ending::Drop);
    assert_eq!(
        frames,
        vec![
            text(ServerFrame::Stdout(Bytes::from_static(b"hi"))),
            text(ServerFrame::Stderr(Bytes::from_static(b"err\n"))),
            text(ServerFrame::StdoutClosed),
            text(ServerFrame::StderrClosed),
            text(ServerFrame::Exited(3)),
        ]
    );
}

#[tokio::test]
async fn output_goes_in_frames_of_at_most_1024_bytes_and_a_tty_still_closes_stderr() {
    let (client, mut proc) = start(true, None);
    let big = vec![b'x'; 3000];
    proc.finish(&big, b"", 0).await;
    let (frames, _) = client.rest().await;
    let mut data = Vec::new();
    for frame in &frames[..frames.len() - 3] {
        let Outgoing::Text(json) = frame else {
            panic!("{frame:?}")
        };
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        use base64::Engine;
        let chunk = base64::engine::general_purpose::STANDARD
            .decode(v["stdout"]["data"].as_str().unwrap())
            .unwrap();
        assert!(chunk.len() <= OUTPUT_CHUNK);
        data.extend_from_slice(&chunk);
    }
    assert_eq!(data, big);
    assert_eq!(
        frames[frames.len() - 3..],
        [
            text(ServerFrame::StdoutClosed),
            text(ServerFrame::StderrClosed),
            Outgoing::Text(r#"{"exited":true,"result":{}}"#.into()),
        ]
    );
}

#[tokio::test]
async fn stdin_data_close_and_sizes_reach_the_process_and_heartbeats_are_ignored() {
    let (mut client, mut proc) = start(true, None);
    client.send("{}").await;
    client.send(r#"{"stdin":{"data":"aGVsbG8K"}}"#).await;
    client
        .send(r#"{"tty_size":{"height":50,"width":132}}"#)
        .await;
    client.send(r#"{"stdin":{"close":true}}"#).await;
    client.send(r#"{"stdin":{"data":"bGF0ZQ=="}}"#).await;
    let mut input = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), proc.stdin.read_to_end(&mut input))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(input, b"hello\n", "nothing after the close");
    assert_eq!(*proc.fake.sizes.lock().unwrap(), vec![(50, 132)]);
    proc.finish(b"", b"", 0).await;
    let (frames, _) = client.rest().await;
    assert_eq!(frames.len(), 3);
}

#[tokio::test]
async fn a_client_that_goes_away_gets_its_process_killed() {
    for goodbye in [Some(Incoming::Close), None] {
        let (mut client, proc) = start(false, None);
        match goodbye {
            Some(close) => {
                use futures::SinkExt;
                client.to_server.send(Ok(close)).await.unwrap();
            }
            None => client.to_server.close_channel(),
        }
        let (frames, ending) = client.rest().await;
        assert!(frames.is_empty());
        assert_eq!(ending, Ending::Drop);
        assert!(proc.fake.killed.load(Ordering::SeqCst));
    }
}

#[tokio::test]
async fn faults_close_before_exit_and_drop_after_frames() {
    let (client, mut proc) = start(false, Some(ExecFault::CloseBeforeExit(1000)));
    proc.finish(b"a", b"", 5).await;
    let (frames, ending) = client.rest().await;
    assert_eq!(ending, Ending::Closed);
    assert_eq!(frames.last(), Some(&Outgoing::Close(1000, String::new())));
    assert!(
        !frames
            .iter()
            .any(|f| matches!(f, Outgoing::Text(t) if t.contains("exited")))
    );

    let (client, mut proc) = start(false, Some(ExecFault::DropAfterFrames(2)));
    proc.stdout.as_mut().unwrap().write_all(b"1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    proc.stdout.as_mut().unwrap().write_all(b"2").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    proc.stdout.as_mut().unwrap().write_all(b"3").await.unwrap();
    let (frames, ending) = client.rest().await;
    assert_eq!(ending, Ending::Drop);
    assert_eq!(frames.len(), 2);
    assert!(proc.fake.killed.load(Ordering::SeqCst));
}

#[tokio::test]
async fn the_runtime_ends_sessions_with_an_exit_code_or_a_reset() {
    let (client, mut proc) = start(false, None);
    proc.stdout.as_mut().unwrap().write_all(b"x").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.end.send_replace(Some(SessionEnd::Exit(128)));
    // The killed process's outputs close.
    proc.stdout = None;
    proc.stderr = None;
    let (frames, ending) = client.rest().await;
    assert_eq!(ending, Ending::Drop);
    assert!(proc.fake.killed.load(Ordering::SeqCst));
    assert_eq!(
        frames,
        vec![
            text(ServerFrame::Stdout(Bytes::from_static(b"x"))),
            text(ServerFrame::StdoutClosed),
            text(ServerFrame::StderrClosed),
            text(ServerFrame::Exited(128)),
        ]
    );

    let (client, proc) = start(false, None);
    client.end.send_replace(Some(SessionEnd::Reset));
    let (frames, ending) = client.rest().await;
    assert!(frames.is_empty());
    assert_eq!(ending, Ending::Drop);
    assert!(proc.fake.killed.load(Ordering::SeqCst));
}

#[tokio::test]
async fn a_process_lost_with_its_sandbox_waits_for_the_runtimes_word() {
    let (client, mut proc) = start(false, None);
    proc.stdout = None;
    proc.stderr = None;
    proc.fake.exit.send_replace(Some(None));
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.end.send_replace(Some(SessionEnd::Exit(128)));
    let (frames, _) = client.rest().await;
    assert_eq!(frames.last(), Some(&text(ServerFrame::Exited(128))));
}

#[tokio::test]
async fn oversized_and_malformed_frames_end_the_session_with_a_close() {
    let (mut client, proc) = start(false, None);
    let huge = format!(
        r#"{{"stdin":{{"data":"{}"}}}}"#,
        "A".repeat(MAX_CLIENT_FRAME)
    );
    client.send(&huge).await;
    let (frames, ending) = client.rest().await;
    assert_eq!(ending, Ending::Closed);
    assert!(
        matches!(frames.last(), Some(Outgoing::Close(1009, _))),
        "{frames:?}"
    );
    assert!(proc.fake.killed.load(Ordering::SeqCst));

    let (mut client, _proc) = start(false, None);
    client.send("{not json").await;
    let (frames, _) = client.rest().await;
    assert!(
        matches!(frames.last(), Some(Outgoing::Close(1008, _))),
        "{frames:?}"
    );
}

#[tokio::test]
async fn a_process_that_does_not_read_stops_the_reading_of_client_frames() {
    let (mut client, proc) = start(false, None);
    // Nobody reads the process's stdin: its pipe (64 KiB here) and then the session's queue
    // fill up, after which frames stay in the (16-frame) channel.
    let chunk = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(vec![b'a'; 30_000])
    };
    let frame = format!(r#"{{"stdin":{{"data":"{chunk}"}}}}"#);
    let mut sent = 0usize;
    let blocked = loop {
        match tokio::time::timeout(Duration::from_millis(500), client.send(&frame)).await {
            Ok(()) => sent += 1,
            Err(_) => break true,
        }
        if sent > 1000 {
            break false;
        }
    };
    assert!(blocked, "the session read {sent} frames without bound");
    assert!(sent * 30_000 <= (1 << 16) + MAX_PENDING_STDIN + 17 * 30_000 + 30_000);
    drop(proc);
}
