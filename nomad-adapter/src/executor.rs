//! [`NomadExecutor`]: [`ExecutorApi`] on Nomad.
//!
//! It owns one event-stream consumer (started before anything is listed, so no change is missed)
//! that feeds the [`Tracker`]; claims, readiness and executions are answered from the tracker's
//! cache, so a claim makes no Nomad call and an execution opens only its exec sessions.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream};
use futures::{StreamExt, TryStreamExt};
use runner_core::backoff::{Backoff, BackoffPolicy};
use runner_core::{
    BackendError, BackendEvent, Creation, DestroyReason, EnvironmentId, EnvironmentSpec,
    ExecutionEvent, ExecutionFailure, ExecutionHandle, ExecutionRequest, ExecutorApi, FileContent,
    FileError, FileHeader, FileUpdate, ListFilesRequest, RecordedState, RunnerId, RunnerInfo,
    RunnerRecord, RunnerState, UsedState,
};
use serde_json::Value;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::api::{HttpNomadApi, SharedApi};
use crate::command::{self, NOT_FOUND_EXIT};
use crate::config::NomadConfig;
use crate::error::{ApiError, NomadError};
use crate::exec::{ExecTarget, SessionEnd, Stdin};
use crate::files;
use crate::jobs::{self, JobShape};
use crate::stream::{Cursor, Item, Line, LineDecoder, Verdict, parse_line};
use crate::tracker::{Action, EvalOutcome, Listed, ListedState, Phase, Tracker};

/// The clean-shutdown marker's file name in the data directory.
const MARKER: &str = "clean-shutdown.json";
/// Attempts of a REST call that fails transiently.
const ATTEMPTS: u32 = 5;
/// Events buffered per execution.
const EVENT_BUFFER: usize = 64;
/// Largest output collected from a file command.
const MAX_COLLECT: usize = 64 << 20;
/// How long an execution's stderr may trail its exit.
const STDERR_GRACE: Duration = Duration::from_secs(2);
/// How long an exit code 128 waits for an OOM report (Poseidon #397/#401).
const OOM_GRACE: Duration = Duration::from_secs(1);
/// How long a runner that stopped on its own is remembered.
const FORGET_STOPPED_AFTER: Duration = Duration::from_secs(60);
/// Consecutive failed subscriptions after which a resynchronisation is due.
const RESYNC_AFTER_FAILURES: u32 = 3;

/// [`ExecutorApi`] on Nomad, with Poseidon's job layout. Cheap to clone.
#[derive(Debug, Clone)]
pub struct NomadExecutor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: NomadConfig,
    api: SharedApi,
    exec: ExecTarget,
    shape: JobShape,
    prefix: Vec<String>,
    tracker: Mutex<Tracker>,
    evals: Notify,
    events_tx: mpsc::UnboundedSender<BackendEvent>,
    events_rx: Mutex<Option<mpsc::UnboundedReceiver<BackendEvent>>>,
    clean_start: bool,
    marker: PathBuf,
    deadlines: Mutex<HashMap<RunnerId, u64>>,
    restored_deadlines: HashMap<String, u64>,
    stop: CancellationToken,
    backoff: BackoffPolicy,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The executor is shared across tasks and its futures run on any of them.
const _: fn() = || {
    fn send<T: Send>(_: T) {}
    send(NomadExecutor::connect(NomadConfig::default()));
};

impl NomadExecutor {
    /// Connects to the Nomad `config` names: checks the leader, opens the event stream (and
    /// waits for its first line), and reads the clean-shutdown marker of the data directory.
    pub async fn connect(config: NomadConfig) -> Result<NomadExecutor, NomadError> {
        let api = Arc::new(HttpNomadApi::new(&config)?);
        Self::with_api(config, api).await
    }

    /// [`NomadExecutor::connect`] over another [`NomadApi`] (for tests).
    pub async fn with_api(
        config: NomadConfig,
        api: SharedApi,
    ) -> Result<NomadExecutor, NomadError> {
        crate::tls::install_crypto_provider();
        let tls = crate::tls::client_config(&config.tls)?;
        let token = (!config.token.is_empty()).then(|| config.token.clone());
        let exec = ExecTarget::new(&config.base_url(), &config.namespace, token, tls);
        std::fs::create_dir_all(&config.datadir).map_err(|source| NomadError::DataDir {
            path: config.datadir.clone(),
            source,
        })?;
        let marker = config.datadir.join(MARKER);
        let (clean_start, restored_deadlines) = match std::fs::read(&marker) {
            Ok(bytes) => {
                let deadlines = serde_json::from_slice::<Value>(&bytes)
                    .ok()
                    .and_then(|v| serde_json::from_value(v["deadlines"].clone()).ok())
                    .unwrap_or_default();
                (true, deadlines)
            }
            Err(_) => (false, HashMap::new()),
        };
        let mut leader = Backoff::new(BackoffPolicy {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(2),
        });
        loop {
            match api.leader().await {
                Ok(_) => break,
                Err(e) if leader.failures() + 1 < ATTEMPTS && e.is_transient() => {
                    tokio::time::sleep(leader.fail()).await;
                }
                Err(e) => return Err(NomadError::Unreachable(e.to_string())),
            }
        }
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let shape = JobShape {
            network: config.network.clone(),
            disable_force_pull: config.disableforcepull,
            ..JobShape::default()
        };
        let inner = Arc::new(Inner {
            prefix: config.unprivileged_prefix(),
            config,
            api: api.clone(),
            exec,
            shape,
            tracker: Mutex::new(Tracker::default()),
            evals: Notify::new(),
            events_tx,
            events_rx: Mutex::new(Some(events_rx)),
            clean_start,
            marker,
            deadlines: Mutex::new(HashMap::new()),
            restored_deadlines,
            stop: CancellationToken::new(),
            backoff: BackoffPolicy {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(5),
            },
        });
        let (ready_tx, mut ready_rx) = watch::channel(false);
        tokio::spawn(consume_stream(
            Arc::downgrade(&inner),
            api,
            inner.config.watchdog(),
            inner.stop.clone(),
            ready_tx,
        ));
        let stream_up = matches!(
            tokio::time::timeout(
                inner.config.watchdog().max(Duration::from_secs(5)),
                ready_rx.wait_for(|up| *up),
            )
            .await,
            Ok(Ok(_))
        );
        if !stream_up {
            inner.stop.cancel();
            return Err(NomadError::Unreachable(
                "the event stream did not answer".into(),
            ));
        }
        let executor = NomadExecutor { inner };
        // Known environments first, so replayed template events settle against them.
        executor
            .load_environments()
            .await
            .map_err(|e| NomadError::Unreachable(e.to_string()))?;
        let deferred = lock(&executor.inner.tracker).environments_loaded();
        executor.inner.perform(deferred);
        // From now on a crash leaves no marker. Removed only once connected: a connection that
        // failed (and is retried) must not cost the next attempt its clean start.
        match std::fs::remove_file(&executor.inner.marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(NomadError::DataDir {
                    path: executor.inner.marker.clone(),
                    source,
                });
            }
        }
        info!(clean_start, "connected to nomad");
        Ok(executor)
    }

    /// Stops following Nomad and records a clean shutdown, so the next start trusts idle marks.
    /// Runners stay on Nomad.
    pub async fn shutdown(&self) -> Result<(), NomadError> {
        self.inner.stop.cancel();
        let deadlines: HashMap<String, u64> = lock(&self.inner.deadlines)
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        let body = serde_json::json!({ "deadlines": deadlines }).to_string();
        let marker = self.inner.marker.clone();
        let tmp = marker.with_extension("tmp");
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(body.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &marker)
        })
        .await
        .map_err(|e| NomadError::Unreachable(e.to_string()))?
        .map_err(|source| NomadError::DataDir {
            path: self.inner.marker.clone(),
            source,
        })
    }
}

/// Follows the event stream until `stop`: resumes from `last + 1`, drops replays, reconnects
/// when nothing (heartbeats included) arrives within `watchdog`, and asks for a resynchronisation
/// after a gap or repeated failures.
async fn consume_stream(
    inner: Weak<Inner>,
    api: SharedApi,
    watchdog: Duration,
    stop: CancellationToken,
    ready: watch::Sender<bool>,
) {
    let mut cursor = Cursor::default();
    let mut backoff = Backoff::new(BackoffPolicy {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(5),
    });
    let mut failures = 0u32;
    let mut resync_due = false;
    loop {
        let index = cursor.next_index();
        let opened = tokio::select! {
            () = stop.cancelled() => return,
            opened = tokio::time::timeout(watchdog, api.event_stream(index)) => opened,
        };
        let mut body = match opened {
            Ok(Ok(body)) => body,
            other => {
                failures += 1;
                if failures >= RESYNC_AFTER_FAILURES {
                    resync_due = true;
                }
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                warn!(index, failures, error = %why, "subscribing to nomad's event stream failed");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff.fail()) => continue,
                }
            }
        };
        cursor.subscribed(index);
        debug!(index, "event stream subscribed");
        let mut decoder = LineDecoder::default();
        let mut first = true;
        loop {
            let chunk = tokio::select! {
                () = stop.cancelled() => return,
                chunk = tokio::time::timeout(watchdog, body.next()) => chunk,
            };
            let bytes = match chunk {
                Ok(Some(Ok(bytes))) => bytes,
                Ok(Some(Err(e))) => {
                    warn!(error = %e, "nomad's event stream broke");
                    break;
                }
                Ok(None) => {
                    warn!("nomad's event stream ended");
                    break;
                }
                Err(_) => {
                    warn!(?watchdog, "nomad's event stream went silent; reconnecting");
                    break;
                }
            };
            let Some(inner) = inner.upgrade() else {
                return;
            };
            for line in decoder.push(&bytes) {
                if first {
                    first = false;
                    failures = 0;
                    backoff.succeed();
                    let _ = ready.send(true);
                    if std::mem::take(&mut resync_due) {
                        inner.emit(BackendEvent::Resynchronize);
                    }
                }
                let line = match line {
                    Line::Complete(line) => line,
                    Line::Overlong => {
                        warn!("an event-stream line was too long and is lost; resynchronising");
                        inner.emit(BackendEvent::Resynchronize);
                        continue;
                    }
                };
                match parse_line(&line) {
                    Item::Heartbeat => {}
                    Item::Malformed(why) => warn!(%why, "skipping an unreadable event-stream line"),
                    Item::Batch { index, events } => match cursor.accept(index) {
                        Verdict::Duplicate => {}
                        verdict => {
                            inner.apply(&events);
                            if verdict == Verdict::AfterGap {
                                info!(
                                    index,
                                    "events were missed while the stream was away; resynchronising"
                                );
                                inner.emit(BackendEvent::Resynchronize);
                            }
                        }
                    },
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff.fail()) => {}
        }
    }
}

impl Inner {
    fn emit(&self, event: BackendEvent) {
        let _ = self.events_tx.send(event);
    }

    fn apply(self: &Arc<Self>, events: &[crate::stream::Event]) {
        let now = Instant::now();
        let actions: Vec<Action> = {
            let mut tracker = lock(&self.tracker);
            events.iter().flat_map(|e| tracker.apply(e, now)).collect()
        };
        if events.iter().any(|e| e.topic == "Evaluation") {
            self.evals.notify_waiters();
        }
        self.perform(actions);
    }

    fn perform(self: &Arc<Self>, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Emit(event) => {
                    debug!(?event, "backend event");
                    if let BackendEvent::RunnerStopped { runner, .. } = &event {
                        // Kept a while (an execution may still ask why it ended), then forgotten.
                        let inner = Arc::downgrade(self);
                        let runner = runner.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(FORGET_STOPPED_AFTER).await;
                            if let Some(inner) = inner.upgrade() {
                                let mut tracker = lock(&inner.tracker);
                                if tracker
                                    .runner(&runner)
                                    .is_some_and(|t| t.phase == Phase::Gone)
                                {
                                    tracker.forget(&runner);
                                }
                            }
                        });
                    }
                    self.emit(event);
                }
                Action::CheckEnvironment(env) => {
                    let inner = self.clone();
                    tokio::spawn(async move { inner.check_environment(env).await });
                }
                Action::Purge(job) => {
                    let inner = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = inner.retry(|| inner.api.purge_job(&job)).await {
                            warn!(job_id = %job, error = %e, "purging a stopped runner's job failed");
                        }
                    });
                }
            }
        }
    }

    /// Reads `env`'s template and tells the manager if it appeared or vanished.
    async fn check_environment(self: &Arc<Self>, env: EnvironmentId) {
        let id = jobs::template_id(env);
        let template = match self.retry(|| self.api.read_job(&id)).await {
            Ok(job) => job
                .filter(|j| j["Stop"] != Value::Bool(true))
                .and_then(|j| jobs::spec_of_template(&j)),
            Err(e) => {
                warn!(environment_id = %env, error = %e, "reading a template failed");
                return;
            }
        };
        let event = lock(&self.tracker).settle_environment(env, template);
        if let Some(event) = event {
            info!(?event, "environment changed on nomad");
            self.emit(event);
        }
    }

    /// Runs `call` until it succeeds, fails permanently, or [`ATTEMPTS`] transient failures.
    async fn retry<T, F, Fut>(&self, mut call: F) -> Result<T, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        let mut backoff = Backoff::new(self.backoff);
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && backoff.failures() + 1 < ATTEMPTS => {
                    let delay = backoff.fail();
                    debug!(error = %e, ?delay, "retrying a nomad call");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for the evaluation's outcome on the stream, then reads it directly.
    async fn await_eval(&self, eval_id: &str) -> Result<(), BackendError> {
        if eval_id.is_empty() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.config.register_timeout();
        let outcome = loop {
            let notified = self.evals.notified();
            if let Some(o) = lock(&self.tracker).eval_outcome(eval_id) {
                break Some(o);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break None;
            }
        };
        let outcome = match outcome {
            Some(o) => o,
            None => {
                let eval = self
                    .retry(|| self.api.read_evaluation(eval_id))
                    .await
                    .map_err(BackendError::from)?;
                match eval.as_ref().and_then(EvalOutcome::of) {
                    Some(o) => o,
                    None => {
                        return Err(BackendError::Unreachable(format!(
                            "evaluation {eval_id} did not complete in time"
                        )));
                    }
                }
            }
        };
        match outcome {
            EvalOutcome::Complete => Ok(()),
            EvalOutcome::PlacementFailed(m) => Err(BackendError::Overloaded(m)),
            EvalOutcome::Failed(m) => Err(BackendError::Internal(m)),
        }
    }

    fn alloc_of(&self, runner: &RunnerId) -> Result<String, BackendError> {
        let tracker = lock(&self.tracker);
        match tracker.runner(runner) {
            Some(t) if t.phase == Phase::Ready => t
                .alloc
                .clone()
                .ok_or_else(|| BackendError::RunnerNotFound(runner.clone())),
            _ => Err(BackendError::RunnerNotFound(runner.clone())),
        }
    }

    fn stop_reason(&self, runner: &RunnerId) -> Option<DestroyReason> {
        lock(&self.tracker)
            .runner(runner)
            .and_then(|t| t.stopped.clone())
    }

    fn gone(&self, runner: &RunnerId) -> bool {
        lock(&self.tracker)
            .runner(runner)
            .is_none_or(|t| t.phase == Phase::Gone)
    }

    /// An exec session's refusal as a backend error.
    fn session_error(&self, runner: &RunnerId, message: String) -> BackendError {
        if self.gone(runner)
            || message.contains("Unknown allocation")
            || message.contains("exec not possible")
        {
            BackendError::RunnerNotFound(runner.clone())
        } else {
            BackendError::Unreachable(message)
        }
    }

    /// Runs a file command without a terminal and collects its output (bounded).
    async fn collect(
        &self,
        runner: &RunnerId,
        argv: Vec<String>,
        stdin: Stdin,
    ) -> Result<(i32, Vec<u8>, Vec<u8>), BackendError> {
        let alloc = self.alloc_of(runner)?;
        let (tx, mut rx) = mpsc::channel(EVENT_BUFFER);
        let handle = self
            .exec
            .open(&alloc, jobs::MAIN_TASK, &argv, false, stdin, tx)
            .await
            .map_err(|m| self.session_error(runner, m))?;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some((is_err, bytes)) = rx.recv().await {
            let buf = if is_err { &mut err } else { &mut out };
            if buf.len() + bytes.len() > MAX_COLLECT {
                handle.abort();
                return Err(BackendError::Internal(format!(
                    "the command's output exceeds {MAX_COLLECT} bytes"
                )));
            }
            buf.extend_from_slice(&bytes);
        }
        match handle.await {
            Ok(SessionEnd::Exited(code)) => Ok((code, out, err)),
            Ok(SessionEnd::Broken(m)) => Err(self.session_error(runner, m)),
            Ok(SessionEnd::Abandoned) | Err(_) => Err(BackendError::Internal(
                "the exec session was abandoned".into(),
            )),
        }
    }

    /// Kills an execution's processes (best effort, bounded).
    async fn kill(self: &Arc<Self>, alloc: &str, argv: Vec<String>) {
        let (tx, mut rx) = mpsc::channel(4);
        match self
            .exec
            .open(alloc, jobs::MAIN_TASK, &argv, false, Stdin::Never, tx)
            .await
        {
            Ok(handle) => {
                let drain = async {
                    while rx.recv().await.is_some() {}
                    handle.await
                };
                match tokio::time::timeout(Duration::from_secs(10), drain).await {
                    Ok(Ok(SessionEnd::Exited(_))) => {}
                    other => {
                        warn!(alloc_id = %alloc, outcome = ?other, "killing an execution did not finish")
                    }
                }
            }
            Err(e) => warn!(alloc_id = %alloc, error = %e, "killing an execution failed"),
        }
    }
}

fn file_error(e: BackendError) -> FileError {
    FileError::Backend(e)
}

fn check_path(path: &str) -> Result<(), FileError> {
    if path.is_empty() || path.contains('\0') || path.len() > files::MAX_PATH_LEN {
        return Err(FileError::InvalidPath(path.to_string()));
    }
    Ok(())
}

#[async_trait]
impl ExecutorApi for NomadExecutor {
    async fn register_environment(&self, spec: &EnvironmentSpec) -> Result<(), BackendError> {
        let inner = &self.inner;
        lock(&inner.tracker).environment_known(spec.id);
        let job = inner.shape.template(spec);
        let registration = inner.retry(|| inner.api.register_job(&job)).await?;
        inner.await_eval(&registration.eval_id).await
    }

    async fn delete_environment(&self, id: EnvironmentId) -> Result<(), BackendError> {
        let inner = &self.inner;
        lock(&inner.tracker).environment_deleting(id);
        let job = jobs::template_id(id);
        inner.retry(|| inner.api.purge_job(&job)).await?;
        Ok(())
    }

    async fn load_environments(&self) -> Result<Vec<EnvironmentSpec>, BackendError> {
        let inner = &self.inner;
        let stubs = inner
            .retry(|| inner.api.list_jobs(jobs::TEMPLATE_PREFIX))
            .await?;
        let mut specs = Vec::new();
        for stub in stubs {
            if stub.status == "dead" || jobs::environment_of_template(&stub.id).is_none() {
                continue;
            }
            let Some(job) = inner.retry(|| inner.api.read_job(&stub.id)).await? else {
                continue;
            };
            if job["Stop"] == Value::Bool(true) {
                continue;
            }
            if let Some(spec) = jobs::spec_of_template(&job) {
                lock(&inner.tracker).environment_known(spec.id);
                specs.push(spec);
            }
        }
        Ok(specs)
    }

    async fn create_runner(&self, spec: &EnvironmentSpec) -> Result<Creation, BackendError> {
        let inner = &self.inner;
        let id = RunnerId::generate(spec.id);
        let job = inner.shape.runner(spec, &id, true);
        lock(&inner.tracker).creating(id.clone(), spec.id, job.clone(), Instant::now());
        let registered = match inner.retry(|| inner.api.register_job(&job)).await {
            Ok(r) => inner.await_eval(&r.eval_id).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = registered {
            // Whatever Nomad kept of it goes: no leaked job (Poseidon leaves a blocked one).
            lock(&inner.tracker).destroying(&id);
            let cleanup = inner.clone();
            let job_id = id.to_string();
            tokio::spawn(async move {
                if cleanup
                    .retry(|| cleanup.api.purge_job(&job_id))
                    .await
                    .is_ok()
                {
                    lock(&cleanup.tracker).forget(&RunnerId::new(job_id.as_str()));
                }
            });
            return Err(e);
        }
        let mut mapped_ports = lock(&inner.tracker)
            .newest_ports(id.as_str())
            .unwrap_or_default();
        if mapped_ports.len() < spec.exposed_ports.len() {
            // The stream has not shown the placement (e.g. it is reconnecting): read it.
            let allocs = inner
                .retry(|| inner.api.job_allocations(id.as_str()))
                .await
                .unwrap_or_default();
            if let Some(newest) = allocs
                .iter()
                .filter_map(crate::tracker::AllocView::parse)
                .max_by_key(|a| a.create_index)
            {
                mapped_ports = newest.ports;
            }
        }
        let info = RunnerInfo {
            id: id.clone(),
            environment: spec.id,
            mapped_ports,
        };
        // The stream may have reported it running already.
        let ready = lock(&inner.tracker)
            .runner(&id)
            .is_some_and(|t| t.phase == Phase::Ready);
        if ready {
            // RunnerReady was (or is about to be) emitted; Pending keeps one code path.
            debug!(runner_id = %id, "runner already running when its creation returned");
        }
        Ok(Creation::Pending(info))
    }

    async fn destroy_runner(
        &self,
        runner: &RunnerId,
        reason: &DestroyReason,
    ) -> Result<(), BackendError> {
        let inner = &self.inner;
        lock(&inner.tracker).destroying(runner);
        lock(&inner.deadlines).remove(runner);
        debug!(runner_id = %runner, reason = reason.label(), "destroying runner");
        let job = runner.to_string();
        inner.retry(|| inner.api.purge_job(&job)).await?;
        lock(&inner.tracker).forget(runner);
        Ok(())
    }

    async fn mark_runner(
        &self,
        runner: &RunnerId,
        state: &RunnerState,
    ) -> Result<(), BackendError> {
        let inner = &self.inner;
        let cached = {
            let tracker = lock(&inner.tracker);
            match tracker.runner(runner) {
                Some(t) if t.phase == Phase::Gone => {
                    return Err(BackendError::RunnerNotFound(runner.clone()));
                }
                Some(t) => t.job.clone(),
                None => None,
            }
        };
        let mut job = match cached {
            Some(job) => job,
            None => inner
                .retry(|| inner.api.read_job(runner.as_str()))
                .await?
                .ok_or_else(|| BackendError::RunnerNotFound(runner.clone()))?,
        };
        if !jobs::set_runner_state(&mut job, state) {
            return Err(BackendError::Internal(format!(
                "job {runner} has no config group to record its state in"
            )));
        }
        inner.retry(|| inner.api.register_job(&job)).await?;
        if let Some(t) = lock(&inner.tracker).runner_mut(runner) {
            t.job = Some(job);
        }
        let mut deadlines = lock(&inner.deadlines);
        match state {
            RunnerState::Used(UsedState {
                deadline: Some(d), ..
            }) => {
                deadlines.insert(runner.clone(), unix_seconds(*d));
            }
            _ => {
                deadlines.remove(runner);
            }
        }
        Ok(())
    }

    async fn record_activity(
        &self,
        runner: &RunnerId,
        deadline: SystemTime,
    ) -> Result<(), BackendError> {
        // Kept in memory and written with the clean-shutdown marker: a crash only shortens the
        // restored timeout to the one of the last mark.
        lock(&self.inner.deadlines).insert(runner.clone(), unix_seconds(deadline));
        Ok(())
    }

    async fn load_runners(
        &self,
        environment: EnvironmentId,
    ) -> Result<Vec<RunnerRecord>, BackendError> {
        let inner = &self.inner;
        // `<id>-`, not `<id>`: environment 1 must not load the runners of 10 (Poseidon #20).
        let prefix = format!("{environment}-");
        let stubs = inner.retry(|| inner.api.list_jobs(&prefix)).await?;
        let wanted: Vec<String> = stubs
            .into_iter()
            .filter(|s| {
                s.status != "dead" && jobs::environment_of_runner(&s.id) == Some(environment)
            })
            .map(|s| s.id)
            .collect();
        let listed: Vec<Option<Listed>> = stream::iter(wanted)
            .map(|id| async move {
                let runner = RunnerId::new(id.as_str());
                let cached = lock(&inner.tracker)
                    .runner(&runner)
                    .and_then(|t| t.job.clone());
                let job = match cached {
                    Some(job) => Some(job),
                    None => inner.retry(|| inner.api.read_job(&id)).await?,
                };
                let Some(job) = job else {
                    return Ok::<_, ApiError>(None);
                };
                let allocs = inner.retry(|| inner.api.job_allocations(&id)).await?;
                Ok(Some(Listed {
                    id: runner,
                    job,
                    allocs,
                }))
            })
            .buffer_unordered(8)
            .try_collect()
            .await?;
        let listed: Vec<Listed> = listed.into_iter().flatten().collect();
        let jobs_by_id: HashMap<RunnerId, Value> = listed
            .iter()
            .map(|l| (l.id.clone(), l.job.clone()))
            .collect();
        let (states, actions) = lock(&inner.tracker).reconcile(environment, listed, Instant::now());
        inner.perform(actions);
        let tracker = lock(&inner.tracker);
        let mut records = Vec::new();
        for (id, state) in states {
            let ListedState::Ready(info) = state else {
                continue;
            };
            let Some(track) = tracker.runner(&id) else {
                continue;
            };
            let job = track.job.as_ref().or_else(|| jobs_by_id.get(&id));
            let recorded = match job.and_then(jobs::runner_state) {
                Some(mut used) => {
                    if let Some(later) = inner.restored_deadlines.get(id.as_str())
                        && used.deadline.is_some_and(|d| unix_seconds(d) < *later)
                    {
                        used.deadline = Some(UNIX_EPOCH + Duration::from_secs(*later));
                    }
                    RecordedState::Used(used)
                }
                None if track.recovered && !inner.clean_start => RecordedState::Uncertain,
                None => RecordedState::Idle,
            };
            records.push(RunnerRecord {
                info,
                state: recorded,
            });
        }
        Ok(records)
    }

    async fn execute(
        &self,
        runner: &RunnerId,
        request: &ExecutionRequest,
        cancel: CancellationToken,
    ) -> Result<ExecutionHandle, BackendError> {
        let inner = self.inner.clone();
        let alloc = inner.alloc_of(runner)?;
        request
            .validate()
            .map_err(|e| BackendError::InvalidRequest(e.to_string()))?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let commands = command::execution(request, &id, &inner.prefix);
        let (out_tx, mut out_rx) = mpsc::channel(EVENT_BUFFER);
        // Everything the stderr session prints is the command's stderr.
        let (err_tx, mut err_rx) = mpsc::channel(EVENT_BUFFER);
        let stderr_session = inner
            .exec
            .open(
                &alloc,
                jobs::MAIN_TASK,
                &commands.stderr,
                false,
                Stdin::Never,
                err_tx,
            )
            .await
            .map_err(|m| inner.session_error(runner, m))?;
        let (stdin_tx, stdin_rx) = mpsc::channel(EVENT_BUFFER);
        let main_session = match inner
            .exec
            .open(
                &alloc,
                jobs::MAIN_TASK,
                &commands.main,
                true,
                Stdin::Forward {
                    rx: stdin_rx,
                    tty: true,
                },
                out_tx,
            )
            .await
        {
            Ok(handle) => handle,
            Err(m) => {
                stderr_session.abort();
                inner.kill(&alloc, commands.kill.clone()).await;
                return Err(inner.session_error(runner, m));
            }
        };
        let (events_tx, events_rx) = mpsc::channel(EVENT_BUFFER);
        let runner = runner.clone();
        tokio::spawn(async move {
            let mut main_session = main_session;
            let mut stderr_session = stderr_session;
            let forward = |(is_err, bytes): (bool, Bytes)| {
                if is_err {
                    ExecutionEvent::Stderr(bytes)
                } else {
                    ExecutionEvent::Stdout(bytes)
                }
            };
            let ended = loop {
                tokio::select! {
                    () = cancel.cancelled() => break None,
                    Some(chunk) = out_rx.recv() => {
                        if events_tx.send(forward(chunk)).await.is_err() {
                            break None;
                        }
                    }
                    Some((_, bytes)) = err_rx.recv() => {
                        if events_tx.send(ExecutionEvent::Stderr(bytes)).await.is_err() {
                            break None;
                        }
                    }
                    end = &mut main_session => break Some(end.unwrap_or(SessionEnd::Abandoned)),
                }
            };
            let Some(end) = ended else {
                // Cancelled or abandoned: kill the whole tree, end without a terminal event.
                main_session.abort();
                stderr_session.abort();
                inner.kill(&alloc, commands.kill).await;
                return;
            };
            // The stderr reader ends when the command's last writer closes the FIFO.
            let grace = tokio::time::sleep(STDERR_GRACE);
            tokio::pin!(grace);
            let mut stderr_done = false;
            loop {
                tokio::select! {
                    Some(chunk) = out_rx.recv() => {
                        if events_tx.send(forward(chunk)).await.is_err() {
                            return;
                        }
                    }
                    Some((_, bytes)) = err_rx.recv() => {
                        if events_tx.send(ExecutionEvent::Stderr(bytes)).await.is_err() {
                            return;
                        }
                    }
                    _ = &mut stderr_session, if !stderr_done => stderr_done = true,
                    () = &mut grace, if !stderr_done => {
                        stderr_session.abort();
                        stderr_done = true;
                    }
                    else => break,
                }
            }
            let terminal = match end {
                SessionEnd::Exited(128) => {
                    // Maybe an OOM kill whose report is on its way (Poseidon #397/#401).
                    let until = Instant::now() + OOM_GRACE;
                    loop {
                        if inner.stop_reason(&runner) == Some(DestroyReason::OomKilled) {
                            break ExecutionEvent::Error(ExecutionFailure::OomKilled);
                        }
                        if Instant::now() >= until {
                            break ExecutionEvent::Exit(128);
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                SessionEnd::Exited(code) => ExecutionEvent::Exit((code & 0xff) as u8),
                SessionEnd::Broken(message) => {
                    warn!(runner_id = %runner, %message, "execution ended without an exit code");
                    match inner.stop_reason(&runner) {
                        Some(DestroyReason::OomKilled) => {
                            ExecutionEvent::Error(ExecutionFailure::OomKilled)
                        }
                        _ => ExecutionEvent::Error(ExecutionFailure::Failed),
                    }
                }
                SessionEnd::Abandoned => return,
            };
            let _ = events_tx.send(terminal).await;
        });
        Ok(ExecutionHandle {
            stdin: stdin_tx,
            events: events_rx,
        })
    }

    async fn update_files(&self, runner: &RunnerId, update: &FileUpdate) -> Result<(), FileError> {
        let inner = &self.inner;
        for p in update
            .delete
            .iter()
            .chain(update.copy.iter().map(|c| &c.path))
        {
            check_path(p)?;
        }
        let workdir = &inner.config.workdir;
        let archive = files::archive(workdir, &update.copy).map_err(|e| {
            file_error(BackendError::Internal(format!("building the archive: {e}")))
        })?;
        let argv = command::update(workdir, &update.delete);
        let (code, out, err) = inner
            .collect(runner, argv, Stdin::Feed(Bytes::from(archive)))
            .await
            .map_err(file_error)?;
        if code == 0 {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&err);
        let failures = files::failures(workdir, &update.copy, &err);
        if failures.is_empty() {
            return Err(file_error(BackendError::Internal(format!(
                "file copy failed: stderr output '{}' and stdout output '{}'",
                err.trim(),
                String::from_utf8_lossy(&out).trim()
            ))));
        }
        Err(FileError::Partial(failures))
    }

    async fn list_files(
        &self,
        runner: &RunnerId,
        request: &ListFilesRequest,
    ) -> Result<Vec<FileHeader>, FileError> {
        let inner = &self.inner;
        if request.path.contains('\0') || request.path.len() > files::MAX_PATH_LEN {
            return Err(FileError::InvalidPath(request.path.clone()));
        }
        let prefix: &[String] = if request.privileged {
            &[]
        } else {
            &inner.prefix
        };
        let argv = command::list(
            &inner.config.workdir,
            &request.path,
            request.recursive,
            prefix,
        );
        let (code, out, err) = inner
            .collect(runner, argv, Stdin::Never)
            .await
            .map_err(file_error)?;
        match code {
            0 => Ok(files::parse_listing(&request.path, &out)),
            NOT_FOUND_EXIT => Err(FileError::NotFound),
            _ => Err(file_error(BackendError::Internal(format!(
                "listing failed: {}",
                String::from_utf8_lossy(&err).trim()
            )))),
        }
    }

    async fn read_file(
        &self,
        runner: &RunnerId,
        path: &str,
        privileged: bool,
    ) -> Result<FileContent, FileError> {
        let inner = &self.inner;
        check_path(path)?;
        let prefix: &[String] = if privileged { &[] } else { &inner.prefix };
        let argv = command::read(&inner.config.workdir, path, prefix);
        let alloc = inner.alloc_of(runner).map_err(file_error)?;
        let (tx, mut rx) = mpsc::channel(EVENT_BUFFER);
        let handle = inner
            .exec
            .open(&alloc, jobs::MAIN_TASK, &argv, false, Stdin::Never, tx)
            .await
            .map_err(|m| file_error(inner.session_error(runner, m)))?;
        // The first line is the size.
        let mut head = Vec::new();
        let size_line = loop {
            if let Some(at) = head.iter().position(|b| *b == b'\n') {
                break Some(at);
            }
            match rx.recv().await {
                Some((false, bytes)) => {
                    head.extend_from_slice(&bytes);
                    if head.len() > 64 && !head[..64].contains(&b'\n') {
                        handle.abort();
                        return Err(file_error(BackendError::Internal(
                            "unexpected output reading a file".into(),
                        )));
                    }
                }
                Some((true, _)) => {}
                None => break None,
            }
        };
        let Some(at) = size_line else {
            return match handle.await {
                Ok(SessionEnd::Exited(NOT_FOUND_EXIT)) => Err(FileError::NotFound),
                Ok(SessionEnd::Broken(m)) => Err(file_error(inner.session_error(runner, m))),
                other => Err(file_error(BackendError::Internal(format!(
                    "reading the file failed: {other:?}"
                )))),
            };
        };
        let size: u64 = String::from_utf8_lossy(&head[..at])
            .trim()
            .parse()
            .map_err(|_| file_error(BackendError::Internal("unreadable file size".into())))?;
        let first = Bytes::copy_from_slice(&head[at + 1..]);
        if size == 0 {
            // Empty, or generated (e.g. in /proc): read what there is, bounded.
            let mut content = first.to_vec();
            while let Some((is_err, bytes)) = rx.recv().await {
                if !is_err && content.len() + bytes.len() <= 1 << 20 {
                    content.extend_from_slice(&bytes);
                }
            }
            let _ = handle.await;
            return Ok(FileContent {
                size: content.len() as u64,
                body: stream::once(async move { Ok(Bytes::from(content)) }).boxed(),
            });
        }
        let body = stream::unfold(
            (Some(first), rx, size, Some(handle)),
            |(pending, mut rx, left, handle)| async move {
                if left == 0 {
                    return None;
                }
                let next = match pending.filter(|b| !b.is_empty()) {
                    Some(b) => Some(b),
                    None => loop {
                        match rx.recv().await {
                            Some((false, b)) => break Some(b),
                            Some((true, _)) => continue,
                            None => break None,
                        }
                    },
                };
                match next {
                    Some(mut b) => {
                        if b.len() as u64 > left {
                            b.truncate(left as usize);
                        }
                        let left = left - b.len() as u64;
                        Some((Ok(b), (None, rx, left, handle)))
                    }
                    None => Some((
                        Err(file_error(BackendError::Internal(
                            "the file ended early".into(),
                        ))),
                        (None, rx, 0, handle),
                    )),
                }
            },
        );
        Ok(FileContent {
            size,
            body: body.boxed(),
        })
    }

    async fn health(&self) -> Result<(), BackendError> {
        self.inner
            .api
            .leader()
            .await
            .map(|_| ())
            .map_err(|e| BackendError::Unreachable(e.to_string()))
    }

    fn events(&self) -> BoxStream<'static, BackendEvent> {
        match lock(&self.inner.events_rx).take() {
            Some(mut rx) => stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed(),
            None => stream::pending().boxed(),
        }
    }
}
