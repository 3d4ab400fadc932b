//! The `poseidon-server` binary: arguments, configuration errors (exit code 2), serving with the
//! fake backend, TLS, and SIGTERM.

mod common;

use std::time::Duration;

use common::process::{command, spawn};
use serde_json::{Value, json};

#[test]
fn help_and_version_come_from_clap() {
    let dir = tempfile::tempdir().expect("dir");
    let out = command(dir.path()).arg("--help").output().expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--config"));
    let out = command(dir.path()).arg("--version").output().expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn invalid_configuration_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().expect("dir");
    for (vars, key) in [
        (vec![("POSEIDON_SERVER_PORT", "not-a-port")], "server.port"),
        (vec![("POSEIDON_NOMAD_PORT", "many")], "nomad.port"),
        (
            vec![("POSEIDON_LOGGER_FORMATTER", "XMLFormatter")],
            "logger.formatter",
        ),
        (
            vec![("POSEIDON_SERVER_BACKEND", "docker")],
            "server.backend",
        ),
        (
            vec![("POSEIDON_INFLUXDB_URL", "influxdb:8086")],
            "influxdb.url",
        ),
    ] {
        let mut cmd = command(dir.path());
        for (k, v) in &vars {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run");
        assert_eq!(out.status.code(), Some(2), "{vars:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{vars:?}: {stderr}");
    }
    std::fs::write(
        dir.path().join("configuration.yaml"),
        "limits:\n  maxpoolsize: -3\n",
    )
    .expect("write");
    let out = command(dir.path()).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.maxpoolsize"));
    let out = command(dir.path())
        .args(["--config", "/nonexistent/custom.yaml"])
        .env("POSEIDON_SERVER_PORT", "x")
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(2),
        "a missing --config file means defaults"
    );
}

const POSEIDON_SHAPED: &str = include_str!("fixtures/poseidon-shaped-configuration.yaml");

#[tokio::test]
async fn a_configuration_of_poseidons_shape_loads_and_unused_keys_are_logged_once() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("configuration.yaml"), POSEIDON_SHAPED).expect("write");
    let mut server = common::process::spawn_in(
        dir,
        &[
            ("POSEIDON_SERVER_BACKEND", "fake"),
            ("POSEIDON_SERVER_SHUTDOWNGRACE", "1"),
        ],
    );
    let ignored: Vec<&String> = server
        .startup
        .iter()
        .filter(|l| l.contains("are ignored"))
        .collect();
    assert_eq!(ignored.len(), 1, "{:#?}", server.startup);
    for key in ["aws", "profiling", "server.interactivestderr"] {
        assert!(ignored[0].contains(key), "{key} in {}", ignored[0]);
    }
    let r = reqwest::get(format!("http://{}/api/v1/health", server.addr))
        .await
        .expect("health");
    assert_eq!(r.status(), 204);
    drop(r);
    server.signal("TERM");
    assert_eq!(server.wait_exit(Duration::from_secs(20)), Some(0));
}

#[test]
fn nomad_enabled_waits_for_nomad_without_serving_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("dir");
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let file = POSEIDON_SHAPED
        .replace("  enabled: false\n  address", "  enabled: true\n  address")
        .replace("  port: 4646", &format!("  port: {port}"));
    assert_ne!(file, POSEIDON_SHAPED);
    std::fs::write(dir.path().join("configuration.yaml"), file).expect("write");
    let mut child = command(dir.path()).spawn().expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let waiting = loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.contains("Nomad is not reachable yet") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    if !waiting {
        let _ = child.kill();
        panic!("no wait for Nomad was logged: {seen:#?}");
    }
    assert!(
        !seen.iter().any(|l| l.contains("listening")),
        "served before Nomad answered: {seen:#?}"
    );
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            assert!(status.code().is_some(), "ended by its own exit, not killed");
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("SIGTERM did not stop the wait for Nomad");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn serves_from_a_configuration_file_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("configuration.yaml"),
        "server:\n  token: file-token\n  backend: fake\n  shutdowngrace: 1\nsentry:\n  release: rel-123\nenvironments:\n  - id: 4\n    image: img\n    prewarmingPoolSize: 1\n    cpuLimit: 10\n    memoryLimit: 64\n    networkAccess: false\n    exposedPorts: []\n",
    )
    .expect("write");
    let mut server = common::process::spawn_in(dir, &[]);
    let base = format!("http://{}/api/v1", server.addr);
    let version: Value = reqwest::get(format!("{base}/version"))
        .await
        .expect("version")
        .json()
        .await
        .expect("json");
    assert_eq!(version, json!("rel-123"));
    let client = reqwest::Client::new();
    let r = client
        .get(format!("{base}/execution-environments/4"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 401);
    let r = client
        .get(format!("{base}/execution-environments/4"))
        .header("Poseidon-Token", "file-token")
        .send()
        .await
        .expect("get");
    assert_eq!(
        r.status(),
        200,
        "declared environments are created at start-up"
    );
    server.signal("TERM");
    assert_eq!(server.wait_exit(Duration::from_secs(20)), Some(0));
}

#[tokio::test]
async fn tls_serves_https_and_wss_urls() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let cert = format!("{fixtures}/test-cert.pem");
    let key = format!("{fixtures}/test-key.pem");
    let mut server = spawn(&[
        ("POSEIDON_SERVER_BACKEND", "fake"),
        ("POSEIDON_SERVER_TLS_ACTIVE", "true"),
        ("POSEIDON_SERVER_TLS_CERTFILE", &cert),
        ("POSEIDON_SERVER_TLS_KEYFILE", &key),
    ]);
    let port = server
        .addr
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_string();
    let pem = std::fs::read(format!("{fixtures}/test-ca.pem")).expect("ca");
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"))
        .build()
        .expect("client");
    let base = format!("https://localhost:{port}/api/v1");
    let r = client
        .get(format!("{base}/health"))
        .send()
        .await
        .expect("https");
    assert_eq!(r.status(), 204);
    let r = client
        .put(format!("{base}/execution-environments/1"))
        .json(&json!({"image": "img", "prewarmingPoolSize": 1}))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 201);
    let runner = common::process::claim(&client, &base, None, 1).await;
    let body: Value = client
        .post(format!("{base}/runners/{runner}/execute"))
        .json(&json!({"command": "echo hi"}))
        .send()
        .await
        .expect("execute")
        .json()
        .await
        .expect("json");
    let url = body["websocketUrl"].as_str().unwrap_or_default();
    assert!(
        url.starts_with(&format!(
            "wss://localhost:{port}/api/v1/runners/{runner}/websocket?executionID="
        )),
        "{url}"
    );
    // Plain HTTP on the TLS port is not served.
    assert!(
        reqwest::get(format!("http://127.0.0.1:{port}/api/v1/health"))
            .await
            .is_err()
    );
    server.signal("INT");
    assert_eq!(server.wait_exit(Duration::from_secs(20)), Some(0));
}

#[test]
fn systemd_is_notified_when_ready_and_stopping() {
    let dir = tempfile::tempdir().expect("dir");
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let notify = socket_path.to_string_lossy().to_string();
    let mut server = spawn(&[
        ("POSEIDON_SERVER_BACKEND", "fake"),
        ("NOTIFY_SOCKET", notify.as_str()),
        ("WATCHDOG_USEC", "200000"),
    ]);
    let mut received = Vec::new();
    let mut buf = [0u8; 256];
    while !(received.iter().any(|m| m == "READY=1") && received.iter().any(|m| m == "WATCHDOG=1")) {
        let n = socket.recv(&mut buf).expect("a notification");
        received.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    server.signal("TERM");
    loop {
        let n = socket.recv(&mut buf).expect("a notification");
        if &buf[..n] == b"STOPPING=1" {
            break;
        }
    }
    assert_eq!(server.wait_exit(Duration::from_secs(20)), Some(0));
}

#[tokio::test]
async fn a_socket_activated_server_serves_on_the_passed_listener() {
    let dir = tempfile::tempdir().expect("dir");
    // python3 plays systemd: it binds, passes the socket as fd 3 with LISTEN_FDS/LISTEN_PID for
    // its own pid, and execs the server. The configured address cannot be bound here, so only
    // the passed listener can answer.
    let launcher = r#"
import os, socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(16)
os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
print(s.getsockname()[1], flush=True)
env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execve(sys.argv[1], [sys.argv[1]], env)
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", launcher, env!("CARGO_BIN_EXE_poseidon-server")])
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .env("POSEIDON_SERVER_BACKEND", "fake")
        .env("POSEIDON_SERVER_ADDRESS", "192.0.2.1")
        .env("POSEIDON_SERVER_PORT", "7200")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("port");
    let port: u16 = line.trim().parse().expect("a port");
    let health = reqwest::get(format!("http://127.0.0.1:{port}/api/v1/health")).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(health.expect("health").status(), 204);
}
