//! [`FakeExecutor`]: an in-memory [`ExecutorApi`] for tests and examples.
//!
//! Runners are records in memory, created at once (or after a configurable delay, or failing on
//! demand, or accepted as pending and reported ready later through the event stream, as a
//! Nomad-like backend does). Executions understand a tiny command language, enough to exercise streaming,
//! backpressure, cancellation and exit codes:
//!
//! | command | behaviour |
//! |---|---|
//! | `echo WORDS` | `WORDS\r\n` on stdout, exit 0 |
//! | `echo-stderr WORDS` | `WORDS\n` on stderr, exit 0 |
//! | `exit N` | exit N |
//! | `sleep SECONDS` / `sleep infinity` | waits (tokio time), exit 0 |
//! | `cat` | echoes stdin to stdout until stdin closes, exit 0 |
//! | `yes` | endless `y\r\n` on stdout |
//! | `env` | the request's variables and `CODEOCEAN=true`, one per line |
//! | `vanish` | ends the stream without a terminal event |
//! | anything else | `bash: <cmd>: command not found` on stderr, exit 127 |
//!
//! Files live in a map per runner, with the time each was written; directories exist as the
//! parents of files (listed with type `d`); paths starting with `/proc/` cannot be written.
//!
//! Its durable state (environments, runners, records, files) can outlive an instance:
//! [`FakeExecutor::restarted`] and [`FakeExecutor::crashed`] start a new one over it, after a
//! clean shutdown or a crash (idle records then become uncertain, as the crash rule asks), and
//! [`FakeExecutor::stop_runner`] ends a runner on its own. The conformance kit
//! (`runner_core::testkit`, feature `testkit`) runs against it in `tests/conformance.rs`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::destroy::DestroyReason;
use crate::environment::EnvironmentSpec;
use crate::execution::{EVENT_BUFFER, ExecutionEvent, ExecutionRequest, STDIN_BUFFER};
use crate::executor::{
    BackendError, BackendEvent, Creation, ExecutionHandle, ExecutorApi, RecordedState, RunnerInfo,
    RunnerRecord, RunnerState,
};
use crate::files::{FileContent, FileError, FileFailure, FileHeader, FileUpdate, ListFilesRequest};
use crate::ids::{EnvironmentId, RunnerId};

/// One runner of the fake backend.
#[derive(Debug, Clone)]
pub struct FakeRunner {
    /// Its description.
    pub info: RunnerInfo,
    /// The state recorded by `mark_runner`, as `load_runners` reports it.
    pub recorded: RecordedState,
    /// Its files, by absolute path.
    pub files: BTreeMap<String, Bytes>,
    /// When each of its files was last written (unix seconds), by absolute path.
    pub modified: BTreeMap<String, i64>,
}

#[derive(Debug, Default)]
struct State {
    environments: BTreeMap<EnvironmentId, EnvironmentSpec>,
    runners: HashMap<RunnerId, FakeRunner>,
    destroyed: Vec<(RunnerId, DestroyReason)>,
}

/// When a created runner of the fake backend becomes ready.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Readiness {
    /// `create_runner` returns [`Creation::Ready`] (the default).
    #[default]
    AtOnce,
    /// `create_runner` returns [`Creation::Pending`]; [`BackendEvent::RunnerReady`] follows after
    /// this long (tokio time).
    After(Duration),
    /// `create_runner` returns [`Creation::Pending`]; the runner is ready only when the test
    /// calls [`FakeExecutor::report_ready`].
    Never,
}

/// An in-memory backend. Cloning shares the state.
#[derive(Debug, Clone)]
pub struct FakeExecutor {
    state: Arc<Mutex<State>>,
    failing_creates: Arc<AtomicU32>,
    failing_environment_deletes: Arc<AtomicU32>,
    failing_executes: Arc<AtomicU32>,
    creation_refusal: Arc<Mutex<Option<String>>>,
    running_executions: Arc<AtomicUsize>,
    create_attempts: Arc<AtomicUsize>,
    creating_now: Arc<AtomicUsize>,
    max_concurrent_creates: Arc<AtomicUsize>,
    create_delay: Arc<Mutex<Duration>>,
    load_delay: Arc<Mutex<Duration>>,
    mark_delay: Arc<Mutex<Duration>>,
    readiness: Arc<Mutex<Readiness>>,
    stalled: Arc<Mutex<std::collections::HashSet<EnvironmentId>>>,
    unhealthy: Arc<Mutex<Option<String>>>,
    /// The sender of the latest `events()` stream: each call starts a new stream, so a restarted
    /// manager over the same fake receives the events from then on.
    events_tx: Arc<Mutex<Option<mpsc::UnboundedSender<BackendEvent>>>>,
}

impl Default for FakeExecutor {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeExecutor {
    /// An empty backend.
    pub fn new() -> Self {
        Self::over(Arc::default())
    }

    /// A backend over `state`, with every knob at its default and no event stream yet.
    fn over(state: Arc<Mutex<State>>) -> Self {
        Self {
            state,
            failing_creates: Arc::default(),
            failing_environment_deletes: Arc::default(),
            failing_executes: Arc::default(),
            creation_refusal: Arc::default(),
            running_executions: Arc::default(),
            create_attempts: Arc::default(),
            creating_now: Arc::default(),
            max_concurrent_creates: Arc::default(),
            create_delay: Arc::new(Mutex::new(Duration::ZERO)),
            load_delay: Arc::new(Mutex::new(Duration::ZERO)),
            mark_delay: Arc::new(Mutex::new(Duration::ZERO)),
            readiness: Arc::default(),
            stalled: Arc::default(),
            unhealthy: Arc::default(),
            events_tx: Arc::default(),
        }
    }

    /// A new instance over this one's durable state (environments, runners, their records and
    /// files), as a backend process started again after a clean shutdown would be: records are
    /// reported as they were written. Knobs (readiness, delays, injected failures) start at their
    /// defaults, and events go to the new instance's `events()` stream only.
    pub fn restarted(&self) -> FakeExecutor {
        Self::over(Arc::clone(&self.state))
    }

    /// Like [`FakeExecutor::restarted`], but as after a crash of the previous process: the fake
    /// keeps no clean-shutdown marker, so by the crash rule of [`ExecutorApi`] every runner
    /// recorded idle is reported [`RecordedState::Uncertain`] (its claim may have been lost).
    pub fn crashed(&self) -> FakeExecutor {
        for runner in self.lock().runners.values_mut() {
            if runner.recorded == RecordedState::Idle {
                runner.recorded = RecordedState::Uncertain;
            }
        }
        self.restarted()
    }

    /// Ends a runner on its own, as a sandbox killed from outside would: it is gone from the
    /// backend and [`BackendEvent::RunnerStopped`] with `reason` is emitted.
    pub fn stop_runner(&self, id: &RunnerId, reason: DestroyReason) {
        if self.lock().runners.remove(id).is_some() {
            self.emit(BackendEvent::RunnerStopped {
                runner: id.clone(),
                reason,
            });
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets when runners created from now on become ready.
    pub fn set_readiness(&self, readiness: Readiness) {
        *self
            .readiness
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = readiness;
    }

    /// Makes every runner creation of `environment` from now on hang until the call is dropped
    /// (a backend that never places it).
    pub fn stall_creations(&self, environment: EnvironmentId) {
        self.stalled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(environment);
    }

    /// Reports a pending runner ready (as the backend's event stream would), if it still exists.
    pub fn report_ready(&self, id: &RunnerId, startup: Duration) {
        if self.runner(id).is_some() {
            self.emit(BackendEvent::RunnerReady {
                runner: id.clone(),
                startup,
            });
        }
    }

    /// Makes [`ExecutorApi::health`] fail with `reason` (`None`: healthy again).
    pub fn set_unhealthy(&self, reason: Option<&str>) {
        *self
            .unhealthy
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = reason.map(str::to_owned);
    }

    /// Makes the next `n` runner creations fail.
    pub fn fail_next_creates(&self, n: u32) {
        self.failing_creates.store(n, Ordering::SeqCst);
    }

    /// While `reason` is set, every runner creation fails as a request the backend can never
    /// serve ([`BackendError::InvalidRequest`]), e.g. networking on a machine without it.
    pub fn refuse_creates(&self, reason: Option<&str>) {
        *self
            .creation_refusal
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = reason.map(str::to_string);
    }

    /// Makes the next `n` calls of `delete_environment` fail as if the backend were unreachable.
    pub fn fail_next_environment_deletes(&self, n: u32) {
        self.failing_environment_deletes.store(n, Ordering::SeqCst);
    }

    /// Makes the next `n` calls of `execute` fail as a process limit would (`fork: EAGAIN`).
    pub fn fail_next_executes(&self, n: u32) {
        self.failing_executes.store(n, Ordering::SeqCst);
    }

    /// Makes every creation take `delay` (tokio time).
    pub fn set_create_delay(&self, delay: Duration) {
        *self
            .create_delay
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = delay;
    }

    /// Makes `load_runners` answer `delay` (tokio time) after taking its snapshot, as a slow
    /// backend would.
    pub fn set_load_delay(&self, delay: Duration) {
        *self
            .load_delay
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = delay;
    }

    /// Makes `mark_runner` take `delay` (tokio time) before recording, as a slow backend would.
    pub fn set_mark_delay(&self, delay: Duration) {
        *self
            .mark_delay
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = delay;
    }

    /// How many creations were attempted, failed ones included.
    pub fn create_attempts(&self) -> usize {
        self.create_attempts.load(Ordering::SeqCst)
    }

    /// How many executions are running now: started and neither ended nor cancelled.
    pub fn running_executions(&self) -> usize {
        self.running_executions.load(Ordering::SeqCst)
    }

    /// The most creations that ran at the same time.
    pub fn max_concurrent_creates(&self) -> usize {
        self.max_concurrent_creates.load(Ordering::SeqCst)
    }

    /// Sends an event to the manager that called `events()` last.
    pub fn emit(&self, event: BackendEvent) {
        if let Some(tx) = self
            .events_tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            let _ = tx.send(event);
        }
    }

    /// The runners that exist.
    pub fn runners(&self) -> Vec<FakeRunner> {
        self.lock().runners.values().cloned().collect()
    }

    /// One runner.
    pub fn runner(&self, id: &RunnerId) -> Option<FakeRunner> {
        self.lock().runners.get(id).cloned()
    }

    /// Overrides what `load_runners` reports for a runner (e.g. to simulate a lost used-mark).
    pub fn set_recorded(&self, id: &RunnerId, recorded: RecordedState) {
        if let Some(r) = self.lock().runners.get_mut(id) {
            r.recorded = recorded;
        }
    }

    /// Removes a runner as if the backend lost it, without telling the manager.
    pub fn lose_runner(&self, id: &RunnerId) {
        self.lock().runners.remove(id);
    }

    /// Every destruction so far, in order.
    pub fn destroyed(&self) -> Vec<(RunnerId, DestroyReason)> {
        self.lock().destroyed.clone()
    }

    /// The registered environments.
    pub fn environments(&self) -> Vec<EnvironmentSpec> {
        self.lock().environments.values().cloned().collect()
    }

    fn runner_exists(&self, id: &RunnerId) -> Result<(), BackendError> {
        if self.lock().runners.contains_key(id) {
            Ok(())
        } else {
            Err(BackendError::RunnerNotFound(id.clone()))
        }
    }
}

fn absolute(path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/workspace/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

#[async_trait]
impl ExecutorApi for FakeExecutor {
    async fn register_environment(&self, spec: &EnvironmentSpec) -> Result<(), BackendError> {
        self.lock().environments.insert(spec.id, spec.clone());
        Ok(())
    }

    async fn delete_environment(&self, id: EnvironmentId) -> Result<(), BackendError> {
        if self
            .failing_environment_deletes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(BackendError::Unreachable(
                "injected environment deletion failure".into(),
            ));
        }
        self.lock().environments.remove(&id);
        Ok(())
    }

    async fn load_environments(&self) -> Result<Vec<EnvironmentSpec>, BackendError> {
        Ok(self.environments())
    }

    async fn create_runner(&self, spec: &EnvironmentSpec) -> Result<Creation, BackendError> {
        self.create_attempts.fetch_add(1, Ordering::SeqCst);
        let stalled = self
            .stalled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&spec.id);
        if stalled {
            std::future::pending::<()>().await;
        }
        let now = self.creating_now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_concurrent_creates.fetch_max(now, Ordering::SeqCst);
        let delay = *self
            .create_delay
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.creating_now.fetch_sub(1, Ordering::SeqCst);
        let refusal = self
            .creation_refusal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(reason) = refusal {
            return Err(BackendError::InvalidRequest(reason));
        }
        let fail = self
            .failing_creates
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Err(BackendError::Unreachable(
                "injected creation failure".into(),
            ));
        }
        let info = RunnerInfo {
            id: RunnerId::generate(spec.id),
            environment: spec.id,
            mapped_ports: Vec::new(),
        };
        self.lock().runners.insert(
            info.id.clone(),
            FakeRunner {
                info: info.clone(),
                recorded: RecordedState::Idle,
                files: BTreeMap::new(),
                modified: BTreeMap::new(),
            },
        );
        let readiness = *self
            .readiness
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match readiness {
            Readiness::AtOnce => Ok(Creation::Ready(info)),
            Readiness::Never => Ok(Creation::Pending(info)),
            Readiness::After(delay) => {
                let fake = self.clone();
                let id = info.id.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    fake.report_ready(&id, delay);
                });
                Ok(Creation::Pending(info))
            }
        }
    }

    async fn health(&self) -> Result<(), BackendError> {
        match &*self
            .unhealthy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            Some(reason) => Err(BackendError::Unreachable(reason.clone())),
            None => Ok(()),
        }
    }

    async fn destroy_runner(
        &self,
        runner: &RunnerId,
        reason: &DestroyReason,
    ) -> Result<(), BackendError> {
        let mut state = self.lock();
        state.runners.remove(runner);
        state.destroyed.push((runner.clone(), reason.clone()));
        Ok(())
    }

    async fn mark_runner(
        &self,
        runner: &RunnerId,
        recorded: &RunnerState,
    ) -> Result<(), BackendError> {
        let delay = *self
            .mark_delay
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut state = self.lock();
        let r = state
            .runners
            .get_mut(runner)
            .ok_or_else(|| BackendError::RunnerNotFound(runner.clone()))?;
        r.recorded = match recorded {
            RunnerState::Idle => RecordedState::Idle,
            RunnerState::Used(u) => RecordedState::Used(*u),
        };
        Ok(())
    }

    async fn load_runners(
        &self,
        environment: EnvironmentId,
    ) -> Result<Vec<RunnerRecord>, BackendError> {
        let records: Vec<RunnerRecord> = self
            .lock()
            .runners
            .values()
            .filter(|r| r.info.environment == environment)
            .map(|r| RunnerRecord {
                info: r.info.clone(),
                state: r.recorded,
            })
            .collect();
        let delay = *self
            .load_delay
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(records)
    }

    async fn execute(
        &self,
        runner: &RunnerId,
        request: &ExecutionRequest,
        cancel: CancellationToken,
    ) -> Result<ExecutionHandle, BackendError> {
        self.runner_exists(runner)?;
        if self
            .failing_executes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(BackendError::Internal(
                "injected execution failure: fork: Resource temporarily unavailable".into(),
            ));
        }
        let (stdin_tx, stdin_rx) = mpsc::channel(STDIN_BUFFER);
        let (events_tx, events_rx) = mpsc::channel(EVENT_BUFFER);
        let request = request.clone();
        let running = RunningGuard::new(Arc::clone(&self.running_executions));
        tokio::spawn(async move {
            let _running = running;
            tokio::select! {
                () = cancel.cancelled() => {}
                () = run_fake_command(request, stdin_rx, events_tx) => {}
            }
        });
        Ok(ExecutionHandle {
            stdin: stdin_tx,
            events: events_rx,
        })
    }

    async fn update_files(&self, runner: &RunnerId, update: &FileUpdate) -> Result<(), FileError> {
        let mut state = self.lock();
        let r = state
            .runners
            .get_mut(runner)
            .ok_or_else(|| BackendError::RunnerNotFound(runner.clone()))?;
        for path in &update.delete {
            let prefix = absolute(path);
            let doomed = |p: &String| p == &prefix || p.starts_with(&format!("{prefix}/"));
            r.files.retain(|p, _| !doomed(p));
            r.modified.retain(|p, _| !doomed(p));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let mut failures = Vec::new();
        for copy in &update.copy {
            let path = absolute(&copy.path);
            if path.starts_with("/proc/") {
                failures.push(FileFailure {
                    path: copy.path.clone(),
                    reason: "Cannot open: Permission denied".into(),
                });
                continue;
            }
            r.modified.insert(path.clone(), now);
            r.files.insert(path, copy.content.clone());
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(FileError::Partial(failures))
        }
    }

    async fn list_files(
        &self,
        runner: &RunnerId,
        request: &ListFilesRequest,
    ) -> Result<Vec<FileHeader>, FileError> {
        let state = self.lock();
        let r = state
            .runners
            .get(runner)
            .ok_or_else(|| BackendError::RunnerNotFound(runner.clone()))?;
        let dir = absolute(&request.path);
        let prefix = if dir == "/" {
            dir.clone()
        } else {
            format!("{dir}/")
        };
        let shown = request.path.trim_end_matches('/');
        let header =
            |rest: &str, entry_type: char, size: usize, modified: i64, mode: &str| FileHeader {
                name: format!("{shown}/{rest}"),
                entry_type,
                link_target: None,
                size: size as u64,
                modification_time: modified,
                permissions: mode.into(),
                owner: "root".into(),
                group: "root".into(),
            };
        // Directories exist implicitly, as the parents of files.
        let mut entries: BTreeMap<String, FileHeader> = BTreeMap::new();
        for (path, content) in &r.files {
            let Some(rest) = path.strip_prefix(&prefix) else {
                continue;
            };
            let modified = r.modified.get(path).copied().unwrap_or(0);
            let parts: Vec<&str> = rest.split('/').collect();
            let shown_dirs = if request.recursive { parts.len() } else { 2 };
            for depth in 1..parts.len().min(shown_dirs) {
                let dir = parts[..depth].join("/");
                let entry = entries
                    .entry(dir.clone())
                    .or_insert_with(|| header(&dir, 'd', 0, modified, "rwxrwxrwt"));
                entry.modification_time = entry.modification_time.max(modified);
            }
            if request.recursive || parts.len() == 1 {
                entries.insert(
                    rest.to_owned(),
                    header(rest, '-', content.len(), modified, "rwxr--r--"),
                );
            }
        }
        Ok(entries.into_values().collect())
    }

    async fn read_file(
        &self,
        runner: &RunnerId,
        path: &str,
        _privileged: bool,
    ) -> Result<FileContent, FileError> {
        let state = self.lock();
        let r = state
            .runners
            .get(runner)
            .ok_or_else(|| BackendError::RunnerNotFound(runner.clone()))?;
        let content = r
            .files
            .get(&absolute(path))
            .cloned()
            .ok_or(FileError::NotFound)?;
        Ok(FileContent {
            size: content.len() as u64,
            body: futures::stream::once(async move { Ok(content) }).boxed(),
        })
    }

    fn events(&self) -> BoxStream<'static, BackendEvent> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        *self
            .events_tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(tx);
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
    }
}

/// Counts an execution as running until dropped.
#[derive(Debug)]
struct RunningGuard(Arc<AtomicUsize>);

impl RunningGuard {
    fn new(counter: Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn run_fake_command(
    request: ExecutionRequest,
    mut stdin: mpsc::Receiver<Bytes>,
    events: mpsc::Sender<ExecutionEvent>,
) {
    let command = request.command.trim();
    let (program, args) = command.split_once(' ').unwrap_or((command, ""));
    let out = |text: String| ExecutionEvent::Stdout(Bytes::from(text));
    let terminal = match program {
        "echo" => {
            let _ = events.send(out(format!("{args}\r\n"))).await;
            ExecutionEvent::Exit(0)
        }
        "echo-stderr" => {
            let _ = events
                .send(ExecutionEvent::Stderr(Bytes::from(format!("{args}\n"))))
                .await;
            ExecutionEvent::Exit(0)
        }
        "exit" => ExecutionEvent::Exit(args.trim().parse().unwrap_or(1)),
        "sleep" => {
            match args.trim().parse::<f64>() {
                Ok(secs) if secs.is_finite() && secs >= 0.0 => {
                    tokio::time::sleep(Duration::from_secs_f64(secs.min(1e9))).await;
                }
                _ => std::future::pending::<()>().await,
            }
            ExecutionEvent::Exit(0)
        }
        "cat" => {
            while let Some(chunk) = stdin.recv().await {
                if events.send(ExecutionEvent::Stdout(chunk)).await.is_err() {
                    return;
                }
            }
            ExecutionEvent::Exit(0)
        }
        "yes" => loop {
            if events.send(out("y\r\n".into())).await.is_err() {
                return;
            }
        },
        "env" => {
            let mut text = String::from("CODEOCEAN=true\r\n");
            for (k, v) in &request.environment {
                text.push_str(&format!("{k}={v}\r\n"));
            }
            let _ = events.send(out(text)).await;
            ExecutionEvent::Exit(0)
        }
        "vanish" => return,
        other => {
            let _ = events
                .send(ExecutionEvent::Stderr(Bytes::from(format!(
                    "bash: {other}: command not found\n"
                ))))
                .await;
            ExecutionEvent::Exit(127)
        }
    };
    let _ = events.send(terminal).await;
}
