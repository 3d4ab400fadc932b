//! Test helpers: a recording AllocationRuntime double, an emulator starter, HTTP and event-stream
//! helpers, and Poseidon-shaped jobs.
#![allow(dead_code, missing_docs)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::StreamExt;
use futures::stream::BoxStream;
use nomad_emulator::runtime::{
    AllocationRuntime, ExecSession, RuntimeError, RuntimeEvent, SessionEnd, TaskLaunch,
};
use nomad_emulator::{Control, EmulatorConfig, NomadEmulator};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Records every call; exec just closes the socket (code 1000, reason "fake runtime").
#[derive(Debug)]
pub struct FakeRuntime {
    pub calls: Mutex<Vec<String>>,
    pub launches: Mutex<Vec<TaskLaunch>>,
    pub sessions: Mutex<Vec<ExecSession>>,
    pub fail_next_starts: Mutex<u32>,
    pub surviving: Mutex<Vec<String>>,
    events_tx: mpsc::UnboundedSender<RuntimeEvent>,
    events_rx: Mutex<Option<mpsc::UnboundedReceiver<RuntimeEvent>>>,
}

impl FakeRuntime {
    pub fn new() -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        Arc::new(Self {
            calls: Mutex::new(Vec::new()),
            launches: Mutex::new(Vec::new()),
            sessions: Mutex::new(Vec::new()),
            fail_next_starts: Mutex::new(0),
            surviving: Mutex::new(Vec::new()),
            events_tx: tx,
            events_rx: Mutex::new(Some(rx)),
        })
    }
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    pub fn calls_for(&self, alloc: &str) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.contains(alloc))
            .collect()
    }
    pub fn emit(&self, ev: RuntimeEvent) {
        self.events_tx.send(ev).unwrap();
    }
}

#[async_trait]
impl AllocationRuntime for FakeRuntime {
    async fn start(&self, launch: &TaskLaunch) -> Result<(), RuntimeError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("start:{}", launch.alloc_id));
        self.launches.lock().unwrap().push(launch.clone());
        let mut f = self.fail_next_starts.lock().unwrap();
        if *f > 0 {
            *f -= 1;
            return Err(RuntimeError("image not found".into()));
        }
        Ok(())
    }
    async fn end_sessions(&self, alloc_id: &str, end: SessionEnd) {
        self.calls
            .lock()
            .unwrap()
            .push(format!("end:{alloc_id}:{end:?}"));
    }
    async fn stop(&self, alloc_id: &str) {
        self.calls.lock().unwrap().push(format!("stop:{alloc_id}"));
    }
    async fn exec(&self, mut socket: WebSocket, session: ExecSession) {
        self.calls
            .lock()
            .unwrap()
            .push(format!("exec:{}", session.alloc_id));
        self.sessions.lock().unwrap().push(session);
        let _ = socket
            .send(Message::Close(Some(CloseFrame {
                code: 1000,
                reason: "fake runtime".into(),
            })))
            .await;
    }
    async fn surviving(&self) -> Vec<String> {
        self.surviving.lock().unwrap().clone()
    }
    fn events(&self) -> BoxStream<'static, RuntimeEvent> {
        match self.events_rx.lock().unwrap().take() {
            Some(rx) => tokio_stream_from(rx),
            None => futures::stream::empty().boxed(),
        }
    }
}

fn tokio_stream_from(
    mut rx: mpsc::UnboundedReceiver<RuntimeEvent>,
) -> BoxStream<'static, RuntimeEvent> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

/// Starts an emulator with `EmulatorConfig::for_tests()` on `runtime`.
pub async fn start_emulator(runtime: Arc<dyn AllocationRuntime>) -> NomadEmulator {
    start_with(EmulatorConfig::for_tests(), runtime).await
}

pub async fn start_with(
    config: EmulatorConfig,
    runtime: Arc<dyn AllocationRuntime>,
) -> NomadEmulator {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("nomad_emulator=debug")
        .try_init();
    NomadEmulator::start(config, runtime).await.unwrap()
}

/// Generous bound for conditions on a loaded machine.
pub const WAIT: Duration = Duration::from_secs(20);

/// A Poseidon runner job: batch, `default-group` (count 1, one dynamic port), `config` (count 0,
/// meta `used`).
pub fn runner_job(id: &str) -> Value {
    json!({
        "ID": id, "Name": id, "Namespace": "default", "Type": "batch", "Datacenters": ["dc1"],
        "TaskGroups": [
            {"Name": "default-group", "Count": 1,
             "EphemeralDisk": {"Migrate": false, "SizeMB": 10, "Sticky": false},
             "RestartPolicy": {"Attempts": 3, "Delay": 15_000_000_000i64, "Interval": 3_600_000_000_000i64, "Mode": "fail"},
             "ReschedulePolicy": {"Unlimited": false, "Attempts": 3, "Interval": 21_600_000_000_000i64, "Delay": 60_000_000_000i64,
                                  "MaxDelay": 240_000_000_000i64, "DelayFunction": "exponential"},
             "Networks": [{"Mode": "bridge", "DynamicPorts": [{"Label": "8080", "To": 8080}]}],
             "Tasks": [{"Name": "default-task", "Driver": "docker", "KillTimeout": 0, "KillSignal": "SIGKILL",
                        "Config": {"image": "openhpi/docker_exec_phusion", "command": "sleep", "args": ["infinity"], "network_mode": ""},
                        "LogConfig": {"MaxFiles": 1, "MaxFileSizeMB": 1},
                        "Resources": {"CPU": 40, "MemoryMB": 50, "MemoryMaxMB": 256}}]},
            {"Name": "config", "Count": 0,
             "Tasks": [{"Name": "config", "Driver": "exec", "Config": {"command": "true"},
                        "LogConfig": {"MaxFiles": 1, "MaxFileSizeMB": 1}, "Resources": {"CPU": 1, "MemoryMB": 10}}],
             "Meta": {"used": "false"}}
        ]
    })
}

/// A plain HTTP client for the emulator.
#[derive(Debug, Clone)]
pub struct Http {
    pub base: String,
    pub client: reqwest::Client,
    pub token: Option<String>,
}

pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
    pub fn header(&self, k: &str) -> Option<String> {
        self.headers.get(k).map(|v| v.to_str().unwrap().to_owned())
    }
}

impl Http {
    pub fn new(emu: &NomadEmulator) -> Self {
        Self {
            base: emu.base_url(),
            client: reqwest::Client::new(),
            token: None,
        }
    }
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Result<Answer> {
        let mut rb = self
            .client
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            rb = rb.header("X-Nomad-Token", t);
        }
        if let Some(b) = body {
            rb = rb.body(b.to_string());
        }
        let r = rb.send().await?;
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await?;
        Ok(Answer {
            status,
            headers,
            text,
        })
    }
    pub async fn get(&self, path: &str) -> Answer {
        self.send("GET", path, None).await.unwrap()
    }
    pub async fn put(&self, path: &str, body: Value) -> Answer {
        self.send("PUT", path, Some(body)).await.unwrap()
    }
    pub async fn delete(&self, path: &str) -> Answer {
        self.send("DELETE", path, None).await.unwrap()
    }
    pub async fn register(&self, job: Value) -> Value {
        let a = self.put("/v1/jobs", json!({ "Job": job })).await;
        assert_eq!(a.status, 200, "{}", a.text);
        a.json()
    }
}

/// What reading the next line of an event stream gave.
#[derive(Debug)]
pub enum Line {
    Json(Value),
    /// The body ended cleanly.
    Eof,
    /// The body ended abruptly.
    Broken(String),
    /// Nothing arrived in time.
    Timeout,
}

/// An NDJSON event stream reader.
pub struct EventStream {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl EventStream {
    pub async fn open(http: &Http, query: &str) -> Result<Self, Answer> {
        let mut rb = http
            .client
            .get(format!("{}/v1/event/stream?{query}", http.base));
        if let Some(t) = &http.token {
            rb = rb.header("X-Nomad-Token", t);
        }
        let resp = rb.send().await.unwrap();
        if resp.status() != 200 {
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            return Err(Answer {
                status,
                headers,
                text: resp.text().await.unwrap(),
            });
        }
        Ok(Self {
            resp,
            buf: Vec::new(),
        })
    }

    pub async fn next_line(&mut self, timeout: Duration) -> Line {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Line::Json(serde_json::from_slice(&line[..line.len() - 1]).unwrap());
            }
            match tokio::time::timeout_at(deadline, self.resp.chunk()).await {
                Err(_) => return Line::Timeout,
                Ok(Ok(Some(c))) => self.buf.extend_from_slice(&c),
                Ok(Ok(None)) => return Line::Eof,
                Ok(Err(e)) => return Line::Broken(e.to_string()),
            }
        }
    }

    /// The next batch (skipping heartbeats) or panics.
    pub async fn next_batch(&mut self) -> Value {
        loop {
            match self.next_line(WAIT).await {
                Line::Json(v) if v.get("Index").is_some() => return v,
                Line::Json(_) => continue,
                other => panic!("stream ended: {other:?}"),
            }
        }
    }

    /// Batches until one satisfies `pred`; returns all read.
    pub async fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let b = self.next_batch().await;
            let done = pred(&b);
            out.push(b);
            if done {
                return out;
            }
        }
    }
}

/// `(Topic, Type, ClientStatus or Status)` of every event of a batch.
pub fn summary(batch: &Value) -> Vec<(String, String, String)> {
    batch["Events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let p = &e["Payload"];
            let status = p["Allocation"]["ClientStatus"]
                .as_str()
                .or(p["Evaluation"]["Status"].as_str())
                .or(p["Job"]["Status"].as_str())
                .or(p["Node"]["Status"].as_str())
                .unwrap_or("")
                .to_owned();
            (
                e["Topic"].as_str().unwrap().to_owned(),
                e["Type"].as_str().unwrap().to_owned(),
                status,
            )
        })
        .collect()
}

/// Waits until job `id` has an allocation with `ClientStatus == status`; returns it.
pub async fn wait_alloc_status(c: &Control, job: &str, status: &str) -> Value {
    let job2 = job.to_owned();
    let status2 = status.to_owned();
    c.wait_for(WAIT, move |c| {
        c.allocs(&job2)
            .iter()
            .any(|a| a["ClientStatus"] == status2.as_str())
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{job} never had a {status} allocation: {e}; allocs {:#?}",
            c.allocs(job)
        )
    });
    c.allocs(job)
        .into_iter()
        .find(|a| a["ClientStatus"] == status)
        .unwrap()
}
