//! The executor's lifecycle against a scripted Nomad (a fake `NomadApi` that turns
//! registrations into the event sequences of nomad.md §3.1): readiness only from the stream,
//! marks, recovery with the crash rule, OOM, placement failure, and resuming the stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use nomad_adapter::api::{EventBody, JobStub, NomadApi, Registration};
use nomad_adapter::{ApiError, NomadConfig, NomadExecutor};
use runner_core::{
    BackendError, BackendEvent, Creation, DestroyReason, EnvironmentId, EnvironmentSpec,
    ExecutorApi, RecordedState, RunnerId, RunnerState, UsedState,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

#[derive(Debug, Default)]
struct State {
    index: u64,
    jobs: HashMap<String, Value>,
    allocs: HashMap<String, Value>,
    buffer: Vec<(u64, String)>,
    subscribers: Vec<mpsc::UnboundedSender<Bytes>>,
    subscriptions: Vec<u64>,
    no_capacity: bool,
    registrations: usize,
}

#[derive(Debug, Default, Clone)]
struct Fake(Arc<Mutex<State>>);

impl State {
    fn batch(&mut self, events: Vec<Value>) {
        self.index += 1;
        let index = self.index;
        let events: Vec<Value> = events
            .into_iter()
            .map(|mut e| {
                e["Index"] = json!(index);
                e
            })
            .collect();
        let line = json!({"Index": index, "Events": events}).to_string() + "\n";
        self.buffer.push((index, line.clone()));
        self.subscribers
            .retain(|s| s.send(Bytes::from(line.clone())).is_ok());
    }

    fn alloc_update(&mut self, id: &str, change: impl FnOnce(&mut Value)) {
        let index = self.index + 1;
        let Some(a) = self.allocs.get_mut(id) else {
            return;
        };
        change(a);
        a["ModifyIndex"] = json!(index);
        let a = a.clone();
        self.batch(vec![json!({"Topic": "Allocation", "Type": "AllocationUpdated", "Key": id, "Payload": {"Allocation": a}})]);
    }
}

impl Fake {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    fn drop_streams(&self) {
        self.state().subscribers.clear();
    }
}

#[async_trait]
impl NomadApi for Fake {
    async fn register_job(&self, job: &Value) -> Result<Registration, ApiError> {
        let mut s = self.state();
        s.registrations += 1;
        let id = job["ID"].as_str().unwrap().to_string();
        let eval = format!("eval-{}", s.index + 1);
        let existed = s.jobs.insert(id.clone(), job.clone()).is_some();
        s.batch(vec![
            json!({"Topic": "Job", "Type": "JobRegistered", "Key": id, "Payload": {"Job": job}}),
            json!({"Topic": "Evaluation", "Type": "JobRegistered", "Key": eval, "Payload": {"Evaluation": {"ID": eval, "Status": "pending"}}}),
        ]);
        if existed || id.starts_with("template-") {
            s.batch(vec![json!({"Topic": "Evaluation", "Type": "EvaluationUpdated", "Key": eval, "Payload": {"Evaluation": {"ID": eval, "Status": "complete"}}})]);
            return Ok(Registration { eval_id: eval });
        }
        if s.no_capacity {
            s.batch(vec![json!({"Topic": "Evaluation", "Type": "EvaluationUpdated", "Key": eval, "Payload": {"Evaluation": {"ID": eval, "Status": "complete",
                "FailedTGAllocs": {"default-group": {"NodesEvaluated": 1, "NodesExhausted": 1, "DimensionExhausted": {"memory": 1}}}}}})]);
            return Ok(Registration { eval_id: eval });
        }
        let alloc_id = format!("alloc-{id}");
        let index = s.index + 1;
        let alloc = json!({"ID": alloc_id, "JobID": id, "ClientStatus": "pending", "DesiredStatus": "run",
            "CreateIndex": index, "ModifyIndex": index, "PreviousAllocation": "", "TaskStates": null,
            "AllocatedResources": {"Shared": {"Ports": []}}});
        s.allocs.insert(alloc_id.clone(), alloc.clone());
        s.batch(vec![json!({"Topic": "Allocation", "Type": "PlanResult", "Key": alloc_id, "Payload": {"Allocation": alloc}})]);
        s.batch(vec![json!({"Topic": "Evaluation", "Type": "EvaluationUpdated", "Key": eval, "Payload": {"Evaluation": {"ID": eval, "Status": "complete"}}})]);
        // The client starts it a little later.
        let fake = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            fake.state()
                .alloc_update(&alloc_id, |a| a["ClientStatus"] = json!("running"));
        });
        Ok(Registration { eval_id: eval })
    }

    async fn read_job(&self, id: &str) -> Result<Option<Value>, ApiError> {
        Ok(self.state().jobs.get(id).cloned())
    }

    async fn list_jobs(&self, prefix: &str) -> Result<Vec<JobStub>, ApiError> {
        let s = self.state();
        let mut out: Vec<JobStub> = s
            .jobs
            .keys()
            .filter(|id| id.starts_with(prefix))
            .map(|id| JobStub {
                id: id.clone(),
                status: "running".into(),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn purge_job(&self, id: &str) -> Result<(), ApiError> {
        let mut s = self.state();
        if let Some(job) = s.jobs.remove(id) {
            s.batch(vec![json!({"Topic": "Job", "Type": "JobDeregistered", "Key": id, "Payload": {"Job": job, "Deleted": true}})]);
            let alloc_id = format!("alloc-{id}");
            s.alloc_update(&alloc_id, |a| {
                a["ClientStatus"] = json!("complete");
                a["DesiredStatus"] = json!("stop");
            });
        }
        Ok(())
    }

    async fn job_allocations(&self, id: &str) -> Result<Vec<Value>, ApiError> {
        Ok(self
            .state()
            .allocs
            .values()
            .filter(|a| a["JobID"] == id)
            .cloned()
            .collect())
    }

    async fn read_evaluation(&self, _id: &str) -> Result<Option<Value>, ApiError> {
        Ok(None)
    }

    async fn leader(&self) -> Result<String, ApiError> {
        Ok("127.0.0.1:4647".into())
    }

    async fn event_stream(&self, index: u64) -> Result<EventBody, ApiError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = self.state();
        s.subscriptions.push(index);
        let _ = tx.send(Bytes::from_static(b"{}\n"));
        for (i, line) in &s.buffer {
            if *i >= index {
                let _ = tx.send(Bytes::from(line.clone()));
            }
        }
        s.subscribers.push(tx);
        Ok(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
            .map(Ok)
            .boxed())
    }
}

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
