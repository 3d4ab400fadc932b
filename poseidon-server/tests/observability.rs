//! Observability through the real HTTP API over the fake backend: a scripted sequence (create
//! an environment, claim, execute, time out, OOM, delete) moves every metric family to exactly
//! the expected values; the request id is echoed; and every metric the operations files in
//! `deploy/` reference is exported by the server.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::observe::{
    LOCAL_BACKEND_ONLY, Scrape, deploy_expressions, metric_names, referenced_metrics,
};
use common::{TOKEN, TestServer, connect, read_all, run};
use poseidon_server::metrics::Metrics;
use poseidon_server::observe::{InstrumentedExecutor, ServerObserver};
use poseidon_server::{ApiSettings, AppState, app, serve};
use runner_core::fake::FakeExecutor;
use runner_core::{DestroyReason, ManagerConfig, RunnerId, RunnerManager};
use serde_json::json;
use tokio::sync::oneshot;

/// A server over the fake backend wired as `main` wires it: instrumented backend, observer.
async fn start_observed() -> TestServer {
    let fake = FakeExecutor::new();
    let metrics = Arc::new(Metrics::new());
    let backend = Arc::new(InstrumentedExecutor::new(
        Arc::new(fake.clone()),
        metrics.clone(),
        "fake",
    ));
    let observer = Arc::new(ServerObserver::new(metrics.clone(), "fake", None));
    let config = ManagerConfig::default();
    let manager = RunnerManager::with_observer(backend, config.clone(), observer);
    manager.recover().await.expect("recover");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let settings = ApiSettings {
        token: Some(TOKEN.into()),
        bounds: config.bounds.clone(),
        fallback_host: addr.to_string(),
        ..ApiSettings::default()
    };
    let state = AppState::with_metrics(manager.clone(), settings, None, metrics);
    let streams = state.streams.clone();
    let (tx, rx) = oneshot::channel::<()>();
    let served = tokio::spawn(serve::serve(
        listener,
        app(state),
        None,
        streams,
        Duration::from_secs(1),
        serve::DEFAULT_MAX_CONNECTIONS,
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

async fn scrape(server: &TestServer) -> Scrape {
    let response = server
        .client
        .get(format!("http://{}/metrics", server.host))
        .send()
        .await
        .expect("metrics");
    assert_eq!(response.status(), 200);
    Scrape::parse(&response.text().await.expect("text"))
}

/// Scrapes until `name{labels}` reaches `expected` (bounded), and returns that scrape.
async fn until(server: &TestServer, name: &str, labels: &[(&str, &str)], expected: f64) -> Scrape {
    for _ in 0..400 {
        let s = scrape(server).await;
        if s.value(name, labels) == expected {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let s = scrape(server).await;
    panic!(
        "{name}{labels:?} is {} not {expected}",
        s.value(name, labels)
    );
}

const ENV: u64 = 7;

#[tokio::test]
async fn a_scripted_session_moves_every_family_to_the_expected_values() {
    let server = start_observed().await;
    let env = ENV.to_string();
    let e = env.as_str();
    let mut exported = BTreeSet::new();

    // Create: two runners start.
    server.environment(ENV, 2).await;
    let s = scrape(&server).await;
    assert_eq!(
        s.value("poseidon_prewarming_pool_size", &[("environment_id", e)]),
        2.0
    );
    assert_eq!(
        s.value("poseidon_idle_runners", &[("environment_id", e)]),
        2.0
    );
    assert_eq!(
        s.value("poseidon_pending_runners", &[("environment_id", e)]),
        0.0
    );
    assert_eq!(
        s.value(
            "poseidon_runner_startup_duration_seconds_count",
            &[("environment_id", e), ("backend", "fake")]
        ),
        2.0
    );

    // Claim A while the backend fails once: the refill fails, backs off, then succeeds.
    server.fake.fail_next_creates(1);
    let a = server.claim(ENV, 0).await;
    server.wait_idle(ENV, 2).await;
    let s = scrape(&server).await;
    assert_eq!(
        s.value(
            "poseidon_runner_creation_failures_total",
            &[("environment_id", e), ("kind", "unreachable")]
        ),
        1.0
    );
    assert_eq!(
        s.value(
            "poseidon_backend_call_errors_total",
            &[
                ("backend", "fake"),
                ("operation", "create_runner"),
                ("kind", "unreachable")
            ]
        ),
        1.0
    );
    assert_eq!(
        s.value("poseidon_used_runners", &[("environment_id", e)]),
        1.0
    );

    // Execute: exit 0, exit 3, a time limit, and a start the backend fails.
    let t = run(&server, &a, json!({"command": "exit 0"})).await;
    assert_eq!(t.last()["type"], "exit");
    run(&server, &a, json!({"command": "exit 3"})).await;
    let t = run(&server, &a, json!({"command": "sleep 30", "timeLimit": 1})).await;
    assert_eq!(t.last()["type"], "timeout");
    server.fake.fail_next_executes(1);
    let t = run(&server, &a, json!({"command": "exit 0"})).await;
    assert_eq!(t.last()["type"], "error");

    // OOM: runner B is killed for memory while an execution runs on it.
    let b = server.claim(ENV, 0).await;
    let url = server
        .execute(&b, json!({"command": "sleep infinity"}))
        .await;
    let mut ws = connect(&url, Some(TOKEN)).await.expect("connect");
    until(&server, "poseidon_websocket_connections", &[], 1.0).await;
    server
        .fake
        .stop_runner(&RunnerId::from(b.as_str()), DestroyReason::OomKilled);
    let t = read_all(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(t.last()["data"], "the allocation was OOM Killed");
    until(&server, "poseidon_websocket_connections", &[], 0.0).await;

    // Inactivity timeout: runner C is not used for a second.
    let _c = server.claim(ENV, 1).await;
    let s = until(
        &server,
        "poseidon_runners_destroyed_total",
        &[("reason", "inactivity_timeout")],
        1.0,
    )
    .await;
    exported.extend(s.names());
    let executions = |outcome: &str| {
        s.value(
            "poseidon_executions_total",
            &[("environment_id", e), ("outcome", outcome)],
        )
    };
    assert_eq!(executions("exit_zero"), 1.0);
    assert_eq!(executions("exit_nonzero"), 1.0);
    assert_eq!(executions("timeout"), 1.0);
    assert_eq!(executions("error"), 1.0);
    assert_eq!(executions("oom_killed"), 1.0);
    assert_eq!(executions("cancelled"), 0.0);
    assert_eq!(s.value("poseidon_executions_total", &[]), 5.0);
    assert_eq!(
        s.value(
            "poseidon_execution_duration_seconds_count",
            &[("outcome", "timeout")]
        ),
        1.0
    );
    assert_eq!(
        s.value("poseidon_execution_duration_seconds_count", &[]),
        5.0
    );
    assert_eq!(
        s.value(
            "poseidon_backend_call_errors_total",
            &[("operation", "execute"), ("kind", "internal")]
        ),
        1.0
    );
    assert_eq!(
        s.value(
            "poseidon_execution_streams_total",
            &[("end", "start_failed")]
        ),
        1.0
    );
    assert_eq!(
        s.value(
            "poseidon_runners_destroyed_total",
            &[("reason", "oom_killed")]
        ),
        1.0
    );

    // Delete runner A, then the environment (with its two idle runners).
    server.wait_idle(ENV, 2).await;
    let r = server
        .client
        .delete(server.url(&format!("/runners/{a}")))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    let before_delete = scrape(&server).await;
    exported.extend(before_delete.names());
    let r = server
        .client
        .delete(server.url(&format!("/execution-environments/{ENV}")))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);

    let s = until(
        &server,
        "poseidon_backend_call_duration_seconds_count",
        &[("operation", "destroy_runner")],
        4.0,
    )
    .await;
    exported.extend(s.names());
    let destroyed =
        |reason: &str| s.value("poseidon_runners_destroyed_total", &[("reason", reason)]);
    assert_eq!(destroyed("api_request"), 1.0);
    assert_eq!(destroyed("inactivity_timeout"), 1.0);
    assert_eq!(destroyed("oom_killed"), 1.0);
    assert_eq!(destroyed("environment_deleted"), 2.0);
    assert_eq!(s.value("poseidon_runners_destroyed_total", &[]), 5.0);
    // Two at creation and one per claim (A, B, C).
    assert_eq!(
        s.value(
            "poseidon_runner_startup_duration_seconds_count",
            &[("environment_id", e), ("backend", "fake")]
        ),
        5.0
    );
    let calls = |operation: &str| {
        s.value(
            "poseidon_backend_call_duration_seconds_count",
            &[("backend", "fake"), ("operation", operation)],
        )
    };
    assert_eq!(calls("register_environment"), 1.0);
    assert_eq!(calls("create_runner"), 6.0);
    assert_eq!(calls("execute"), 5.0);
    assert_eq!(calls("mark_runner"), 3.0);
    assert_eq!(calls("delete_environment"), 1.0);
    assert_eq!(s.value("poseidon_backend_call_errors_total", &[]), 2.0);
    assert_eq!(s.value("poseidon_websocket_connections", &[]), 0.0);
    assert_eq!(
        s.value("poseidon_idle_runners", &[("environment_id", e)]),
        0.0,
        "a deleted environment has no series"
    );

    assert_deploy_files_reference_only(&exported);
}

#[tokio::test]
async fn the_request_id_is_echoed_or_made() {
    let server = start_observed().await;
    let r = server
        .client
        .get(server.url("/health"))
        .header("X-Request-Id", "client-id_1.2:3")
        .send()
        .await
        .expect("health");
    assert_eq!(r.headers()["x-request-id"], "client-id_1.2:3");
    let r = server
        .client
        .get(server.url("/health"))
        .header("X-Request-Id", "not sane \"id\"")
        .send()
        .await
        .expect("health");
    let made = r.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(!made.is_empty() && made != "not sane \"id\"", "{made}");
    let r = server
        .client
        .get(server.url("/no-such-route"))
        .send()
        .await
        .expect("unknown");
    assert_eq!(r.status(), 404);
    let other = r.headers()["x-request-id"].to_str().expect("ascii");
    assert_ne!(other, made, "every request gets its own id");
}

fn assert_deploy_files_reference_only(exported: &BTreeSet<String>) {
    assert!(deploy_expressions().len() >= 10);
    let referenced = referenced_metrics();
    for (name, sources) in &referenced {
        if LOCAL_BACKEND_ONLY.contains(&name.as_str()) {
            continue;
        }
        assert!(
            exported.contains(name),
            "{sources:?} reference {name}, which the server does not export: {exported:?}"
        );
    }
    // The dashboard covers pools, claims, executions, start-up latency, destroy reasons and
    // errors.
    for needed in [
        "poseidon_idle_runners",
        "poseidon_used_runners",
        "poseidon_executions_total",
        "poseidon_runner_startup_duration_seconds_bucket",
        "poseidon_runners_destroyed_total",
        "poseidon_backend_call_errors_total",
        "poseidon_runner_creation_failures_total",
    ] {
        assert!(referenced.contains_key(needed), "nothing shows {needed}");
    }
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = metric_names(
        "sum by (reason) (rate(poseidon_runners_destroyed_total{reason!=\"x\"}[5m])) / on() poseidon_idle_runners",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        vec!["poseidon_idle_runners", "poseidon_runners_destroyed_total"]
    );
}
