//! The server under test, started as a child process on an ephemeral port with the embedded
//! backend and a fresh data directory, and a small client of its API.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// The steps of one execution as a client sees them.
#[derive(Debug, Clone, Copy)]
pub struct ExecutionSteps {
    /// `POST /execute` until its answer.
    pub post: Duration,
    /// TCP connect and WebSocket upgrade.
    pub upgrade: Duration,
    /// Upgrade until the `start` frame.
    pub start: Duration,
    /// `start` until the `exit` frame.
    pub exit: Duration,
}

/// A running server; killed (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct ServerChild {
    child: Child,
    /// `http://127.0.0.1:<port>/api/v1`.
    pub api: String,
    _datadir: tempfile::TempDir,
}

/// Finds the server binary next to this one, building it first when launched by `cargo run`.
pub fn server_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let server = exe.with_file_name("poseidon-server");
    let stale = match (std::fs::metadata(&server), std::fs::metadata(&exe)) {
        (Ok(s), Ok(e)) => s.modified()? < e.modified()?,
        _ => true,
    };
    if stale && let Ok(cargo) = std::env::var("CARGO") {
        let release = exe.parent().and_then(Path::file_name) == Some("release".as_ref());
        let mut build = Command::new(cargo);
        build.args(["build", "-q", "-p", "poseidon-server"]);
        if release {
            build.arg("--release");
        }
        let status = build.status().context("building poseidon-server")?;
        if !status.success() {
            bail!("building poseidon-server failed");
        }
    }
    if !server.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p poseidon-server`",
            server.display()
        );
    }
    Ok(server)
}

impl ServerChild {
    /// Starts the server with `extra` environment variables and waits until it answers.
    pub async fn start(binary: &Path, extra: &[(&str, String)]) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let datadir = tempfile::Builder::new()
            .prefix("poseidon-bench-")
            .tempdir_in(std::env::temp_dir())?;
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(datadir.path().join("absent.yaml"))
            .env("POSEIDON_SERVER_PORT", port.to_string())
            .env("POSEIDON_SERVER_ADDRESS", "127.0.0.1")
            .env("POSEIDON_LOCAL_DATADIR", datadir.path().join("data"))
            // The Nomad mode's clean-shutdown marker, out of the working directory.
            .env("POSEIDON_NOMAD_DATADIR", datadir.path().join("nomad"))
            .env("POSEIDON_LOGGER_LEVEL", "warn")
            .env("POSEIDON_LIMITS_MAXPOOLSIZE", "1000")
            .env("POSEIDON_LIMITS_MAXRUNNERS", "2000")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        for (k, v) in extra {
            command.env(k, v);
        }
        let child = command.spawn().context("starting the server")?;
        let server = Self {
            child,
            api: format!("http://127.0.0.1:{port}/api/v1"),
            _datadir: datadir,
        };
        let client = reqwest::Client::new();
        let start = Instant::now();
        loop {
            if client
                .get(format!("{}/version", server.api))
                .send()
                .await
                .is_ok()
            {
                return Ok(server);
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("the server did not answer within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The server process's id, for sampling it through `/proc/<pid>`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client of the API.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    /// A client of `base` (`http://host:port/api/v1`).
    pub fn new(base: &str) -> Self {
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(256)
            .build()
            .unwrap_or_default();
        Self {
            http,
            base: base.to_owned(),
        }
    }

    /// Creates or replaces environment `id` with a pool of `pool` runners.
    pub async fn put_environment(&self, id: u64, pool: u32) -> anyhow::Result<()> {
        let status = self
            .http
            .put(format!("{}/execution-environments/{id}", self.base))
            .json(&json!({
                "id": id, "image": "bench", "prewarmingPoolSize": pool, "cpuLimit": 1000,
                "memoryLimit": 256, "networkAccess": false, "exposedPorts": []
            }))
            .send()
            .await?
            .status();
        if !status.is_success() {
            bail!("PUT environment {id}: {status}");
        }
        Ok(())
    }

    /// Deletes environment `id`.
    pub async fn delete_environment(&self, id: u64) -> anyhow::Result<()> {
        self.http
            .delete(format!("{}/execution-environments/{id}", self.base))
            .send()
            .await?;
        Ok(())
    }

    /// Idle runners of environment `id`.
    pub async fn idle(&self, id: u64) -> anyhow::Result<u64> {
        let stats: Value = self
            .http
            .get(format!("{}/statistics/execution-environments", self.base))
            .send()
            .await?
            .json()
            .await?;
        Ok(stats[id.to_string()]["idleRunners"].as_u64().unwrap_or(0))
    }

    /// Waits until environment `id` has `n` idle runners.
    pub async fn wait_idle(&self, id: u64, n: u64, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        while self.idle(id).await? < n {
            if start.elapsed() > limit {
                bail!("environment {id} did not reach {n} idle runners within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Claims a runner; `None` when the pool is empty.
    pub async fn claim(&self, env: u64) -> anyhow::Result<Option<String>> {
        let response = self
            .http
            .post(format!("{}/runners", self.base))
            .json(&json!({"executionEnvironmentId": env, "inactivityTimeout": 300}))
            .send()
            .await?;
        if response.status().as_u16() == 500 {
            return Ok(None);
        }
        let body: Value = response.error_for_status()?.json().await?;
        Ok(body["runnerId"].as_str().map(str::to_owned))
    }

    /// Returns a runner.
    pub async fn delete_runner(&self, runner: &str) -> anyhow::Result<()> {
        self.http
            .delete(format!("{}/runners/{runner}", self.base))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// `GET /health`; any answer counts.
    pub async fn health(&self) -> anyhow::Result<()> {
        self.http
            .get(format!("{}/health", self.base))
            .send()
            .await?;
        Ok(())
    }

    /// Runs `command` through POST execute and the WebSocket; returns the exit code.
    pub async fn execute(&self, runner: &str, command: &str) -> anyhow::Result<i64> {
        Ok(self.execute_timed(runner, command).await?.0)
    }

    /// [`Api::execute`], also returning how long each step took as the client sees it.
    pub async fn execute_timed(
        &self,
        runner: &str,
        command: &str,
    ) -> anyhow::Result<(i64, ExecutionSteps)> {
        let started = Instant::now();
        let body: Value = self
            .http
            .post(format!("{}/runners/{runner}/execute", self.base))
            .json(&json!({"command": command}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let url = body["websocketUrl"]
            .as_str()
            .context("no websocketUrl")?
            .to_owned();
        let posted = Instant::now();
        let (mut socket, _) = tokio_tungstenite::connect_async(url).await?;
        let upgraded = Instant::now();
        let mut start = None;
        while let Some(message) = socket.next().await {
            if let Message::Text(text) = message? {
                let event: Value = serde_json::from_str(&text)?;
                match event["type"].as_str() {
                    Some("start") => start = Some(Instant::now()),
                    Some("exit") => {
                        let exited = Instant::now();
                        let start = start.unwrap_or(upgraded);
                        let steps = ExecutionSteps {
                            post: posted - started,
                            upgrade: upgraded - posted,
                            start: start - upgraded,
                            exit: exited - start,
                        };
                        return Ok((event["data"].as_i64().unwrap_or(-1), steps));
                    }
                    Some("timeout") | Some("error") => bail!("execution ended with {text}"),
                    _ => {}
                }
            }
        }
        bail!("the stream ended without exit")
    }

    /// Copies `files` (path, content) in one PATCH.
    pub async fn copy_files(
        &self,
        runner: &str,
        files: &[(String, Vec<u8>)],
    ) -> anyhow::Result<()> {
        use base64::Engine;
        let copy: Vec<Value> = files
            .iter()
            .map(|(path, content)| {
                json!({"path": path, "content": base64::engine::general_purpose::STANDARD.encode(content)})
            })
            .collect();
        self.http
            .patch(format!("{}/runners/{runner}/files", self.base))
            .json(&json!({"copy": copy}))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Lists `path` recursively; returns the number of entries.
    pub async fn list_files(&self, runner: &str, path: &str) -> anyhow::Result<usize> {
        let body: Value = self
            .http
            .get(format!("{}/runners/{runner}/files", self.base))
            .query(&[("path", path), ("recursive", "true")])
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(body["files"].as_array().map_or(0, Vec::len))
    }
}
