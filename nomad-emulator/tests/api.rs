//! Nomad's HTTP API and event stream as a client sees them (nomad.md §5.10 scenarios 1, 2, 6, 13).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn scenario_1_register_template_and_three_runners() {
    let rt = FakeRuntime::new();
    let emu = start_emulator(rt.clone()).await;
    let http = Http::new(&emu);
    let c = emu.control();
    let mut stream = EventStream::open(
        &http,
        &format!(
            "index={}&topic=Job&topic=Evaluation&topic=Allocation",
            c.index() + 1
        ),
    )
    .await
    .ok()
    .unwrap();
    match stream.next_line(WAIT).await {
        Line::Json(v) => assert_eq!(v, json!({}), "first line is an empty heartbeat"),
        other => panic!("{other:?}"),
    }
    let r = http.register(runner_job("10-a")).await;
    assert!(r["EvalID"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(r["EvalCreateIndex"], r["JobModifyIndex"]);
    let batches = stream
        .until(|b| {
            summary(b)
                .iter()
                .any(|(t, _, s)| t == "Allocation" && s == "running")
        })
        .await;
    let seq: Vec<_> = batches.iter().map(summary).collect();
    let expect: Vec<Vec<(&str, &str, &str)>> = vec![
        vec![
            ("Job", "JobRegistered", "pending"),
            ("Evaluation", "JobRegistered", "pending"),
        ],
        vec![
            ("Evaluation", "PlanResult", "pending"),
            ("Allocation", "PlanResult", "pending"),
            ("Job", "PlanResult", "running"),
        ],
        vec![("Evaluation", "EvaluationUpdated", "complete")],
        vec![("Allocation", "AllocationUpdated", "pending")],
        vec![("Allocation", "AllocationUpdated", "running")],
    ];
    let got: Vec<Vec<(&str, &str, &str)>> = seq
        .iter()
        .map(|b| {
            b.iter()
                .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
                .collect()
        })
        .collect();
    assert_eq!(got, expect);
    // Indexes increase by one per batch and every event carries its batch's index.
    for w in batches.windows(2) {
        assert_eq!(
            w[1]["Index"].as_u64().unwrap(),
            w[0]["Index"].as_u64().unwrap() + 1
        );
    }
    for b in &batches {
        for e in b["Events"].as_array().unwrap() {
            assert_eq!(e["Index"], b["Index"]);
        }
    }
    let plan_alloc = &batches[1]["Events"][1]["Payload"]["Allocation"];
    assert_eq!(plan_alloc["TaskStates"], Value::Null);
    assert_eq!(plan_alloc["Job"], Value::Null, "events carry no job");
    assert_eq!(plan_alloc["Name"], "10-a.default-group[0]");
    assert_eq!(batches[0]["Events"][1]["FilterKeys"], json!(["10-a", ""]));
    let pending = &batches[3]["Events"][0]["Payload"]["Allocation"]["TaskStates"]["default-task"];
    let types: Vec<&str> = pending["Events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["Received", "Task Setup", "Driver"]);
    // Startup duration ≥ alloc_start_delay (pending event → running event).
    let t_pending = batches[3]["Events"][0]["Payload"]["Allocation"]["ModifyTime"]
        .as_i64()
        .unwrap();
    let t_plan = batches[1]["Events"][1]["Payload"]["Allocation"]["ModifyTime"]
        .as_i64()
        .unwrap();
    let t_running = batches[4]["Events"][0]["Payload"]["Allocation"]["ModifyTime"]
        .as_i64()
        .unwrap();
    assert!(
        t_running - t_plan >= 50_000_000,
        "start took {} ns",
        t_running - t_plan
    );
    assert!(t_running > t_pending);

    http.register(runner_job("10-b")).await;
    http.register(runner_job("10-c")).await;
    http.register(runner_job("template-10")).await;
    for j in ["10-b", "10-c"] {
        wait_alloc_status(&c, j, "running").await;
    }
    let list = http.get("/v1/jobs?prefix=10-&namespace=default").await;
    assert_eq!(list.status, 200);
    assert!(list.header("X-Nomad-Index").is_some());
    assert_eq!(list.header("X-Nomad-KnownLeader").as_deref(), Some("true"));
    let jobs = list.json();
    let ids: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["ID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["10-a", "10-b", "10-c"]);
    assert!(
        jobs.as_array()
            .unwrap()
            .iter()
            .all(|j| j["Status"] == "running")
    );
    assert_eq!(
        jobs[0]["JobSummary"]["Summary"]["default-group"]["Running"],
        1
    );
    assert_eq!(http.get("/v1/jobs?prefix=nothing").await.text, "[]");
    // The runtime got one start per allocation, with Nomad's variables.
    let launches = rt.launches.lock().unwrap().clone();
    let l = launches.iter().find(|l| l.job_id == "10-a").unwrap();
    assert_eq!(l.task, "default-task");
    assert_eq!(l.image.as_deref(), Some("openhpi/docker_exec_phusion"));
    assert_eq!(l.memory_max_mb, Some(256));
    assert_eq!(l.env["NOMAD_JOB_ID"], "10-a");
    assert!(
        !l.env.contains_key("NOMAD_META_used"),
        "config-group meta does not reach the task"
    );
    assert_eq!(l.env["NOMAD_GROUP_NAME"], "default-group");
    assert_eq!(l.ports.len(), 1);
    assert_eq!(l.ports[0].to, 8080);
    assert!((20000..32000).contains(&l.ports[0].host_port));
    emu.shutdown().await;
}

#[tokio::test]
async fn scenario_2_meta_update_is_in_place_and_read_back() {
    let rt = FakeRuntime::new();
    let emu = start_emulator(rt.clone()).await;
    let http = Http::new(&emu);
    let c = emu.control();
    http.register(runner_job("11-a")).await;
    let alloc = wait_alloc_status(&c, "11-a", "running").await;
    let alloc_id = alloc["ID"].as_str().unwrap().to_owned();
    // Read-modify-write of the whole job, as Poseidon's SetRunnerMetaUsed does.
    let mut job = http.get("/v1/job/11-a?namespace=default").await.json();
    assert_eq!(job["Version"], 0);
    job["TaskGroups"][1]["Meta"] = json!({"used": "true", "timeout": "30"});
    let from = c.index() + 1;
    let r = http.register(job).await;
    let mut stream = EventStream::open(&http, &format!("index={from}&topic=*"))
        .await
        .ok()
        .unwrap();
    let batches = stream
        .until(|b| {
            summary(b)
                .iter()
                .any(|(t, ty, _)| t == "Evaluation" && ty == "EvaluationUpdated")
        })
        .await;
    assert_eq!(
        summary(&batches[0])[0],
        ("Job".into(), "JobRegistered".into(), "running".into())
    );
    assert_eq!(batches[0]["Events"][0]["Payload"]["Job"]["Version"], 1);
    let plan = &batches[1];
    let a = plan["Events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["Topic"] == "Allocation")
        .unwrap();
    assert_eq!(a["Key"], alloc_id.as_str(), "in place: the same allocation");
    assert_eq!(a["Payload"]["Allocation"]["ClientStatus"], "running");
    assert_eq!(a["Payload"]["Allocation"]["JobVersion"], 1);
    let read = http.get("/v1/job/11-a").await.json();
    assert_eq!(
        read["TaskGroups"][1]["Meta"],
        json!({"used": "true", "timeout": "30"})
    );
    assert_eq!(read["Version"], 1);
    assert_eq!(read["JobModifyIndex"], r["JobModifyIndex"]);
    // No stop or second start for an in-place update.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rt.calls_for(&alloc_id), [format!("start:{alloc_id}")]);
    assert_eq!(c.allocs("11-a").len(), 1);
    // Re-registering the same spec: no new version, only an evaluation.
    let again = http.register(read.clone()).await;
    assert_eq!(again["JobModifyIndex"], r["JobModifyIndex"]);
    assert_eq!(http.get("/v1/job/11-a").await.json()["Version"], 1);
    let last = c.events().last().cloned().unwrap();
    assert!(last.events.iter().all(|e| e.topic == "Evaluation"));
    // A change of the running group is destructive: a new allocation replaces the old one.
    let mut job = read;
    job["TaskGroups"][0]["Tasks"][0]["Config"]["image"] = json!("other");
    http.register(job).await;
    c.wait_for(WAIT, |c| {
        let a = c.allocs("11-a");
        a.len() == 2 && a[0]["ClientStatus"] == "running" && a[1]["ClientStatus"] == "complete"
    })
    .await
    .unwrap();
    let allocs = c.allocs("11-a");
    assert_eq!(allocs[0]["PreviousAllocation"], alloc_id.as_str());
    assert_eq!(allocs[1]["NextAllocation"], allocs[0]["ID"]);
    assert_eq!(
        allocs[1]["DesiredDescription"],
        "alloc is being updated due to job update"
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn scenario_6_purge_runner() {
    let rt = FakeRuntime::new();
    let emu = start_emulator(rt.clone()).await;
    let http = Http::new(&emu);
    let c = emu.control();
    http.register(runner_job("12-a")).await;
    let alloc = wait_alloc_status(&c, "12-a", "running").await;
    let id = alloc["ID"].as_str().unwrap().to_owned();
    let from = c.index() + 1;
    let d = http
        .delete("/v1/job/12-a?purge=true&namespace=default")
        .await;
    assert_eq!(d.status, 200);
    assert!(d.json()["EvalID"].as_str().is_some_and(|s| !s.is_empty()));
    let mut stream = EventStream::open(
        &http,
        &format!("index={from}&topic=Job&topic=Allocation&topic=Evaluation"),
    )
    .await
    .ok()
    .unwrap();
    let batches = stream
        .until(|b| {
            summary(b)
                .iter()
                .any(|(t, _, s)| t == "Allocation" && s == "complete")
        })
        .await;
    let first = &batches[0]["Events"];
    assert_eq!(first[0]["Type"], "JobDeregistered");
    assert_eq!(first[0]["Payload"]["Deleted"], true);
    assert_eq!(
        first[1]["Payload"]["Evaluation"]["TriggeredBy"],
        "job-deregister"
    );
    let plan = batches
        .iter()
        .find(|b| b["Events"][0]["Type"] == "PlanResult")
        .unwrap();
    let stopped = plan["Events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["Topic"] == "Allocation")
        .unwrap();
    assert_eq!(stopped["Payload"]["Allocation"]["DesiredStatus"], "stop");
    assert_eq!(
        stopped["Payload"]["Allocation"]["DesiredDescription"],
        "alloc not needed due to job update"
    );
    let done = batches.last().unwrap()["Events"][0]["Payload"]["Allocation"].clone();
    let ev: Vec<&str> = done["TaskStates"]["default-task"]["Events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Type"].as_str().unwrap())
        .collect();
    assert!(ev.ends_with(&["Killing", "Terminated", "Killed"]), "{ev:?}");
    assert!(rt.calls().contains(&format!("stop:{id}")));
    assert_eq!(http.get("/v1/job/12-a").await.status, 404);
    assert_eq!(http.get("/v1/job/12-a").await.text, "job not found");
    assert_eq!(http.get("/v1/jobs").await.text, "[]");
    // Allocations stay readable; deregistering an unknown job is fine.
    assert_eq!(http.get(&format!("/v1/allocation/{id}")).await.status, 200);
    let again = http.delete("/v1/job/12-a?purge=true").await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["EvalID"], "");
    // Without purge the job stays, stopped and dead.
    http.register(runner_job("12-b")).await;
    wait_alloc_status(&c, "12-b", "running").await;
    http.delete("/v1/job/12-b").await;
    c.wait_for(WAIT, |c| {
        c.job("12-b")
            .is_some_and(|j| j["Status"] == "dead" && j["Stop"] == true)
    })
    .await
    .unwrap();
    emu.shutdown().await;
}

#[tokio::test]
async fn scenario_13_replay_from_buffer_and_resume_inclusive() {
    let emu = start_emulator(FakeRuntime::new()).await;
    let http = Http::new(&emu);
    let c = emu.control();
    http.register(runner_job("13-a")).await;
    wait_alloc_status(&c, "13-a", "running").await;
    let history = c.events();
    let mut s = EventStream::open(&http, "index=0&topic=*&namespace=*")
        .await
        .ok()
        .unwrap();
    let first = s.next_batch().await;
    assert_eq!(
        first["Index"].as_u64(),
        Some(history[0].index),
        "index=0 replays the oldest batch"
    );
    assert_eq!(summary(&first)[0].0, "Node");
    let mid = history[2].index;
    let mut s = EventStream::open(&http, &format!("index={mid}&topic=Allocation:13-a"))
        .await
        .ok()
        .unwrap();
    let b = s.next_batch().await;
    assert!(b["Index"].as_u64().unwrap() >= mid);
    assert!(
        b["Events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["Topic"] == "Allocation")
    );
    // Replayed allocation events carry their old ModifyTime (Poseidon's filter relies on it).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    assert!(
        b["Events"][0]["Payload"]["Allocation"]["ModifyTime"]
            .as_i64()
            .unwrap()
            < now
    );
    // Heartbeats come every heartbeat_interval (200 ms in tests).
    let mut s = EventStream::open(&http, &format!("index={}&topic=Job", c.index() + 1))
        .await
        .ok()
        .unwrap();
    for _ in 0..3 {
        match s.next_line(Duration::from_secs(5)).await {
            Line::Json(v) => assert_eq!(v, json!({})),
            other => panic!("{other:?}"),
        }
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn errors_tokens_and_conventions() {
    let mut cfg = nomad_emulator::EmulatorConfig::for_tests();
    cfg.token = Some("secret".into());
    cfg.namespaces.insert("other".into());
    let emu = start_with(cfg, FakeRuntime::new()).await;
    let mut http = Http::new(&emu);
    let denied = http.get("/v1/jobs").await;
    assert_eq!(
        (denied.status, denied.text.as_str()),
        (403, "Permission denied")
    );
    assert_eq!(
        EventStream::open(&http, "topic=Job")
            .await
            .err()
            .unwrap()
            .status,
        403
    );
    http.token = Some("secret".into());
    assert_eq!(http.get("/v1/jobs").await.status, 200);
    // Register validation and namespaces.
    let a = http.put("/v1/jobs", json!({"Job": null})).await;
    assert_eq!((a.status, a.text.as_str()), (400, "Job must be specified"));
    let a = http.put("/v1/jobs", json!({"Job": {"Name": "x"}})).await;
    assert_eq!(
        (a.status, a.text.as_str()),
        (400, "Job ID hasn't been provided")
    );
    let mut j = runner_job("e-1");
    j["Namespace"] = json!("nope");
    let a = http.put("/v1/jobs", json!({"Job": j})).await;
    assert_eq!(
        (a.status, a.text.as_str()),
        (500, "job \"e-1\" is in nonexistent namespace \"nope\"")
    );
    let a = http
        .put(
            "/v1/jobs?namespace=other",
            json!({"Job": runner_job("e-1")}),
        )
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        http.get("/v1/job/e-1?namespace=other").await.json()["Namespace"],
        "other"
    );
    assert_eq!(http.get("/v1/job/e-1").await.status, 404);
    assert_eq!(
        http.get("/v1/jobs?namespace=*")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let ns = http.get("/v1/namespaces").await.json();
    assert_eq!(ns.as_array().unwrap().len(), 2);
    // Go-client style body: nulls everywhere, lower-case keys, unknown fields.
    let go_body = json!({"Job": {"id": "e-2", "Type": "batch", "Region": null, "Priority": null, "Constraints": null,
        "SomethingNew": {"x": 1},
        "TaskGroups": [{"Name": "g", "Count": null, "Tasks": [{"Name": "t", "Driver": "exec", "Resources": null, "Config": {"Command": "true"}}]}]},
        "Submission": null, "EnforceIndex": null});
    let a = http.put("/v1/jobs", go_body).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let read = http.get("/v1/job/e-2").await.json();
    assert_eq!(read["Priority"], 50);
    assert_eq!(
        read["SomethingNew"],
        json!({"x": 1}),
        "unknown fields are kept"
    );
    assert_eq!(read["TaskGroups"][0]["Count"], 1);
    assert_eq!(
        read["TaskGroups"][0]["Tasks"][0]["Config"]["Command"], "true",
        "user maps keep their keys"
    );
    assert_eq!(read["Constraints"], Value::Null);
    // EnforceIndex.
    let a = http
        .put(
            "/v1/jobs",
            json!({"Job": runner_job("e-2"), "EnforceIndex": true, "JobModifyIndex": 1}),
        )
        .await;
    assert_eq!(a.status, 500);
    assert!(
        a.text.starts_with(
            "Enforcing job modify index 1: job exists with conflicting job modify index: "
        ),
        "{}",
        a.text
    );
    let jmi = read["JobModifyIndex"].as_u64().unwrap();
    let a = http
        .put(
            "/v1/jobs",
            json!({"Job": runner_job("e-2"), "EnforceIndex": true, "JobModifyIndex": jmi}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    // POST works as well as PUT.
    assert_eq!(
        http.send("POST", "/v1/jobs", Some(json!({"Job": runner_job("e-3")})))
            .await
            .unwrap()
            .status,
        200
    );
    // Unknown things.
    assert_eq!(
        http.get("/v1/allocation/nope").await.text,
        "alloc not found"
    );
    assert_eq!(http.get("/v1/evaluation/nope").await.text, "eval not found");
    assert_eq!(http.get("/v1/job/nope/allocations").await.text, "[]");
    let unknown = http.get("/v1/whatever").await;
    assert_eq!((unknown.status, unknown.text.as_str()), (404, ""));
    assert_eq!(http.get("/v1/jobs/parse").await.status, 501);
    assert_eq!(
        http.send("PATCH", "/v1/jobs", None).await.unwrap().text,
        "Invalid method"
    );
    // Blocking-query parameters.
    let a = http.get("/v1/jobs?index=abc").await;
    assert_eq!((a.status, a.text.as_str()), (400, "Invalid index"));
    let a = http.get("/v1/jobs?index=1&wait=5").await;
    assert_eq!((a.status, a.text.as_str()), (400, "Invalid wait time"));
    assert_eq!(
        EventStream::open(&http, "topic=Job:a:b")
            .await
            .err()
            .unwrap()
            .status,
        400
    );
    assert_eq!(
        EventStream::open(&http, "index=x")
            .await
            .err()
            .unwrap()
            .status,
        400
    );
    assert_eq!(
        http.get("/v1/status/leader").await.json(),
        json!("127.0.0.1:4647")
    );
    let node_id = emu.control().nodes()[0]["ID"].as_str().unwrap().to_owned();
    let node = http.get(&format!("/v1/node/{node_id}")).await.json();
    assert_eq!(node["HTTPAddr"], emu.address().to_string());
    assert_eq!(node["Status"], "ready");
    emu.shutdown().await;
}

#[tokio::test]
async fn blocking_queries_wait_for_a_change() {
    let emu = start_emulator(FakeRuntime::new()).await;
    let http = Http::new(&emu);
    let first = http.get("/v1/jobs").await;
    let index: u64 = first.header("X-Nomad-Index").unwrap().parse().unwrap();
    // Times out and answers the current data.
    let t = std::time::Instant::now();
    let a = http
        .get(&format!("/v1/jobs?index={index}&wait=300ms"))
        .await;
    assert!(t.elapsed() >= Duration::from_millis(250));
    assert_eq!(a.header("X-Nomad-Index").unwrap(), index.to_string());
    // Wakes on a change.
    let http2 = http.clone();
    let waiter =
        tokio::spawn(async move { http2.get(&format!("/v1/jobs?index={index}&wait=20s")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    http.register(runner_job("b-1")).await;
    let a = tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap();
    assert!(a.header("X-Nomad-Index").unwrap().parse::<u64>().unwrap() > index);
    assert_eq!(a.json()[0]["ID"], "b-1");
    emu.shutdown().await;
}

#[tokio::test]
async fn exec_route_checks_after_the_upgrade() {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let rt = FakeRuntime::new();
    let mut cfg = nomad_emulator::EmulatorConfig::for_tests();
    cfg.token = Some("tok".into());
    let emu = start_with(cfg, rt.clone()).await;
    let mut http = Http::new(&emu);
    http.token = Some("tok".into());
    let c = emu.control();
    c.hold_pending("x-");
    http.register(runner_job("x-1")).await;
    c.wait_for(WAIT, |c| {
        c.allocs("x-1")
            .first()
            .is_some_and(|a| !a["TaskStates"].is_null())
    })
    .await
    .unwrap();
    let alloc = c.allocs("x-1")[0]["ID"].as_str().unwrap().to_owned();
    let ws_base = emu.base_url().replace("http://", "ws://");
    let close_of = |url: String, token: Option<&'static str>, first: Option<String>| async move {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = url.into_client_request().unwrap();
        if let Some(t) = token {
            req.headers_mut()
                .insert("X-Nomad-Token", t.parse().unwrap());
        }
        let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(resp.status(), 101);
        if let Some(f) = first {
            futures::SinkExt::send(&mut ws, Message::text(f))
                .await
                .unwrap();
        }
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(f)))) => (u16::from(f.code), f.reason.to_string()),
            other => panic!("{other:?}"),
        }
    };
    let cmd = "%5B%22ls%22%5D";
    let url = |a: &str, q: &str| format!("{ws_base}/v1/client/allocation/{a}/exec?{q}");
    assert_eq!(
        close_of(
            url(&alloc, &format!("command={cmd}&task=default-task")),
            None,
            None
        )
        .await,
        (1008, "Permission denied".into())
    );
    assert_eq!(
        close_of(
            url("nope", &format!("command={cmd}&task=default-task")),
            Some("tok"),
            None
        )
        .await,
        (1008, "Unknown allocation \"nope\"".into())
    );
    assert_eq!(
        close_of(
            url(&alloc, "command=%5Bbad&task=default-task"),
            Some("tok"),
            None
        )
        .await
        .0,
        1011
    );
    let (code, reason) = close_of(
        url(
            &alloc,
            &format!("command={cmd}&task=default-task&tty=maybe"),
        ),
        Some("tok"),
        None,
    )
    .await;
    assert_eq!(code, 1011);
    assert!(reason.starts_with("tty value is not a boolean"), "{reason}");
    assert_eq!(
        close_of(url(&alloc, &format!("command={cmd}")), Some("tok"), None).await,
        (1008, "must provide task name".into())
    );
    assert_eq!(
        close_of(
            url(&alloc, &format!("command={cmd}&task=x")),
            Some("tok"),
            None
        )
        .await,
        (1008, "unknown task name \"x\"".into())
    );
    assert_eq!(
        close_of(
            url(&alloc, &format!("command={cmd}&task=default-task")),
            Some("tok"),
            None
        )
        .await,
        (1008, "task \"default-task\" not started yet.".into())
    );
    c.release_pending("x-");
    wait_alloc_status(&c, "x-1", "running").await;
    assert_eq!(
        close_of(url(&alloc, "task=default-task"), Some("tok"), None).await,
        (1008, "command is not present".into())
    );
    // A valid session reaches the runtime, with the exec fault armed for it.
    c.exec_drop_after_frames(None, nomad_emulator::Times::ONCE, 2);
    let hs = r#"{"version":1,"auth_token":"tok"}"#.to_owned();
    assert_eq!(
        close_of(
            url(
                &alloc,
                &format!("command={cmd}&task=default-task&tty=true&ws_handshake=true")
            ),
            None,
            Some(hs)
        )
        .await,
        (1000, "fake runtime".into())
    );
    let s = rt.sessions.lock().unwrap()[0].clone();
    assert_eq!(s.argv, ["ls"]);
    assert!(s.tty);
    assert_eq!(
        s.fault,
        Some(nomad_emulator::runtime::ExecFault::DropAfterFrames(2))
    );
    // Pending restart → not running; stopped → exec not possible.
    c.set_capacity(c.nodes()[0]["ID"].as_str().unwrap(), 100000, 100000);
    http.delete("/v1/job/x-1?purge=true").await;
    wait_alloc_status(&c, "x-1", "complete").await;
    assert_eq!(
        close_of(
            url(&alloc, &format!("command={cmd}&task=default-task")),
            Some("tok"),
            None
        )
        .await,
        (
            1008,
            format!("exec not possible, client status of allocation {alloc} is complete")
        )
    );
    emu.shutdown().await;
}
