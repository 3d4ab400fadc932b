//! Executions and file operations through the exec WebSocket, against the scripted Nomad of
//! `common` whose exec server runs the commands as local processes (as a runner would).

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::{ExecFaults, Fake};
use futures::StreamExt;
use nomad_adapter::{NomadConfig, NomadExecutor};
use runner_core::{
    BackendEvent, Creation, EnvironmentId, EnvironmentSpec, ExecutionEvent, ExecutionFailure,
    ExecutionRequest, ExecutorApi, FileCopy, FileError, FileUpdate, ListFilesRequest, RunnerId,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

struct Setup {
    backend: NomadExecutor,
    fake: Fake,
    faults: Arc<ExecFaults>,
    runner: RunnerId,
    workdir: tempfile::TempDir,
    _data: tempfile::TempDir,
}

fn spec() -> EnvironmentSpec {
    EnvironmentSpec {
        id: EnvironmentId::new(20).unwrap(),
        image: "img".into(),
        prewarming_pool_size: 1,
        cpu_limit: 20,
        memory_limit: 128,
        network_access: false,
        exposed_ports: vec![],
    }
}

async fn setup() -> Setup {
    common::init_tracing();
    let faults = Arc::new(ExecFaults::default());
    let address = common::exec_server(faults.clone()).await;
    let data = tempfile::tempdir().unwrap();
    let workdir = tempfile::tempdir().unwrap();
    let config = NomadConfig {
        address,
        datadir: data.path().to_path_buf(),
        workdir: workdir.path().to_str().unwrap().into(),
        unprivilegedprefix: "setpriv --reuid=1000 --regid=1000 --clear-groups --".into(),
        heartbeatseconds: 1.0,
        ..NomadConfig::default()
    };
    let fake = Fake::default();
    let backend = NomadExecutor::with_api(config, Arc::new(fake.clone()))
        .await
        .unwrap();
    let mut events = backend.events();
    backend.register_environment(&spec()).await.unwrap();
    let Creation::Pending(info) = backend.create_runner(&spec()).await.unwrap() else {
        panic!("nomad runners are pending at creation");
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = events.next().await {
            if matches!(e, BackendEvent::RunnerReady { ref runner, .. } if *runner == info.id) {
                return;
            }
        }
    })
    .await
    .expect("ready");
    Setup {
        backend,
        fake,
        faults,
        runner: info.id,
        workdir,
        _data: data,
    }
}

#[derive(Debug, Default)]
struct Outcome {
    out: Vec<u8>,
    err: Vec<u8>,
    end: Option<ExecutionEvent>,
}

async fn collect(mut events: tokio::sync::mpsc::Receiver<ExecutionEvent>) -> Outcome {
    let mut o = Outcome::default();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(e) = events.recv().await {
            match e {
                ExecutionEvent::Stdout(b) => o.out.extend_from_slice(&b),
                ExecutionEvent::Stderr(b) => o.err.extend_from_slice(&b),
                end => {
                    assert!(o.end.is_none(), "two terminal events");
                    o.end = Some(end);
                }
            }
        }
    })
    .await
    .expect("the execution ended");
    o
}

async fn run(s: &Setup, request: ExecutionRequest) -> Outcome {
    let h = s
        .backend
        .execute(&s.runner, &request, CancellationToken::new())
        .await
        .unwrap();
    let o = collect(h.events).await;
    drop(h.stdin);
    o
}

fn privileged(command: &str) -> ExecutionRequest {
    let mut r = ExecutionRequest::new(command);
    r.privileged_execution = true;
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn stdout_is_a_terminal_stderr_apart_and_exit_codes_reported() {
    let s = setup().await;
    let o = run(&s, privileged("echo hi; echo oops >&2; exit 3")).await;
    assert_eq!(String::from_utf8_lossy(&o.out), "hi\r\n");
    assert_eq!(String::from_utf8_lossy(&o.err), "oops\n");
    assert_eq!(o.end, Some(ExecutionEvent::Exit(3)));
    let o = run(
        &s,
        privileged("[ -t 1 ] && ! [ -t 2 ] && echo \"$CODEOCEAN $A\""),
    )
    .await;
    assert_eq!(o.end, Some(ExecutionEvent::Exit(0)));
    assert_eq!(String::from_utf8_lossy(&o.out), "true \r\n");
    let mut r = ExecutionRequest::new("id -u; echo \"$A\"");
    r.environment.insert("A".into(), "with space 'q'".into());
    let o = run(&s, r).await;
    assert_eq!(
        String::from_utf8_lossy(&o.out),
        "1000\r\nwith space 'q'\r\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stdin_reaches_the_command_until_closed() {
    let s = setup().await;
    let h = s
        .backend
        .execute(&s.runner, &privileged("cat"), CancellationToken::new())
        .await
        .unwrap();
    h.stdin.send(Bytes::from_static(b"ping\n")).await.unwrap();
    let mut events = h.events;
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("ping\r\nping") {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(ExecutionEvent::Stdout(b))) => out.extend_from_slice(&b),
            other => panic!("cat: {other:?} after {:?}", String::from_utf8_lossy(&out)),
        }
    }
    drop(h.stdin);
    assert_eq!(collect(events).await.end, Some(ExecutionEvent::Exit(0)));
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_kills_the_whole_tree_and_ends_without_a_terminal_event() {
    let s = setup().await;
    let marker = format!("{}.{}", 4000 + std::process::id() % 1000, 7);
    let cancel = CancellationToken::new();
    let h = s
        .backend
        .execute(
            &s.runner,
            &privileged(&format!("setsid sleep {marker} & sleep {marker} & wait")),
            cancel.clone(),
        )
        .await
        .unwrap();
    let sleepers = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .map(|c| c == format!("sleep\0{marker}\0").as_bytes())
                    .unwrap_or(false)
            })
            .count()
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        while sleepers() < 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("both sleepers started");
    cancel.cancel();
    let o = collect(h.events).await;
    assert_eq!(o.end, None, "a cancelled execution has no terminal event");
    tokio::time::timeout(Duration::from_secs(10), async {
        while sleepers() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("every process of the tree was killed");
    let o = run(&s, privileged("echo after")).await;
    assert_eq!(o.end, Some(ExecutionEvent::Exit(0)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_closed_before_its_exit_code_is_an_error_and_exit_128_after_an_oom_is_oom() {
    let s = setup().await;
    // Both sessions lose their exit code: the execution must not turn that into exit 0.
    s.faults.close_before_exit.store(2, Ordering::SeqCst);
    let o = run(&s, privileged("echo x")).await;
    assert_eq!(o.end, Some(ExecutionEvent::Error(ExecutionFailure::Failed)));

    *s.faults.forced_exit.lock().unwrap() = Some(128);
    let fake = s.fake.clone();
    let alloc = format!("alloc-{}", s.runner);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        fake.state().alloc_update(&alloc, |a| {
            a["ClientStatus"] = json!("pending");
            a["TaskStates"] = json!({"default-task": {"Restarts": 1, "Events": [
                {"Type": "Terminated", "Details": {"oom_killed": "true"}}]}});
        });
    });
    let o = run(&s, privileged("true")).await;
    assert_eq!(
        o.end,
        Some(ExecutionEvent::Error(ExecutionFailure::OomKilled))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn files_are_copied_listed_read_and_deleted_with_the_local_semantics() {
    let s = setup().await;
    let w = s.workdir.path().to_str().unwrap().to_string();
    std::fs::write(format!("{w}/plain"), "file").unwrap();
    let copy = |p: &str, c: &'static str| FileCopy {
        path: p.into(),
        content: Bytes::from_static(c.as_bytes()),
    };
    let update = FileUpdate {
        delete: vec![],
        copy: vec![
            copy("kit/a.txt", "alpha"),
            copy("kit/sub/", ""),
            copy("plain/x", "no"),
        ],
    };
    match s.backend.update_files(&s.runner, &update).await {
        Err(FileError::Partial(f)) => {
            assert_eq!(f.len(), 1);
            assert_eq!(f[0].path, "plain/x");
        }
        other => panic!("{other:?}"),
    }
    let list = |path: &str, recursive: bool, privileged: bool| ListFilesRequest {
        path: path.into(),
        recursive,
        privileged,
    };
    let listing = s
        .backend
        .list_files(&s.runner, &list("kit", false, true))
        .await
        .unwrap();
    let names: Vec<&str> = listing.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["kit/a.txt", "kit/sub"]);
    assert_eq!(listing[0].permissions, "rwxr--r--");
    assert_eq!(
        (listing[0].owner.as_str(), listing[0].group.as_str()),
        ("root", "root")
    );
    assert_eq!(listing[1].permissions, "rwxrwxrwt");
    let content = s
        .backend
        .read_file(&s.runner, "kit/a.txt", false)
        .await
        .unwrap();
    assert_eq!(content.size, 5);
    let body: Vec<Bytes> = content.body.map(|b| b.unwrap()).collect().await;
    assert_eq!(body.concat(), b"alpha");
    let abs = format!("{w}/kit/a.txt");
    assert_eq!(
        s.backend
            .read_file(&s.runner, &abs, true)
            .await
            .unwrap()
            .size,
        5
    );
    assert!(matches!(
        s.backend.read_file(&s.runner, "kit/none", true).await,
        Err(FileError::NotFound)
    ));
    assert!(matches!(
        s.backend
            .list_files(&s.runner, &list("none", false, true))
            .await,
        Err(FileError::NotFound)
    ));
    s.backend
        .update_files(
            &s.runner,
            &FileUpdate {
                delete: vec!["kit/a.txt".into()],
                copy: vec![],
            },
        )
        .await
        .unwrap();
    let listing = s
        .backend
        .list_files(&s.runner, &list("kit", true, true))
        .await
        .unwrap();
    assert!(listing.iter().all(|h| h.name != "kit/a.txt"), "{listing:?}");
    assert!(matches!(
        s.backend
            .update_files(
                &s.runner,
                &FileUpdate {
                    delete: vec!["a\0b".into()],
                    copy: vec![]
                }
            )
            .await,
        Err(FileError::InvalidPath(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_or_destroyed_runner_is_not_found() {
    let s = setup().await;
    s.backend
        .destroy_runner(&s.runner, &runner_core::DestroyReason::ApiRequest)
        .await
        .unwrap();
    assert!(matches!(
        s.backend
            .execute(&s.runner, &privileged("true"), CancellationToken::new())
            .await,
        Err(runner_core::BackendError::RunnerNotFound(_))
    ));
}
