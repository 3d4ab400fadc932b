//! Memory of the `poseidon-server` process under hostile file requests (issue 9 item 2): the
//! binary runs on the real local backend and its `VmHWM`/`VmRSS` are read from `/proc`.

mod common;

use std::time::{Duration, Instant};

use common::TOKEN;
use common::process::spawn;
use serde_json::{Value, json};

const MB: u64 = 1 << 20;

/// `VmRSS` and `VmHWM` (peak) of `pid`, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .expect("field")
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the peak so the next `VmHWM` is the peak from now on (`/proc/<pid>/clear_refs`).
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("clear_refs");
}

fn deletes(n: usize) -> String {
    let mut body = String::with_capacity(n * 4 + 16);
    body.push_str("{\"delete\":[");
    for i in 0..n {
        if i > 0 {
            body.push(',');
        }
        body.push_str("\"a\"");
    }
    body.push_str("]}");
    body
}

fn copies(n: usize) -> String {
    let mut body = String::with_capacity(n * 26 + 16);
    body.push_str("{\"copy\":[");
    for i in 0..n {
        if i > 0 {
            body.push(',');
        }
        body.push_str("{\"path\":\"a\",\"content\":\"\"}");
    }
    body.push_str("]}");
    body
}

struct Measured {
    what: &'static str,
    body: u64,
    peak_growth: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_file_requests_are_refused_early_and_memory_returns_to_baseline() {
    let server = spawn(&[("POSEIDON_SERVER_TOKEN", TOKEN)]);
    let pid = server.child.id();
    let base = format!("http://{}/api/v1", server.addr);
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("Poseidon-Token", TOKEN.parse().expect("header"));
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client");
    let r = client
        .put(format!("{base}/execution-environments/5"))
        .json(
            &json!({"image": "host", "prewarmingPoolSize": 1, "cpuLimit": 20,
            "memoryLimit": 256, "networkAccess": false, "exposedPorts": []}),
        )
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 201);
    let runner = common::process::claim(&client, &base, None, 5).await;
    let files = format!("{base}/runners/{runner}/files");
    let patch = |body: String| {
        let request = client
            .patch(&files)
            .header("Content-Type", "application/json")
            .body(body);
        async move {
            let r = request.send().await.expect("patch");
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            (status, text)
        }
    };
    // Warm up: a normal request, so allocator and runtime are at their working size.
    let (status, _) = patch(copies(10)).await;
    assert_eq!(status, 204);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (baseline, _) = memory(pid);

    let mut measured = Vec::new();
    let mut answers = Vec::new();
    for (what, body) in [
        ("6 000 000 deletes", deletes(6_000_000)),
        ("1 000 000 copies", copies(1_000_000)),
    ] {
        let size = body.len() as u64;
        reset_peak(pid);
        let started = Instant::now();
        let answer = patch(body).await;
        let (_, peak) = memory(pid);
        eprintln!("{what}: {} in {:?}", answer.0, started.elapsed());
        answers.push((what, answer));
        measured.push(Measured {
            what,
            body: size,
            peak_growth: peak.saturating_sub(baseline),
        });
    }
    reset_peak(pid);
    let three = futures::future::join3(
        patch(deletes(6_000_000)),
        patch(copies(1_000_000)),
        patch(deletes(6_000_000)),
    )
    .await;
    let (_, peak) = memory(pid);
    measured.push(Measured {
        what: "three at once",
        body: (deletes(6_000_000).len() * 2 + copies(1_000_000).len()) as u64,
        peak_growth: peak.saturating_sub(baseline),
    });
    answers.extend([
        ("three at once (1)", three.0),
        ("three at once (2)", three.1),
        ("three at once (3)", three.2),
    ]);

    // Settled: memory goes back near the baseline within seconds while the server serves its
    // ordinary traffic (here a health check every 250 ms, as a load balancer would send): the
    // allocator returns freed pages when it next runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut settled = memory(pid).0;
    while Instant::now() < deadline && settled > baseline + 32 * MB {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let _ = client.get(format!("{base}/health")).send().await;
        settled = memory(pid).0;
    }
    eprintln!(
        "baseline RSS {} MB, settled RSS {} MB",
        baseline / MB,
        settled / MB
    );
    for m in &measured {
        eprintln!(
            "{}: body {} MB, peak {} MB above baseline",
            m.what,
            m.body / MB,
            m.peak_growth / MB
        );
    }

    for (what, (status, text)) in &answers {
        assert_eq!(*status, 400, "{what}: {text}");
        let body: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        let message = body["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("at most") && message.contains("entries"),
            "{what}: {text}"
        );
    }
    for m in &measured {
        assert!(
            m.peak_growth <= 3 * m.body + 32 * MB,
            "{}: peak grew {} MB for a {} MB body",
            m.what,
            m.peak_growth / MB,
            m.body / MB
        );
    }
    assert!(
        settled <= baseline + 32 * MB,
        "RSS settled at {} MB over a baseline of {} MB",
        settled / MB,
        baseline / MB
    );

    // The largest request the cap allows still works.
    let (status, text) = patch(copies(50_000)).await;
    assert_eq!(status, 204, "{text}");
}
