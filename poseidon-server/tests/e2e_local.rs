//! End to end: the `poseidon-server` binary with the real local backend (sandboxes on this
//! machine; needs root), one test per applicable row of Poseidon's e2e table
//! (poseidon-behaviour.md §7.2), over HTTP and WebSocket.
//!
//! Every test starts its own server on a fresh data directory and an ephemeral port, and removes
//! its environments before stopping it (runners deliberately survive a server stop).

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::process::{ServerProcess, spawn};
use common::{TOKEN, Transcript, connect, read_all};
use serde_json::{Value, json};

const BACKEND: Backend = Backend::Local;

include!("e2e/shared.rs");

// Below: tests of the local backend's own promises (its sandbox's process table and teardown).

/// Reads frames until a JSON message of type `kind` arrives (bounded), returning what came.
async fn read_until(ws: &mut common::Ws, kind: &str, limit: Duration) -> Vec<Value> {
    use futures::StreamExt;
    let mut seen = Vec::new();
    let found = tokio::time::timeout(limit, async {
        while let Some(Ok(frame)) = ws.next().await {
            if let tokio_tungstenite::tungstenite::Message::Text(text) = frame {
                let message: Value = serde_json::from_str(text.as_str()).expect("JSON message");
                let done = message["type"] == kind;
                seen.push(message);
                if done {
                    return true;
                }
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "no {kind:?} message: {seen:?}");
    seen
}

/// `DELETE` of the runner, returning how long it took to answer.
async fn timed_delete(client: &reqwest::Client, base: &str, runner: &str) -> Duration {
    let started = Instant::now();
    let r = client
        .delete(format!("{base}/runners/{runner}"))
        .send()
        .await
        .expect("delete");
    let took = started.elapsed();
    assert_eq!(r.status(), 204);
    took
}

/// The p99 and the maximum of `durations`.
fn p99_and_max(mut durations: Vec<Duration>) -> (Duration, Duration) {
    durations.sort();
    let p99 = durations[(durations.len() * 99).div_ceil(100).saturating_sub(1)];
    (p99, durations[durations.len() - 1])
}

/// CodeOcean deletes a runner synchronously on its event loop right after an execution ended:
/// that `DELETE` must answer at once even when the execution was just killed, by its time limit or
/// by the client closing the socket (the init may be freezing the execution at that moment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_answers_at_once_after_a_killed_execution() {
    const ROUNDS: usize = 100;
    const WORKERS: usize = 8;
    const BOUND: Duration = Duration::from_secs(1);
    let e = E2e::start(WORKERS as u32).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..WORKERS {
        let (client, base) = (e.client.clone(), e.base.clone());
        let execute = move |runner: String, body: Value| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let r = client
                    .post(format!("{base}/runners/{runner}/execute"))
                    .json(&body)
                    .send()
                    .await
                    .expect("execute");
                assert_eq!(r.status(), 200);
                let body: Value = r.json().await.expect("json");
                let url = body["websocketUrl"].as_str().expect("url").to_string();
                connect(&url, Some(TOKEN)).await.expect("connect")
            }
        };
        let (client, base) = (e.client.clone(), e.base.clone());
        tasks.push(tokio::spawn(async move {
            let mut after_timeout = Vec::new();
            let mut after_close = Vec::new();
            for round in (worker..ROUNDS).step_by(WORKERS) {
                let runner = common::process::claim(&client, &base, None, ENVIRONMENTS[0]).await;
                let body = json!({"command": "sleep 30", "timeLimit": 1});
                let mut ws = execute(runner.clone(), body).await;
                read_until(&mut ws, "timeout", Duration::from_secs(20)).await;
                after_timeout.push(timed_delete(&client, &base, &runner).await);
                drop(ws);

                let runner = common::process::claim(&client, &base, None, ENVIRONMENTS[0]).await;
                let mut ws = execute(runner.clone(), json!({"command": "sleep 30"})).await;
                read_until(&mut ws, "start", Duration::from_secs(20)).await;
                // Vary the moment so the DELETE meets the execution's kill at every stage.
                tokio::time::sleep(Duration::from_millis((round % 4 * 10) as u64)).await;
                let _ = ws.close(None).await;
                tokio::time::sleep(Duration::from_millis((round % 3) as u64)).await;
                after_close.push(timed_delete(&client, &base, &runner).await);
            }
            (after_timeout, after_close)
        }));
    }
    let (mut after_timeout, mut after_close) = (Vec::new(), Vec::new());
    for task in tasks {
        let (t, c) = task.await.expect("worker");
        after_timeout.extend(t);
        after_close.extend(c);
    }
    let (timeout_p99, timeout_max) = p99_and_max(after_timeout);
    let (close_p99, close_max) = p99_and_max(after_close);
    eprintln!(
        "DELETE after timeout: p99 {timeout_p99:?}, max {timeout_max:?}; after a closed socket: \
         p99 {close_p99:?}, max {close_max:?}; {ROUNDS}+{ROUNDS} rounds in {:?}",
        started.elapsed()
    );
    assert!(
        timeout_max < BOUND,
        "DELETE after a timeout took {timeout_max:?}"
    );
    assert!(
        close_max < BOUND,
        "DELETE after a closed socket took {close_max:?}"
    );
}

/// A fork bomb left running in the background fills the runner's process table: the next
/// execution ends with an error naming the process limit (not an OOM kill), the runner is
/// replaced (its id is gone), and the pool gets a fresh runner that works.
#[tokio::test]
async fn a_full_process_table_ends_in_a_process_limit_error_and_a_fresh_runner() {
    // Memory enough for the whole process table (512 shells near 100 MB), so that only the
    // process limit is reached.
    let e = E2e::start(0).await;
    assert_eq!(e.put_environment(0, 1, 400).await, 201);
    e.wait_idle(0, 1).await;
    let runner = e.claim(60).await;
    let t = e
        .run(
            &runner,
            json!({"command": ":(){ :|:& };:", "timeLimit": 10}),
        )
        .await;
    assert_eq!(t.last()["type"], "exit", "{t:?}");
    let mut seen = Vec::new();
    let mut gone = false;
    // The bomb's shells sleep and retry when a fork fails, so the table may take a moment to be
    // full to the last place; until it is, an execution may still run.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        let r = e
            .client
            .post(e.url(&format!("/runners/{runner}/execute")))
            .json(&json!({"command": "echo hi"}))
            .send()
            .await
            .expect("execute");
        if r.status() == 410 {
            gone = true;
            break;
        }
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.expect("json");
        let url = body["websocketUrl"].as_str().expect("url").to_string();
        let mut ws = connect(&url, Some(TOKEN)).await.expect("connect");
        seen.push(read_all(&mut ws, Duration::from_secs(30)).await.last());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen.iter().all(|m| !m.to_string().contains("OOM")),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|m| m["type"] == "error"
            && m["data"]
                .as_str()
                .is_some_and(|d| d.contains("process limit"))),
        "no process-limit error: {seen:?}"
    );
    assert!(gone, "the runner was not replaced: {seen:?}");
    e.wait_idle(0, 1).await;
    let fresh = e.claim(60).await;
    assert_eq!(e.sh(&fresh, "echo fine").await.stdout(), "fine\r\n");
}
