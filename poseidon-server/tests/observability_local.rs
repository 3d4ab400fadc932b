//! Metrics of the `poseidon-server` binary over the real local backend (sandboxes on this
//! machine; needs root): runner start-ups labelled `local`, a real memory overrun, state store
//! writes, destructions and backend calls, read from `/metrics`.

mod common;

use std::time::Duration;

use common::observe::{LOCAL_BACKEND_ONLY, Scrape, referenced_metrics};
use common::process::{ServerProcess, claim, spawn};
use common::{TOKEN, connect, read_all};
use serde_json::{Value, json};

struct Local {
    server: ServerProcess,
    client: reqwest::Client,
}

impl Local {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.addr)
    }

    async fn scrape(&self) -> Scrape {
        let r = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics");
        assert_eq!(r.status(), 200);
        Scrape::parse(&r.text().await.expect("text"))
    }

    /// Scrapes until `name{labels}` is `expected` (bounded); returns that scrape.
    async fn until(&self, name: &str, labels: &[(&str, &str)], expected: f64) -> Scrape {
        for _ in 0..300 {
            let s = self.scrape().await;
            if s.value(name, labels) == expected {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let s = self.scrape().await;
        panic!(
            "{name}{labels:?} is {} not {expected}",
            s.value(name, labels)
        );
    }
}

#[tokio::test]
async fn a_local_session_is_measured_from_start_up_to_deletion() {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("Poseidon-Token", TOKEN.parse().expect("header"));
    let local = Local {
        server: spawn(&[("POSEIDON_SERVER_TOKEN", TOKEN)]),
        client: reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .expect("client"),
    };
    let base = local.url("/api/v1");
    let r = local
        .client
        .put(format!("{base}/execution-environments/0"))
        .json(
            &json!({"image": "host", "prewarmingPoolSize": 1, "cpuLimit": 20,
                      "memoryLimit": 100, "networkAccess": false, "exposedPorts": []}),
        )
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 201);
    let runner = claim(&local.client, &base, None, 0).await;
    // The claim's refill: two runners started, on the local backend.
    local
        .until(
            "poseidon_runner_startup_duration_seconds_count",
            &[("environment_id", "0"), ("backend", "local")],
            2.0,
        )
        .await;

    // A real memory overrun: the kernel kills the process in the runner's cgroup.
    let r = local
        .client
        .post(format!("{base}/runners/{runner}/execute"))
        .json(&json!({"command": "</dev/zero head -c 110MB | tail > /dev/null"}))
        .send()
        .await
        .expect("execute");
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    let url = body["websocketUrl"].as_str().expect("url");
    let mut ws = connect(url, Some(TOKEN)).await.expect("connect");
    let t = read_all(&mut ws, Duration::from_secs(30)).await;
    assert!(t.stderr().contains("Killed"), "{t:?}");
    let s = local
        .until(
            "poseidon_executions_total",
            &[("environment_id", "0"), ("outcome", "exit_nonzero")],
            1.0,
        )
        .await;
    assert_eq!(s.value("poseidon_executions_total", &[]), 1.0);
    let store = |s: &Scrape, operation: &str| {
        s.value(
            "poseidon_store_write_duration_seconds_count",
            &[("operation", operation), ("durability", "durable")],
        )
    };
    assert_eq!(store(&s, "put_environment"), 1.0);
    assert_eq!(store(&s, "set_runner_state"), 1.0, "the claim's used-mark");
    assert!(store(&s, "put_runner") >= 2.0);
    for name in LOCAL_BACKEND_ONLY {
        assert!(
            s.names().contains(*name),
            "{name} is referenced by {:?} but not exported",
            referenced_metrics().get(*name)
        );
    }

    let r = local
        .client
        .delete(format!("{base}/runners/{runner}"))
        .send()
        .await
        .expect("delete runner");
    assert_eq!(r.status(), 204);
    let r = local
        .client
        .delete(format!("{base}/execution-environments/0"))
        .send()
        .await
        .expect("delete environment");
    assert_eq!(r.status(), 204);
    let s = local
        .until(
            "poseidon_backend_call_duration_seconds_count",
            &[("backend", "local"), ("operation", "destroy_runner")],
            2.0,
        )
        .await;
    let destroyed =
        |reason: &str| s.value("poseidon_runners_destroyed_total", &[("reason", reason)]);
    assert_eq!(destroyed("api_request"), 1.0);
    assert_eq!(destroyed("environment_deleted"), 1.0);
    assert_eq!(s.value("poseidon_runners_destroyed_total", &[]), 2.0);
    assert_eq!(
        s.value(
            "poseidon_backend_call_errors_total",
            &[("backend", "local")]
        ),
        0.0
    );
    assert_eq!(store(&s, "remove_environment"), 1.0);
}
