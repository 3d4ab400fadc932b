//! The writer against a local HTTP server that records what InfluxDB would receive.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::post;
use monitoring::{InfluxConfig, InfluxWriter, Point};

#[derive(Debug, Clone)]
struct Request {
    path_and_query: String,
    authorization: Option<String>,
    body: String,
}

#[derive(Debug, Default)]
struct Recorder {
    requests: Mutex<Vec<Request>>,
    /// Statuses to answer with, in order; 204 once they are used up.
    statuses: Mutex<VecDeque<u16>>,
}

async fn record(
    State(rec): State<Arc<Recorder>>,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    rec.requests.lock().expect("lock").push(Request {
        path_and_query: uri
            .path_and_query()
            .map(ToString::to_string)
            .unwrap_or_default(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body,
    });
    let status = rec
        .statuses
        .lock()
        .expect("lock")
        .pop_front()
        .unwrap_or(204);
    StatusCode::from_u16(status).unwrap_or(StatusCode::NO_CONTENT)
}

async fn recorder(statuses: &[u16]) -> (Arc<Recorder>, String) {
    let rec = Arc::new(Recorder {
        requests: Mutex::default(),
        statuses: Mutex::new(statuses.iter().copied().collect()),
    });
    let app = Router::new()
        .route("/{*path}", post(record))
        .with_state(rec.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (rec, format!("http://{addr}"))
}

fn requests(rec: &Recorder) -> Vec<Request> {
    rec.requests.lock().expect("lock").clone()
}

async fn wait_for(rec: &Recorder, count: usize, limit: Duration) -> Vec<Request> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let seen = requests(rec);
        if seen.len() >= count || tokio::time::Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn config(url: &str) -> InfluxConfig {
    let mut c = InfluxConfig::new(url, "s3cr3t", "my org", "poseidon");
    c.default_tags.insert("stage".into(), "test".into());
    c.retry_backoff = Duration::from_millis(50);
    c
}

#[tokio::test]
async fn points_arrive_as_line_protocol_with_path_query_and_token() {
    let (rec, url) = recorder(&[]).await;
    let writer = InfluxWriter::start(config(&url)).expect("start");
    writer.write(
        Point::new("poseidon_/health")
            .tag("status", "204")
            .field("duration", 1234_i64)
            .timestamp(Some(1_700_000_000_000_000_000)),
    );
    writer.write(
        Point::new("poseidon_poolsize")
            .tag("environment_id", "7")
            .tag("stage", "own stage")
            .field("prewarming_pool_size", 3_u32)
            .timestamp(Some(1_700_000_000_000_000_001)),
    );
    // Flushed by the one-second timer, not by the shutdown.
    let seen = wait_for(&rec, 1, Duration::from_secs(5)).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    let r = &seen[0];
    assert_eq!(
        r.path_and_query,
        "/api/v2/write?org=my+org&bucket=poseidon&precision=ns"
    );
    assert_eq!(r.authorization.as_deref(), Some("Token s3cr3t"));
    assert_eq!(
        r.body,
        "poseidon_/health,stage=test,status=204 duration=1234i 1700000000000000000\n\
         poseidon_poolsize,environment_id=7,stage=own\\ stage prewarming_pool_size=3i 1700000000000000001\n"
    );
    writer.shutdown().await;
    assert_eq!(writer.dropped(), 0);
}

#[tokio::test]
async fn a_full_batch_is_sent_without_waiting_for_the_timer() {
    let (rec, url) = recorder(&[]).await;
    let mut c = config(&url);
    c.batch_size = 3;
    c.flush_interval = Duration::from_secs(3600);
    let writer = InfluxWriter::start(c).expect("start");
    for i in 0..3_i64 {
        writer.write(Point::new("m").field("i", i));
    }
    let seen = wait_for(&rec, 1, Duration::from_secs(5)).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body.lines().count(), 3);
    writer.shutdown().await;
}

#[tokio::test]
async fn shutdown_flushes_what_is_buffered() {
    let (rec, url) = recorder(&[]).await;
    let mut c = config(&url);
    c.flush_interval = Duration::from_secs(3600);
    let writer = InfluxWriter::start(c).expect("start");
    writer.write(Point::new("last").field("n", 1_i64));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(requests(&rec).is_empty(), "nothing before the shutdown");
    writer.shutdown().await;
    let seen = requests(&rec);
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].body.starts_with("last,stage=test n=1i "),
        "{seen:?}"
    );
}

#[tokio::test]
async fn a_failed_batch_is_retried_then_dropped() {
    // Two server errors, then success: the same batch arrives three times.
    let (rec, url) = recorder(&[500, 503]).await;
    let writer = InfluxWriter::start(config(&url)).expect("start");
    writer.write(Point::new("m").field("n", 1_i64));
    let seen = wait_for(&rec, 3, Duration::from_secs(10)).await;
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.iter().all(|r| r.body == seen[0].body));
    writer.shutdown().await;

    // Always failing: 1 + max_retries attempts, then the batch is given up and the next one
    // is sent normally.
    let (rec, url) = recorder(&[500, 500, 500, 500]).await;
    let writer = InfluxWriter::start(config(&url)).expect("start");
    writer.write(Point::new("first").field("n", 1_i64));
    let seen = wait_for(&rec, 4, Duration::from_secs(10)).await;
    assert_eq!(seen.len(), 4);
    writer.write(Point::new("second").field("n", 2_i64));
    let seen = wait_for(&rec, 5, Duration::from_secs(10)).await;
    assert_eq!(seen.len(), 5);
    assert!(seen[4].body.starts_with("second"), "{seen:?}");
    writer.shutdown().await;

    // A client error (bad data, bad token) is not retried.
    let (rec, url) = recorder(&[400]).await;
    let writer = InfluxWriter::start(config(&url)).expect("start");
    writer.write(Point::new("bad").field("n", 1_i64));
    wait_for(&rec, 1, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(requests(&rec).len(), 1);
    writer.shutdown().await;
}

#[tokio::test]
async fn shutdown_is_bounded_when_influxdb_is_unreachable() {
    // A listener that accepts and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let mut c = config(&url);
    c.flush_interval = Duration::from_secs(3600);
    c.shutdown_timeout = Duration::from_millis(500);
    let writer = InfluxWriter::start(c).expect("start");
    writer.write(Point::new("m").field("n", 1_i64));
    let started = std::time::Instant::now();
    writer.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}
