//! Runner lifecycle: creation and destruction leave nothing behind, a restart reattaches, a
//! runner dying on its own is reported, and the figures of the issue are measured.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Fixture, config, run, spec};
use futures::StreamExt;
use runner_core::{
    BackendError, BackendEvent, DestroyReason, ExecutorApi, RecordedState, RunnerState, UsedState,
};

/// Every cgroup directory of this data directory's instance, in any hierarchy.
fn instance_cgroups(data_dir: &Path) -> Vec<String> {
    let canonical = std::fs::canonicalize(data_dir).unwrap();
    let mut found = Vec::new();
    for c in ["memory", "pids", "cpu", "freezer"] {
        let Ok(rd) = std::fs::read_dir(Path::new("/sys/fs/cgroup").join(c)) else {
            continue;
        };
        for inst in rd.flatten() {
            let name = inst.file_name().to_string_lossy().into_owned();
            if !name.starts_with("poseidon-") {
                continue;
            }
            for runner in std::fs::read_dir(inst.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if runner.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    found.push(format!(
                        "{}/{}",
                        inst.path().display(),
                        runner.file_name().to_string_lossy()
                    ));
                }
            }
        }
    }
    let _ = canonical;
    found
}

fn processes_of(exe_marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("cgroup"))
                .map(|c| c.contains(exe_marker))
                .unwrap_or(false)
        })
        .count()
}

const SERVER_MODE: &str = "LOCAL_ADAPTER_TEST_SERVER";

/// In a child started by `kill_9_of_the_server_leaves_runners_to_the_next_start`: acts as a server
/// that creates a used runner, reports it, and waits to be killed.
#[ctor::ctor]
fn child_server() {
    let Some(dir) = std::env::var_os(SERVER_MODE) else {
        return;
    };
    let Ok(rt) = tokio::runtime::Runtime::new() else {
        std::process::exit(3);
    };
    rt.block_on(async move {
        let executor = local_adapter::LocalExecutor::start(config(Path::new(&dir)))
            .await
            .expect("start");
        let env = spec(64);
        executor.register_environment(&env).await.expect("register");
        let used = executor
            .create_runner(&env)
            .await
            .expect("create")
            .into_info()
            .id;
        let idle = executor
            .create_runner(&env)
            .await
            .expect("create")
            .into_info()
            .id;
        let state = RunnerState::Used(UsedState {
            inactivity_timeout: Duration::from_secs(60),
            deadline: Some(std::time::SystemTime::now() + Duration::from_secs(600)),
        });
        executor.mark_runner(&used, &state).await.expect("mark");
        let o = run(&executor, &used, "echo kept > file.txt; sleep 1000 &").await;
        assert_eq!(o.code(), Some(0));
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "runners {used} {idle}");
        let _ = out.flush();
        tokio::time::sleep(Duration::from_secs(600)).await;
    });
    std::process::exit(0);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_the_server_leaves_runners_to_the_next_start() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .env(SERVER_MODE, dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map(|_| line)
    })
    .await
    .unwrap()
    .unwrap();
    // The killed server's fork server exits when its socket closes. Orphaned, it becomes a
    // child of this process (a subreaper, as it runs executors too), which must reap it.
    let child_pid = child.id().to_string();
    // Children of any of its threads (the fork server comes from a blocking-pool thread).
    let fork_server = std::fs::read_dir(format!("/proc/{child_pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .collect::<String>()
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .find(|p| {
            // Not one of the runners' inits, forked from it (in pid namespaces of their own).
            std::fs::read_link(format!("/proc/{p}/ns/pid")).ok()
                == std::fs::read_link("/proc/self/ns/pid").ok()
                && std::fs::read(format!("/proc/{p}/environ"))
                    .unwrap_or_default()
                    .split(|b| *b == 0)
                    .any(|v| v == b"POSEIDON_LOCAL_SANDBOX_HELPER=fork-server")
        })
        .expect("the child server's fork server");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    tokio::task::spawn_blocking(move || {
        let fork_server = nix::unistd::Pid::from_raw(fork_server);
        let deadline = Instant::now() + Duration::from_secs(10);
        // ECHILD until it has been reparented to this process.
        while nix::sys::wait::waitpid(fork_server, None).is_err() {
            assert!(
                Instant::now() < deadline,
                "the orphaned fork server never came"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    })
    .await
    .unwrap();
    let mut ids = line
        .split_whitespace()
        .skip(1)
        .map(runner_core::RunnerId::from);
    let (used, idle) = (ids.next().expect("used id"), ids.next().expect("idle id"));

    let b = local_adapter::LocalExecutor::start(config(dir.path()))
        .await
        .unwrap();
    let records = b.load_runners(spec(64).id).await.unwrap();
    let state =
        |id: &runner_core::RunnerId| records.iter().find(|r| &r.info.id == id).map(|r| r.state);
    assert!(
        matches!(state(&used), Some(RecordedState::Used(_))),
        "{records:?}"
    );
    assert_eq!(state(&idle), Some(RecordedState::Uncertain));
    let mut req = runner_core::ExecutionRequest::new(
        "cat file.txt; for c in /proc/[0-9]*/comm; do cat $c; done | grep -c '^sleep$'",
    );
    req.privileged_execution = true;
    let o = common::run_with(&b, &used, req, None).await;
    assert_eq!(o.out(), "kept\r\n1\r\n", "{}", o.err());
    for r in [&used, &idle] {
        b.destroy_runner(r, &DestroyReason::ApiRequest)
            .await
            .unwrap();
    }
    b.shutdown().await;
}

/// The host pid of the runner's init, while it runs.
fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread")]
async fn create_destroy_cycles_leave_no_process_mount_cgroup_or_file() {
    let f = Fixture::new().await;
    let env = spec(64);
    let cycles = 1_000;
    let mut ids = Vec::new();
    let mut inits = std::collections::HashSet::new();
    for _ in 0..cycles / 4 {
        let created =
            futures::future::join_all((0..4).map(|_| f.executor.create_runner(&env))).await;
        // Destroy every runner that was created before judging the batch.
        for info in created.iter().flatten().map(|c| c.info()) {
            ids.push(info.id.to_string());
            // With its start time: this machine's pid space is small enough (32 768 here) that
            // a pid comes round again within the test.
            inits.extend(f.init_pid(&info.id).and_then(|pid| {
                let started = common::stat_fields(pid)?.get(19)?.clone();
                Some((pid, started))
            }));
            f.executor
                .destroy_runner(&info.id, &DestroyReason::ApiRequest)
                .await
                .expect("destroy");
        }
        for info in created {
            info.expect("create");
        }
    }
    assert_eq!(ids.len(), cycles);
    f.executor.teardowns_finished().await;
    let leftovers: Vec<String> = instance_cgroups(f.dir.path())
        .into_iter()
        .filter(|c| ids.iter().any(|id| c.ends_with(id.as_str())))
        .collect();
    assert!(leftovers.is_empty(), "cgroups left: {leftovers:?}");
    let procs: usize = ids.iter().map(|id| processes_of(id)).sum();
    assert_eq!(procs, 0, "processes left in runner cgroups");
    let run_dir = std::fs::canonicalize(f.dir.path()).unwrap().join("run");
    assert_eq!(
        std::fs::read_dir(&run_dir).unwrap().count(),
        0,
        "sockets left"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let data = std::fs::canonicalize(f.dir.path()).unwrap();
    assert!(
        !mounts.contains(&*data.to_string_lossy()),
        "mounts left under the data dir"
    );
    // Only these runners' inits count: other tests in this binary have processes of their own
    // that exit and are reaped at any moment (e.g. a killed server's orphaned fork server).
    assert_eq!(inits.len(), cycles, "an init pid per runner");
    let ours = std::process::id().to_string();
    let zombies = inits
        .iter()
        .filter_map(|(pid, started)| {
            let stat = common::stat_fields(*pid)?;
            let ours_and_dead = stat.first()? == "Z" && stat.get(1)? == &ours;
            (ours_and_dead && stat.get(19)? == started)
                .then(|| format!("{pid}: {}", stat.join(" ")))
        })
        .collect::<Vec<_>>();
    assert!(
        zombies.is_empty(),
        "{} zombies left to the server: {:?} (we are {})",
        zombies.len(),
        &zombies[..zombies.len().min(3)],
        std::process::id()
    );
}

/// An init killed while it has an execution's cgroup frozen (it freezes one to kill the
/// execution's tree after a time limit or a closed socket) cannot finish exiting until that
/// cgroup is thawed: destroying the runner must not wait seconds for it, and must leave nothing.
#[tokio::test(flavor = "multi_thread")]
async fn destroying_a_runner_with_a_frozen_execution_is_quick_and_complete() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let cancel = tokio_util::sync::CancellationToken::new();
    let handle = f
        .executor
        .execute(
            &r,
            &runner_core::ExecutionRequest::new("sleep 1000 & sleep 1001"),
            cancel.clone(),
        )
        .await
        .unwrap();
    let runner_freezer = instance_cgroups(f.dir.path())
        .into_iter()
        .find(|c| c.contains("/freezer/") && c.ends_with(r.as_str()))
        .expect("runner cgroup");
    let execution = std::fs::read_dir(&runner_freezer)
        .unwrap()
        .flatten()
        .find(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .expect("execution cgroup")
        .path();
    std::fs::write(execution.join("freezer.state"), "FROZEN").unwrap();
    let started = Instant::now();
    f.destroy(&r).await;
    let answered = started.elapsed();
    f.executor.teardowns_finished().await;
    let finished = started.elapsed();
    drop(handle);
    eprintln!("destroy answered after {answered:?}, teardown finished after {finished:?}");
    assert!(answered < Duration::from_millis(500), "{answered:?}");
    assert!(finished < Duration::from_secs(2), "{finished:?}");
    let left: Vec<String> = instance_cgroups(f.dir.path())
        .into_iter()
        .filter(|c| c.ends_with(r.as_str()))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(processes_of(r.as_str()), 0);
}

/// A crash in the middle of a destruction (the runner's socket gone and its init killed, its
/// record and cgroups still there) is completed by the next start.
#[tokio::test(flavor = "multi_thread")]
async fn a_destruction_cut_short_by_a_crash_is_completed_at_the_next_start() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let env = spec(64);
    let a = local_adapter::LocalExecutor::start(config(dir.path()))
        .await
        .unwrap();
    let r = a.create_runner(&env).await.unwrap().into_info().id;
    // What `destroy_runner` does before it answers, without the background part.
    let run_dir = std::fs::canonicalize(dir.path()).unwrap().join("run");
    for socket in std::fs::read_dir(&run_dir).unwrap().flatten() {
        std::fs::remove_file(socket.path()).unwrap();
    }
    drop(a);
    assert!(processes_of(r.as_str()) > 0);
    let b = local_adapter::LocalExecutor::start(config(dir.path()))
        .await
        .unwrap();
    assert!(b.load_runners(env.id).await.unwrap().is_empty());
    let left: Vec<String> = instance_cgroups(dir.path())
        .into_iter()
        .filter(|c| c.ends_with(r.as_str()))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(processes_of(r.as_str()), 0);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_reattaches_to_used_runners_with_their_files() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let env = spec(64);
    let deadline = std::time::SystemTime::now() + Duration::from_secs(600);
    let (used, idle) = {
        let a = local_adapter::LocalExecutor::start(config(dir.path()))
            .await
            .unwrap();
        a.register_environment(&env).await.unwrap();
        let used = a.create_runner(&env).await.unwrap().into_info().id;
        let idle = a.create_runner(&env).await.unwrap().into_info().id;
        let state = RunnerState::Used(UsedState {
            inactivity_timeout: Duration::from_secs(60),
            deadline: Some(deadline),
        });
        a.mark_runner(&used, &state).await.unwrap();
        let o = run(&a, &used, "echo kept > file.txt; sleep 1000 & echo started").await;
        assert_eq!(o.code(), Some(0));
        // A crash: the executor goes away without `shutdown`.
        drop(a);
        (used, idle)
    };
    let b = local_adapter::LocalExecutor::start(config(dir.path()))
        .await
        .unwrap();
    assert_eq!(b.load_environments().await.unwrap(), vec![env.clone()]);
    let mut records = b.load_runners(env.id).await.unwrap();
    records.sort_by_key(|r| r.info.id != used);
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].info.id, used);
    match records[0].state {
        RecordedState::Used(u) => {
            assert_eq!(u.inactivity_timeout, Duration::from_secs(60));
            assert!(u.deadline.is_some());
        }
        other => panic!("used runner recovered as {other:?}"),
    }
    assert_eq!(records[1].info.id, idle);
    assert_eq!(
        records[1].state,
        RecordedState::Uncertain,
        "idle record after a crash"
    );
    let o = run(
        &b,
        &used,
        "cat file.txt; pgrep -c sleep || ls /proc | grep -c '^[0-9]'",
    )
    .await;
    assert!(o.out().starts_with("kept\r\n"), "{}", o.out());
    // A clean shutdown makes idle records trustworthy.
    b.shutdown().await;
    drop(b);
    let c = local_adapter::LocalExecutor::start(config(dir.path()))
        .await
        .unwrap();
    let records = c.load_runners(env.id).await.unwrap();
    let idle_state = records.iter().find(|r| r.info.id == idle).map(|r| r.state);
    assert_eq!(idle_state, Some(RecordedState::Idle));
    for r in [&used, &idle] {
        c.destroy_runner(r, &DestroyReason::ApiRequest)
            .await
            .unwrap();
    }
    assert!(c.load_runners(env.id).await.unwrap().is_empty());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn destroying_is_idempotent_and_a_destroyed_runner_is_gone() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    f.destroy(&r).await;
    f.destroy(&r).await;
    let err = f
        .executor
        .execute(
            &r,
            &runner_core::ExecutionRequest::new("true"),
            Default::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err, BackendError::RunnerNotFound(r));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runner_whose_init_dies_is_reported_stopped() {
    let f = Fixture::new().await;
    let mut events = f.executor.events();
    let r = f.runner().await;
    let procs = format!(
        "{}/{}/cgroup.procs",
        instance_cgroups(f.dir.path())
            .into_iter()
            .find(|c| c.contains("/freezer/") && c.ends_with(r.as_str()))
            .map(|c| c.rsplit_once('/').unwrap().0.to_string())
            .expect("runner cgroup"),
        r.as_str()
    );
    for pid in std::fs::read_to_string(procs).unwrap().lines() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid.parse().unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let event = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("no event");
    match event {
        Some(BackendEvent::RunnerStopped { runner, reason }) => {
            assert_eq!(runner, r);
            assert!(matches!(reason, DestroyReason::Stopped(_)), "{reason:?}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        f.executor
            .load_runners(spec(100).id)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Prints the figures the issue asks for; asserts only generous bounds.
#[tokio::test(flavor = "multi_thread")]
async fn measure_runner_creation_and_execution_against_bare_fork_exec() {
    let f = Fixture::new().await;
    let env = spec(64);
    let n = 15;
    let mut create = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let id = f.runner_with(env.clone()).await;
        create.push(t.elapsed());
        ids.push(id);
    }
    let mut exec = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let o = run(&f.executor, &ids[0], "true").await;
        exec.push(t.elapsed());
        assert_eq!(o.code(), Some(0));
    }
    let mut bare = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let status = tokio::process::Command::new("bash")
            .args(["-c", "true"])
            .status()
            .await
            .unwrap();
        bare.push(t.elapsed());
        assert!(status.success());
    }
    let (c, e, b) = (median(create), median(exec), median(bare));
    eprintln!(
        "median over {n}: create runner {c:?}, execute `bash -c true` in a runner {e:?}, bare fork+exec of `bash -c true` {b:?}"
    );
    assert!(c < Duration::from_secs(10));
    assert!(e < Duration::from_secs(5));
    for id in &ids {
        f.destroy(id).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_cgroups_runners_still_work_and_cancel_kills_the_tree() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.cgroup = Some(local_adapter::CgroupChoice::None);
    // Without cgroups the backend refuses to start unless the operator opts in.
    let refused = local_adapter::LocalExecutor::start(cfg.clone())
        .await
        .expect_err("no limits without an explicit opt-in");
    assert!(refused.to_string().contains("allowunlimited"), "{refused}");
    cfg.allow_unlimited = true;
    let ex = local_adapter::LocalExecutor::start(cfg).await.unwrap();
    let r = ex.create_runner(&spec(64)).await.unwrap().into_info().id;
    assert_eq!(run(&ex, &r, "echo hi").await.out(), "hi\r\n");
    let cancel = tokio_util::sync::CancellationToken::new();
    let handle = ex
        .execute(
            &r,
            &runner_core::ExecutionRequest::new("sleep 1000 & sleep 1001"),
            cancel.clone(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel.cancel();
    drop(handle);
    let mut left = String::new();
    for _ in 0..50 {
        left = run(
            &ex,
            &r,
            "for c in /proc/[0-9]*/comm; do cat $c; done | grep -c '^sleep$'",
        )
        .await
        .out();
        if left == "0\r\n" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, "0\r\n");
    ex.destroy_runner(&r, &DestroyReason::ApiRequest)
        .await
        .unwrap();
    ex.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_data_directories_never_touch_each_others_runners() {
    common::init_tracing();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = local_adapter::LocalExecutor::start(config(d1.path()))
        .await
        .unwrap();
    let ra = a.create_runner(&spec(64)).await.unwrap().into_info().id;
    let b = local_adapter::LocalExecutor::start(config(d2.path()))
        .await
        .unwrap();
    let rb = b.create_runner(&spec(64)).await.unwrap().into_info().id;
    // Restarting `b` (crash-style) cleans up only its own data directory.
    drop(b);
    let b = local_adapter::LocalExecutor::start(config(d2.path()))
        .await
        .unwrap();
    assert_eq!(run(&a, &ra, "echo a").await.out(), "a\r\n");
    assert_eq!(run(&b, &rb, "echo b").await.out(), "b\r\n");
    a.destroy_runner(&ra, &DestroyReason::ApiRequest)
        .await
        .unwrap();
    b.destroy_runner(&rb, &DestroyReason::ApiRequest)
        .await
        .unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_data_directory_too_long_for_sockets_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let long = dir.path().join("d".repeat(90));
    let err = local_adapter::LocalExecutor::start(config(&long))
        .await
        .unwrap_err();
    assert!(
        matches!(err, local_adapter::LocalError::DataDirTooLong(_)),
        "{err}"
    );
}
