//! Spawning the `poseidon-server` binary with a temporary working directory and reading the
//! address it listens on from its log.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub struct ServerProcess {
    pub child: Child,
    pub addr: String,
    pub dir: tempfile::TempDir,
    pub log: mpsc::Receiver<String>,
    /// The log lines written before the server listened.
    pub startup: Vec<String>,
}

pub fn command(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_poseidon-server"));
    cmd.current_dir(dir)
        .env_remove("RUST_LOG")
        .env("POSEIDON_SERVER_PORT", "0")
        .env("POSEIDON_LOGGER_LEVEL", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Starts the binary with `vars` and waits (bounded) until it listens.
pub fn spawn(vars: &[(&str, &str)]) -> ServerProcess {
    let dir = tempfile::tempdir().expect("temp dir");
    spawn_in(dir, vars)
}

pub fn spawn_in(dir: tempfile::TempDir, vars: &[(&str, &str)]) -> ServerProcess {
    let mut cmd = command(dir.path());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn poseidon-server");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let addr = loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                if let Some(rest) = line.split("listening address=").nth(1) {
                    break rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                }
                seen.push(line);
            }
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start listening: {seen:#?}");
            }
        }
    };
    ServerProcess {
        child,
        addr,
        dir,
        log: rx,
        startup: seen,
    }
}

/// Claims a runner of `environment` at `base` (`…/api/v1`, sending `token` if given), retrying
/// for up to 5 s while the pool fills; returns its id.
pub async fn claim(
    client: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    environment: u64,
) -> String {
    for _ in 0..100 {
        let mut request = client
            .post(format!("{base}/runners"))
            .json(&serde_json::json!({"executionEnvironmentId": environment}));
        if let Some(token) = token {
            request = request.header("Poseidon-Token", token);
        }
        let r = request.send().await.expect("claim");
        if r.status() == 200 {
            let body: serde_json::Value = r.json().await.expect("json");
            return body["runnerId"].as_str().expect("a runner id").to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no runner of environment {environment} to claim");
}

impl ServerProcess {
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits (bounded) for the process to exit and returns its code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        None
    }
}

impl Drop for ServerProcess {
    /// Kills the server if it still runs, then the runners it leaves in its data directory (by
    /// design they outlive it, but this data directory goes with the test).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        super::leftovers::remove_sandboxes(&self.dir.path().join("poseidon-data"));
    }
}
