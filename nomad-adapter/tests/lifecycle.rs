//! The executor's lifecycle against a scripted Nomad (a fake `NomadApi` that turns
//! registrations into the event sequences of nomad.md §3.1): readiness only from the stream,
//! marks, recovery with the crash rule, OOM, placement failure, and resuming the stream.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Fake;
use futures::StreamExt;
use nomad_adapter::api::NomadApi;
use nomad_adapter::{NomadConfig, NomadExecutor};
use runner_core::{
    BackendError, BackendEvent, Creation, DestroyReason, EnvironmentId, EnvironmentSpec,
    ExecutorApi, RecordedState, RunnerId, RunnerState, UsedState,
};
use serde_json::json;

fn spec() -> EnvironmentSpec {
    EnvironmentSpec {
        id: EnvironmentId::new(10).unwrap(),
        image: "img".into(),
        prewarming_pool_size: 2,
        cpu_limit: 20,
        memory_limit: 128,
        network_access: false,
        exposed_ports: vec![],
    }
}

fn config(dir: &std::path::Path) -> NomadConfig {
    NomadConfig {
        datadir: dir.to_path_buf(),
        heartbeatseconds: 0.5,
        registertimeoutseconds: 2.0,
        ..NomadConfig::default()
    }
}

async fn next_event(
    events: &mut futures::stream::BoxStream<'static, BackendEvent>,
    wanted: impl Fn(&BackendEvent) -> bool,
) -> BackendEvent {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = events.next().await.expect("events ended");
            if wanted(&e) {
                return e;
            }
        }
    })
    .await
    .expect("the event did not arrive")
}

async fn ready_runner(
    backend: &NomadExecutor,
    events: &mut futures::stream::BoxStream<'static, BackendEvent>,
) -> RunnerId {
    let creation = backend.create_runner(&spec()).await.unwrap();
    let Creation::Pending(info) = creation else {
        panic!("a nomad runner is never ready at creation: {creation:?}");
    };
    let id = info.id.clone();
    next_event(
        events,
        |e| matches!(e, BackendEvent::RunnerReady { runner, .. } if *runner == id),
    )
    .await;
    id
}

#[tokio::test]
async fn runners_become_ready_from_the_stream_and_survive_restarts_under_the_crash_rule() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let backend = NomadExecutor::with_api(config(dir.path()), Arc::new(fake.clone()))
        .await
        .unwrap();
    let mut events = backend.events();
    backend.register_environment(&spec()).await.unwrap();
    let used = ready_runner(&backend, &mut events).await;
    let idle = ready_runner(&backend, &mut events).await;
    let state = UsedState {
        inactivity_timeout: Duration::from_secs(90),
        deadline: Some(std::time::SystemTime::now() + Duration::from_secs(600)),
    };
    let calls = fake.state().registrations;
    backend
        .mark_runner(&used, &RunnerState::Used(state))
        .await
        .unwrap();
    assert_eq!(
        fake.state().registrations,
        calls + 1,
        "a mark is one registration"
    );
    assert_eq!(
        fake.state().jobs[used.as_str()]["TaskGroups"][1]["Meta"]["used"],
        "true"
    );
    let records = backend.load_runners(spec().id).await.unwrap();
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r.state != RecordedState::Uncertain));

    // A crash: idle records become uncertain, the used one stays used.
    drop(events);
    drop(backend);
    let backend = NomadExecutor::with_api(config(dir.path()), Arc::new(fake.clone()))
        .await
        .unwrap();
    assert_eq!(backend.load_environments().await.unwrap(), vec![spec()]);
    let records = backend.load_runners(spec().id).await.unwrap();
    let state_of = |id: &RunnerId| records.iter().find(|r| r.info.id == *id).map(|r| r.state);
    assert!(
        matches!(state_of(&used), Some(RecordedState::Used(u)) if u.inactivity_timeout == Duration::from_secs(90))
    );
    assert_eq!(state_of(&idle), Some(RecordedState::Uncertain));

    // A clean restart: idle records are trusted.
    backend.shutdown().await.unwrap();
    drop(backend);
    let backend = NomadExecutor::with_api(config(dir.path()), Arc::new(fake.clone()))
        .await
        .unwrap();
    let records = backend.load_runners(spec().id).await.unwrap();
    assert!(
        records
            .iter()
            .any(|r| r.info.id == idle && r.state == RecordedState::Idle)
    );

    // Environment 1 does not load environment 10's runners (Poseidon #20).
    assert!(
        backend
            .load_runners(EnvironmentId::new(1).unwrap())
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn an_oom_kill_is_reported_and_the_runner_purged() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let backend = NomadExecutor::with_api(config(dir.path()), Arc::new(fake.clone()))
        .await
        .unwrap();
    let mut events = backend.events();
    backend.register_environment(&spec()).await.unwrap();
    let r = ready_runner(&backend, &mut events).await;
    fake.state().alloc_update(&format!("alloc-{r}"), |a| {
        a["ClientStatus"] = json!("pending");
        a["TaskStates"] = json!({"default-task": {"State": "pending", "Restarts": 1, "Events": [
            {"Type": "Terminated", "Details": {"exit_code": "137", "oom_killed": "true"}}]}});
    });
    let e = next_event(&mut events, |e| {
        matches!(e, BackendEvent::RunnerStopped { .. })
    })
    .await;
    assert_eq!(
        e,
        BackendEvent::RunnerStopped {
            runner: r.clone(),
            reason: DestroyReason::OomKilled
        }
    );
    tokio::time::timeout(Duration::from_secs(10), async {
        while fake.state().jobs.contains_key(r.as_str()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the OOM-killed runner's job is purged");
    assert!(matches!(
        backend.mark_runner(&r, &RunnerState::Idle).await,
        Err(BackendError::RunnerNotFound(_))
    ));
}

#[tokio::test]
async fn a_placement_failure_fails_the_creation_without_leaking_its_job() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let backend = NomadExecutor::with_api(config(dir.path()), Arc::new(fake.clone()))
        .await
        .unwrap();
    backend.register_environment(&spec()).await.unwrap();
    fake.state().no_capacity = true;
    match backend.create_runner(&spec()).await {
        Err(BackendError::Overloaded(m)) => assert!(m.contains("memory"), "{m}"),
        other => panic!("creation without capacity: {other:?}"),
    }
    tokio::time::timeout(Duration::from_secs(10), async {
        while fake.state().jobs.keys().any(|k| k.starts_with("10-")) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the unplaceable runner's job is purged");
}

#[tokio::test]
async fn a_dropped_stream_resumes_after_the_last_index_without_replays() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let backend = NomadExecutor::with_api(config(dir.path()), Arc::new(fake.clone()))
        .await
        .unwrap();
    let mut events = backend.events();
    backend.register_environment(&spec()).await.unwrap();
    let first = ready_runner(&backend, &mut events).await;
    let last = fake.state().index;
    fake.drop_streams();
    // Reconnected at last + 1 (the buffer still holds everything: no resync).
    tokio::time::timeout(Duration::from_secs(10), async {
        while !fake.state().subscriptions.contains(&(last + 1)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the stream resumes at last + 1");
    let second = ready_runner(&backend, &mut events).await;
    assert_ne!(first, second);
    // Stalled: nothing, not even heartbeats; the watchdog (2 × 0.5 s) reconnects.
    let subscriptions = fake.state().subscriptions.len();
    {
        let mut s = fake.state();
        // Keep the senders alive but silent by replacing them with fresh, unread ones.
        let silent: Vec<_> = s.subscribers.drain(..).collect();
        std::mem::forget(silent);
    }
    tokio::time::timeout(Duration::from_secs(10), async {
        while fake.state().subscriptions.len() == subscriptions {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a silent stream is reconnected by the watchdog");
    ready_runner(&backend, &mut events).await;
}

#[tokio::test]
async fn replayed_template_history_is_settled_against_nomad_and_new_templates_are_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let shape = nomad_adapter::jobs::JobShape::default();
    // History in the buffer: template 10 registered, deleted, registered again.
    fake.register_job(&shape.template(&spec())).await.unwrap();
    fake.purge_job("template-10").await.unwrap();
    fake.register_job(&shape.template(&spec())).await.unwrap();
    let backend = NomadExecutor::with_api(config(dir.path()), Arc::new(fake.clone()))
        .await
        .unwrap();
    let mut events = backend.events();
    // An operator registers environment 11 behind the manager's back.
    let other = EnvironmentSpec {
        id: EnvironmentId::new(11).unwrap(),
        ..spec()
    };
    fake.register_job(&shape.template(&other)).await.unwrap();
    let e = next_event(&mut events, |e| {
        matches!(
            e,
            BackendEvent::EnvironmentAppeared(_) | BackendEvent::EnvironmentVanished(_)
        )
    })
    .await;
    assert_eq!(e, BackendEvent::EnvironmentAppeared(other.clone()));
    // And deletes it again.
    fake.purge_job("template-11").await.unwrap();
    let e = next_event(&mut events, |e| {
        matches!(
            e,
            BackendEvent::EnvironmentAppeared(_) | BackendEvent::EnvironmentVanished(_)
        )
    })
    .await;
    assert_eq!(e, BackendEvent::EnvironmentVanished(other.id));
}

#[tokio::test]
async fn a_created_runner_knows_its_mapped_ports() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let backend = NomadExecutor::with_api(config(dir.path()), Arc::new(fake.clone()))
        .await
        .unwrap();
    let spec = EnvironmentSpec {
        network_access: true,
        exposed_ports: vec![80, 8080],
        ..spec()
    };
    backend.register_environment(&spec).await.unwrap();
    let creation = backend.create_runner(&spec).await.unwrap();
    let ports: Vec<u16> = creation
        .info()
        .mapped_ports
        .iter()
        .map(|p| p.exposed_port)
        .collect();
    assert_eq!(ports, [80, 8080]);
    assert!(
        creation.info().mapped_ports[0]
            .host_address
            .starts_with("127.0.0.1:")
    );
}

#[tokio::test]
async fn an_evaluation_the_stream_does_not_report_is_read_after_the_bounded_wait() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let config = NomadConfig {
        registertimeoutseconds: 0.3,
        ..config(dir.path())
    };
    let backend = NomadExecutor::with_api(config, Arc::new(fake.clone()))
        .await
        .unwrap();
    fake.state().silent_evals = true;
    backend.register_environment(&spec()).await.unwrap();
    assert_eq!(
        fake.state().eval_reads,
        1,
        "one GET /v1/evaluation/:id after the wait"
    );
    let mut events = backend.events();
    ready_runner(&backend, &mut events).await;
    assert_eq!(fake.state().eval_reads, 2);
}
