//! The `poseidon-server` binary's telemetry: Sentry envelopes (events tagged with the request's
//! ids, request transactions, release and environment) arrive at a local listener standing in
//! for Sentry, and `logger.formatter: JSONFormatter` writes one JSON object per line carrying
//! the request's span.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use common::TOKEN;
use common::process::spawn;
use serde_json::{Value, json};
use tokio::sync::mpsc;

fn client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("Poseidon-Token", TOKEN.parse().expect("header"));
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client")
}

/// A listener taking Sentry envelopes on `/api/1/envelope/`; returns its port and the items
/// (each item header paired with its payload, both parsed as JSON where they are JSON).
async fn sentry_listener() -> (u16, mpsc::UnboundedReceiver<(Value, Value, Value)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = Router::new().route(
        "/api/1/envelope/",
        post(move |body: Bytes| {
            let tx = tx.clone();
            async move {
                let text = String::from_utf8_lossy(&body).to_string();
                let mut lines = text.lines();
                let header: Value = lines
                    .next()
                    .and_then(|l| serde_json::from_str(l).ok())
                    .unwrap_or(Value::Null);
                // Item header, payload, item header, payload, … (payloads here are one line).
                while let Some(item) = lines.next() {
                    let item: Value = serde_json::from_str(item).unwrap_or(Value::Null);
                    let payload: Value = lines
                        .next()
                        .and_then(|l| serde_json::from_str(l).ok())
                        .unwrap_or(Value::Null);
                    let _ = tx.send((header.clone(), item, payload));
                }
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, rx)
}

/// Waits (bounded) for an item of `kind` whose payload satisfies `matches`.
async fn item_of(
    rx: &mut mpsc::UnboundedReceiver<(Value, Value, Value)>,
    kind: &str,
    matches: impl Fn(&Value) -> bool,
) -> Value {
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some((_, item, payload)) = rx.recv().await {
            if item["type"] == kind && matches(&payload) {
                return payload;
            }
        }
        Value::Null
    })
    .await;
    match found {
        Ok(payload) if !payload.is_null() => payload,
        _ => panic!("no Sentry {kind} arrived"),
    }
}

#[tokio::test]
async fn warnings_and_request_transactions_reach_sentry_with_the_request_ids() {
    let (port, mut envelopes) = sentry_listener().await;
    let dsn = format!("http://key@127.0.0.1:{port}/1");
    let server = spawn(&[
        ("POSEIDON_SERVER_TOKEN", TOKEN),
        ("POSEIDON_SERVER_BACKEND", "fake"),
        ("POSEIDON_SENTRY_DSN", &dsn),
        ("POSEIDON_SENTRY_TRACESSAMPLERATE", "1.0"),
        ("POSEIDON_SENTRY_RELEASE", "rel-9"),
        ("POSEIDON_SENTRY_ENVIRONMENT", "ci"),
    ]);
    let base = format!("http://{}/api/v1", server.addr);
    let client = client();
    let r = client
        .put(format!("{base}/execution-environments/3"))
        .json(
            &json!({"image": "img", "prewarmingPoolSize": 1, "cpuLimit": 20,
                      "memoryLimit": 100, "networkAccess": false, "exposedPorts": []}),
        )
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 201);
    let runner = common::process::claim(&client, &base, None, 3).await;
    // The fake backend cannot write below /proc: a 500 whose warning names the runner.
    let r = client
        .patch(format!("{base}/runners/{runner}/files"))
        .header("X-Request-Id", "req-sentry-1")
        .json(&json!({"copy": [{"path": "/proc/x", "content": ""}]}))
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 500);

    let event = item_of(&mut envelopes, "event", |p| {
        p["tags"]["request_id"] == "req-sentry-1"
    })
    .await;
    assert_eq!(event["level"], "warning", "{event}");
    assert_eq!(event["tags"]["runner_id"], runner.as_str(), "{event}");
    assert_eq!(event["tags"]["environment_id"], "3", "{event}");
    assert_eq!(event["release"], "rel-9", "{event}");
    assert_eq!(event["environment"], "ci", "{event}");

    let transaction = item_of(&mut envelopes, "transaction", |p| {
        p["transaction"] == "PATCH /api/v1/runners/{runner_id}/files"
    })
    .await;
    assert_eq!(transaction["release"], "rel-9", "{transaction}");
    assert_eq!(
        transaction["contexts"]["trace"]["op"], "http.server",
        "{transaction}"
    );
}

#[tokio::test]
async fn the_json_formatter_writes_one_object_per_line_with_the_request_span() {
    let dir = tempfile::tempdir().expect("dir");
    let mut cmd = common::process::command(dir.path());
    cmd.env("POSEIDON_SERVER_TOKEN", TOKEN)
        .env("POSEIDON_SERVER_BACKEND", "fake")
        .env("POSEIDON_LOGGER_FORMATTER", "JSONFormatter")
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_line = |rx: &std::sync::mpsc::Receiver<String>| {
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no more log lines"))
    };
    let parse = |line: &str| -> Value {
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"))
    };
    let addr = loop {
        let line = next_line(&rx);
        let object = parse(&line);
        if object["fields"]["message"] == "listening" {
            break object["fields"]["address"]
                .as_str()
                .expect("address")
                .to_string();
        }
    };
    let base = format!("http://{addr}/api/v1");
    let client = client();
    let r = client
        .put(format!("{base}/execution-environments/5"))
        .header("X-Request-Id", "req-json-1")
        .json(
            &json!({"image": "img", "prewarmingPoolSize": 1, "cpuLimit": 20,
                      "memoryLimit": 100, "networkAccess": false, "exposedPorts": []}),
        )
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-request-id"], "req-json-1");
    let stored = loop {
        let object = parse(&next_line(&rx));
        assert!(object["level"].is_string() && object["timestamp"].is_string());
        if object["fields"]["message"] == "environment stored" {
            break object;
        }
    };
    assert_eq!(stored["span"]["name"], "request", "{stored}");
    assert_eq!(stored["span"]["request_id"], "req-json-1", "{stored}");
    assert_eq!(stored["span"]["environment_id"], 5, "{stored}");
    assert_eq!(
        stored["span"]["route"], "/api/v1/execution-environments/{environment_id}",
        "{stored}"
    );
    let _ = child.kill();
    let _ = child.wait();
}
