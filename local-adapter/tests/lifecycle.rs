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

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread")]
async fn create_destroy_cycles_leave_no_process_mount_cgroup_or_file() {
    let f = Fixture::new().await;
    let env = spec(64);
    let cycles = 120;
    let mut ids = Vec::new();
    for _ in 0..cycles / 4 {
        let created =
            futures::future::join_all((0..4).map(|_| f.executor.create_runner(&env))).await;
        for info in created {
            let info = info.expect("create");
            ids.push(info.id.to_string());
            f.executor
                .destroy_runner(&info.id, &DestroyReason::ApiRequest)
                .await
                .expect("destroy");
        }
    }
    assert_eq!(ids.len(), cycles);
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
    let zombies = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|s| {
            let ours = format!(" {} ", std::process::id());
            s.rsplit_once(')').is_some_and(|(_, r)| {
                r.trim_start().starts_with('Z') && r.trim_start()[1..].starts_with(&ours)
            })
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
        let used = a.create_runner(&env).await.unwrap().id;
        let idle = a.create_runner(&env).await.unwrap().id;
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
