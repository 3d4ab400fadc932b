//! Executions through `ExecutorApi` against real sandboxes (needs root, as CI runs).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Fixture, request, run, run_with};
use runner_core::{ExecutionEvent, ExecutorApi};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread")]
async fn echo_reaches_stdout_and_exit_code_is_reported() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let o = run(&f.executor, &r, "echo -n Hello World").await;
    assert_eq!(o.out(), "Hello World");
    assert_eq!(o.code(), Some(0));
    let o = run(&f.executor, &r, "exit 42").await;
    assert_eq!(o.code(), Some(42));
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stderr_stays_apart_from_stdout() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let o = run(&f.executor, &r, "cat -invalid").await;
    assert!(o.err().contains("invalid option"), "stderr: {:?}", o.err());
    assert!(!o.out().contains("invalid option"), "stdout: {:?}", o.out());
    assert_eq!(o.code(), Some(1));
    let o = run(&f.executor, &r, "echo out; echo err >&2").await;
    assert_eq!(o.out(), "out\r\n");
    assert_eq!(o.err(), "err\n");
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stdin_is_a_terminal_that_echoes() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let o = run_with(
        &f.executor,
        &r,
        request("head -n 1"),
        Some("Hello World!\n"),
    )
    .await;
    assert_eq!(o.out(), "Hello World!\r\nHello World!\r\n");
    assert_eq!(o.code(), Some(0));
    let o = run(
        &f.executor,
        &r,
        "test -t 0 && test -t 1 && ! test -t 2 && echo tty",
    )
    .await;
    assert_eq!(o.out(), "tty\r\n");
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn environment_is_clean_and_variables_pass_exactly() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let mut req = request("env");
    req.environment.insert("hello".into(), "world".into());
    req.environment
        .insert("SPACED".into(), "a b 'c' \"d\" $HOME".into());
    let o = run_with(&f.executor, &r, req, None).await;
    let env = o.out();
    let lines: Vec<&str> = env.lines().map(|l| l.trim_end_matches('\r')).collect();
    assert!(lines.contains(&"hello=world"), "{env}");
    assert!(lines.contains(&"SPACED=a b 'c' \"d\" $HOME"), "{env}");
    assert!(lines.contains(&"CODEOCEAN=true"), "{env}");
    assert!(lines.contains(&"HOME=/home/user"), "{env}");
    for l in &lines {
        let name = l.split('=').next().unwrap_or_default();
        assert!(
            [
                "PATH",
                "HOME",
                "LANG",
                "TERM",
                "CODEOCEAN",
                "hello",
                "SPACED",
                "PWD",
                "SHLVL",
                "_"
            ]
            .contains(&name),
            "unexpected variable {l:?} in {env}"
        );
    }
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unprivileged_runs_as_user_and_privileged_as_root_in_workspace() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let o = run(&f.executor, &r, "id -un; id -u; pwd").await;
    assert_eq!(o.out(), "user\r\n1000\r\n/workspace\r\n");
    let mut req = request("id -un; id -u");
    req.privileged_execution = true;
    let o = run_with(&f.executor, &r, req, None).await;
    assert_eq!(o.out(), "root\r\n0\r\n");
    f.destroy(&r).await;
}

async fn count_processes(f: &Fixture, r: &runner_core::RunnerId, name: &str) -> usize {
    let mut req = request(&format!(
        "n=0; for c in /proc/[0-9]*/comm; do [ \"$(cat $c 2>/dev/null)\" = {name} ] && n=$((n+1)); done; echo $n"
    ));
    req.privileged_execution = true;
    let o = run_with(&f.executor, r, req, None).await;
    o.out().trim().parse().expect("count")
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_kills_the_whole_tree_of_background_children() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let cancel = CancellationToken::new();
    let handle = f
        .executor
        .execute(
            &r,
            &request(
                "(sleep 1000 &) ; sleep 1001 & bash -c 'sleep 1002 & wait' & echo started; wait",
            ),
            cancel.clone(),
        )
        .await
        .expect("execute");
    let mut events = handle.events;
    let mut seen = Vec::new();
    while let Some(ev) = events.recv().await {
        if let ExecutionEvent::Stdout(b) = &ev {
            seen.extend_from_slice(b);
            if String::from_utf8_lossy(&seen).contains("started") {
                break;
            }
        }
    }
    // `started` may be printed before every background shell has started its sleep.
    let mut running = 0;
    for _ in 0..50 {
        running = count_processes(&f, &r, "sleep").await;
        if running == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(running, 3);
    cancel.cancel();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(ev) = events.recv().await {
            assert!(
                !ev.is_terminal(),
                "a cancelled execution gets no terminal event: {ev:?}"
            );
        }
    })
    .await;
    assert!(end.is_ok(), "the stream did not end after cancel");
    let mut left = usize::MAX;
    for _ in 0..50 {
        left = count_processes(&f, &r, "sleep").await;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0, "processes of the cancelled execution survived");
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn background_processes_outlive_their_execution_which_still_exits() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let started = std::time::Instant::now();
    let o = run(&f.executor, &r, "sleep 1000 & echo bye").await;
    assert_eq!(o.code(), Some(0));
    assert_eq!(o.out(), "bye\r\n");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(count_processes(&f, &r, "sleep").await, 1);
    f.destroy(&r).await;
}

/// A background process that writes to its stderr after its execution ended keeps running (a
/// pipe without a reader would kill it with SIGPIPE), and what it writes goes nowhere.
#[tokio::test(flavor = "multi_thread")]
async fn a_background_process_writing_to_stderr_after_its_execution_keeps_running() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let o = run(
        &f.executor,
        &r,
        "(sleep 0.5; echo late >&2; echo alive > /workspace/alive) >/dev/null & echo bye",
    )
    .await;
    assert_eq!(o.out(), "bye\r\n");
    assert_eq!(o.err(), "");
    // It writes its file half a second after its stderr line, if it lives.
    let alive = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if run(&f.executor, &r, "cat /workspace/alive").await.out() == "alive\r\n" {
                return;
            }
        }
    })
    .await;
    assert!(
        alive.is_ok(),
        "the background process died writing to stderr"
    );
    f.destroy(&r).await;
}

/// What background processes write to stderr after their execution is discarded by the server
/// only up to a budget: past it the pipe closes, and a flood ends as it would without a reader.
#[tokio::test(flavor = "multi_thread")]
async fn a_background_flood_of_stderr_is_not_drained_forever() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let o = run(&f.executor, &r, "sleep 0.5 && cat /dev/zero >&2 & echo bye").await;
    assert_eq!(o.out(), "bye\r\n");
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        while count_processes(&f, &r, "cat").await > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(ended.is_ok(), "the flood is still drained");
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prompt_arrives_before_any_input() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let handle = f
        .executor
        .execute(
            &r,
            &request("python3 -c \"print('hi ' + input('name? '))\""),
            CancellationToken::new(),
        )
        .await
        .expect("execute");
    let mut events = handle.events;
    let mut seen = String::new();
    let prompt = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(ev) = events.recv().await {
            match ev {
                // Python writes the prompt of `input()` on a terminal to stderr.
                ExecutionEvent::Stdout(b) | ExecutionEvent::Stderr(b) => {
                    seen.push_str(&String::from_utf8_lossy(&b));
                    if seen.contains("name? ") {
                        return true;
                    }
                }
                other => panic!("unexpected {other:?} before the prompt ({seen:?})"),
            }
        }
        false
    })
    .await;
    assert_eq!(prompt, Ok(true), "no prompt before input: {seen:?}");
    handle
        .stdin
        .send(Bytes::from_static(b"Ada\n"))
        .await
        .expect("stdin");
    let mut rest = String::new();
    let mut code = None;
    while let Some(ev) = events.recv().await {
        match ev {
            ExecutionEvent::Stdout(b) | ExecutionEvent::Stderr(b) => {
                rest.push_str(&String::from_utf8_lossy(&b))
            }
            ExecutionEvent::Exit(c) => code = Some(c),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(rest.contains("hi Ada"), "{rest:?}");
    assert_eq!(code, Some(0));
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn several_executions_run_at_once_on_one_runner() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let (a, b) = tokio::join!(
        run(&f.executor, &r, "sleep 0.5; echo a"),
        run(&f.executor, &r, "sleep 0.5; echo b")
    );
    assert_eq!(
        (a.out(), b.out()),
        ("a\r\n".to_string(), "b\r\n".to_string())
    );
    f.destroy(&r).await;
}

/// The host pids of the init's children that lead a session of their own: the standby leader
/// the init keeps for the next execution (the execution namespace's holder has no session).
fn standby_leaders(f: &Fixture, r: &runner_core::RunnerId) -> Vec<i32> {
    let init = f.init_pid(r).expect("a live runner");
    let (init, mut leaders) = (init.to_string(), Vec::new());
    for pid in common::pids() {
        // Fields after the command: state, ppid, pgrp, session.
        let fields = common::stat_fields(pid).unwrap_or_default();
        if fields.get(1) == Some(&init) && fields.get(3) == Some(&pid.to_string()) {
            leaders.push(pid);
        }
    }
    leaders
}

#[tokio::test(flavor = "multi_thread")]
async fn the_init_keeps_one_standby_leader_and_replaces_a_killed_one() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    // Executions one after the other leave exactly one standby behind.
    for i in 0..3 {
        let o = run(&f.executor, &r, &format!("echo run{i}")).await;
        assert_eq!(o.out(), format!("run{i}\r\n"));
    }
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let leaders = standby_leaders(&f, &r);
            if leaders.len() == 1 {
                return leaders;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("one standby leader");
    // A standby that dies (here killed from the host) is replaced, and executions still run,
    // also several at once (only one of which can take the standby).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(found[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // SIGKILL is delivered asynchronously: a standby still running when the launch arrives
    // would die as that execution's leader. Wait until it is dead (a zombie, or reaped).
    tokio::time::timeout(Duration::from_secs(10), async {
        while common::stat_fields(found[0])
            .is_some_and(|f| f.first().map(String::as_str) != Some("Z"))
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the killed standby dies");
    let o = run(&f.executor, &r, "echo after").await;
    assert_eq!(o.out(), "after\r\n");
    assert_eq!(o.code(), Some(0));
    let runs = (0..3).map(|i| {
        let (executor, r) = (&f.executor, &r);
        async move { run(executor, r, &format!("sleep 0.2; echo together{i}")).await }
    });
    for (i, o) in futures::future::join_all(runs)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(o.out(), format!("together{i}\r\n"));
        assert_eq!(o.code(), Some(0));
    }
    tokio::time::timeout(Duration::from_secs(10), async {
        while standby_leaders(&f, &r).len() != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("again one standby leader");
    f.destroy(&r).await;
}
