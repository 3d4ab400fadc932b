//! The adapter against the nomad-emulator (its HTTP API, scheduler, events and faults, with
//! allocations run as local sandboxes): registrations, readiness, the calls per claim and per
//! execution, and every fault class of the brief.

mod common;

#[ctor::ctor]
fn sandbox_hook() {
    local_adapter::sandbox_main_if_requested();
}

use std::time::Duration;

use common::sandboxes::Sandboxes;
use futures::StreamExt;
use futures::stream::BoxStream;
use nomad_adapter::api::NomadApi;
use nomad_adapter::{HttpNomadApi, NomadConfig, NomadExecutor};
use nomad_emulator::{EmulatorConfig, Match, NodeSpec, NomadEmulator, Times};
use runner_core::{
    BackendError, BackendEvent, Creation, DestroyReason, EnvironmentId, EnvironmentSpec,
    ExecutionEvent, ExecutionFailure, ExecutionRequest, ExecutorApi, RunnerId, RunnerState,
    UsedState,
};
use tokio_util::sync::CancellationToken;

struct Setup {
    emu: NomadEmulator,
    _sandboxes: Sandboxes,
    backend: NomadExecutor,
    events: BoxStream<'static, BackendEvent>,
    backlog: Vec<BackendEvent>,
    config: NomadConfig,
    _data: tempfile::TempDir,
}

fn spec() -> EnvironmentSpec {
    EnvironmentSpec {
        id: EnvironmentId::new(10).unwrap(),
        image: "img".into(),
        prewarming_pool_size: 3,
        cpu_limit: 20,
        memory_limit: 128,
        network_access: false,
        exposed_ports: vec![],
    }
}

async fn setup_with(emu_config: EmulatorConfig) -> Setup {
    let token = emu_config.token.clone().unwrap_or_default();
    common::init_tracing();
    let sandboxes = Sandboxes::start().await;
    let emu = NomadEmulator::start(emu_config, sandboxes.runtime())
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = NomadConfig {
        address: emu.base_url(),
        datadir: data.path().to_path_buf(),
        unprivilegedprefix: "setpriv --reuid=1000 --regid=1000 --clear-groups --".into(),
        heartbeatseconds: 0.5,
        registertimeoutseconds: 5.0,
        token,
        ..NomadConfig::default()
    };
    let backend = NomadExecutor::connect(config.clone()).await.unwrap();
    let events = backend.events();
    backend.register_environment(&spec()).await.unwrap();
    Setup {
        emu,
        _sandboxes: sandboxes,
        backend,
        events,
        backlog: Vec::new(),
        config,
        _data: data,
    }
}

async fn setup() -> Setup {
    setup_with(EmulatorConfig::for_tests()).await
}

impl Setup {
    /// The first event `wanted` accepts, read before (kept in the backlog) or within 20 s.
    async fn event(&mut self, wanted: impl Fn(&BackendEvent) -> bool, what: &str) -> BackendEvent {
        if let Some(at) = self.backlog.iter().position(&wanted) {
            return self.backlog.remove(at);
        }
        let (events, backlog) = (&mut self.events, &mut self.backlog);
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let e = events.next().await.expect("events ended");
                if wanted(&e) {
                    return e;
                }
                backlog.push(e);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {what}"))
    }

    async fn runner(&mut self) -> RunnerId {
        let creation = self.backend.create_runner(&spec()).await.unwrap();
        let Creation::Pending(info) = creation else {
            panic!("ready before its allocation ran: {creation:?}");
        };
        let id = info.id.clone();
        self.event(
            |e| matches!(e, BackendEvent::RunnerReady { runner, .. } if *runner == id),
            "RunnerReady",
        )
        .await;
        id
    }

    fn alloc_of(&self, runner: &RunnerId) -> String {
        let allocs = self.emu.control().allocs(runner.as_str());
        allocs
            .iter()
            .max_by_key(|a| a["CreateIndex"].as_u64())
            .and_then(|a| a["ID"].as_str())
            .expect("an allocation")
            .to_string()
    }

    async fn run(
        &self,
        runner: &RunnerId,
        command: &str,
    ) -> (String, String, Option<ExecutionEvent>) {
        let mut r = ExecutionRequest::new(command);
        r.privileged_execution = true;
        let h = self
            .backend
            .execute(runner, &r, CancellationToken::new())
            .await
            .unwrap();
        let mut events = h.events;
        let (mut out, mut err, mut end) = (Vec::new(), Vec::new(), None);
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(e) = events.recv().await {
                match e {
                    ExecutionEvent::Stdout(b) => out.extend_from_slice(&b),
                    ExecutionEvent::Stderr(b) => err.extend_from_slice(&b),
                    e => end = Some(e),
                }
            }
        })
        .await
        .expect("the execution ended");
        drop(h.stdin);
        (
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
            end,
        )
    }

    async fn job_gone(&self, runner: &RunnerId) {
        let c = self.emu.control();
        let id = runner.to_string();
        c.wait_for(Duration::from_secs(20), move |c| c.job(&id).is_none())
            .await
            .unwrap_or_else(|_| panic!("the job of {runner} is still registered"));
    }

    async fn runner_jobs(&self) -> Vec<String> {
        HttpNomadApi::new(&self.config)
            .unwrap()
            .list_jobs("10-")
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claim_makes_one_put_and_an_execution_no_rest_call() {
    let mut s = setup().await;
    let r = s.runner().await;
    let before = s.emu.control().requests().len();
    s.backend
        .mark_runner(
            &r,
            &RunnerState::Used(UsedState {
                inactivity_timeout: Duration::from_secs(60),
                deadline: None,
            }),
        )
        .await
        .unwrap();
    let requests = s.emu.control().requests();
    let mark: Vec<String> = requests[before..]
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(mark, ["PUT /v1/jobs"], "the used-mark");
    let job = s.emu.control().job(r.as_str()).unwrap();
    assert_eq!(job["TaskGroups"][1]["Meta"]["used"], "true");
    assert_eq!(job["TaskGroups"][1]["Meta"]["timeout"], "60");

    let before = s.emu.control().requests().len();
    let (out, err, end) = s.run(&r, "echo hi; echo oops >&2; exit 3").await;
    assert_eq!((out.as_str(), err.as_str()), ("hi\r\n", "oops\n"));
    assert_eq!(end, Some(ExecutionEvent::Exit(3)));
    let during: Vec<String> = s.emu.control().requests()[before..]
        .iter()
        .map(|r| r.path.clone())
        .filter(|p| !p.ends_with("/exec"))
        .collect();
    assert!(
        during.is_empty(),
        "REST calls during an execution: {during:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oom_kill_ends_the_execution_as_oom_and_the_runner_is_never_handed_out_again() {
    let mut s = setup().await;
    let r = s.runner().await;
    let alloc = s.alloc_of(&r);
    let mut req = ExecutionRequest::new("sleep 100");
    req.privileged_execution = true;
    let h = s
        .backend
        .execute(&r, &req, CancellationToken::new())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(s.emu.control().oom_kill(&alloc));
    let stopped = s
        .event(
            |e| matches!(e, BackendEvent::RunnerStopped { .. }),
            "RunnerStopped",
        )
        .await;
    assert_eq!(
        stopped,
        BackendEvent::RunnerStopped {
            runner: r.clone(),
            reason: DestroyReason::OomKilled
        }
    );
    let mut events = h.events;
    let mut end = None;
    while let Some(e) = tokio::time::timeout(Duration::from_secs(20), events.recv())
        .await
        .expect("the execution ended")
    {
        if e.is_terminal() {
            end = Some(e);
        }
    }
    assert_eq!(
        end,
        Some(ExecutionEvent::Error(ExecutionFailure::OomKilled))
    );
    s.job_gone(&r).await;
    assert!(matches!(
        s.backend.execute(&r, &req, CancellationToken::new()).await,
        Err(BackendError::RunnerNotFound(_))
    ));
    let records = s.backend.load_runners(spec().id).await.unwrap();
    assert!(records.iter().all(|rec| rec.info.id != r));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_task_and_a_lost_node_stop_their_runners_without_leaking_jobs() {
    let mut s = setup().await;
    s.emu.control().add_node(NodeSpec::named("emu-node-2"));
    let crashed = s.runner().await;
    let others = [s.runner().await, s.runner().await];
    assert!(s.emu.control().crash_task(&s.alloc_of(&crashed), 1));
    s.event(
        |e| matches!(e, BackendEvent::RunnerStopped { runner, reason: DestroyReason::Stopped(_) } if *runner == crashed),
        "RunnerStopped for the crashed runner",
    )
    .await;
    s.job_gone(&crashed).await;
    let node_of = |s: &Setup, r: &RunnerId| {
        s.emu.control().allocs(r.as_str())[0]["NodeID"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let lost_node = node_of(&s, &others[0]);
    let (on_lost, elsewhere): (Vec<RunnerId>, Vec<RunnerId>) = others
        .iter()
        .cloned()
        .partition(|r| node_of(&s, r) == lost_node);
    assert!(s.emu.control().lose_node(&lost_node));
    for r in &on_lost {
        s.event(
            |e| matches!(e, BackendEvent::RunnerStopped { runner, .. } if runner == r),
            "RunnerStopped for a runner on the lost node",
        )
        .await;
        // Its replacement allocation on the other node must not leak.
        s.job_gone(r).await;
    }
    let mut jobs = s.runner_jobs().await;
    jobs.sort();
    let mut expected: Vec<String> = elsewhere.iter().map(|r| r.to_string()).collect();
    expected.sort();
    assert_eq!(
        jobs, expected,
        "only runners on the healthy node keep their jobs"
    );
    // New runners land on the healthy node and work.
    let fresh = s.runner().await;
    let (out, _, end) = s.run(&fresh, "echo fine").await;
    assert_eq!(
        (out.as_str(), end),
        ("fine\r\n", Some(ExecutionEvent::Exit(0)))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_capacity_a_creation_fails_as_overload_and_leaves_no_job() {
    let s = setup().await;
    let node = s.emu.control().nodes()[0]["ID"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(s.emu.control().set_capacity(&node, 0, 0));
    match s.backend.create_runner(&spec()).await {
        Err(BackendError::Overloaded(m)) => assert!(m.contains("place"), "{m}"),
        other => panic!("a creation without capacity: {other:?}"),
    }
    let c = s.emu.control();
    let config = s.config.clone();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let jobs = HttpNomadApi::new(&config)
                .unwrap()
                .list_jobs("10-")
                .await
                .unwrap();
            if jobs.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the unplaceable job was purged");
    let _ = c;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_faults_are_retried_and_a_slow_listing_blocks_no_execution() {
    let mut s = setup().await;
    let c = s.emu.control();
    c.fail_requests(
        Match::path("/v1/jobs").method("PUT"),
        Times(2),
        500,
        "rpc error: No cluster leader",
    );
    c.fail_requests(
        Match::path("/v1/jobs").method("POST"),
        Times(2),
        500,
        "rpc error: No cluster leader",
    );
    let r = s.runner().await;
    c.drop_connection(Match::path("/v1/jobs").method("PUT"), Times(1));
    c.drop_connection(Match::path("/v1/jobs").method("POST"), Times(1));
    let r2 = s.runner().await;
    assert_ne!(r, r2);
    c.delay_requests(
        Match::path("/v1/job/*/allocations"),
        Times(10),
        Duration::from_secs(8),
    );
    let backend = s.backend.clone();
    let slow = tokio::spawn(async move { backend.load_runners(spec().id).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (out, _, end) = s.run(&r, "echo quick").await;
    assert_eq!(
        (out.as_str(), end),
        ("quick\r\n", Some(ExecutionEvent::Exit(0)))
    );
    assert!(
        !slow.is_finished(),
        "the execution waited for the slow listing"
    );
    let records = slow.await.unwrap().unwrap();
    assert_eq!(records.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stream_resumes_after_drops_and_stalls_and_resynchronises_after_a_gap() {
    let mut s = setup().await;
    let c = s.emu.control();
    s.runner().await;
    let subscriptions = |c: &nomad_emulator::Control| -> Vec<String> {
        c.requests()
            .into_iter()
            .filter(|r| r.path == "/v1/event/stream")
            .map(|r| r.query.clone())
            .collect()
    };
    let last = c.index();
    let before = subscriptions(&c).len();
    c.drop_event_streams();
    c.wait_for(Duration::from_secs(10), |c| subscriptions(c).len() > before)
        .await
        .expect("a resubscription after the drop");
    let query = subscriptions(&c)[before].clone();
    let index: u64 = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("index="))
        .and_then(|v| v.parse().ok())
        .expect("an index");
    assert!(
        index > 1 && index <= last + 1,
        "resumed at {index}, last seen {last}"
    );
    // A runner created after the drop still becomes ready.
    s.runner().await;

    let before = subscriptions(&c).len();
    c.stall_event_streams(true);
    c.wait_for(Duration::from_secs(10), |c| subscriptions(c).len() > before)
        .await
        .expect("the watchdog reconnects a silent stream");
    c.stall_event_streams(false);
    s.runner().await;

    // Events lost while away: a runner's job is purged behind the adapter's back while the
    // stream is silent, and the buffer forgets it before the stream comes back.
    let victim = s.runner().await;
    // Two refusals keep the adapter away (fewer than the three failures that resynchronise
    // anyway) while the purge happens and the buffer forgets it.
    c.reject_event_streams(Times(2), 500);
    c.drop_event_streams();
    HttpNomadApi::new(&s.config)
        .unwrap()
        .purge_job(victim.as_str())
        .await
        .unwrap();
    c.truncate_event_buffer();
    // The next batch starts above the resume index: a gap.
    s.runner().await;
    s.event(
        |e| matches!(e, BackendEvent::Resynchronize),
        "Resynchronize after a gap",
    )
    .await;
    // The reload the manager does then finds the purged runner gone.
    let records = s.backend.load_runners(spec().id).await.unwrap();
    assert!(records.iter().all(|r| r.info.id != victim));
    s.event(
        |e| matches!(e, BackendEvent::RunnerStopped { runner, .. } if *runner == victim),
        "RunnerStopped for the runner purged during the gap",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_emulator_restart_and_refused_subscriptions_are_survived() {
    let mut s = setup().await;
    let r = s.runner().await;
    let c = s.emu.control();
    let streams = |c: &nomad_emulator::Control| {
        c.requests()
            .iter()
            .filter(|r| r.path == "/v1/event/stream")
            .count()
    };
    let before = streams(&c);
    c.restart_server(Duration::from_millis(500));
    c.wait_for(Duration::from_secs(10), |c| streams(c) > before)
        .await
        .expect("resubscribed after the restart");
    let (out, _, end) = s.run(&r, "echo back").await;
    assert_eq!(
        (out.as_str(), end),
        ("back\r\n", Some(ExecutionEvent::Exit(0)))
    );
    s.runner().await;
    // Subscriptions refused again and again: once back, the adapter resynchronises.
    c.reject_event_streams(Times(4), 500);
    c.drop_event_streams();
    s.event(
        |e| matches!(e, BackendEvent::Resynchronize),
        "Resynchronize after failed subscriptions",
    )
    .await;
    let records = s.backend.load_runners(spec().id).await.unwrap();
    assert!(records.iter().any(|rec| rec.info.id == r));
    s.runner().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exec_cut_before_its_exit_is_an_error_not_exit_0() {
    let mut s = setup().await;
    let r = s.runner().await;
    let alloc = s.alloc_of(&r);
    s.emu
        .control()
        .exec_close_before_exit(Some(&alloc), Times(2), 1000);
    let (_, _, end) = s.run(&r, "echo x").await;
    assert_eq!(end, Some(ExecutionEvent::Error(ExecutionFailure::Failed)));
    s.emu
        .control()
        .exec_drop_after_frames(Some(&alloc), Times(2), 1);
    let (_, _, end) = s
        .run(&r, "echo a; sleep 0.2; echo b; sleep 0.2; echo c")
        .await;
    assert_eq!(end, Some(ExecutionEvent::Error(ExecutionFailure::Failed)));
    let (out, _, end) = s.run(&r, "echo ok").await;
    assert_eq!(
        (out.as_str(), end),
        ("ok\r\n", Some(ExecutionEvent::Exit(0)))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_goes_with_every_call_stream_and_exec() {
    let mut s = setup_with(EmulatorConfig {
        token: Some("s3cret".into()),
        ..EmulatorConfig::for_tests()
    })
    .await;
    let r = s.runner().await;
    let (out, _, end) = s.run(&r, "echo authorised").await;
    assert_eq!(
        (out.as_str(), end),
        ("authorised\r\n", Some(ExecutionEvent::Exit(0)))
    );
    let requests = s.emu.control().requests();
    assert!(requests.iter().any(|r| r.path.ends_with("/exec")));
    for r in &requests {
        assert!(
            r.headers
                .iter()
                .any(|(k, v)| k.eq_ignore_ascii_case("x-nomad-token") && v == "s3cret"),
            "{} {} without the token",
            r.method,
            r.path
        );
    }
    let wrong = NomadConfig {
        token: "wrong".into(),
        ..s.config.clone()
    };
    assert!(NomadExecutor::connect(wrong).await.is_err());
}
