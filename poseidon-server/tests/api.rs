//! The HTTP API over real sockets, against the in-memory fake backend: every route, status and
//! body of design §1, and hostile input.

mod common;

use std::time::Duration;

use common::{TOKEN, connect, read_all, run, start, start_with};
use runner_core::ManagerConfig;
use serde_json::{Value, json};

#[tokio::test]
async fn health_is_204_and_version_a_json_string_without_token() {
    let s = start().await;
    let plain = reqwest::Client::new();
    let r = plain.get(s.url("/health")).send().await.expect("health");
    assert_eq!(r.status(), 204);
    let r = plain.get(s.url("/version")).send().await.expect("version");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().await.expect("json");
    assert!(v.is_string());
}

#[tokio::test]
async fn every_other_route_needs_the_token_and_answers_401_with_empty_body() {
    let s = start().await;
    s.environment(1, 1).await;
    let runner = s.claim(1, 0).await;
    let plain = reqwest::Client::new();
    let routes = [
        ("GET", "/statistics/execution-environments".to_string()),
        ("POST", "/runners".to_string()),
        ("DELETE", format!("/runners/{runner}")),
        ("GET", format!("/runners/{runner}/files")),
        ("PATCH", format!("/runners/{runner}/files")),
        ("GET", format!("/runners/{runner}/files/raw?path=a")),
        ("POST", format!("/runners/{runner}/execute")),
        ("GET", format!("/runners/{runner}/websocket?executionID=x")),
        ("GET", "/execution-environments".to_string()),
        ("GET", "/execution-environments/1".to_string()),
        ("PUT", "/execution-environments/1".to_string()),
        ("DELETE", "/execution-environments/1".to_string()),
    ];
    for token in [None, Some("wrong"), Some("s3cret-token-but-longer")] {
        for (method, path) in &routes {
            let mut request = plain.request(method.parse().expect("method"), s.url(path));
            if let Some(t) = token {
                request = request.header("Poseidon-Token", t);
            }
            let r = request.send().await.expect("send");
            assert_eq!(r.status(), 401, "{method} {path} with {token:?}");
            assert!(r.bytes().await.expect("body").is_empty());
        }
    }
    // The runner survived all of that.
    assert!(s.manager.used_runner(&runner.as_str().into()).is_some());
}

#[tokio::test]
async fn websocket_upgrade_needs_the_token() {
    let s = start().await;
    s.environment(1, 1).await;
    let runner = s.claim(1, 0).await;
    let url = s.execute(&runner, json!({"command": "echo hi"})).await;
    let err = connect(&url, None).await.expect_err("rejected");
    assert!(err.to_string().contains("401"), "{err}");
    // The id was not consumed by the rejected attempt.
    let mut ws = connect(&url, Some(TOKEN)).await.expect("connect");
    let t = read_all(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(t.stdout(), "hi\r\n");
}

#[tokio::test]
async fn unknown_paths_ids_methods_and_queries_answer_with_json_messages() {
    let s = start().await;
    let message = |body: &[u8]| -> Option<String> {
        serde_json::from_slice::<Value>(body).ok()?["message"]
            .as_str()
            .map(str::to_string)
    };
    let cases: Vec<(reqwest::Method, &str, u16)> = vec![
        (reqwest::Method::GET, "/api/v1/nothing", 404),
        (reqwest::Method::GET, "/", 404),
        (reqwest::Method::GET, "/api/v2/health", 404),
        (
            reqwest::Method::GET,
            "/api/v1/execution-environments/abc",
            404,
        ),
        (
            reqwest::Method::PUT,
            "/api/v1/execution-environments/-1",
            404,
        ),
        (
            reqwest::Method::PUT,
            "/api/v1/execution-environments/abc",
            404,
        ),
        (
            reqwest::Method::DELETE,
            "/api/v1/execution-environments/1.5",
            404,
        ),
        (
            reqwest::Method::GET,
            "/api/v1/execution-environments/99999999999999999999",
            400,
        ),
        (
            reqwest::Method::GET,
            "/api/v1/execution-environments?fetch=maybe",
            400,
        ),
        (reqwest::Method::DELETE, "/api/v1/runners/-1", 410),
        (reqwest::Method::DELETE, "/api/v1/runners/%20", 410),
        (
            reqwest::Method::GET,
            "/api/v1/runners/x/files?recursive=maybe",
            410,
        ),
        (reqwest::Method::GET, "/api/v1/runners/%FF/files", 400),
        (reqwest::Method::POST, "/api/v1/health", 405),
        (reqwest::Method::GET, "/api/v1/runners", 405),
    ];
    for (method, path, status) in cases {
        let r = s
            .client
            .request(method.clone(), format!("http://{}{path}", s.host))
            .json(&json!({}))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), status, "{method} {path}");
        let body = r.bytes().await.expect("body");
        assert!(
            message(&body).is_some_and(|m| !m.is_empty()),
            "{method} {path}: {}",
            String::from_utf8_lossy(&body)
        );
    }
}

#[tokio::test]
async fn environment_lifecycle_has_poseidons_statuses_and_bodies() {
    let s = start().await;
    let env = json!({"id": 999, "image": "img", "prewarmingPoolSize": 1, "cpuLimit": 20,
        "memoryLimit": 100, "networkAccess": true, "exposedPorts": [80, 443]});
    let r = s
        .client
        .put(s.url("/execution-environments/42"))
        .json(&env)
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["content-length"], "0");
    assert!(r.bytes().await.expect("body").is_empty());
    let r = s
        .client
        .put(s.url("/execution-environments/42"))
        .json(&env)
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 204);
    assert!(r.bytes().await.expect("body").is_empty());

    let got: Value = s
        .client
        .get(s.url("/execution-environments/42?fetch=true"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(
        got,
        json!({"id": 42, "image": "img", "prewarmingPoolSize": 1, "cpuLimit": 20,
        "memoryLimit": 100, "networkAccess": true, "exposedPorts": [80, 443]})
    );
    let list: Value = s
        .client
        .get(s.url("/execution-environments"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(
        list["executionEnvironments"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(list["executionEnvironments"][0]["id"], 42);

    let r = s
        .client
        .get(s.url("/execution-environments?fetch=maybe"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 400);
    let r = s
        .client
        .get(s.url("/execution-environments/7"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"message": "execution environment not found"})
    );
    let r = s
        .client
        .get(s.url("/execution-environments/99999999999999999999"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 400);

    let r = s
        .client
        .delete(s.url("/execution-environments/42"))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    let r = s
        .client
        .delete(s.url("/execution-environments/42"))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"message": "execution environment not found"})
    );
}

async fn put_raw(s: &common::TestServer, body: &'static str) -> (u16, Value) {
    let r = s
        .client
        .put(s.url("/execution-environments/5"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("put");
    let status = r.status().as_u16();
    let text = r.text().await.expect("text");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn hostile_environment_bodies_get_400_naming_the_field() {
    let s = start().await;
    let cases: [(&str, Option<&str>); 14] = [
        ("", None),
        ("{", None),
        (r#"{"image":"x","prewarmingPoolSize":1"#, None),
        ("[1,2]", None),
        ("null", None),
        (
            r#"{"image":"x","prewarmingPoolSize":-1}"#,
            Some("prewarmingPoolSize"),
        ),
        (
            r#"{"image":"x","prewarmingPoolSize":101}"#,
            Some("prewarmingPoolSize"),
        ),
        (
            r#"{"image":"x","prewarmingPoolSize":1e99}"#,
            Some("prewarmingPoolSize"),
        ),
        (r#"{"image":"x","memoryLimit":1}"#, Some("memoryLimit")),
        (r#"{"image":"x","cpuLimit":"fast"}"#, Some("cpuLimit")),
        (
            r#"{"image":"x","memoryLimit":18446744073709551616}"#,
            Some("memoryLimit"),
        ),
        (r#"{"image":"x","exposedPorts":[0]}"#, Some("exposedPorts")),
        (
            r#"{"image":"x","exposedPorts":[65536]}"#,
            Some("exposedPorts"),
        ),
        (r#"{"image":["x"]}"#, Some("image")),
    ];
    for (body, field) in cases {
        let (status, json) = put_raw(&s, body).await;
        assert_eq!(status, 400, "{body}");
        let message = json["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{body}: {json}");
        if let Some(field) = field {
            assert!(message.contains(field), "{body}: {message}");
        }
    }
    let (status, _) = put_raw(&s, r#"{"image":"x","networkAccess":"yes"}"#).await;
    assert_eq!(status, 400);
    // Nothing was created.
    let r = s
        .client
        .get(s.url("/execution-environments/5"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn statistics_are_keyed_by_id_string() {
    let s = start().await;
    s.environment(21, 2).await;
    let _runner = s.claim(21, 0).await;
    s.wait_idle(21, 2).await;
    let stats: Value = s
        .client
        .get(s.url("/statistics/execution-environments"))
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("json");
    assert_eq!(
        stats,
        json!({"21": {"id": 21, "prewarmingPoolSize": 2, "idleRunners": 2, "usedRunners": 1}})
    );
}

#[tokio::test]
async fn claiming_answers_runner_404_400_and_overload() {
    let mut config = ManagerConfig::default();
    config.bounds.max_pool_size = 5;
    let s = start_with(common::Options {
        manager: config,
        ..Default::default()
    })
    .await;
    s.environment(1, 1).await;
    s.fake.set_create_delay(Duration::from_secs(3600));

    let r = s
        .client
        .post(s.url("/runners"))
        .json(&json!({"executionEnvironmentId": 1, "inactivityTimeout": 60}))
        .send()
        .await
        .expect("claim");
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    assert!(body["runnerId"].as_str().is_some_and(|id| !id.is_empty()));
    assert_eq!(body["mappedPorts"], json!([]));

    let r = s
        .client
        .post(s.url("/runners"))
        .json(&json!({"executionEnvironmentId": 1}))
        .send()
        .await
        .expect("claim");
    assert_eq!(r.status(), 500);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["errorCode"], "NOMAD_OVERLOAD");
    assert!(body["message"].is_string());

    let r = s
        .client
        .post(s.url("/runners"))
        .json(&json!({"executionEnvironmentId": 9999}))
        .send()
        .await
        .expect("claim");
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.expect("json")["message"].is_string());

    for (body, field) in [
        ("", "body"),
        ("{}", "executionEnvironmentId"),
        (
            r#"{"executionEnvironmentId":"1"}"#,
            "executionEnvironmentId",
        ),
        (r#"{"executionEnvironmentId":-1}"#, "executionEnvironmentId"),
        (
            r#"{"executionEnvironmentId":1,"inactivityTimeout":-5}"#,
            "inactivityTimeout",
        ),
        (
            r#"{"executionEnvironmentId":1,"inactivityTimeout":1e30}"#,
            "inactivityTimeout",
        ),
        (
            r#"{"executionEnvironmentId":1,"inactivityTimeout":99999999999999}"#,
            "inactivityTimeout",
        ),
    ] {
        let r = s
            .client
            .post(s.url("/runners"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("claim");
        assert_eq!(r.status(), 400, "{body}");
        let message = r.json::<Value>().await.expect("json")["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(message.contains(field), "{body}: {message}");
    }
}

#[tokio::test]
async fn deleting_a_runner_twice_is_410_and_unknown_runners_are_410_after_the_body() {
    let s = start().await;
    s.environment(1, 1).await;
    let runner = s.claim(1, 0).await;
    let r = s
        .client
        .delete(s.url(&format!("/runners/{runner}")))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    let r = s
        .client
        .delete(s.url(&format!("/runners/{runner}")))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 410);
    assert!(r.json::<Value>().await.expect("json")["message"].is_string());

    // An idle runner is not addressable either.
    s.wait_idle(1, 1).await;
    let idle = s
        .fake
        .runners()
        .into_iter()
        .map(|r| r.info.id.to_string())
        .find(|id| id != &runner);
    if let Some(idle) = idle {
        let r = s
            .client
            .get(s.url(&format!("/runners/{idle}/files")))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 410);
    }
    // A large upload to an unknown runner is read before the 410 (no connection reset).
    let big = json!({"copy": [{"path": "a", "content": "A".repeat(600_000)}]});
    for path in ["/runners/nope/files", "/runners/nope/execute"] {
        let method = if path.ends_with("files") {
            reqwest::Method::PATCH
        } else {
            reqwest::Method::POST
        };
        let r = s
            .client
            .request(method, s.url(path))
            .json(&big)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 410, "{path}");
    }
    let r = s
        .client
        .post(s.url("/runners/nope/execute"))
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 410);
}

#[tokio::test]
async fn files_are_copied_listed_downloaded_and_partial_failures_are_500_unknown() {
    let s = start().await;
    s.environment(1, 1).await;
    let runner = s.claim(1, 0).await;
    let files = s.url(&format!("/runners/{runner}/files"));

    let r = s
        .client
        .patch(&files)
        .json(&json!({"copy": [{"path": "test.txt", "content": "SGVsbG8="}, {"path": "empty"}]}))
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 204);
    assert!(r.bytes().await.expect("body").is_empty());

    let listing: Value = s
        .client
        .get(&files)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let names: Vec<&str> = listing["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert!(names.contains(&"./test.txt"), "{listing}");
    let entry = listing["files"]
        .as_array()
        .expect("files")
        .iter()
        .find(|f| f["name"] == "./test.txt")
        .cloned()
        .unwrap_or_default();
    assert_eq!(entry["entryType"], "-");
    assert_eq!(entry["size"], 5);
    assert!(entry.get("linkTarget").is_none());

    let r = s
        .client
        .get(format!("{files}/raw?path=test.txt"))
        .send()
        .await
        .expect("raw");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "5");
    assert_eq!(
        r.headers()["content-disposition"],
        "attachment; filename=\"test.txt\""
    );
    assert_eq!(r.bytes().await.expect("body").as_ref(), b"Hello");

    let r = s
        .client
        .get(format!("{files}/raw?path=missing.txt"))
        .send()
        .await
        .expect("raw");
    assert_eq!(r.status(), 424);
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"message": "file not found or insufficient permissions"})
    );

    let r = s.client.patch(&files)
        .json(&json!({"copy": [{"path": "/proc/1/environ", "content": ""}, {"path": "ok.txt", "content": "aGk="}]}))
        .send().await.expect("patch");
    assert_eq!(r.status(), 500);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["errorCode"], "UNKNOWN");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("/proc/1/environ")
    );
    let r = s
        .client
        .get(format!("{files}/raw?path=ok.txt"))
        .send()
        .await
        .expect("raw");
    assert_eq!(r.status(), 200, "the other file is still written");

    let r = s
        .client
        .patch(&files)
        .json(&json!({"delete": ["test.txt"]}))
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 204);
    let r = s
        .client
        .get(format!("{files}/raw?path=test.txt"))
        .send()
        .await
        .expect("raw");
    assert_eq!(r.status(), 424);
}

#[tokio::test]
async fn hostile_file_requests_get_4xx() {
    let s = start_with(common::Options {
        body_limit: 64 * 1024,
        ..Default::default()
    })
    .await;
    s.environment(1, 1).await;
    let runner = s.claim(1, 0).await;
    let files = s.url(&format!("/runners/{runner}/files"));
    for (body, field) in [
        (
            r#"{"copy":[{"path":"a","content":"!!!not base64"}]}"#,
            "copy[0].content",
        ),
        (r#"{"copy":[{"path":"a\u0000b"}]}"#, "copy[0].path"),
        (r#"{"copy":[{"content":"aGk="}]}"#, "copy[0].path"),
        (r#"{"copy":{"path":"a"}}"#, "copy"),
        (r#"{"delete":[null]}"#, "delete[0]"),
        (r#"{"delete":"x"}"#, "delete"),
        ("{\"delete\":[\"a\"", "JSON"),
        ("", "empty"),
    ] {
        let r = s
            .client
            .patch(&files)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("patch");
        assert_eq!(r.status(), 400, "{body}");
        let message = r.json::<Value>().await.expect("json")["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(message.contains(field), "{body}: {message}");
    }
    let big = json!({"copy": [{"path": "a", "content": "A".repeat(100_000)}]});
    let r = s
        .client
        .patch(&files)
        .json(&big)
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 413);
    assert!(r.json::<Value>().await.expect("json")["message"].is_string());

    // Traversal stays inside the sandbox: it is a normal path for the backend.
    let r = s
        .client
        .get(format!("{files}/raw?path=../../etc/shadow"))
        .send()
        .await
        .expect("raw");
    assert_eq!(r.status(), 424);
    let r = s
        .client
        .get(format!("{files}/raw?path=%FF%FE"))
        .send()
        .await
        .expect("raw");
    assert_eq!(r.status(), 400);
    let r = s
        .client
        .get(format!("{files}/raw"))
        .send()
        .await
        .expect("raw");
    assert_eq!(r.status(), 400);
    let r = s
        .client
        .get(format!("{files}/raw?path=a%00b"))
        .send()
        .await
        .expect("raw");
    assert_eq!(r.status(), 400);
    let r = s
        .client
        .get(format!("{files}?privilegedExecution=perhaps"))
        .send()
        .await
        .expect("list");
    assert_eq!(r.status(), 400);
    let r = s
        .client
        .get(format!("{files}?recursive=perhaps"))
        .send()
        .await
        .expect("list");
    assert_eq!(
        r.status(),
        200,
        "an unparsable recursive means true, as in Poseidon"
    );
}

#[tokio::test]
async fn execute_answers_a_websocket_url_from_the_host_header() {
    let s = start().await;
    s.environment(1, 1).await;
    let runner = s.claim(1, 0).await;
    let r = s
        .client
        .post(s.url(&format!("/runners/{runner}/execute")))
        .header("Host", "poseidon.example:8443")
        .json(&json!({"command": "echo 'it''s quoted'", "environment": {"A": "b c 'd'"}}))
        .send()
        .await
        .expect("execute");
    assert_eq!(r.status(), 200);
    let url = r.json::<Value>().await.expect("json")["websocketUrl"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let prefix =
        format!("ws://poseidon.example:8443/api/v1/runners/{runner}/websocket?executionID=");
    assert!(url.starts_with(&prefix), "{url}");
    assert!(url[prefix.len()..].parse::<uuid::Uuid>().is_ok(), "{url}");

    for (body, field) in [
        (r#"{}"#, "command"),
        (r#"{"command":5}"#, "command"),
        (r#"{"command":"x","timeLimit":-1}"#, "timeLimit"),
        (r#"{"command":"x","timeLimit":"1"}"#, "timeLimit"),
        (
            r#"{"command":"x","privilegedExecution":"yes"}"#,
            "privilegedExecution",
        ),
        (r#"{"command":"x","environment":{"A":1}}"#, "environment"),
        (r#"{"command":"x","environment":[]}"#, "environment"),
        (
            r#"{"command":"x","environment":{"A=B":"c"}}"#,
            "environment",
        ),
        (r#"{"command":"x""#, "JSON"),
    ] {
        let r = s
            .client
            .post(s.url(&format!("/runners/{runner}/execute")))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("execute");
        assert_eq!(r.status(), 400, "{body}");
        let message = r.json::<Value>().await.expect("json")["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(message.contains(field), "{body}: {message}");
    }
}

#[tokio::test]
async fn execute_rejects_commands_and_environments_exec_cannot_take() {
    let s = start_with(common::Options {
        body_limit: 16 << 20,
        ..common::Options::default()
    })
    .await;
    s.environment(1, 1).await;
    let runner = s.claim(1, 0).await;
    let post = |body: Value| {
        s.client
            .post(s.url(&format!("/runners/{runner}/execute")))
            .json(&body)
            .send()
    };

    // Linux's MAX_ARG_STRLEN is 131072 bytes including the NUL.
    let r = post(json!({"command": "x".repeat(131_071)}))
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    let many: serde_json::Map<String, Value> = (0..100_000)
        .map(|i| (format!("V{i}"), Value::from("x")))
        .collect();
    let mut entries_too_large = serde_json::Map::new();
    for i in 0..10 {
        entries_too_large.insert(format!("V{i}"), Value::from("v".repeat(131_000)));
    }
    for (body, field) in [
        (json!({"command": "x".repeat(10 << 20)}), "command"),
        (json!({"command": "x".repeat(131_072)}), "command"),
        (json!({"command": "x", "environment": many}), "environment"),
        (
            json!({"command": "x", "environment": {"A": "v".repeat(131_070)}}),
            "environment",
        ),
        (
            json!({"command": "x", "environment": entries_too_large}),
            "environment",
        ),
    ] {
        let r = post(body).await.expect("post");
        assert_eq!(r.status(), 400, "{field}");
        let message = r.json::<Value>().await.expect("json")["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            message.starts_with(field) || message.contains(field),
            "{message}"
        );
        assert!(message.len() < 200, "the message stays short: {message}");
    }
    // The largest accepted entry still runs.
    let t = run(
        &s,
        &runner,
        json!({"command": "env", "environment": {"A": "v".repeat(131_069)}}),
    )
    .await;
    assert_eq!(t.last(), json!({"type": "exit", "data": 0}));
}

#[tokio::test]
async fn websocket_streams_start_output_exit_and_close_1000() {
    let s = start().await;
    s.environment(1, 1).await;
    let runner = s.claim(1, 0).await;
    let t = run(&s, &runner, json!({"command": "echo 'Hello World'"})).await;
    assert_eq!(t.messages[0], json!({"type": "start"}));
    assert_eq!(t.stdout(), "'Hello World'\r\n");
    assert_eq!(
        t.control(),
        vec![json!({"type": "start"}), json!({"type": "exit", "data": 0})]
    );
    assert_eq!(t.close_code, Some(1000));

    let t = run(&s, &runner, json!({"command": "exit 42"})).await;
    assert_eq!(t.last(), json!({"type": "exit", "data": 42}));
    let t = run(&s, &runner, json!({"command": "echo-stderr oops"})).await;
    assert_eq!(t.stderr(), "oops\n");
    assert_eq!(t.stdout(), "");
    let t = run(
        &s,
        &runner,
        json!({"command": "env", "environment": {"hello": "world with 'quotes'"}}),
    )
    .await;
    assert!(t.stdout().contains("hello=world with 'quotes'"));
    assert!(t.stdout().contains("CODEOCEAN=true"));
    let t = run(&s, &runner, json!({"command": "vanish"})).await;
    assert_eq!(
        t.last(),
        json!({"type": "error", "data": "Error executing the request"})
    );
}

#[tokio::test]
async fn websocket_text_frames_are_stdin() {
    let s = start().await;
    s.environment(1, 1).await;
    let runner = s.claim(1, 0).await;
    let url = s.execute(&runner, json!({"command": "cat"})).await;
    let mut ws = connect(&url, Some(TOKEN)).await.expect("connect");
    common::send_text(&mut ws, "Hello World!\n").await;
    let mut seen = String::new();
    while !seen.contains("Hello World!") {
        let frame = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut ws))
            .await
            .expect("in time")
            .expect("frame")
            .expect("ok");
        if let tokio_tungstenite::tungstenite::Message::Text(t) = frame {
            let v: Value = serde_json::from_str(t.as_str()).expect("json");
            if v["type"] == "stdout" {
                seen.push_str(v["data"].as_str().unwrap_or_default());
            }
        }
    }
    assert_eq!(seen, "Hello World!\n");
}

#[tokio::test]
async fn a_stdin_message_over_the_limit_ends_the_stream_with_an_error_and_close_1000() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let s = start().await;
    s.environment(1, 1).await;
    let runner = s.claim(1, 0).await;
    let url = s.execute(&runner, json!({"command": "cat"})).await;
    let ws = connect(&url, Some(TOKEN)).await.expect("connect");
    let (mut tx, mut rx) = ws.split();
    // One mebibyte is the largest message the server takes; the server stops reading this one
    // early, so it is sent on its own task while the answer is read.
    let big = "x".repeat((1 << 20) + 1);
    let sender = tokio::spawn(async move {
        let _ = tx.send(Message::Text(big.into())).await;
        tx
    });
    let mut messages = Vec::new();
    let mut close_code = None;
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(frame) = rx.next().await {
            match frame {
                Ok(Message::Text(text)) => {
                    messages.push(serde_json::from_str::<Value>(text.as_str()).expect("JSON"));
                }
                Ok(Message::Close(frame)) => {
                    close_code = frame.map(|f| u16::from(f.code));
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the stream ends: {messages:?}");
    sender.abort();
    let control: Vec<&Value> = messages
        .iter()
        .filter(|m| m["type"] != "stdout" && m["type"] != "stderr")
        .collect();
    assert_eq!(
        control.len(),
        2,
        "start and one terminal message: {control:?}"
    );
    assert_eq!(control[0], &json!({"type": "start"}));
    assert_eq!(control[1]["type"], "error", "{control:?}");
    assert!(
        control[1]["data"]
            .as_str()
            .is_some_and(|d| d.contains("1048576")),
        "{control:?}"
    );
    assert_eq!(close_code, Some(1000));
    eventually("the execution is cancelled", || {
        s.fake.running_executions() == 0
    })
    .await;
}

#[tokio::test]
async fn execution_ids_are_single_use_and_unknown_ones_404() {
    let s = start().await;
    s.environment(1, 1).await;
    let runner = s.claim(1, 0).await;
    let url = s.execute(&runner, json!({"command": "echo once"})).await;
    let mut ws = connect(&url, Some(TOKEN)).await.expect("connect");
    read_all(&mut ws, Duration::from_secs(5)).await;
    let err = connect(&url, Some(TOKEN)).await.expect_err("used id");
    assert!(err.to_string().contains("404"), "{err}");
    let bogus = format!(
        "ws://{}/api/v1/runners/{runner}/websocket?executionID=not-a-uuid",
        s.host
    );
    assert!(
        connect(&bogus, Some(TOKEN))
            .await
            .expect_err("bogus")
            .to_string()
            .contains("404")
    );
    let gone = format!(
        "ws://{}/api/v1/runners/nope/websocket?executionID={}",
        s.host,
        uuid::Uuid::new_v4()
    );
    assert!(
        connect(&gone, Some(TOKEN))
            .await
            .expect_err("gone")
            .to_string()
            .contains("410")
    );

    // A plain GET (no upgrade) is a 400 with a message, and does not use the id.
    let url = s.execute(&runner, json!({"command": "echo kept"})).await;
    let r = s
        .client
        .get(url.replace("ws://", "http://"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 400);
    let mut ws = connect(&url, Some(TOKEN)).await.expect("connect");
    assert_eq!(
        read_all(&mut ws, Duration::from_secs(5)).await.stdout(),
        "kept\r\n"
    );
}

#[tokio::test]
async fn a_start_the_backend_fails_is_an_error_message_in_the_stream_not_a_500() {
    let s = start().await;
    s.environment(1, 1).await;
    let runner = s.claim(1, 0).await;
    let url = s.execute(&runner, json!({"command": "echo hi"})).await;
    // As when the runner's process limit is exhausted (fork: EAGAIN).
    s.fake.fail_next_executes(1);
    let mut ws = connect(&url, Some(TOKEN))
        .await
        .expect("the upgrade succeeds");
    let t = read_all(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(
        t.messages,
        vec![
            json!({"type": "start"}),
            json!({"type": "error", "data": "Error executing the request"})
        ]
    );
    assert_eq!(t.close_code, Some(1000));
    // The id is used up; the runner still works.
    let err = connect(&url, Some(TOKEN)).await.expect_err("used id");
    assert!(err.to_string().contains("404"), "{err}");
    let t = run(&s, &runner, json!({"command": "echo after"})).await;
    assert_eq!(t.stdout(), "after\r\n");
}

#[tokio::test]
async fn time_limit_ends_with_timeout_and_deleting_the_runner_with_stopped_as_expected() {
    let s = start().await;
    s.environment(1, 1).await;
    let runner = s.claim(1, 0).await;
    let t = run(&s, &runner, json!({"command": "sleep 30", "timeLimit": 1})).await;
    assert_eq!(t.last(), json!({"type": "timeout"}));
    assert_eq!(t.close_code, Some(1000));

    let url = s
        .execute(&runner, json!({"command": "sleep infinity"}))
        .await;
    let mut ws = connect(&url, Some(TOKEN)).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = s
        .client
        .delete(s.url(&format!("/runners/{runner}")))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    let t = read_all(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(
        t.last(),
        json!({"type": "error", "data": "the allocation stopped as expected"})
    );
}

#[tokio::test]
async fn inactivity_timeout_ends_a_running_execution_with_timeout() {
    let s = start().await;
    s.environment(1, 1).await;
    let runner = s.claim(1, 1).await;
    let t = run(&s, &runner, json!({"command": "sleep infinity"})).await;
    assert_eq!(t.last(), json!({"type": "timeout"}));
    let r = s
        .client
        .delete(s.url(&format!("/runners/{runner}")))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 410);
}

#[tokio::test]
async fn client_close_cancels_the_execution() {
    let s = start().await;
    s.environment(1, 1).await;
    let runner = s.claim(1, 0).await;
    let url = s.execute(&runner, json!({"command": "yes"})).await;
    let mut ws = connect(&url, Some(TOKEN)).await.expect("connect");
    futures::SinkExt::close(&mut ws).await.ok();
    drop(ws);
    // The runner stays usable.
    let t = run(&s, &runner, json!({"command": "echo after"})).await;
    assert_eq!(t.stdout(), "after\r\n");
}

/// Polls `condition` every 20 ms for up to five seconds.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..250 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not within 5 s: {what}");
}

#[tokio::test]
async fn client_close_frame_is_answered_with_a_close_frame_and_cancels_the_execution() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let s = start().await;
    s.environment(1, 1).await;
    let runner = s.claim(1, 0).await;
    let url = s.execute(&runner, json!({"command": "yes"})).await;
    let mut ws = connect(&url, Some(TOKEN)).await.expect("connect");
    eventually("the execution runs", || s.fake.running_executions() == 1).await;
    futures::SinkExt::send(
        &mut ws,
        Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })),
    )
    .await
    .expect("send close");
    // RFC 6455 §5.5.1: the server answers with a close frame (the client would see 1006 if the
    // connection were just dropped).
    let t = read_all(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(t.close_code, Some(1000), "{:?}", t.control());
    eventually("the execution is cancelled", || {
        s.fake.running_executions() == 0
    })
    .await;
}

#[tokio::test]
async fn two_hundred_concurrent_executions_each_get_their_output() {
    let s = start().await;
    s.environment(1, 4).await;
    let mut runners = Vec::new();
    for _ in 0..4 {
        runners.push(s.claim(1, 0).await);
    }
    let mut tasks = Vec::new();
    for i in 0..200 {
        let url = s
            .execute(&runners[i % 4], json!({"command": format!("echo n{i}")}))
            .await;
        tasks.push(tokio::spawn(async move {
            let mut ws = connect(&url, Some(TOKEN)).await.expect("connect");
            let t = read_all(&mut ws, Duration::from_secs(30)).await;
            (i, t)
        }));
    }
    for task in tasks {
        let (i, t) = task.await.expect("task");
        assert_eq!(t.stdout(), format!("n{i}\r\n"));
        assert_eq!(t.last(), json!({"type": "exit", "data": 0}));
    }
}

#[tokio::test]
async fn health_reports_a_depleting_pool_with_503() {
    let config = ManagerConfig {
        alert_threshold: 0.6,
        ..ManagerConfig::default()
    };
    let s = start_with(common::Options {
        manager: config,
        ..Default::default()
    })
    .await;
    s.environment(3, 2).await;
    s.fake.set_create_delay(Duration::from_secs(3600));
    let r = s.client.get(s.url("/health")).send().await.expect("health");
    assert_eq!(r.status(), 204);
    let _runner = s.claim(3, 0).await;
    let r = s.client.get(s.url("/health")).send().await.expect("health");
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["errorCode"], "PREWARMING_POOL_DEPLETING");
    assert!(body["message"].as_str().unwrap_or_default().contains('3'));
}

#[tokio::test]
async fn an_environment_whose_runners_cannot_be_created_is_reported_and_not_retried() {
    let s = start().await;
    s.fake
        .refuse_creates(Some("runner networking is not available on this machine"));
    let r = s
        .client
        .put(s.url("/execution-environments/3"))
        .json(&json!({
            "image": "test-image", "prewarmingPoolSize": 2, "cpuLimit": 20,
            "memoryLimit": 100, "networkAccess": false, "exposedPorts": []
        }))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 201);
    let mut stats = Value::Null;
    for _ in 0..200 {
        stats = s
            .client
            .get(s.url("/statistics/execution-environments"))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("json");
        if stats["3"]["creationError"].is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let reason = stats["3"]["creationError"].as_str().unwrap_or_default();
    assert!(
        reason.contains("runner networking is not available"),
        "{stats}"
    );
    let attempts = s.fake.create_attempts();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.fake.create_attempts(), attempts, "no retries");

    let r = s.client.get(s.url("/health")).send().await.expect("health");
    assert_eq!(r.status(), 503, "reported even without an alert threshold");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["errorCode"], "PREWARMING_POOL_DEPLETING");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("environment 3 cannot get runners") && message.contains("networking"),
        "{body}"
    );
    let metrics = s
        .client
        .get(format!("http://{}/metrics", s.host))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("poseidon_environment_creation_failed{environment_id=\"3\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn pending_executions_are_bounded_by_bytes_per_runner() {
    let s = start().await;
    s.environment(1, 1).await;
    let runner = s.claim(1, 0).await;
    // About 0.9 MiB per request: within what exec takes, so only the per-runner bound applies.
    let environment: serde_json::Map<String, Value> = (0..8)
        .map(|i| (format!("V{i}"), Value::String("x".repeat(120_000))))
        .collect();
    let body = json!({"command": "true", "environment": environment});
    let mut statuses = Vec::new();
    let mut last = Value::Null;
    for _ in 0..6 {
        let r = s
            .client
            .post(s.url(&format!("/runners/{runner}/execute")))
            .json(&body)
            .send()
            .await
            .expect("execute");
        statuses.push(r.status().as_u16());
        last = r.json().await.unwrap_or(Value::Null);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 400, 400], "{last}");
    let message = last["message"].as_str().unwrap_or_default();
    assert!(message.contains("more than 4194304 bytes"), "{last}");
    // A small request still fits in what is left.
    let r = s
        .client
        .post(s.url(&format!("/runners/{runner}/execute")))
        .json(&json!({"command": "true"}))
        .send()
        .await
        .expect("execute");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn metrics_and_the_openapi_document_need_the_token() {
    let s = start().await;
    let plain = reqwest::Client::new();
    for url in [format!("http://{}/metrics", s.host), s.url("/openapi.json")] {
        let r = plain.get(&url).send().await.expect("send");
        assert_eq!(r.status(), 401, "{url}");
        let r = plain
            .get(&url)
            .header("Poseidon-Token", "wrong")
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 401, "{url}");
        let r = s.client.get(&url).send().await.expect("send");
        assert_eq!(r.status(), 200, "{url}");
    }
    for path in ["/health", "/version"] {
        let r = plain.get(s.url(path)).send().await.expect("send");
        assert!(r.status().is_success(), "{path} stays open");
    }
}

#[tokio::test]
async fn metrics_show_request_durations_and_runner_counts() {
    let s = start().await;
    s.environment(8, 1).await;
    let text = s
        .client
        .get(format!("http://{}/metrics", s.host))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        text.contains("poseidon_http_request_duration_seconds"),
        "{text}"
    );
    assert!(
        text.contains("route=\"/api/v1/execution-environments/{environment_id}\""),
        "{text}"
    );
    assert!(
        text.contains("poseidon_idle_runners{environment_id=\"8\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("poseidon_prewarming_pool_size{environment_id=\"8\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn openapi_document_has_every_route_and_schema_of_the_peer() {
    let s = start().await;
    let doc: Value = s
        .client
        .get(s.url("/openapi.json"))
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    for path in [
        "/health",
        "/version",
        "/statistics/execution-environments",
        "/runners",
        "/runners/{runnerId}",
        "/runners/{runnerId}/files",
        "/runners/{runnerId}/files/raw",
        "/runners/{runnerId}/execute",
        "/runners/{runnerId}/websocket",
        "/execution-environments",
        "/execution-environments/{executionEnvironmentId}",
    ] {
        assert!(doc["paths"].get(path).is_some(), "missing {path}");
    }
    for schema in [
        "ExecutionEnvironment",
        "FileHeader",
        "ClientError",
        "InternalServerError",
    ] {
        assert!(
            doc["components"]["schemas"].get(schema).is_some(),
            "missing {schema}"
        );
    }
    assert!(
        doc["components"]["securitySchemes"]
            .get("poseidonAuthToken")
            .is_some()
    );
    assert_eq!(doc["servers"][0]["url"], "/api/v1");
}

#[tokio::test]
async fn shutdown_ends_open_streams_after_the_grace_period() {
    let mut s = start().await;
    s.environment(1, 1).await;
    let runner = s.claim(1, 0).await;
    let url = s
        .execute(&runner, json!({"command": "sleep infinity"}))
        .await;
    let mut ws = connect(&url, Some(TOKEN)).await.expect("connect");
    if let Some(tx) = s.shutdown.take() {
        let _ = tx.send(());
    }
    let t = read_all(&mut ws, Duration::from_secs(15)).await;
    assert_eq!(t.close_code, Some(1001));
    let served = tokio::time::timeout(Duration::from_secs(15), &mut s.served).await;
    assert!(matches!(served, Ok(Ok(Ok(())))), "{served:?}");
    // No new connections are accepted.
    assert!(reqwest::get(s.url("/health")).await.is_err());
    // The runner is still there for the next start.
    assert!(s.fake.runner(&runner.as_str().into()).is_some());
}

#[tokio::test]
async fn slow_clients_are_cut_off_after_the_read_timeouts() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = start().await;
    // Headers never finished: the connection is closed.
    let headers = async {
        let mut stream = tokio::net::TcpStream::connect(&s.host)
            .await
            .expect("connect");
        stream
            .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(40), stream.read_to_end(&mut buf))
            .await
            .is_ok()
    };
    // A body that never arrives in full: 400 with a message, not a hang.
    let body = async {
        let mut stream = tokio::net::TcpStream::connect(&s.host)
            .await
            .expect("connect");
        let request = format!(
            "PUT /api/v1/execution-environments/1 HTTP/1.1\r\nHost: x\r\nPoseidon-Token: {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"image\":"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut buf = vec![0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(40), stream.read(&mut buf)).await;
        let n = read.ok().and_then(Result::ok).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let (closed, answer) = tokio::join!(headers, body);
    assert!(closed, "an unfinished request head is not kept open");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("in time"), "{answer}");
}

/// Sends `GET /api/v1/health` on a fresh connection; the status line, or `None` when the server
/// closed the connection without an answer.
async fn raw_health(host: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(host).await.ok()?;
    // The server may already have closed the connection; the answer (or its absence) tells.
    let _ = stream
        .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    text.lines().next().map(str::to_owned)
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once_and_served_again_below_it() {
    use tokio::io::AsyncWriteExt;
    let s = start_with(common::Options {
        max_connections: 3,
        ..common::Options::default()
    })
    .await;
    // Slow clients holding every connection with a request head they never finish.
    let mut holders = Vec::new();
    for _ in 0..3 {
        let mut stream = tokio::net::TcpStream::connect(&s.host)
            .await
            .expect("connect");
        stream
            .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        holders.push(stream);
    }
    // The server has taken all of them (each partial head is being read).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    assert_eq!(raw_health(&s.host).await, None, "over the cap: closed");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed at once, not held until a timeout"
    );
    // One slow client leaves: a new connection is served again.
    drop(holders.pop());
    let mut answer = None;
    for _ in 0..100 {
        answer = raw_health(&s.host).await;
        if answer.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(answer.as_deref(), Some("HTTP/1.1 204 No Content"));
}

#[tokio::test]
async fn undecodable_path_parameters_are_400_with_a_message() {
    let s = start().await;
    for path in [
        "/runners/%FF/files",
        "/runners/%C0%AF/execute",
        "/execution-environments/%FF",
    ] {
        let method = if path.ends_with("execute") {
            reqwest::Method::POST
        } else {
            reqwest::Method::GET
        };
        let r = s
            .client
            .request(method, s.url(path))
            .send()
            .await
            .expect("send");
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert!(
            status == 400 || (status == 404 && path.starts_with("/execution")),
            "{path}: {status}"
        );
        if status == 400 {
            assert!(body["message"].is_string(), "{path}: {body}");
        }
    }
}

#[tokio::test]
async fn the_global_runner_cap_is_a_400_naming_the_pool_size() {
    let config = ManagerConfig {
        max_runners: 3,
        ..ManagerConfig::default()
    };
    let s = start_with(common::Options {
        manager: config,
        ..Default::default()
    })
    .await;
    s.environment(1, 2).await;
    let r = s
        .client
        .put(s.url("/execution-environments/2"))
        .json(&json!({"image": "img", "prewarmingPoolSize": 2}))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 400);
    let message = r.json::<Value>().await.expect("json")["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("prewarmingPoolSize"), "{message}");
}

#[tokio::test]
async fn the_largest_accepted_timeouts_work() {
    let s = start().await;
    s.environment(1, 1).await;
    let runner = s.claim(1, u64::from(u32::MAX)).await;
    let t = run(
        &s,
        &runner,
        json!({"command": "echo big", "timeLimit": u32::MAX}),
    )
    .await;
    assert_eq!(t.stdout(), "big\r\n");
    let r = s
        .client
        .delete(s.url(&format!("/runners/{runner}")))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
}

#[tokio::test]
async fn a_claim_right_after_creating_an_environment_gets_a_runner() {
    let s = start().await;
    // Runners take a while to start, as on a slow backend.
    s.fake.set_create_delay(Duration::from_millis(400));
    let r = s
        .client
        .put(s.url("/execution-environments/12"))
        .json(&json!({
            "id": 12, "image": "test-image", "prewarmingPoolSize": 1,
            "cpuLimit": 20, "memoryLimit": 100, "networkAccess": false, "exposedPorts": []
        }))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 201);
    let r = s
        .client
        .post(s.url("/runners"))
        .json(&json!({"executionEnvironmentId": 12, "inactivityTimeout": 0}))
        .send()
        .await
        .expect("claim");
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    // An environment with nothing under way still answers at once, as Poseidon does.
    s.environment(13, 0).await;
    let r = s
        .client
        .post(s.url("/runners"))
        .json(&json!({"executionEnvironmentId": 13, "inactivityTimeout": 0}))
        .send()
        .await
        .expect("claim");
    assert_eq!(r.status(), 500);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["errorCode"], "NOMAD_OVERLOAD");
}

#[tokio::test]
async fn health_is_503_nomad_unreachable_while_the_backend_cannot_be_reached() {
    let s = start().await;
    s.fake.set_unhealthy(Some("connection refused"));
    let r = s.client.get(s.url("/health")).send().await.expect("health");
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["errorCode"], "NOMAD_UNREACHABLE");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("connection refused"),
        "{body}"
    );
    s.fake.set_unhealthy(None);
    let r = s.client.get(s.url("/health")).send().await.expect("health");
    assert_eq!(r.status(), 204);
}

#[tokio::test]
async fn statistics_show_pending_runners_and_creation_failures() {
    let s = start_with(common::Options {
        manager: ManagerConfig {
            backoff: runner_core::backoff::BackoffPolicy {
                initial: Duration::from_millis(20),
                max: Duration::from_millis(200),
            },
            ..ManagerConfig::default()
        },
        ..Default::default()
    })
    .await;
    s.fake.fail_next_creates(1_000);
    let r = s
        .client
        .put(s.url("/execution-environments/14"))
        .json(&json!({
            "id": 14, "image": "test-image", "prewarmingPoolSize": 2,
            "cpuLimit": 20, "memoryLimit": 100, "networkAccess": false, "exposedPorts": []
        }))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 201);
    let mut last = Value::Null;
    for _ in 0..100 {
        last = s
            .client
            .get(s.url("/statistics/execution-environments"))
            .send()
            .await
            .expect("statistics")
            .json()
            .await
            .expect("json");
        if last["14"]["failing"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last["14"]["failing"], true, "{last}");
    assert!(
        last["14"]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("injected creation failure")),
        "{last}"
    );
    assert_eq!(last["14"]["idleRunners"], 0);
    // Healthy again: the additions disappear and the entry has Poseidon's shape.
    s.fake.fail_next_creates(0);
    for _ in 0..200 {
        last = s
            .client
            .get(s.url("/statistics/execution-environments"))
            .send()
            .await
            .expect("statistics")
            .json()
            .await
            .expect("json");
        if last["14"]["idleRunners"] == 2 && last["14"].get("failing").is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        last["14"],
        json!({"id": 14, "prewarmingPoolSize": 2, "idleRunners": 2, "usedRunners": 0}),
        "{last}"
    );
}
