//! Alloc exec end to end: a tiny axum router upgrades `GET /exec` and hands the socket to the
//! sandbox runtime; a tokio-tungstenite client speaks Nomad's frames.
#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures::{SinkExt, StreamExt};
use nomad_emulator::runtime::{AllocationRuntime, ExecFault, ExecSession, SessionEnd, TaskLaunch};
use nomad_emulator::sandbox::{SandboxConfig, SandboxRuntime};
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;

#[ctor::ctor]
fn sandbox_hook() {
    local_adapter::sandbox_main_if_requested();
}

#[derive(Debug, Deserialize)]
struct ExecQuery {
    alloc: String,
    command: String,
    tty: bool,
    #[serde(default)]
    drop_after: Option<usize>,
    #[serde(default)]
    close_code: Option<u16>,
}

async fn exec_handler(
    State(runtime): State<SandboxRuntime>,
    Query(q): Query<ExecQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let argv: Vec<String> = serde_json::from_str(&q.command).unwrap();
    let fault = match (q.drop_after, q.close_code) {
        (Some(n), _) => Some(ExecFault::DropAfterFrames(n)),
        (None, Some(code)) => Some(ExecFault::CloseBeforeExit(code)),
        _ => None,
    };
    let session = ExecSession {
        alloc_id: q.alloc,
        task: "default-task".into(),
        argv,
        tty: q.tty,
        fault,
    };
    ws.on_upgrade(move |socket| async move { runtime.exec(socket, session).await })
}

/// A runtime on a private data directory with an exec endpoint. Dropping it stops the
/// allocations it started, so no sandbox outlives a test.
struct Emu {
    runtime: SandboxRuntime,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    started: Mutex<Vec<String>>,
}

impl Drop for Emu {
    fn drop(&mut self) {
        let runtime = self.runtime.clone();
        let allocs = std::mem::take(&mut *self.started.lock().unwrap_or_else(|e| e.into_inner()));
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                for a in allocs {
                    runtime.stop(&a).await;
                }
                runtime.shutdown().await;
            });
        })
        .join();
    }
}

fn config(dir: &std::path::Path) -> SandboxConfig {
    let mut config = SandboxConfig::new(dir);
    config.local.default_memory_mb = 256;
    config.local.max_processes = 128;
    config.local.disk_limit_mb = 32;
    config.local.network = None;
    config
}

async fn serve(runtime: SandboxRuntime) -> SocketAddr {
    let app = Router::new()
        .route("/exec", get(exec_handler))
        .with_state(runtime);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

impl Emu {
    async fn new() -> Emu {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let runtime = SandboxRuntime::start(config(dir.path())).await.unwrap();
        let addr = serve(runtime.clone()).await;
        Emu {
            runtime,
            addr,
            dir,
            started: Mutex::new(Vec::new()),
        }
    }

    async fn alloc(&self, id: &str, memory_mb: u32) -> TaskLaunch {
        let launch = launch(id, memory_mb);
        self.runtime.start(&launch).await.unwrap();
        self.started.lock().unwrap().push(id.to_string());
        launch
    }

    async fn connect(&self, alloc: &str, argv: &[&str], tty: bool, extra: &str) -> Ws {
        let command = serde_json::to_string(argv).unwrap();
        let url = format!(
            "ws://{}/exec?alloc={alloc}&tty={tty}&command={}{extra}",
            self.addr,
            urlencode(&command)
        );
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Ws(ws)
    }

    /// Runs `argv` with `input` (then `stdin.close` when `close`) and collects the transcript.
    async fn run(&self, alloc: &str, argv: &[&str], tty: bool, input: &[u8]) -> Transcript {
        let mut ws = self.connect(alloc, argv, tty, "").await;
        ws.stdin(input).await;
        ws.close_stdin().await;
        ws.transcript().await
    }
}

fn launch(id: &str, memory_mb: u32) -> TaskLaunch {
    TaskLaunch {
        alloc_id: id.into(),
        job_id: "job".into(),
        namespace: "default".into(),
        group: "default-group".into(),
        task: "default-task".into(),
        image: None,
        cpu_mhz: 100,
        memory_mb,
        memory_max_mb: None,
        network: false,
        ports: vec![],
        env: BTreeMap::from([("NOMAD_ALLOC_ID".to_string(), id.to_string())]),
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Ws(Client);

/// Everything the server sent, and how the connection ended.
#[derive(Debug, Default)]
struct Transcript {
    frames: Vec<serde_json::Value>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// The `exited` frame's exit code (a missing one is 0).
    exit: Option<i64>,
    /// A close frame's code.
    close: Option<u16>,
    /// Whether the connection ended without a close frame (EOF or reset).
    dropped: bool,
}

impl Transcript {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    fn add(&mut self, v: serde_json::Value) {
        for (key, sink) in [("stdout", &mut self.stdout), ("stderr", &mut self.stderr)] {
            if let Some(data) = v[key]["data"].as_str() {
                sink.extend_from_slice(&STANDARD.decode(data).unwrap());
            }
        }
        if v["exited"] == serde_json::Value::Bool(true) {
            assert!(self.exit.is_none(), "two exited frames");
            self.exit = Some(v["result"]["exit_code"].as_i64().unwrap_or(0));
        }
        self.frames.push(v);
    }
}

impl Ws {
    async fn send(&mut self, v: serde_json::Value) {
        self.0.send(Message::text(v.to_string())).await.unwrap();
    }

    async fn stdin(&mut self, data: &[u8]) {
        for chunk in data.chunks(2048) {
            self.send(serde_json::json!({"stdin": {"data": STANDARD.encode(chunk)}}))
                .await;
        }
    }

    async fn close_stdin(&mut self) {
        self.send(serde_json::json!({"stdin": {"close": true}}))
            .await;
    }

    /// Reads until `want` shows up on stdout; returns the transcript so far.
    async fn until_stdout(&mut self, want: &str, seen: &mut Transcript) {
        tokio::time::timeout(Duration::from_secs(60), async {
            while !seen.out().contains(want) {
                match self.0.next().await {
                    Some(Ok(Message::Text(t))) => seen.add(serde_json::from_str(&t).unwrap()),
                    other => panic!("ended before {want:?}: {other:?} after {seen:?}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {want:?} on stdout"));
    }

    async fn transcript(self) -> Transcript {
        self.transcript_from(Transcript::default()).await
    }

    async fn transcript_from(mut self, mut t: Transcript) -> Transcript {
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match self.0.next().await {
                    Some(Ok(Message::Text(text))) => t.add(serde_json::from_str(&text).unwrap()),
                    Some(Ok(Message::Close(frame))) => {
                        t.close = Some(frame.map_or(1005, |f| u16::from(f.code)));
                        // Nothing but the end may follow a close frame.
                        while let Some(Ok(_)) = self.0.next().await {}
                        return;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        t.dropped = true;
                        return;
                    }
                }
            }
        })
        .await
        .expect("the session did not end");
        t
    }
}

fn frame_kinds(t: &Transcript) -> Vec<&'static str> {
    t.frames
        .iter()
        .map(|f| {
            if f["exited"].as_bool() == Some(true) {
                "exited"
            } else if f["stdout"]["close"].as_bool() == Some(true) {
                "stdout-close"
            } else if f["stderr"]["close"].as_bool() == Some(true) {
                "stderr-close"
            } else {
                "data"
            }
        })
        .collect()
}

#[tokio::test]
async fn without_tty_stdout_and_stderr_stay_apart_in_nomads_frame_order() {
    let emu = Emu::new().await;
    emu.alloc("a1", 128).await;
    let ws = emu
        .connect(
            "a1",
            &["/bin/bash", "-c", "echo -n hi; echo err >&2; exit 3"],
            false,
            "",
        )
        .await;
    let t = ws.transcript().await;
    assert_eq!(t.out(), "hi");
    assert_eq!(t.err(), "err\n");
    assert_eq!(t.exit, Some(3));
    assert_eq!(t.frames.last().unwrap()["result"]["exit_code"], 3);
    let kinds = frame_kinds(&t);
    let n = kinds.len();
    assert!(kinds[..n - 3].iter().all(|k| *k == "data"), "{kinds:?}");
    assert_eq!(kinds[n - 1], "exited");
    let mut closes = kinds[n - 3..n - 1].to_vec();
    closes.sort();
    assert_eq!(closes, ["stderr-close", "stdout-close"]);
    assert!(t.dropped && t.close.is_none(), "{t:?}");

    let t = emu.run("a1", &["true"], false, b"").await;
    assert_eq!(
        t.frames.last().unwrap().to_string(),
        r#"{"exited":true,"result":{}}"#
    );
    assert_eq!(t.exit, Some(0));

    let t = emu
        .run("a1", &["/bin/sh", "-c", "exit 42"], false, b"")
        .await;
    assert_eq!(t.exit, Some(42));

    let t = emu.run("a1", &["cat"], false, b"through stdin").await;
    assert_eq!(t.out(), "through stdin");
    assert_eq!(t.exit, Some(0));

    let t = emu
        .run(
            "a1",
            &["/bin/sh", "-c", "echo $NOMAD_ALLOC_ID; id -u"],
            false,
            b"",
        )
        .await;
    assert_eq!(t.out(), "a1\n0\n");
}

#[tokio::test]
async fn with_tty_input_echoes_and_control_characters_signal() {
    let emu = Emu::new().await;
    emu.alloc("t1", 128).await;
    let mut ws = emu.connect("t1", &["head", "-n", "1"], true, "").await;
    ws.stdin(b"Hello World!\n").await;
    let t = ws.transcript().await;
    assert_eq!(
        t.out().matches("Hello World!\r\n").count(),
        2,
        "{:?}",
        t.out()
    );
    assert_eq!(t.exit, Some(0));
    assert!(t.stderr.is_empty());
    let kinds = frame_kinds(&t);
    assert!(kinds.contains(&"stderr-close"), "{kinds:?}");

    let mut ws = emu
        .connect(
            "t1",
            &["/bin/sh", "-c", "echo ready; exec sleep 100"],
            true,
            "",
        )
        .await;
    let mut seen = Transcript::default();
    ws.until_stdout("ready", &mut seen).await;
    ws.stdin(&[0x1c]).await;
    let t = ws.transcript_from(seen).await;
    assert_eq!(t.exit, Some(131));

    let mut ws = emu
        .connect(
            "t1",
            &["/bin/sh", "-c", "echo ready; read x; stty size"],
            true,
            "",
        )
        .await;
    let mut seen = Transcript::default();
    ws.until_stdout("ready", &mut seen).await;
    ws.send(serde_json::json!({"tty_size": {"height": 40, "width": 100}}))
        .await;
    ws.send(serde_json::json!({})).await;
    ws.stdin(b"go\n").await;
    let t = ws.transcript_from(seen).await;
    assert!(t.out().contains("40 100\r\n"), "{:?}", t.out());
}

#[tokio::test]
async fn a_command_outliving_its_client_is_killed() {
    let emu = Emu::new().await;
    emu.alloc("k1", 128).await;
    let mut ws = emu
        .connect(
            "k1",
            &[
                "/bin/sh",
                "-c",
                "echo started; while true; do echo x >> /tmp/grow; sleep 0.1; done",
            ],
            false,
            "",
        )
        .await;
    let mut seen = Transcript::default();
    ws.until_stdout("started", &mut seen).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(ws);
    let size = || async {
        let t = emu
            .run("k1", &["/bin/sh", "-c", "wc -c < /tmp/grow"], false, b"")
            .await;
        t.out().trim().parse::<u64>().unwrap()
    };
    // Give the kill a moment, then the file must stay as it is.
    let mut stable = false;
    for _ in 0..50 {
        let before = size().await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        if size().await == before {
            stable = true;
            break;
        }
    }
    assert!(stable, "the command kept writing after its client left");
    let t = emu
        .run(
            "k1",
            &["/bin/sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"],
            false,
            b"",
        )
        .await;
    assert!(!t.out().contains("/tmp/grow"), "{:?}", t.out());
}

#[tokio::test]
async fn a_tar_stream_on_stdin_is_extracted_and_read_back() {
    let emu = Emu::new().await;
    emu.alloc("f1", 128).await;
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir(src.path().join("sub")).unwrap();
    std::fs::write(src.path().join("a.txt"), "alpha\n").unwrap();
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(src.path().join("sub/big.bin"), &big).unwrap();
    let tar = std::process::Command::new("tar")
        .arg("-c")
        .arg("-C")
        .arg(src.path())
        .args(["a.txt", "sub"])
        .output()
        .unwrap();
    assert!(tar.status.success());
    let t = emu
        .run(
            "f1",
            &[
                "/bin/bash",
                "-c",
                "mkdir -p /workspace/up && tar --extract --verbose --file=/dev/stdin -C /workspace/up",
            ],
            false,
            &tar.stdout,
        )
        .await;
    assert_eq!(t.exit, Some(0), "{}", t.err());
    assert!(t.out().contains("sub/big.bin"), "{:?}", t.out());
    let t = emu
        .run("f1", &["cat", "/workspace/up/a.txt"], false, b"")
        .await;
    assert_eq!(t.out(), "alpha\n");
    let t = emu
        .run("f1", &["cat", "/workspace/up/sub/big.bin"], false, b"")
        .await;
    assert_eq!(t.stdout, big);
}

#[tokio::test]
async fn the_runtime_ends_sessions_with_an_exit_or_a_reset() {
    let emu = Emu::new().await;
    emu.alloc("e1", 128).await;
    for end in [SessionEnd::Exit(128), SessionEnd::Reset] {
        let mut ws = emu
            .connect(
                "e1",
                &["/bin/sh", "-c", "echo started; sleep 100"],
                false,
                "",
            )
            .await;
        let mut seen = Transcript::default();
        ws.until_stdout("started", &mut seen).await;
        emu.runtime.end_sessions("e1", end).await;
        let t = ws.transcript_from(seen).await;
        assert!(t.dropped && t.close.is_none(), "{t:?}");
        match end {
            SessionEnd::Exit(code) => {
                assert_eq!(t.exit, Some(i64::from(code)));
                assert_eq!(frame_kinds(&t).len(), 4, "{t:?}");
            }
            SessionEnd::Reset => assert_eq!(t.exit, None, "{t:?}"),
        }
    }
    // The sandbox stays.
    let t = emu.run("e1", &["echo", "still here"], false, b"").await;
    assert_eq!(t.out(), "still here\n");
}

#[tokio::test]
async fn faults_close_before_exit_and_drop_after_frames() {
    let emu = Emu::new().await;
    emu.alloc("x1", 128).await;
    let ws = emu
        .connect(
            "x1",
            &["/bin/sh", "-c", "echo hi"],
            false,
            "&close_code=1000",
        )
        .await;
    let t = ws.transcript().await;
    assert_eq!(t.close, Some(1000), "{t:?}");
    assert_eq!(t.exit, None);
    assert_eq!(t.out(), "hi\n");

    let ws = emu
        .connect(
            "x1",
            &[
                "/bin/sh",
                "-c",
                "echo one; sleep 0.3; echo two; sleep 0.3; echo three",
            ],
            false,
            "&drop_after=1",
        )
        .await;
    let t = ws.transcript().await;
    assert_eq!(t.frames.len(), 1, "{t:?}");
    assert!(t.dropped && t.close.is_none() && t.exit.is_none());
}

#[tokio::test]
async fn files_persist_within_an_allocation_and_stay_invisible_to_others() {
    let emu = Emu::new().await;
    emu.alloc("p1", 128).await;
    emu.alloc("p2", 128).await;
    let t = emu
        .run(
            "p1",
            &["/bin/sh", "-c", "echo kept > /workspace/f"],
            false,
            b"",
        )
        .await;
    assert_eq!(t.exit, Some(0), "{}", t.err());
    let t = emu.run("p1", &["cat", "/workspace/f"], false, b"").await;
    assert_eq!(t.out(), "kept\n");
    let t = emu
        .run("p2", &["test", "-e", "/workspace/f"], false, b"")
        .await;
    assert_eq!(t.exit, Some(1));

    // Stopped: the sandbox is gone and an exec is refused with a close frame.
    emu.runtime.stop("p1").await;
    emu.runtime.stop("p1").await;
    let t = emu.run("p1", &["true"], false, b"").await;
    assert_eq!(t.close, Some(1008), "{t:?}");
    assert_eq!(emu.runtime.surviving().await, vec!["p2".to_string()]);
}

#[tokio::test]
async fn the_memory_limit_is_real() {
    let emu = Emu::new().await;
    let mut launch = launch("m1", 64);
    launch.memory_max_mb = Some(96);
    emu.runtime.start(&launch).await.unwrap();
    emu.started.lock().unwrap().push("m1".into());
    // `tail` keeps the whole (newline-free) input in memory: past 96 MB the kernel kills it.
    let t = emu
        .run(
            "m1",
            &[
                "/bin/bash",
                "-c",
                "head -c 400M /dev/zero | tail; echo status ${PIPESTATUS[1]}",
            ],
            false,
            b"",
        )
        .await;
    assert!(t.out().contains("status 137"), "{t:?}");
    let t = emu
        .run(
            "m1",
            &["/bin/bash", "-c", "head -c 20M /dev/zero | tail | wc -c"],
            false,
            b"",
        )
        .await;
    assert_eq!(t.out().trim(), "20971520", "{t:?}");
}

#[tokio::test]
async fn allocations_survive_a_restart_on_the_same_data_directory() {
    let emu = Emu::new().await;
    let launch = emu.alloc("r1", 128).await;
    let t = emu
        .run(
            "r1",
            &["/bin/sh", "-c", "echo before > /workspace/f"],
            false,
            b"",
        )
        .await;
    assert_eq!(t.exit, Some(0));
    emu.runtime.shutdown().await;

    let again = SandboxRuntime::start(config(emu.dir.path())).await.unwrap();
    assert_eq!(again.surviving().await, vec!["r1".to_string()]);
    again.start(&launch).await.unwrap();
    assert_eq!(again.runner_of("r1"), emu.runtime.runner_of("r1"));
    let addr = serve(again.clone()).await;
    let emu2 = Emu {
        runtime: again,
        addr,
        dir: tempfile::tempdir().unwrap(),
        started: Mutex::new(vec!["r1".into()]),
    };
    let t = emu2.run("r1", &["cat", "/workspace/f"], false, b"").await;
    assert_eq!(t.out(), "before\n");
    emu.started.lock().unwrap().clear();
}

#[tokio::test]
async fn task_deaths_are_reported_as_events() {
    let emu = Emu::new().await;
    emu.alloc("d1", 128).await;
    let events = Arc::new(tokio::sync::Mutex::new(emu.runtime.events()));
    let runner = emu.runtime.runner_of("d1").unwrap();
    // Kill the sandbox's init behind the runtime's back, as the kernel would.
    kill9(&init_pids(&runner));
    let event = tokio::time::timeout(Duration::from_secs(30), async {
        events.lock().await.next().await
    })
    .await
    .unwrap()
    .unwrap();
    match event {
        nomad_emulator::runtime::RuntimeEvent::TaskDied {
            alloc_id,
            oom_killed,
            ..
        } => {
            assert_eq!(alloc_id, "d1");
            assert!(!oom_killed);
        }
    }
    assert!(emu.runtime.surviving().await.is_empty());
    // Starting it again makes a new sandbox.
    emu.runtime.start(&launch("d1", 128)).await.unwrap();
    assert_ne!(emu.runtime.runner_of("d1"), Some(runner));
    let t = emu.run("d1", &["echo", "back"], false, b"").await;
    assert_eq!(t.out(), "back\n");
}

/// The processes directly in a runner's cgroup (its init), found by the runner's id under
/// `/sys/fs/cgroup` (v1 or v2).
fn init_pids(runner: &runner_core::RunnerId) -> Vec<i32> {
    fn find(dir: &std::path::Path, name: &str, depth: u32) -> Option<std::path::PathBuf> {
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let path = entry.path();
            if !path.is_dir() || path.is_symlink() {
                continue;
            }
            if entry.file_name().to_str() == Some(name) {
                return Some(path);
            }
            if depth > 0
                && let Some(found) = find(&path, name, depth - 1)
            {
                return Some(found);
            }
        }
        None
    }
    let dir = find(std::path::Path::new("/sys/fs/cgroup"), runner.as_str(), 4)
        .expect("the runner's cgroup");
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn kill9(pids: &[i32]) {
    assert!(!pids.is_empty());
    let status = std::process::Command::new("kill")
        .arg("-9")
        .args(pids.iter().map(ToString::to_string))
        .status()
        .unwrap();
    assert!(status.success());
}

// Multi-threaded: the runner network's own tasks run on this runtime while a test ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_placed_host_port_reaches_the_tasks_port() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.local.network = Some(Default::default());
    let runtime = SandboxRuntime::start(cfg).await.unwrap();
    let addr = serve(runtime.clone()).await;
    let emu = Emu {
        runtime,
        addr,
        dir,
        started: Mutex::new(vec!["n1".into()]),
    };
    let host_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut launch = launch("n1", 128);
    launch.ports = vec![nomad_emulator::runtime::PortLaunch {
        label: "http".into(),
        host_port,
        to: 8080,
        host_ip: "127.0.0.1".into(),
    }];
    tokio::time::timeout(Duration::from_secs(60), emu.runtime.start(&launch))
        .await
        .expect("start hangs")
        .unwrap();
    // Idempotent: a second start keeps the sandbox and its forwarder.
    let runner = emu.runtime.runner_of("n1");
    emu.runtime.start(&launch).await.unwrap();
    assert_eq!(emu.runtime.runner_of("n1"), runner);

    let mut server = emu
        .connect(
            "n1",
            &[
                "/usr/bin/python3",
                "-u",
                "-c",
                "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',8080))\ns.listen()\nprint('listening')\nc,_=s.accept()\nc.sendall(b'hello from the task')\nc.close()",
            ],
            false,
            "",
        )
        .await;
    let mut seen = Transcript::default();
    server.until_stdout("listening", &mut seen).await;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", host_port))
        .await
        .unwrap();
    let mut got = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::AsyncReadExt::read_to_string(&mut conn, &mut got),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(got, "hello from the task");
    let t = server.transcript_from(seen).await;
    assert_eq!(t.exit, Some(0), "{}", t.err());

    // Stopped: the port is free again.
    emu.runtime.stop("n1").await;
    std::net::TcpListener::bind(("127.0.0.1", host_port)).unwrap();
    emu.started.lock().unwrap().clear();
    emu.runtime.executor().teardowns_finished().await;
}
