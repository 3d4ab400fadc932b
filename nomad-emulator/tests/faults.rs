//! Injected faults as a client sees them (nomad.md §5.9, §5.10 scenarios 7–12) and restarts.

mod common;

use std::time::Duration;

use common::*;
use nomad_emulator::runtime::RuntimeEvent;
use nomad_emulator::{EmulatorConfig, Match, NodeSpec, Times};
use serde_json::json;

#[tokio::test]
async fn scenario_7_oom_restarts_in_place() {
    let rt = FakeRuntime::new();
    let emu = start_emulator(rt.clone()).await;
    let http = Http::new(&emu);
    let c = emu.control();
    http.register(runner_job("7-a")).await;
    let id = wait_alloc_status(&c, "7-a", "running").await["ID"]
        .as_str()
        .unwrap()
        .to_owned();
    let from = c.index() + 1;
    assert!(c.oom_kill(&id));
    let mut s = EventStream::open(&http, &format!("index={from}&topic=Allocation"))
        .await
        .ok()
        .unwrap();
    let b = s.next_batch().await;
    let a = &b["Events"][0]["Payload"]["Allocation"];
    assert_eq!(
        (a["ClientStatus"].as_str(), a["DesiredStatus"].as_str()),
        (Some("pending"), Some("run"))
    );
    let ts = &a["TaskStates"]["default-task"];
    assert_eq!(ts["Restarts"], 1);
    let evs = ts["Events"].as_array().unwrap();
    let term = &evs[evs.len() - 2];
    assert_eq!(term["Type"], "Terminated");
    assert_eq!(term["Details"]["oom_killed"], "true");
    assert_eq!(
        evs[evs.len() - 1]["Details"]["restart_reason"],
        "Restart within policy"
    );
    let b = s.next_batch().await;
    assert_eq!(
        b["Events"][0]["Payload"]["Allocation"]["ClientStatus"],
        "running"
    );
    assert_eq!(
        b["Events"][0]["Payload"]["Allocation"]["PreviousAllocation"],
        ""
    );
    assert!(
        rt.calls().contains(&format!("end:{id}:Exit(128)")),
        "{:?}",
        rt.calls()
    );
    assert_eq!(c.allocs("7-a").len(), 1);
    // A task death the runtime reports is handled the same way.
    rt.emit(RuntimeEvent::TaskDied {
        alloc_id: id.clone(),
        exit_code: 137,
        oom_killed: true,
    });
    c.wait_for(WAIT, |c| {
        c.allocs("7-a")[0]["TaskStates"]["default-task"]["Restarts"] == 2
    })
    .await
    .unwrap();
    emu.shutdown().await;
}

#[tokio::test]
async fn scenario_8_crash_beyond_the_restart_policy_reschedules() {
    let rt = FakeRuntime::new();
    let emu = start_emulator(rt.clone()).await;
    let http = Http::new(&emu);
    let c = emu.control();
    http.register(runner_job("8-a")).await;
    let id = wait_alloc_status(&c, "8-a", "running").await["ID"]
        .as_str()
        .unwrap()
        .to_owned();
    for i in 1..=3 {
        assert!(c.crash_task(&id, 1));
        c.wait_for(WAIT, |c| {
            let a = &c.allocs("8-a")[0];
            a["ClientStatus"] == "running" && a["TaskStates"]["default-task"]["Restarts"] == i
        })
        .await
        .unwrap();
    }
    assert!(c.crash_task(&id, 1));
    c.wait_for(WAIT, |c| {
        c.allocs("8-a").len() == 2 && c.allocs("8-a")[0]["ClientStatus"] == "running"
    })
    .await
    .unwrap();
    let allocs = c.allocs("8-a");
    let (new, old) = (&allocs[0], &allocs[1]);
    assert_eq!(new["PreviousAllocation"], id.as_str());
    assert_eq!(
        new["RescheduleTracker"]["Events"][0]["PrevAllocID"],
        id.as_str()
    );
    assert_eq!(old["ClientStatus"], "failed");
    assert_eq!(old["DesiredStatus"], "stop");
    assert_eq!(
        old["DesiredDescription"],
        "alloc was rescheduled because it failed"
    );
    assert_eq!(old["NextAllocation"], new["ID"]);
    assert_eq!(old["TaskStates"]["default-task"]["Failed"], true);
    let evals = c.evals("8-a");
    assert!(
        evals
            .iter()
            .any(|e| e["TriggeredBy"] == "alloc-failure" && !e["WaitUntil"].is_null())
    );
    // The failure batch carried the follow-up evaluation.
    let failed_batch = c
        .events()
        .into_iter()
        .find(|b| {
            b.events
                .iter()
                .any(|e| e.payload["Allocation"]["ClientStatus"] == "failed")
        })
        .unwrap();
    assert!(failed_batch.events.iter().any(|e| e.topic == "Evaluation"));
    assert_eq!(
        failed_batch.events[0].payload["Allocation"]["NextAllocation"],
        ""
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn driver_failure_uses_the_restart_policy() {
    let rt = FakeRuntime::new();
    let emu = start_emulator(rt.clone()).await;
    let http = Http::new(&emu);
    let c = emu.control();
    c.fail_start("f-", "Failed to pull `img`: not found", Times(1));
    *rt.fail_next_starts.lock().unwrap() = 0;
    http.register(runner_job("f-1")).await;
    let a = wait_alloc_status(&c, "f-1", "running").await;
    let evs = a["TaskStates"]["default-task"]["Events"]
        .as_array()
        .unwrap()
        .clone();
    let df = evs.iter().find(|e| e["Type"] == "Driver Failure").unwrap();
    assert_eq!(df["DriverError"], "Failed to pull `img`: not found");
    assert_eq!(a["TaskStates"]["default-task"]["Restarts"], 1);
    // A runtime start error is a driver failure too.
    *rt.fail_next_starts.lock().unwrap() = 1;
    http.register(runner_job("f-2")).await;
    let a = wait_alloc_status(&c, "f-2", "running").await;
    assert!(
        a["TaskStates"]["default-task"]["Events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["DriverError"] == "image not found")
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn scenario_9_lost_node_with_two_nodes_and_with_one() {
    let rt = FakeRuntime::new();
    let emu = start_emulator(rt.clone()).await;
    let http = Http::new(&emu);
    let c = emu.control();
    let n1 = c.nodes()[0]["ID"].as_str().unwrap().to_owned();
    let n2 = c.add_node(NodeSpec::named("emu-node-2"));
    http.register(runner_job("9-a")).await;
    let old = wait_alloc_status(&c, "9-a", "running").await;
    let old_id = old["ID"].as_str().unwrap().to_owned();
    assert_eq!(old["NodeID"], n1.as_str());
    assert!(c.lose_node(&n1));
    c.wait_for(WAIT, |c| {
        c.allocs("9-a").len() == 2 && c.allocs("9-a")[0]["ClientStatus"] == "running"
    })
    .await
    .unwrap();
    let allocs = c.allocs("9-a");
    assert_eq!(allocs[0]["NodeID"], n2.as_str());
    assert_eq!(allocs[0]["PreviousAllocation"], old_id.as_str());
    assert_eq!(allocs[1]["ClientStatus"], "lost");
    assert_eq!(
        allocs[1]["DesiredDescription"],
        "alloc is lost since its node is down"
    );
    assert_eq!(allocs[1]["NextAllocation"], allocs[0]["ID"]);
    assert!(rt.calls().contains(&format!("end:{old_id}:Reset")));
    assert_eq!(
        http.get(&format!("/v1/node/{n1}")).await.json()["Status"],
        "down"
    );
    assert!(
        c.events()
            .iter()
            .any(|b| b.events.iter().any(|e| e.event_type == "NodeStreamEvent"))
    );
    // With no node left: lost, no replacement, a blocked evaluation; a new node places it.
    let cur = allocs[0]["ID"].as_str().unwrap().to_owned();
    assert!(c.lose_node(&n2));
    c.wait_for(WAIT, |c| {
        c.evals("9-a").iter().any(|e| e["Status"] == "blocked")
    })
    .await
    .unwrap();
    let evals = c.evals("9-a");
    let failed = evals
        .iter()
        .find(|e| !e["FailedTGAllocs"].is_null())
        .unwrap();
    assert_eq!(failed["Status"], "complete");
    assert!(failed["FailedTGAllocs"]["default-group"].is_object());
    assert!(
        failed["BlockedEval"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    let lost = c
        .allocs("9-a")
        .into_iter()
        .find(|a| a["ID"] == cur.as_str())
        .unwrap();
    assert_eq!(
        (
            lost["ClientStatus"].as_str(),
            lost["NextAllocation"].as_str()
        ),
        (Some("lost"), Some(""))
    );
    assert!(c.restore_node(&n1));
    c.wait_for(WAIT, |c| {
        c.allocs("9-a")
            .iter()
            .filter(|a| a["ClientStatus"] == "running")
            .count()
            == 1
    })
    .await
    .unwrap();
    emu.shutdown().await;
}

#[tokio::test]
async fn scenario_10_placement_failure_and_capacity() {
    let emu = start_emulator(FakeRuntime::new()).await;
    let http = Http::new(&emu);
    let c = emu.control();
    let node = c.nodes()[0]["ID"].as_str().unwrap().to_owned();
    assert!(c.set_capacity(&node, 0, 0));
    let r = http.register(runner_job("10-x")).await;
    let eval_id = r["EvalID"].as_str().unwrap().to_owned();
    c.wait_for(WAIT, |c| {
        c.evals("10-x")
            .iter()
            .any(|e| e["ID"] == eval_id.as_str() && e["Status"] == "complete")
    })
    .await
    .unwrap();
    let e = http.get(&format!("/v1/evaluation/{eval_id}")).await.json();
    assert_eq!(
        e["FailedTGAllocs"]["default-group"]["DimensionExhausted"]["memory"],
        1
    );
    assert_eq!(e["QueuedAllocations"]["default-group"], 1);
    let blocked = e["BlockedEval"].as_str().unwrap().to_owned();
    assert_eq!(
        http.get(&format!("/v1/evaluation/{blocked}")).await.json()["Status"],
        "blocked"
    );
    assert_eq!(http.get("/v1/job/10-x").await.json()["Status"], "pending");
    assert_eq!(http.get("/v1/job/10-x/allocations").await.text, "[]");
    assert_eq!(
        http.get("/v1/jobs").await.json()[0]["JobSummary"]["Summary"]["default-group"]["Queued"],
        1
    );
    // Capacity comes back: the blocked evaluation places the allocation.
    c.set_capacity(&node, 1000, 1000);
    wait_alloc_status(&c, "10-x", "running").await;
    assert_eq!(
        http.get(&format!("/v1/evaluation/{blocked}")).await.json()["Status"],
        "complete"
    );
    // Capacity is accounted: 1000 MB holds 20 × 50 MB; the 21st job is blocked.
    for i in 0..20 {
        http.register(runner_job(&format!("cap-{i:02}"))).await;
    }
    c.wait_for(WAIT, |c| {
        c.evals("cap-19").iter().any(|e| e["Status"] == "complete")
    })
    .await
    .unwrap();
    let placed = (0..20)
        .filter(|i| !c.allocs(&format!("cap-{i:02}")).is_empty())
        .count();
    assert_eq!(placed, 19, "10-x holds 50 MB of the 1000");
    // Purging one frees room for the blocked one.
    http.delete("/v1/job/cap-00?purge=true").await;
    let blocked_job = (1..20)
        .map(|i| format!("cap-{i:02}"))
        .find(|j| c.allocs(j).is_empty());
    if let Some(j) = blocked_job {
        wait_alloc_status(&c, &j, "running").await;
    }
    // Dynamic ports are unique on the node.
    let ports: std::collections::BTreeSet<u64> = (0..20)
        .flat_map(|i| c.allocs(&format!("cap-{i:02}")))
        .filter(|a| a["ClientStatus"] == "running")
        .map(|a| {
            a["AllocatedResources"]["Shared"]["Ports"][0]["Value"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(ports.len(), 19);
    emu.shutdown().await;
}

#[tokio::test]
async fn hold_and_release_pending() {
    let emu = start_emulator(FakeRuntime::new()).await;
    let http = Http::new(&emu);
    let c = emu.control();
    c.hold_pending("h-");
    http.register(runner_job("h-1")).await;
    c.wait_for(WAIT, |c| {
        c.allocs("h-1")
            .first()
            .is_some_and(|a| !a["TaskStates"].is_null())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.allocs("h-1")[0]["ClientStatus"], "pending");
    c.release_pending("h-");
    wait_alloc_status(&c, "h-1", "running").await;
    emu.shutdown().await;
}

#[tokio::test]
async fn scenario_12_http_faults() {
    let emu = start_emulator(FakeRuntime::new()).await;
    let http = Http::new(&emu);
    let c = emu.control();
    c.fail_requests(
        Match::path("/v1/jobs").method("PUT"),
        Times(2),
        500,
        "rpc error: No cluster leader",
    );
    for _ in 0..2 {
        let a = http
            .put("/v1/jobs", json!({"Job": runner_job("12-a")}))
            .await;
        assert_eq!(
            (a.status, a.text.as_str()),
            (500, "rpc error: No cluster leader")
        );
    }
    assert_eq!(
        http.put("/v1/jobs", json!({"Job": runner_job("12-a")}))
            .await
            .status,
        200
    );
    assert_eq!(
        http.get("/v1/jobs").await.status,
        200,
        "GET was not matched"
    );
    let faulted = c.requests().iter().filter(|r| r.fault.is_some()).count();
    assert_eq!(faulted, 2);
    // A slow answer does not block others.
    c.delay_requests(
        Match::path("/v1/job/*/allocations"),
        Times(1),
        Duration::from_secs(3),
    );
    let h2 = http.clone();
    let slow = tokio::spawn(async move {
        let t = std::time::Instant::now();
        let a = h2.get("/v1/job/12-a/allocations").await;
        (a.status, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = std::time::Instant::now();
    assert_eq!(http.get("/v1/job/12-a/allocations").await.status, 200);
    assert!(t.elapsed() < Duration::from_secs(2));
    let (status, took) = slow.await.unwrap();
    assert_eq!(status, 200);
    assert!(took >= Duration::from_millis(2900));
    // A dropped connection: no answer at all.
    c.drop_connection(Match::path("/v1/allocation/*"), Times(1));
    assert!(http.send("GET", "/v1/allocation/x", None).await.is_err());
    assert_eq!(http.get("/v1/allocation/x").await.status, 404);
    // Rejected streams.
    c.reject_event_streams(Times(1), 500);
    assert_eq!(
        EventStream::open(&http, "topic=Job")
            .await
            .err()
            .unwrap()
            .status,
        500
    );
    assert!(EventStream::open(&http, "topic=Job").await.is_ok());
    // The same over the HTTP control API.
    let a = http
        .send("POST", "/emulator/v1/faults/requests", Some(json!({"method": "GET", "path": "/v1/nodes", "status": 502, "message": "bad gateway"})))
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(http.get("/v1/nodes").await.status, 502);
    assert_eq!(http.get("/v1/nodes").await.status, 200);
    let recorded = http.get("/emulator/v1/requests").await.json();
    assert!(
        recorded
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["path"] == "/v1/nodes" && !r["fault"].is_null())
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn scenario_11_stream_drop_stall_and_truncation() {
    let emu = start_emulator(FakeRuntime::new()).await;
    let http = Http::new(&emu);
    let c = emu.control();
    let mut s = EventStream::open(&http, "topic=Job").await.ok().unwrap();
    assert!(matches!(s.next_line(WAIT).await, Line::Json(_)));
    c.drop_event_streams();
    loop {
        match s.next_line(WAIT).await {
            Line::Json(_) => continue,
            Line::Broken(_) | Line::Eof => break,
            Line::Timeout => panic!("stream not dropped"),
        }
    }
    // Stall: no heartbeat for several intervals, then it resumes.
    let mut s = EventStream::open(&http, "topic=Job").await.ok().unwrap();
    assert!(matches!(s.next_line(WAIT).await, Line::Json(_)));
    c.stall_event_streams(true);
    assert!(
        matches!(
            s.next_line(Duration::from_millis(1000)).await,
            Line::Timeout
        ),
        "heartbeats stop while stalled"
    );
    c.stall_event_streams(false);
    assert!(matches!(s.next_line(WAIT).await, Line::Json(_)));
    // Resume after a gap: the first batch's Index is beyond the one asked for.
    http.register(runner_job("11-a")).await;
    wait_alloc_status(&c, "11-a", "running").await;
    let last_seen = c.index();
    http.register(runner_job("11-b")).await;
    wait_alloc_status(&c, "11-b", "running").await;
    c.truncate_event_buffer();
    http.register(runner_job("11-c")).await;
    let mut s = EventStream::open(&http, &format!("index={}&topic=*", last_seen + 1))
        .await
        .ok()
        .unwrap();
    let b = s.next_batch().await;
    assert!(
        b["Index"].as_u64().unwrap() > last_seen + 1,
        "gap visible: {} > {}",
        b["Index"],
        last_seen + 1
    );
    // Restart: streams end, the index goes on, the API is briefly unavailable.
    let idx = c.index();
    c.restart_server(Duration::from_millis(300));
    loop {
        match s.next_line(WAIT).await {
            Line::Json(_) => continue,
            Line::Broken(_) | Line::Eof => break,
            Line::Timeout => panic!("stream survived the restart"),
        }
    }
    assert_eq!(http.get("/v1/jobs").await.status, 503);
    c.wait_for(WAIT, |_| true).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(http.get("/v1/jobs").await.status, 200);
    assert!(c.index() >= idx);
    emu.shutdown().await;
}

#[tokio::test]
async fn slow_subscriber_is_dropped() {
    let mut cfg = EmulatorConfig::for_tests();
    cfg.subscriber_buffer = 2;
    let emu = start_with(cfg, FakeRuntime::new()).await;
    let http = Http::new(&emu);
    let c = emu.control();
    let mut s = EventStream::open(&http, "topic=*").await.ok().unwrap();
    c.stall_event_streams(true);
    for i in 0..5 {
        http.register(runner_job(&format!("s-{i}"))).await;
    }
    c.stall_event_streams(false);
    let mut ended = false;
    for _ in 0..100 {
        match s.next_line(WAIT).await {
            Line::Json(_) => continue,
            Line::Broken(_) | Line::Eof => {
                ended = true;
                break;
            }
            Line::Timeout => break,
        }
    }
    assert!(ended, "an overflowing subscriber's stream ends");
    emu.shutdown().await;
}

#[tokio::test]
async fn restart_with_data_dir_reloads_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = EmulatorConfig::for_tests();
    cfg.data_dir = Some(dir.path().to_owned());
    let rt = FakeRuntime::new();
    let emu = start_with(cfg.clone(), rt.clone()).await;
    let http = Http::new(&emu);
    let c = emu.control();
    http.register(runner_job("p-keep")).await;
    http.register(runner_job("p-lose")).await;
    let keep = wait_alloc_status(&c, "p-keep", "running").await["ID"]
        .as_str()
        .unwrap()
        .to_owned();
    let lose = wait_alloc_status(&c, "p-lose", "running").await["ID"]
        .as_str()
        .unwrap()
        .to_owned();
    let index = c.index();
    let node = c.nodes()[0]["ID"].clone();
    emu.shutdown().await;

    let rt2 = FakeRuntime::new();
    rt2.surviving.lock().unwrap().push(keep.clone());
    let emu2 = start_with(cfg, rt2.clone()).await;
    let http2 = Http::new(&emu2);
    let c2 = emu2.control();
    assert!(c2.index() >= index, "the raft index carries on");
    assert_eq!(c2.nodes()[0]["ID"], node);
    let jobs = http2.get("/v1/jobs").await.json();
    assert_eq!(jobs.as_array().unwrap().len(), 2);
    assert_eq!(
        http2.get(&format!("/v1/allocation/{keep}")).await.json()["ClientStatus"],
        "running"
    );
    assert!(
        rt2.calls().contains(&format!("start:{keep}")),
        "surviving sandboxes are re-attached"
    );
    // The allocation whose sandbox is gone failed and is rescheduled per its policy.
    c2.wait_for(WAIT, |c| {
        c.allocs("p-lose").len() == 2 && c.allocs("p-lose")[0]["ClientStatus"] == "running"
    })
    .await
    .unwrap();
    let allocs = c2.allocs("p-lose");
    assert_eq!(allocs[0]["PreviousAllocation"], lose.as_str());
    assert_eq!(allocs[1]["ClientStatus"], "failed");
    // New writes continue from the old index.
    let r = http2.register(runner_job("p-new")).await;
    assert!(r["Index"].as_u64().unwrap() > index);
    emu2.shutdown().await;
}

#[tokio::test]
async fn control_http_api_drives_faults() {
    let rt = FakeRuntime::new();
    let emu = start_emulator(rt.clone()).await;
    let http = Http::new(&emu);
    let c = emu.control();
    http.register(runner_job("ctl-1")).await;
    let id = wait_alloc_status(&c, "ctl-1", "running").await["ID"]
        .as_str()
        .unwrap()
        .to_owned();
    let a = http
        .send(
            "POST",
            &format!("/emulator/v1/allocations/{id}/oom"),
            Some(json!({})),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.text);
    c.wait_for(WAIT, |c| {
        c.allocs("ctl-1")[0]["TaskStates"]["default-task"]["Restarts"] == 1
    })
    .await
    .unwrap();
    let a = http
        .send(
            "POST",
            "/emulator/v1/allocations/nope/crash",
            Some(json!({"exit_code": 2})),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 404);
    let nodes = http.get("/emulator/v1/nodes").await.json();
    let n = nodes[0]["ID"].as_str().unwrap();
    assert_eq!(
        http.send(
            "POST",
            &format!("/emulator/v1/nodes/{n}/capacity"),
            Some(json!({"cpu": 0, "memory_mb": 0}))
        )
        .await
        .unwrap()
        .status,
        200
    );
    let added = http
        .send("POST", "/emulator/v1/nodes", Some(json!({"name": "n2"})))
        .await
        .unwrap()
        .json();
    assert!(added["ID"].is_string());
    assert_eq!(
        http.send(
            "POST",
            "/emulator/v1/event-streams/stall",
            Some(json!({"stalled": false}))
        )
        .await
        .unwrap()
        .status,
        200
    );
    assert_eq!(
        http.send(
            "POST",
            "/emulator/v1/jobs/hold",
            Some(json!({"job_prefix": "zz"}))
        )
        .await
        .unwrap()
        .status,
        200
    );
    assert_eq!(
        http.send(
            "POST",
            "/emulator/v1/exec-faults",
            Some(json!({"close_before_exit": 1000}))
        )
        .await
        .unwrap()
        .status,
        200
    );
    let events = http.get("/emulator/v1/events").await.json();
    assert!(events.as_array().unwrap().len() > 3);
    emu.shutdown().await;
}
