//! Helpers for the HTTP-layer tests: a server over the in-memory fake backend on 127.0.0.1:0,
//! a reqwest client with the token, and a WebSocket reader.

#![allow(dead_code)]

pub mod leftovers;
pub mod nomad;
pub mod observe;
pub mod process;

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use poseidon_server::serve;
use poseidon_server::{ApiSettings, AppState, app};
use runner_core::fake::FakeExecutor;
use runner_core::{ManagerConfig, RunnerManager};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub const TOKEN: &str = "s3cret-token";

pub struct TestServer {
    pub base: String,
    pub host: String,
    pub fake: FakeExecutor,
    pub manager: Arc<RunnerManager>,
    pub client: reqwest::Client,
    pub shutdown: Option<oneshot::Sender<()>>,
    pub served: tokio::task::JoinHandle<Result<(), serve::ServeError>>,
}

pub struct Options {
    pub manager: ManagerConfig,
    pub body_limit: usize,
    pub grace: Duration,
    pub max_connections: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            manager: ManagerConfig::default(),
            body_limit: 1024 * 1024,
            grace: Duration::from_secs(1),
            max_connections: serve::DEFAULT_MAX_CONNECTIONS,
        }
    }
}

pub async fn start() -> TestServer {
    start_with(Options::default()).await
}

pub async fn start_with(options: Options) -> TestServer {
    let fake = FakeExecutor::new();
    let manager = RunnerManager::new(Arc::new(fake.clone()), options.manager.clone());
    manager.recover().await.expect("recover");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let settings = ApiSettings {
        token: Some(TOKEN.into()),
        body_limit: options.body_limit,
        bounds: options.manager.bounds.clone(),
        fallback_host: addr.to_string(),
        ..ApiSettings::default()
    };
    let state = AppState::new(manager.clone(), settings);
    let streams = state.streams.clone();
    let (tx, rx) = oneshot::channel::<()>();
    let served = tokio::spawn(serve::serve(
        listener,
        app(state),
        None,
        streams,
        options.grace,
        options.max_connections,
        async {
            let _ = rx.await;
        },
    ));
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("Poseidon-Token", TOKEN.parse().expect("header"));
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client");
    TestServer {
        base: format!("http://{addr}/api/v1"),
        host: addr.to_string(),
        fake,
        manager,
        client,
        shutdown: Some(tx),
        served,
    }
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Creates environment `id` with `pool` runners and waits until they are idle.
    pub async fn environment(&self, id: u64, pool: u32) {
        let response = self
            .client
            .put(self.url(&format!("/execution-environments/{id}")))
            .json(&json!({
                "id": id, "image": "test-image", "prewarmingPoolSize": pool,
                "cpuLimit": 20, "memoryLimit": 100, "networkAccess": false, "exposedPorts": []
            }))
            .send()
            .await
            .expect("put");
        assert!(response.status().is_success(), "{}", response.status());
        self.wait_idle(id, pool).await;
    }

    pub async fn wait_idle(&self, id: u64, idle: u32) {
        for _ in 0..200 {
            let stats: Value = self
                .client
                .get(self.url("/statistics/execution-environments"))
                .send()
                .await
                .expect("stats")
                .json()
                .await
                .expect("json");
            if stats[id.to_string()]["idleRunners"].as_u64() == Some(u64::from(idle)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("environment {id} never had {idle} idle runners");
    }

    pub async fn claim(&self, env: u64, timeout: u64) -> String {
        let body: Value = self
            .client
            .post(self.url("/runners"))
            .json(&json!({"executionEnvironmentId": env, "inactivityTimeout": timeout}))
            .send()
            .await
            .expect("claim")
            .json()
            .await
            .expect("json");
        body["runnerId"].as_str().expect("runnerId").to_string()
    }

    pub async fn execute(&self, runner: &str, body: Value) -> String {
        let response = self
            .client
            .post(self.url(&format!("/runners/{runner}/execute")))
            .json(&body)
            .send()
            .await
            .expect("execute");
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("json");
        body["websocketUrl"].as_str().expect("url").to_string()
    }
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn connect(
    url: &str,
    token: Option<&str>,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut request = url.into_client_request()?;
    if let Some(token) = token {
        request
            .headers_mut()
            .insert("Poseidon-Token", token.parse().expect("header"));
    }
    let (ws, _) = tokio_tungstenite::connect_async(request).await?;
    Ok(ws)
}

/// Everything the server sent until it closed: JSON messages and the close code.
#[derive(Debug, Default)]
pub struct Transcript {
    pub messages: Vec<Value>,
    pub close_code: Option<u16>,
}

impl Transcript {
    pub fn stdout(&self) -> String {
        self.data_of("stdout")
    }

    pub fn stderr(&self) -> String {
        self.data_of("stderr")
    }

    fn data_of(&self, kind: &str) -> String {
        self.messages
            .iter()
            .filter(|m| m["type"] == kind)
            .filter_map(|m| m["data"].as_str())
            .collect()
    }

    /// The control messages (everything but output), in order.
    pub fn control(&self) -> Vec<Value> {
        self.messages
            .iter()
            .filter(|m| m["type"] != "stdout" && m["type"] != "stderr")
            .cloned()
            .collect()
    }

    pub fn last(&self) -> Value {
        self.messages.last().cloned().unwrap_or(Value::Null)
    }
}

/// Reads until the server closes (bounded by `limit`).
pub async fn read_all(ws: &mut Ws, limit: Duration) -> Transcript {
    let mut transcript = Transcript::default();
    let result = tokio::time::timeout(limit, async {
        while let Some(frame) = ws.next().await {
            match frame {
                Ok(Message::Text(text)) => {
                    transcript
                        .messages
                        .push(serde_json::from_str(text.as_str()).expect("JSON message"));
                }
                Ok(Message::Close(frame)) => {
                    transcript.close_code = frame.map(|f| u16::from(f.code));
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "stream did not end within {limit:?}: {transcript:?}"
    );
    transcript
}

/// Runs `command` on a fresh execution of `runner` and returns the transcript.
pub async fn run(server: &TestServer, runner: &str, body: Value) -> Transcript {
    let url = server.execute(runner, body).await;
    let mut ws = connect(&url, Some(TOKEN)).await.expect("connect");
    let t = read_all(&mut ws, Duration::from_secs(20)).await;
    let _ = ws.close(None).await;
    t
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.into())).await.expect("send");
}
