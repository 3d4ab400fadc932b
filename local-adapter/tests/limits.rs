//! Limits: memory, processes, disk, and flat server memory with a slow reader.

mod common;

use std::time::{Duration, Instant};

use common::{Fixture, request, run};
use runner_core::{ExecutionEvent, ExecutorApi};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_bomb_is_killed_and_the_runner_survives() {
    let f = Fixture::new().await;
    let r = f.runner_with(common::spec(64)).await;
    let o = run(
        &f.executor,
        &r,
        "</dev/zero head -c 100M | tail > /dev/null",
    )
    .await;
    assert_eq!(o.out(), "");
    assert!(o.err().contains("Killed"), "stderr: {:?}", o.err());
    assert_eq!(o.code(), Some(137));
    assert_eq!(run(&f.executor, &r, "echo alive").await.out(), "alive\r\n");
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fork_bomb_is_contained_and_a_neighbour_keeps_working() {
    use futures::{FutureExt, StreamExt};
    let f = Fixture::new().await;
    let mut backend_events = f.executor.events();
    let bomb = f.runner().await;
    let neighbour = f.runner().await;
    let cancel = CancellationToken::new();
    let handle = f
        .executor
        // The main process stays (`sleep`), so cancelling must kill the whole bomb: background
        // processes of an execution that already ended would rightly live on.
        .execute(
            &bomb,
            &request("b(){ b|b& }; b; sleep 1000"),
            cancel.clone(),
        )
        .await
        .expect("execute");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let o = run(&f.executor, &neighbour, "echo fine").await;
    assert_eq!(o.out(), "fine\r\n");
    assert!(started.elapsed() < Duration::from_secs(20));
    cancel.cancel();
    drop(handle);
    // Killing thousands of processes takes a moment: until they are gone (the init and the
    // command's leader wait for that, briefly) the runner's process limit refuses a fork. The
    // runner either works again or, when its table stays full, is reported for replacement
    // with the process-limit reason; never a hang, never a wrong reason.
    let deadline = Instant::now() + Duration::from_secs(30);
    let outcome = loop {
        let o = run(&f.executor, &bomb, "echo recovered").await;
        if o.out() == "recovered\r\n" {
            break "recovered".to_string();
        }
        if let Some(Some(event)) = backend_events.next().now_or_never() {
            break format!("{event:?}");
        }
        assert!(
            Instant::now() < deadline,
            "runner neither recovered nor replaced: {o:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        outcome == "recovered" || outcome.contains("ProcessLimitReached"),
        "{outcome}"
    );
    f.destroy(&bomb).await;
    f.destroy(&neighbour).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endless_file_hits_the_runner_disk_limit() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let o = run(&f.executor, &r, "cat /dev/zero > /workspace/big").await;
    assert_ne!(o.code(), Some(0));
    assert!(o.err().contains("No space left on device"), "{:?}", o.err());
    let o = run(&f.executor, &r, "rm /workspace/big && echo freed").await;
    assert_eq!(o.out(), "freed\r\n");
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn files_bigger_than_the_memory_limit_fill_the_disk_not_the_memory() {
    // The test config's disk limit (64 MB) is above what a 48 MB runner may hold in its tmpfs.
    let f = Fixture::new().await;
    let r = f.runner_with(common::spec(48)).await;
    for target in ["/workspace/big", "/tmp/big", "/dev/shm/big"] {
        let o = run(
            &f.executor,
            &r,
            &format!("head -c 100M /dev/zero > {target}"),
        )
        .await;
        assert_ne!(o.code(), Some(0), "{target}");
        assert!(
            o.err().contains("No space left on device"),
            "{target}: {:?} {:?}",
            o.err(),
            o.terminal
        );
    }
    // Everything full at once still leaves the runner alive.
    let o = run(
        &f.executor,
        &r,
        "echo alive; rm /workspace/big /tmp/big /dev/shm/big",
    )
    .await;
    assert_eq!(o.out(), "alive\r\n");
    f.destroy(&r).await;
}

/// The host pid of `runner`'s init: the process in its cgroup that is pid 1 of its namespace.
fn init_pid(runner: &runner_core::RunnerId) -> Option<u32> {
    runner_processes(runner)
        .into_iter()
        .find_map(|(pid, ns_pid)| (ns_pid == 1).then_some(pid))
}

/// Host and namespace pids of the processes in `runner`'s cgroups.
fn runner_processes(runner: &runner_core::RunnerId) -> Vec<(u32, u32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cgroups = std::fs::read_to_string(e.path().join("cgroup")).ok()?;
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
            let ns_pid = nspid.split_whitespace().last()?.parse().ok()?;
            cgroups.contains(runner.as_str()).then_some((pid, ns_pid))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runner_killed_for_memory_ends_its_execution_with_the_oom_message() {
    let f = Fixture::new().await;
    let r = f.runner_with(common::spec(64)).await;
    // Make the init the OOM killer's first choice, as if the runner as a whole ran out: the
    // init gets the highest score, and the command's shell (which inherits it) is set back to
    // normal before it starts the memory bomb.
    let init = init_pid(&r).expect("the runner's init");
    std::fs::write(format!("/proc/{init}/oom_score_adj"), "1000").expect("oom_score_adj");
    let id = r.clone();
    let lower = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        for (pid, ns_pid) in runner_processes(&id) {
            if ns_pid != 1 {
                let _ = std::fs::write(format!("/proc/{pid}/oom_score_adj"), "0");
            }
        }
    });
    let o = run(
        &f.executor,
        &r,
        "sleep 2; </dev/zero head -c 200M | tail > /dev/null",
    )
    .await;
    lower.join().expect("lowering thread");
    assert_eq!(
        o.terminal,
        Some(ExecutionEvent::Error(
            runner_core::ExecutionFailure::OomKilled
        )),
        "{o:?}"
    );
    assert_eq!(
        runner_core::ExecutionFailure::OomKilled.to_string(),
        "the allocation was OOM Killed"
    );
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn yes_with_a_slow_reader_keeps_server_memory_flat() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let cancel = CancellationToken::new();
    let handle = f
        .executor
        .execute(&r, &request("yes"), cancel.clone())
        .await
        .expect("execute");
    let mut events = handle.events;
    // Let the buffers fill, then measure while reading slowly.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kb();
    let mut received = 0usize;
    for _ in 0..100 {
        match events.recv().await {
            Some(ExecutionEvent::Stdout(b)) => received += b.len(),
            other => panic!("unexpected {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = rss_kb();
    assert!(received > 0);
    assert!(
        after < before + 16 * 1024,
        "server memory grew from {before} kB to {after} kB"
    );
    cancel.cancel();
    f.destroy(&r).await;
}

/// A fork bomb left running in the background fills the runner's process table: nothing can be
/// started in it any more. The next execution ends with an error naming the process limit
/// (never an OOM kill: memory is not the problem), and the runner is reported for replacement.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_process_table_is_reported_as_such_and_the_runner_replaced() {
    use futures::StreamExt;
    let f = Fixture::with(|c| c.max_processes = 512).await;
    let mut backend_events = f.executor.events();
    // Memory to spare: 512 shells must fill the process table, not the memory.
    let r = f.runner_with(common::spec(400)).await;
    let mut bomb = request(":(){ :|:& };:");
    bomb.time_limit = 10;
    let o = common::run_with(&f.executor, &r, bomb, None).await;
    // The bomb's first shell returns at once; its children live on, as background processes do.
    assert!(matches!(o.terminal, Some(ExecutionEvent::Exit(_))), "{o:?}");
    let mut outcomes = Vec::new();
    // The bomb's shells sleep and retry when a fork fails, so the table may take a moment to be
    // full to the last place; until it is, an execution may still run.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        let attempt = f
            .executor
            .execute(&r, &request("echo hi"), CancellationToken::new())
            .await;
        let terminal = match attempt {
            Ok(handle) => {
                let mut events = handle.events;
                let mut terminal = None;
                while let Ok(Some(event)) =
                    tokio::time::timeout(Duration::from_secs(10), events.recv()).await
                {
                    if event.is_terminal() {
                        terminal = Some(event);
                    }
                }
                format!("{terminal:?}")
            }
            Err(e) => format!("start failed: {e}"),
        };
        outcomes.push(terminal);
        if outcomes
            .last()
            .is_some_and(|t| t.contains("ProcessLimitReached"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        outcomes.iter().all(|o| !o.contains("Oom")),
        "reported as OOM: {outcomes:?}"
    );
    assert!(
        outcomes
            .last()
            .is_some_and(|t| t.contains("ProcessLimitReached")),
        "no execution ended with the process limit: {outcomes:?}"
    );
    let message = runner_core::ExecutionFailure::ProcessLimitReached.to_string();
    assert!(message.contains("process limit"), "{message}");
    let event = tokio::time::timeout(Duration::from_secs(10), backend_events.next())
        .await
        .expect("no backend event");
    match event {
        Some(runner_core::BackendEvent::RunnerStopped { runner, reason }) => {
            assert_eq!(runner, r);
            assert_eq!(reason, runner_core::DestroyReason::ProcessLimitReached);
        }
        other => panic!("unexpected {other:?}"),
    }
    // What the manager does on that event: destroy it; the bomb goes with it.
    f.destroy(&r).await;
    f.executor.teardowns_finished().await;
    assert!(runner_processes(&r).is_empty());
}
