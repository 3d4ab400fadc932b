//! The binary with `influxdb.url` set writes Poseidon's points to InfluxDB v2: a local HTTP
//! server records what arrives at `/api/v2/write`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::post;
use serde_json::json;

#[derive(Debug, Default)]
struct Recorded {
    /// `(path and query, Authorization, body)` of every POST.
    posts: Mutex<Vec<(String, String, String)>>,
}

impl Recorded {
    fn lines(&self) -> Vec<String> {
        self.posts
            .lock()
            .expect("lock")
            .iter()
            .flat_map(|(_, _, body)| body.lines().map(str::to_string).collect::<Vec<_>>())
            .collect()
    }
}

async fn record(
    State(rec): State<Arc<Recorded>>,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let path = uri
        .path_and_query()
        .map(ToString::to_string)
        .unwrap_or_default();
    rec.posts.lock().expect("lock").push((path, auth, body));
    StatusCode::NO_CONTENT
}

async fn influx_recorder() -> (Arc<Recorded>, String) {
    let rec = Arc::new(Recorded::default());
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

/// The first recorded line whose measurement (and tag set) starts with `prefix` and that
/// contains every one of `parts`, waiting (bounded) for it.
async fn wait_line(rec: &Recorded, prefix: &str, parts: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let lines = rec.lines();
        if let Some(l) = lines
            .iter()
            .find(|l| l.starts_with(prefix) && parts.iter().all(|p| l.contains(p)))
        {
            return l.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no line `{prefix}…` with {parts:?} among {lines:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn requests_and_pool_sizes_arrive_in_influxdb() {
    let (rec, url) = influx_recorder().await;
    let server = common::process::spawn(&[
        ("POSEIDON_SERVER_BACKEND", "fake"),
        ("POSEIDON_SERVER_TOKEN", "tok"),
        ("POSEIDON_INFLUXDB_URL", &url),
        ("POSEIDON_INFLUXDB_TOKEN", "influx-token"),
        ("POSEIDON_INFLUXDB_ORGANIZATION", "openHPI"),
        ("POSEIDON_INFLUXDB_BUCKET", "poseidon"),
        ("POSEIDON_INFLUXDB_STAGE", "ci"),
    ]);
    let base = format!("http://{}/api/v1", server.addr);
    let client = reqwest::Client::new();

    let r = client
        .get(format!("{base}/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(r.status(), 204);
    let r = client
        .put(format!("{base}/execution-environments/3"))
        .header("Poseidon-Token", "tok")
        .json(&json!({"image": "img", "prewarmingPoolSize": 2, "cpuLimit": 10, "memoryLimit": 64, "networkAccess": false, "exposedPorts": []}))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 201);
    let runner = common::process::claim(&client, &base, Some("tok"), 3).await;

    let health = wait_line(&rec, "poseidon_/health,", &["status=204", "stage=ci"]).await;
    assert!(health.contains(" duration="), "{health}");
    let put = wait_line(
        &rec,
        "poseidon_createOrUpdate,",
        &["environment_id=3", "stage=ci", "status=201"],
    )
    .await;
    assert!(put.contains(" duration="), "{put}");
    let pool = wait_line(
        &rec,
        "poseidon_poolsize,",
        &["environment_id=3", "stage=ci", " prewarming_pool_size=2i "],
    )
    .await;
    assert!(pool.split(' ').count() == 3, "timestamped: {pool}");
    let provide = wait_line(
        &rec,
        "poseidon_provideRunner,",
        &[
            "environment_id=3",
            &format!("runner_id={runner}"),
            "stage=ci",
            "status=200",
        ],
    )
    .await;
    let duration = provide
        .split(' ')
        .nth(1)
        .and_then(|f| f.strip_prefix("duration="))
        .and_then(|d| d.strip_suffix('i'))
        .and_then(|d| d.parse::<i64>().ok());
    assert!(duration.is_some_and(|d| d > 0), "{provide}");
    wait_line(
        &rec,
        "poseidon_used_runners,",
        &["environment_id=3", " count=1i"],
    )
    .await;
    // Every runner start-up, as Poseidon writes it for an idle runner that became ready.
    let startup = wait_line(
        &rec,
        "poseidon_nomad_idle_runners,",
        &[
            "environment_id=3",
            &format!("runner_id={runner}"),
            " startup_duration=",
        ],
    )
    .await;
    assert!(startup.contains("stage=ci"), "{startup}");

    let posts = rec.posts.lock().expect("lock").clone();
    for (path, auth, _) in &posts {
        assert_eq!(
            path,
            "/api/v2/write?org=openHPI&bucket=poseidon&precision=ns"
        );
        assert_eq!(auth, "Token influx-token");
    }
}

#[tokio::test]
async fn points_of_the_last_requests_are_flushed_on_sigterm() {
    let (rec, url) = influx_recorder().await;
    let mut server = common::process::spawn(&[
        ("POSEIDON_SERVER_BACKEND", "fake"),
        ("POSEIDON_SERVER_SHUTDOWNGRACE", "1"),
        ("POSEIDON_INFLUXDB_URL", &url),
    ]);
    let base = format!("http://{}/api/v1", server.addr);
    let r = reqwest::get(format!("{base}/version"))
        .await
        .expect("version");
    assert_eq!(r.status(), 200);
    server.signal("TERM");
    let code = tokio::task::spawn_blocking(move || server.wait_exit(Duration::from_secs(20)))
        .await
        .expect("join");
    assert_eq!(code, Some(0));
    // The writer flushes once a second; the shutdown flush must not wait for that.
    let lines = rec.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("poseidon_/version,status=200 duration=")),
        "{lines:#?}"
    );
}
