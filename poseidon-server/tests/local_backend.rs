//! The `poseidon-server` binary over the real local backend: what it refuses, and what it
//! says when it does.

mod common;

use common::TOKEN;
use common::process::spawn;
use serde_json::{Value, json};

fn client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("Poseidon-Token", TOKEN.parse().expect("header"));
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client")
}

#[tokio::test]
async fn environments_needing_networking_are_refused_at_put_when_it_is_unavailable() {
    let server = spawn(&[
        ("POSEIDON_SERVER_TOKEN", TOKEN),
        ("POSEIDON_LOCAL_NETWORK_ENABLED", "false"),
    ]);
    let base = format!("http://{}/api/v1", server.addr);
    let client = client();
    let put = |body: Value| {
        client
            .put(format!("{base}/execution-environments/7"))
            .json(&body)
            .send()
    };
    let spec = |network: bool, ports: Vec<u16>| {
        json!({"image": "host", "prewarmingPoolSize": 1, "cpuLimit": 20, "memoryLimit": 100,
               "networkAccess": network, "exposedPorts": ports})
    };
    for body in [spec(true, vec![]), spec(false, vec![8080])] {
        let r = put(body.clone()).await.expect("put");
        assert_eq!(r.status(), 400, "{body}");
        let answer: Value = r.json().await.expect("json");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("runner networking") && message.contains("local.network.enabled"),
            "{answer}"
        );
    }
    let r = client
        .get(format!("{base}/execution-environments/7"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404, "a refused environment is not stored");
    let r = put(spec(false, vec![])).await.expect("put");
    assert_eq!(r.status(), 201);
    let r = client
        .delete(format!("{base}/execution-environments/7"))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
}
