//! A conformance kit for [`ExecutorApi`] backends (feature `testkit`).
//!
//! Every backend promises the same contract (see [`ExecutorApi`]): creation that is ready at once
//! or reported ready through the event stream, idempotent destruction, durable marks and
//! environments, the crash rule, `bash -c` executions with stdout on a terminal and stderr apart,
//! cancellation, file operations and events for runners that stop on their own. This module checks
//! that contract from the outside, the same way for every backend: the in-memory
//! [`FakeExecutor`](crate::fake::FakeExecutor) and the local sandbox backend run it in
//! `cargo test --workspace`, and a new backend runs it to know it is right.
//!
//! # How a backend uses it
//!
//! 1. Enable the feature for tests only:
//!    `[dev-dependencies] runner-core = { ..., features = ["testkit"] }`.
//! 2. Implement [`Subject`]: one running instance of the backend together with the durable state
//!    it keeps (a data directory, a cluster namespace, …). [`Subject::restart`] ends the instance
//!    (cleanly or as a crash) and starts a new one over the same state; [`Subject::stop_runner_externally`]
//!    ends a runner behind the backend's back. Both are optional: a check that needs a hook the
//!    subject lacks is skipped, unless [`Conformance::require_every_hook`] makes that a failure.
//!    Clean up in `Drop`: the kit drops the subject when a check ends, also when it fails.
//! 3. Build a [`Conformance`] from an [`EnvironmentSpec`] the backend accepts and a factory that
//!    makes a fresh subject, and expand [`conformance_tests!`](crate::conformance_tests) into one
//!    `#[tokio::test]` per check (the test crate needs tokio with `macros` and
//!    `rt-multi-thread`), or call the checks one by one.
//!
//! ```
//! use std::sync::Arc;
//!
//! use runner_core::fake::FakeExecutor;
//! use runner_core::testkit::{Conformance, Ending, Subject, Unsupported};
//! use runner_core::{EnvironmentId, EnvironmentSpec, ExecutorApi, RunnerId};
//!
//! /// One instance of the backend and its durable state.
//! #[derive(Debug)]
//! struct Mine(FakeExecutor);
//!
//! #[async_trait::async_trait]
//! impl Subject for Mine {
//!     fn backend(&self) -> Arc<dyn ExecutorApi> {
//!         Arc::new(self.0.clone())
//!     }
//!
//!     async fn restart(&mut self, ending: Ending) -> Result<(), Unsupported> {
//!         self.0 = match ending {
//!             Ending::Clean => self.0.restarted(),
//!             Ending::Crash => self.0.crashed(),
//!         };
//!         Ok(())
//!     }
//! }
//!
//! fn conformance() -> Conformance {
//!     let spec = EnvironmentSpec {
//!         id: EnvironmentId::new(4242).expect("non-zero"),
//!         image: "my-image".into(),
//!         prewarming_pool_size: 1,
//!         cpu_limit: 100,
//!         memory_limit: 128,
//!         network_access: false,
//!         exposed_ports: vec![],
//!     };
//!     Conformance::new(spec, || async { Mine(FakeExecutor::new()) })
//! }
//!
//! // In tests/conformance.rs: one test per check.
//! mod conformance {
//!     runner_core::conformance_tests!(super::conformance());
//! }
//! # fn main() {}
//! ```
//!
//! A backend whose shell is not bash passes its own [`Commands`]. Each check is an async method of
//! [`Conformance`] that panics with a message naming the broken promise, and returns a
//! [`Verdict`] saying whether it ran or was skipped for a missing hook.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::destroy::DestroyReason;
use crate::environment::EnvironmentSpec;
use crate::execution::{ExecutionEvent, ExecutionRequest};
use crate::executor::{
    BackendError, BackendEvent, Creation, ExecutorApi, RecordedState, RunnerInfo, RunnerRecord,
    RunnerState, UsedState,
};
use crate::files::{FileCopy, FileError, FileHeader, FileUpdate, ListFilesRequest};
use crate::ids::{EnvironmentId, RunnerId};

/// How a backend instance ends before the next one starts over the same durable state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// A graceful shutdown: everything the instance was asked to record is written, so the next
    /// instance may trust its idle records.
    Clean,
    /// A crash (`kill -9`, power loss): the instance ends without shutting down.
    Crash,
}

/// A hook the subject under test does not provide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not supported by this backend")]
pub struct Unsupported;

/// One backend under test: a running instance and the durable state it keeps.
///
/// The kit asks the [`Conformance`] factory for a fresh subject (empty durable state) for every
/// check and drops it when the check ends, also when the check fails: release whatever the backend
/// holds (runners, processes, directories) in `Drop`.
#[async_trait]
pub trait Subject: Send + 'static {
    /// The instance running now. The kit calls it once at the start and once after every
    /// restart, and calls [`ExecutorApi::events`] once on each instance.
    fn backend(&self) -> Arc<dyn ExecutorApi>;

    /// Ends the running instance as `ending` says and starts a new one over the same durable
    /// state (environments, runners, their records and files). The kit has dropped every handle
    /// it had on the old instance before calling. The default supports neither ending.
    async fn restart(&mut self, ending: Ending) -> Result<(), Unsupported> {
        let _ = ending;
        Err(Unsupported)
    }

    /// Ends `runner` from outside the backend's API, as a crash of its sandbox would (e.g. kills
    /// its init process or stops its allocation); the backend must then report
    /// [`BackendEvent::RunnerStopped`]. The default is unsupported.
    async fn stop_runner_externally(&mut self, runner: &RunnerId) -> Result<(), Unsupported> {
        let _ = runner;
        Err(Unsupported)
    }
}

/// The shell commands the execution checks run, as the backend's shell spells them.
///
/// The defaults ([`Commands::bash`]) are what `bash -c` understands; a backend with another
/// command language (such as the fake's) passes its own.
#[derive(Debug, Clone)]
pub struct Commands {
    /// Prints its single-word argument and a newline on stdout, exits 0.
    pub echo: fn(&str) -> String,
    /// Prints its single-word argument and a newline on stderr, exits 0.
    pub echo_stderr: fn(&str) -> String,
    /// Exits with the given code.
    pub exit: fn(u8) -> String,
    /// Waits the given number of seconds, exits 0.
    pub sleep: fn(u32) -> String,
    /// Copies stdin to stdout until end of file, exits 0.
    pub cat: String,
}

impl Commands {
    /// The commands as `bash -c` runs them: `echo W`, `echo W >&2`, `exit N`, `sleep N`, `cat`.
    pub fn bash() -> Self {
        Self {
            echo: |word| format!("echo {word}"),
            echo_stderr: |word| format!("echo {word} >&2"),
            exit: |code| format!("exit {code}"),
            sleep: |seconds| format!("sleep {seconds}"),
            cat: "cat".into(),
        }
    }
}

impl Default for Commands {
    fn default() -> Self {
        Self::bash()
    }
}

/// What a check reports when it did not fail.
#[must_use = "a skipped check should be reported"]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every assertion of the check held.
    Passed,
    /// The check needs a hook the subject does not provide; nothing was asserted.
    Skipped(String),
}

impl Verdict {
    /// Prints a skipped check's reason on stderr (test output), so a skip is visible.
    pub fn report(self, check: &str) {
        if let Self::Skipped(why) = self {
            eprintln!("conformance check {check} skipped: {why}");
        }
    }
}

type Factory = Arc<dyn Fn() -> BoxFuture<'static, Box<dyn Subject>> + Send + Sync>;

/// The conformance suite for one backend: how to make a subject, which environment to use, and
/// the bounds the checks wait within.
///
/// Every check is an async method that makes a fresh subject, panics with a clear message when
/// the backend breaks its contract, and otherwise returns a [`Verdict`].
#[derive(Clone)]
pub struct Conformance {
    factory: Factory,
    spec: EnvironmentSpec,
    commands: Commands,
    ready_within: Duration,
    event_within: Duration,
    execution_within: Duration,
    unwritable_path: String,
    strict: bool,
}

impl fmt::Debug for Conformance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conformance")
            .field("spec", &self.spec)
            .field("commands", &self.commands)
            .field("ready_within", &self.ready_within)
            .field("event_within", &self.event_within)
            .field("execution_within", &self.execution_within)
            .field("unwritable_path", &self.unwritable_path)
            .field("strict", &self.strict)
            .finish_non_exhaustive()
    }
}

impl Conformance {
    /// A suite creating runners of `spec` on subjects `factory` makes, one per check. Another
    /// environment, `spec` with the next id, is used where two are needed.
    pub fn new<F, Fut, S>(spec: EnvironmentSpec, factory: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = S> + Send + 'static,
        S: Subject,
    {
        Self {
            factory: Arc::new(move || {
                let made = factory();
                async move { Box::new(made.await) as Box<dyn Subject> }.boxed()
            }),
            spec,
            commands: Commands::bash(),
            ready_within: Duration::from_secs(60),
            event_within: Duration::from_secs(30),
            execution_within: Duration::from_secs(60),
            unwritable_path: "/proc/1/environ".into(),
            strict: false,
        }
    }

    /// Uses `commands` instead of the bash ones.
    pub fn commands(mut self, commands: Commands) -> Self {
        self.commands = commands;
        self
    }

    /// How long a [`Creation::Pending`] runner may take to be reported ready (default 60 s).
    pub fn ready_within(mut self, bound: Duration) -> Self {
        self.ready_within = bound;
        self
    }

    /// How long an expected backend event may take (default 30 s).
    pub fn event_within(mut self, bound: Duration) -> Self {
        self.event_within = bound;
        self
    }

    /// How long an execution may take to end after its command ended or was cancelled
    /// (default 60 s).
    pub fn execution_within(mut self, bound: Duration) -> Self {
        self.execution_within = bound;
        self
    }

    /// A path no file can be copied to, for the partial-failure check (default
    /// `/proc/1/environ`).
    pub fn unwritable_path(mut self, path: impl Into<String>) -> Self {
        self.unwritable_path = path.into();
        self
    }

    /// Makes a check that needs a hook the subject lacks fail instead of being skipped.
    pub fn require_every_hook(mut self) -> Self {
        self.strict = true;
        self
    }

    /// The environment the checks create runners of.
    pub fn spec(&self) -> &EnvironmentSpec {
        &self.spec
    }

    fn skipped(&self, hook: &str) -> Verdict {
        assert!(
            !self.strict,
            "the subject does not support {hook}, which require_every_hook() demands"
        );
        Verdict::Skipped(format!("the subject does not support {hook}"))
    }

    fn other_spec(&self) -> EnvironmentSpec {
        let id = self
            .spec
            .id
            .get()
            .checked_add(1)
            .and_then(EnvironmentId::new)
            .expect("the spec's environment id has a successor");
        EnvironmentSpec {
            id,
            prewarming_pool_size: self.spec.prewarming_pool_size + 1,
            ..self.spec.clone()
        }
    }

    // ----- creation and destruction -----

    /// `create_runner` gives a runner of the environment that can execute commands: at once
    /// ([`Creation::Ready`]), or after [`BackendEvent::RunnerReady`] for it arrives on
    /// `events()` within the ready bound ([`Creation::Pending`]). Two creations give two runners,
    /// every exposed port is mapped, and `load_runners` lists both as idle.
    pub async fn creation_yields_runners_that_execute(&self) -> Verdict {
        let mut s = Session::start(self).await;
        s.register(&self.spec).await;
        let a = s.create().await;
        let b = s.create().await;
        assert_ne!(a.id, b.id, "two creations returned the same runner id");
        for info in [&a, &b] {
            for port in &self.spec.exposed_ports {
                assert!(
                    info.mapped_ports.iter().any(|m| m.exposed_port == *port),
                    "runner {} does not map exposed port {port}: {:?}",
                    info.id,
                    info.mapped_ports
                );
            }
        }
        for info in [&a, &b] {
            let o = s.run(&info.id, (self.commands.echo)("ready")).await;
            o.expect_exit(0);
            assert_eq!(o.out(), "ready\r\n", "stdout of a new runner's echo");
        }
        let records = s.load_runners(self.spec.id).await;
        for info in [&a, &b] {
            assert_eq!(
                state_of(&records, &info.id),
                Some(RecordedState::Idle),
                "a new runner's record on the instance that created it: {records:?}"
            );
        }
        s.finish().await;
        Verdict::Passed
    }

    /// `destroy_runner` succeeds twice for the same runner and for an id the backend never
    /// made; a destroyed runner is not listed by `load_runners`, `execute` on it fails with
    /// [`BackendError::RunnerNotFound`], and no [`BackendEvent::RunnerStopped`] is emitted for a
    /// destruction the manager asked for.
    pub async fn destroying_is_idempotent(&self) -> Verdict {
        let mut s = Session::start(self).await;
        s.register(&self.spec).await;
        let a = s.create().await;
        let kept = s.create().await;
        for attempt in ["first", "second"] {
            s.backend()
                .destroy_runner(&a.id, &DestroyReason::ApiRequest)
                .await
                .unwrap_or_else(|e| panic!("{attempt} destruction of {} failed: {e}", a.id));
        }
        let unknown = RunnerId::generate(self.spec.id);
        s.backend()
            .destroy_runner(&unknown, &DestroyReason::ApiRequest)
            .await
            .unwrap_or_else(|e| panic!("destroying the unknown runner {unknown} failed: {e}"));
        let records = s.load_runners(self.spec.id).await;
        assert_eq!(
            state_of(&records, &a.id),
            None,
            "a destroyed runner is still listed: {records:?}"
        );
        assert!(
            state_of(&records, &kept.id).is_some(),
            "destroying one runner lost another: {records:?}"
        );
        match s
            .backend()
            .execute(
                &a.id,
                &ExecutionRequest::new((self.commands.echo)("x")),
                CancellationToken::new(),
            )
            .await
        {
            Err(BackendError::RunnerNotFound(id)) => assert_eq!(id, a.id),
            Err(other) => panic!("execute on a destroyed runner: {other}, not RunnerNotFound"),
            Ok(_) => panic!("execute on a destroyed runner started an execution"),
        }
        s.expect_no_event(
            |e| matches!(e, BackendEvent::RunnerStopped { runner, .. } if *runner == a.id),
            Duration::from_millis(500),
            "RunnerStopped for a runner the manager destroyed",
        )
        .await;
        s.finish().await;
        Verdict::Passed
    }

    // ----- marks, recovery and the crash rule -----

    /// After a clean restart, `load_runners` reports every runner with the state last marked:
    /// used with the same inactivity timeout and deadline (to the second), idle again for a
    /// runner marked used and then idle, idle for a runner never marked; files written before
    /// the restart read back. Needs [`Subject::restart`] with [`Ending::Clean`].
    pub async fn marks_survive_a_clean_restart(&self) -> Verdict {
        let mut s = Session::start(self).await;
        s.register(&self.spec).await;
        let used = s.create().await.id;
        let forever = s.create().await.id;
        let returned = s.create().await.id;
        let fresh = s.create().await.id;
        let timed = UsedState {
            inactivity_timeout: Duration::from_secs(90),
            deadline: Some(SystemTime::now() + Duration::from_secs(600)),
        };
        let untimed = UsedState {
            inactivity_timeout: Duration::ZERO,
            deadline: None,
        };
        s.mark(&used, RunnerState::Used(timed)).await;
        s.mark(&forever, RunnerState::Used(untimed)).await;
        s.mark(&returned, RunnerState::Used(timed)).await;
        s.mark(&returned, RunnerState::Idle).await;
        s.copy(&used, vec![file("kept.txt", "kept")]).await;
        if s.restart(Ending::Clean).await.is_err() {
            s.finish().await;
            return self.skipped("restart(Ending::Clean)");
        }
        let records = s.load_runners(self.spec.id).await;
        expect_used(&records, &used, timed);
        expect_used(&records, &forever, untimed);
        for (id, what) in [
            (&returned, "marked used, then idle"),
            (&fresh, "never marked"),
        ] {
            assert_eq!(
                state_of(&records, id),
                Some(RecordedState::Idle),
                "a runner {what} after a clean restart: {records:?}"
            );
        }
        assert_eq!(
            s.read(&used, "kept.txt").await,
            b"kept",
            "file after restart"
        );
        let o = s.run(&used, (self.commands.echo)("back")).await;
        o.expect_exit(0);
        assert_eq!(o.out(), "back\r\n", "stdout after a restart");
        s.finish().await;
        Verdict::Passed
    }

    /// The crash rule: after a crash, a runner recorded idle (never marked, or marked used and
    /// then idle) must be reported [`RecordedState::Uncertain`], since the crashed manager may
    /// have handed it out without its used-mark being written; a runner marked used is reported
    /// used with the same values. Needs [`Subject::restart`] with [`Ending::Crash`].
    pub async fn a_crash_leaves_idle_records_uncertain(&self) -> Verdict {
        let mut s = Session::start(self).await;
        s.register(&self.spec).await;
        let used = s.create().await.id;
        let returned = s.create().await.id;
        let fresh = s.create().await.id;
        let timed = UsedState {
            inactivity_timeout: Duration::from_secs(45),
            deadline: Some(SystemTime::now() + Duration::from_secs(300)),
        };
        s.mark(&used, RunnerState::Used(timed)).await;
        s.mark(&returned, RunnerState::Used(timed)).await;
        s.mark(&returned, RunnerState::Idle).await;
        if s.restart(Ending::Crash).await.is_err() {
            s.finish().await;
            return self.skipped("restart(Ending::Crash)");
        }
        let records = s.load_runners(self.spec.id).await;
        expect_used(&records, &used, timed);
        for (id, what) in [
            (&returned, "marked used, then idle"),
            (&fresh, "never marked"),
        ] {
            assert_eq!(
                state_of(&records, id),
                Some(RecordedState::Uncertain),
                "a runner {what} after a crash must be Uncertain (the crash rule): {records:?}"
            );
        }
        s.finish().await;
        Verdict::Passed
    }

    /// Registered environments are listed by `load_environments` exactly as given, registering
    /// again replaces, and both survive a clean restart; a deleted environment is gone, also after
    /// the next restart. Needs [`Subject::restart`] with [`Ending::Clean`].
    pub async fn environments_persist(&self) -> Verdict {
        let mut s = Session::start(self).await;
        let other = self.other_spec();
        s.register(&self.spec).await;
        s.register(&other).await;
        let environments = s.load_environments().await;
        expect_environment(&environments, &self.spec, "after registering it");
        expect_environment(&environments, &other, "after registering it");
        let changed = EnvironmentSpec {
            prewarming_pool_size: self.spec.prewarming_pool_size + 2,
            ..self.spec.clone()
        };
        s.register(&changed).await;
        expect_environment(
            &s.load_environments().await,
            &changed,
            "after registering it again, changed",
        );
        if s.restart(Ending::Clean).await.is_err() {
            s.finish().await;
            return self.skipped("restart(Ending::Clean)");
        }
        let environments = s.load_environments().await;
        expect_environment(&environments, &changed, "after a restart");
        expect_environment(&environments, &other, "after a restart");
        s.backend()
            .delete_environment(other.id)
            .await
            .unwrap_or_else(|e| panic!("delete_environment({}) failed: {e}", other.id));
        let environments = s.load_environments().await;
        assert!(
            environments.iter().all(|e| e.id != other.id),
            "a deleted environment is still loaded: {environments:?}"
        );
        expect_environment(&environments, &changed, "after deleting another");
        if s.restart(Ending::Clean).await.is_err() {
            s.finish().await;
            return self.skipped("a second restart(Ending::Clean)");
        }
        let environments = s.load_environments().await;
        assert!(
            environments.iter().all(|e| e.id != other.id),
            "a deleted environment came back after a restart: {environments:?}"
        );
        expect_environment(&environments, &changed, "after a second restart");
        s.finish().await;
        Verdict::Passed
    }

    // ----- executions -----

    /// stdout arrives on a terminal: `echo` prints its word with `\r\n`, nothing goes to stderr,
    /// and the execution ends with exactly one `Exit(0)`.
    pub async fn stdout_arrives_on_a_terminal(&self) -> Verdict {
        let mut s = Session::start(self).await;
        s.register(&self.spec).await;
        let r = s.create().await.id;
        let o = s.run(&r, (self.commands.echo)("conformance")).await;
        o.expect_exit(0);
        assert_eq!(
            o.out(),
            "conformance\r\n",
            "stdout (a terminal ends lines \\r\\n)"
        );
        assert_eq!(o.err(), "", "stderr of an echo to stdout");
        s.finish().await;
        Verdict::Passed
    }

    /// stderr is not a terminal and stays apart from stdout: `echo W >&2` gives `W\n` on stderr
    /// and nothing of it on stdout.
    pub async fn stderr_stays_apart(&self) -> Verdict {
        let mut s = Session::start(self).await;
        s.register(&self.spec).await;
        let r = s.create().await.id;
        let o = s.run(&r, (self.commands.echo_stderr)("oops")).await;
        o.expect_exit(0);
        assert_eq!(o.err(), "oops\n", "stderr (not a terminal: lines end \\n)");
        assert!(
            !o.out().contains("oops"),
            "stderr leaked into stdout: {:?}",
            o.out()
        );
        s.finish().await;
        Verdict::Passed
    }

    /// The command's exit code is reported as `Exit(code)`.
    pub async fn exit_codes_are_reported(&self) -> Verdict {
        let mut s = Session::start(self).await;
        s.register(&self.spec).await;
        let r = s.create().await.id;
        for code in [3, 0, 42] {
            s.run(&r, (self.commands.exit)(code))
                .await
                .expect_exit(code);
        }
        s.finish().await;
        Verdict::Passed
    }

    /// stdin reaches the process while it runs, and closing it is end of file: `cat` echoes a
    /// line and keeps running until stdin is closed, then exits 0.
    pub async fn stdin_is_read_until_closed(&self) -> Verdict {
        let mut s = Session::start(self).await;
        s.register(&self.spec).await;
        let r = s.create().await.id;
        let handle = s
            .backend()
            .execute(
                &r,
                &ExecutionRequest::new(self.commands.cat.clone()),
                CancellationToken::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("execute failed: {e}"));
        let (stdin, mut events) = (handle.stdin, handle.events);
        stdin
            .send(Bytes::from_static(b"ping\n"))
            .await
            .expect("the execution dropped its stdin while running");
        let mut o = Outcome::default();
        o.await_stdout(&mut events, "ping", self.execution_within)
            .await;
        // Still running a moment later: it waits for more input.
        if let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_millis(300), events.recv()).await
        {
            o.take(event);
        }
        assert!(
            o.terminal.is_none(),
            "cat ended while stdin was open: {o:?}"
        );
        drop(stdin);
        o.collect(&mut events, self.execution_within).await;
        o.expect_exit(0);
        s.finish().await;
        Verdict::Passed
    }

    /// Several executions run at once on one runner, each with its own stdin and output: two
    /// `cat`s fed different words each echo only their own, and each exits 0 once its stdin is
    /// closed.
    pub async fn executions_on_one_runner_stay_apart(&self) -> Verdict {
        let mut s = Session::start(self).await;
        s.register(&self.spec).await;
        let r = s.create().await.id;
        let mut running = Vec::new();
        for word in ["first", "second"] {
            let handle = s
                .backend()
                .execute(
                    &r,
                    &ExecutionRequest::new(self.commands.cat.clone()),
                    CancellationToken::new(),
                )
                .await
                .unwrap_or_else(|e| panic!("execute failed: {e}"));
            running.push((word, handle));
        }
        let mut outcomes = Vec::new();
        for (word, handle) in &mut running {
            handle
                .stdin
                .send(Bytes::from(format!("{word}\n")))
                .await
                .expect("the execution dropped its stdin while running");
            let mut o = Outcome::default();
            o.await_stdout(&mut handle.events, word, self.execution_within)
                .await;
            outcomes.push(o);
        }
        for ((word, handle), mut o) in running.into_iter().zip(outcomes) {
            let (stdin, mut events) = (handle.stdin, handle.events);
            drop(stdin);
            o.collect(&mut events, self.execution_within).await;
            o.expect_exit(0);
            let other = if word == "first" { "second" } else { "first" };
            assert!(
                !o.out().contains(other),
                "the execution fed {word:?} received {other:?}: {:?}",
                o.out()
            );
        }
        s.finish().await;
        Verdict::Passed
    }

    /// Cancelling kills a running execution (the manager enforces time limits this way): its
    /// event stream ends within the execution bound without a terminal event, and the runner
    /// still executes afterwards.
    pub async fn cancel_ends_an_execution(&self) -> Verdict {
        let mut s = Session::start(self).await;
        s.register(&self.spec).await;
        let r = s.create().await.id;
        let cancel = CancellationToken::new();
        let mut request = ExecutionRequest::new((self.commands.sleep)(1000));
        request.time_limit = 1;
        let handle = s
            .backend()
            .execute(&r, &request, cancel.clone())
            .await
            .unwrap_or_else(|e| panic!("execute failed: {e}"));
        let mut events = handle.events;
        let mut o = Outcome::default();
        // The manager's timer: the limit passes, then it cancels.
        let limit = Instant::now() + Duration::from_secs(1);
        while let Ok(Some(event)) = tokio::time::timeout_at(limit.into(), events.recv()).await {
            o.take(event);
        }
        assert!(
            o.terminal.is_none(),
            "a sleep of 1000 s ended within a second: {o:?}"
        );
        cancel.cancel();
        let ended = tokio::time::timeout(self.execution_within, async {
            while let Some(event) = events.recv().await {
                assert!(
                    !event.is_terminal(),
                    "a cancelled execution reported {event:?}; it must end without a terminal event"
                );
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "the event stream did not end within {:?} of cancelling",
            self.execution_within
        );
        drop(handle.stdin);
        let o = s.run(&r, (self.commands.echo)("after")).await;
        o.expect_exit(0);
        assert_eq!(o.out(), "after\r\n", "an execution after a cancelled one");
        s.finish().await;
        Verdict::Passed
    }

    /// A command that ends within its time limit runs to completion: `sleep 1` under a limit of
    /// 10 s exits 0 after about a second (the backend neither ends it early nor ignores it).
    pub async fn a_command_within_its_time_limit_completes(&self) -> Verdict {
        let mut s = Session::start(self).await;
        s.register(&self.spec).await;
        let r = s.create().await.id;
        let mut request = ExecutionRequest::new((self.commands.sleep)(1));
        request.time_limit = 10;
        let started = Instant::now();
        let o = s.run_request(&r, request).await;
        o.expect_exit(0);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(900),
            "sleep 1 ended after {took:?}"
        );
        s.finish().await;
        Verdict::Passed
    }

    // ----- files -----

    /// Files copied into a runner are listed with their header fields (`-`, size, `rwxr--r--`,
    /// owner and group `root`, a current modification time, no link target), a subdirectory as
    /// `d` (its files only when listing recursively), read back the same
    /// by relative and absolute (`/workspace/...`) path, and are gone once deleted; reading a
    /// missing file fails with [`FileError::NotFound`].
    pub async fn files_are_written_listed_read_and_deleted(&self) -> Verdict {
        let mut s = Session::start(self).await;
        s.register(&self.spec).await;
        let r = s.create().await.id;
        let before = unix_now();
        s.copy(
            &r,
            vec![
                file("kit/a.txt", "alpha"),
                file("kit/b.txt", "beta!!"),
                file("kit/sub/c.txt", "c"),
            ],
        )
        .await;
        let listing = s.list(&r, "kit", false).await;
        let a = header(&listing, "kit/a.txt");
        assert_eq!(a.entry_type, '-', "entry type of a file: {a:?}");
        assert_eq!(a.size, 5, "size of a.txt: {a:?}");
        assert_eq!(a.link_target, None, "link target of a file: {a:?}");
        assert_eq!(
            a.permissions, "rwxr--r--",
            "permissions of a copied file: {a:?}"
        );
        assert_eq!(
            (a.owner.as_str(), a.group.as_str()),
            ("root", "root"),
            "owner of a copied file: {a:?}"
        );
        let now = unix_now();
        assert!(
            (before - 120..=now + 120).contains(&a.modification_time),
            "modification time {} is not the time of the copy ({before}..{now})",
            a.modification_time
        );
        assert_eq!(header(&listing, "kit/b.txt").size, 6, "size of b.txt");
        let sub = header(&listing, "kit/sub");
        assert_eq!(sub.entry_type, 'd', "entry type of a directory: {sub:?}");
        assert!(
            listing.iter().all(|h| h.name != "kit/sub/c.txt"),
            "a listing that is not recursive shows a subdirectory's file: {listing:?}"
        );
        let all = s.list(&r, "kit", true).await;
        let mut names: Vec<&str> = all.iter().map(|h| h.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["kit/a.txt", "kit/b.txt", "kit/sub", "kit/sub/c.txt"],
            "a recursive listing"
        );
        assert_eq!(s.read(&r, "kit/a.txt").await, b"alpha", "read back a.txt");
        assert_eq!(
            s.read(&r, "/workspace/kit/b.txt").await,
            b"beta!!",
            "read back b.txt by its absolute path"
        );
        s.backend()
            .update_files(
                &r,
                &FileUpdate {
                    delete: vec!["kit/a.txt".into()],
                    copy: vec![],
                },
            )
            .await
            .unwrap_or_else(|e| panic!("deleting kit/a.txt failed: {e}"));
        let listing = s.list(&r, "kit", false).await;
        assert!(
            listing.iter().all(|h| h.name != "kit/a.txt"),
            "a deleted file is still listed: {listing:?}"
        );
        header(&listing, "kit/b.txt");
        for missing in ["kit/a.txt", "kit/never-written.txt"] {
            match s.backend().read_file(&r, missing, true).await {
                Err(FileError::NotFound) => {}
                Err(other) => panic!("reading missing {missing}: {other}, not NotFound"),
                Ok(content) => panic!("reading missing {missing} succeeded: {content:?}"),
            }
        }
        s.finish().await;
        Verdict::Passed
    }

    /// A file update with one path that cannot be written fails with [`FileError::Partial`]
    /// naming exactly that path, and still writes the others.
    pub async fn a_failed_file_is_named_and_the_others_are_written(&self) -> Verdict {
        let mut s = Session::start(self).await;
        s.register(&self.spec).await;
        let r = s.create().await.id;
        let update = FileUpdate {
            delete: vec![],
            copy: vec![file(&self.unwritable_path, "x"), file("kit/ok.txt", "ok")],
        };
        match s.backend().update_files(&r, &update).await {
            Err(FileError::Partial(failures)) => {
                let paths: Vec<&str> = failures.iter().map(|f| f.path.as_str()).collect();
                assert_eq!(
                    paths,
                    [self.unwritable_path.as_str()],
                    "the failed paths of a partial update: {failures:?}"
                );
            }
            Err(other) => panic!("a partial update failed with {other}, not Partial"),
            Ok(()) => panic!("writing {} succeeded", self.unwritable_path),
        }
        assert_eq!(
            s.read(&r, "kit/ok.txt").await,
            b"ok",
            "the file that could be written"
        );
        s.finish().await;
        Verdict::Passed
    }

    // ----- events and health -----

    /// A runner that stops on its own (killed behind the backend's back) is reported as
    /// [`BackendEvent::RunnerStopped`] on `events()` within the event bound, and is no longer
    /// listed by `load_runners`. Needs [`Subject::stop_runner_externally`].
    pub async fn a_runner_that_stops_on_its_own_is_reported(&self) -> Verdict {
        let mut s = Session::start(self).await;
        s.register(&self.spec).await;
        let r = s.create().await.id;
        let kept = s.create().await.id;
        if s.subject.stop_runner_externally(&r).await.is_err() {
            s.finish().await;
            return self.skipped("stop_runner_externally");
        }
        let within = self.event_within;
        s.await_event(
            |e| matches!(e, BackendEvent::RunnerStopped { runner, .. } if *runner == r),
            within,
            "RunnerStopped for the runner stopped externally",
        )
        .await;
        let records = s.load_runners(self.spec.id).await;
        assert_eq!(
            state_of(&records, &r),
            None,
            "a stopped runner is still listed: {records:?}"
        );
        assert!(
            state_of(&records, &kept).is_some(),
            "another runner vanished with the stopped one: {records:?}"
        );
        s.finish().await;
        Verdict::Passed
    }

    /// A freshly started backend reports itself healthy.
    pub async fn a_started_backend_is_healthy(&self) -> Verdict {
        let s = Session::start(self).await;
        s.backend()
            .health()
            .await
            .unwrap_or_else(|e| panic!("health of a started backend: {e}"));
        s.finish().await;
        Verdict::Passed
    }
}

/// Expands to one `#[tokio::test(flavor = "multi_thread")]` per check of
/// [`testkit::Conformance`](crate::testkit::Conformance), each evaluating `$conformance` (an
/// expression giving a `Conformance`) and running the check. Needs tokio with `macros` and
/// `rt-multi-thread` in the calling crate.
#[macro_export]
macro_rules! conformance_tests {
    ($conformance:expr) => {
        $crate::conformance_tests!(@each $conformance;
            creation_yields_runners_that_execute,
            destroying_is_idempotent,
            marks_survive_a_clean_restart,
            a_crash_leaves_idle_records_uncertain,
            environments_persist,
            stdout_arrives_on_a_terminal,
            stderr_stays_apart,
            exit_codes_are_reported,
            stdin_is_read_until_closed,
            executions_on_one_runner_stay_apart,
            cancel_ends_an_execution,
            a_command_within_its_time_limit_completes,
            files_are_written_listed_read_and_deleted,
            a_failed_file_is_named_and_the_others_are_written,
            a_runner_that_stops_on_its_own_is_reported,
            a_started_backend_is_healthy,
        );
    };
    (@each $conformance:expr; $($check:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread")]
            async fn $check() {
                let conformance: $crate::testkit::Conformance = $conformance;
                conformance.$check().await.report(stringify!($check));
            }
        )*
    };
}

/// One check's subject, the instance running now, and its events.
struct Session<'a> {
    kit: &'a Conformance,
    subject: Box<dyn Subject>,
    backend: Option<Arc<dyn ExecutorApi>>,
    events: Option<BoxStream<'static, BackendEvent>>,
    /// Events read while waiting for another one, oldest first.
    backlog: VecDeque<BackendEvent>,
    created: Vec<RunnerId>,
}

impl<'a> Session<'a> {
    async fn start(kit: &'a Conformance) -> Self {
        let subject = (kit.factory)().await;
        let backend = subject.backend();
        let events = backend.events();
        Self {
            kit,
            subject,
            backend: Some(backend),
            events: Some(events),
            backlog: VecDeque::new(),
            created: Vec::new(),
        }
    }

    fn backend(&self) -> &Arc<dyn ExecutorApi> {
        self.backend
            .as_ref()
            .expect("the subject failed to restart its backend")
    }

    /// Restarts the subject; on [`Unsupported`] the old instance stays (without events).
    async fn restart(&mut self, ending: Ending) -> Result<(), Unsupported> {
        self.backend = None;
        self.events = None;
        self.backlog.clear();
        let restarted = self.subject.restart(ending).await;
        let backend = self.subject.backend();
        if restarted.is_ok() {
            self.events = Some(backend.events());
        }
        self.backend = Some(backend);
        restarted
    }

    /// Destroys the runners the check created (best effort) and ends the check.
    async fn finish(self) {
        if let Some(backend) = &self.backend {
            for id in &self.created {
                let _ = backend.destroy_runner(id, &DestroyReason::ApiRequest).await;
            }
        }
    }

    async fn register(&self, spec: &EnvironmentSpec) {
        self.backend()
            .register_environment(spec)
            .await
            .unwrap_or_else(|e| panic!("register_environment({}) failed: {e}", spec.id));
    }

    async fn load_environments(&self) -> Vec<EnvironmentSpec> {
        self.backend()
            .load_environments()
            .await
            .unwrap_or_else(|e| panic!("load_environments failed: {e}"))
    }

    async fn load_runners(&self, environment: EnvironmentId) -> Vec<RunnerRecord> {
        self.backend()
            .load_runners(environment)
            .await
            .unwrap_or_else(|e| panic!("load_runners({environment}) failed: {e}"))
    }

    /// Creates a runner of the kit's environment and waits until it is ready.
    async fn create(&mut self) -> RunnerInfo {
        let creation = self
            .backend()
            .create_runner(&self.kit.spec)
            .await
            .unwrap_or_else(|e| panic!("create_runner failed: {e}"));
        let info = creation.info().clone();
        self.created.push(info.id.clone());
        assert_eq!(
            info.environment, self.kit.spec.id,
            "create_runner gave a runner of another environment: {info:?}"
        );
        if let Creation::Pending(_) = creation {
            let id = info.id.clone();
            self.await_event(
                |e| matches!(e, BackendEvent::RunnerReady { runner, .. } if *runner == id),
                self.kit.ready_within,
                "RunnerReady for a pending creation",
            )
            .await;
        }
        info
    }

    async fn mark(&self, runner: &RunnerId, state: RunnerState) {
        self.backend()
            .mark_runner(runner, &state)
            .await
            .unwrap_or_else(|e| panic!("mark_runner({runner}, {state:?}) failed: {e}"));
    }

    async fn copy(&self, runner: &RunnerId, copy: Vec<FileCopy>) {
        self.backend()
            .update_files(
                runner,
                &FileUpdate {
                    delete: vec![],
                    copy,
                },
            )
            .await
            .unwrap_or_else(|e| panic!("update_files on {runner} failed: {e}"));
    }

    async fn list(&self, runner: &RunnerId, path: &str, recursive: bool) -> Vec<FileHeader> {
        let request = ListFilesRequest {
            path: path.into(),
            recursive,
            privileged: true,
        };
        self.backend()
            .list_files(runner, &request)
            .await
            .unwrap_or_else(|e| panic!("list_files({path}) failed: {e}"))
    }

    async fn read(&self, runner: &RunnerId, path: &str) -> Vec<u8> {
        let content = self
            .backend()
            .read_file(runner, path, true)
            .await
            .unwrap_or_else(|e| panic!("read_file({path}) failed: {e}"));
        let mut body = content.body;
        let mut bytes = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.unwrap_or_else(|e| panic!("reading {path} failed midway: {e}"));
            bytes.extend_from_slice(&chunk);
        }
        assert_eq!(
            bytes.len() as u64,
            content.size,
            "{path}: announced size and streamed bytes differ"
        );
        bytes
    }

    async fn run(&self, runner: &RunnerId, command: String) -> Outcome {
        self.run_request(runner, ExecutionRequest::new(command))
            .await
    }

    /// Runs `request` with stdin open and collects its events until the stream ends.
    async fn run_request(&self, runner: &RunnerId, request: ExecutionRequest) -> Outcome {
        let handle = self
            .backend()
            .execute(runner, &request, CancellationToken::new())
            .await
            .unwrap_or_else(|e| panic!("execute({:?}) failed: {e}", request.command));
        let mut events = handle.events;
        let mut o = Outcome::default();
        o.collect(&mut events, self.kit.execution_within).await;
        drop(handle.stdin);
        o
    }

    /// The first event (read before or within `within`) that `wanted` accepts.
    async fn await_event(
        &mut self,
        wanted: impl Fn(&BackendEvent) -> bool,
        within: Duration,
        what: &str,
    ) -> BackendEvent {
        if let Some(at) = self.backlog.iter().position(&wanted)
            && let Some(event) = self.backlog.remove(at)
        {
            return event;
        }
        let events = self
            .events
            .as_mut()
            .expect("the backend's events are not available");
        let deadline = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline.into(), events.next()).await {
                Ok(Some(event)) if wanted(&event) => return event,
                Ok(Some(event)) => self.backlog.push_back(event),
                Ok(None) => panic!("events() ended while waiting for {what}"),
                Err(_) => panic!(
                    "no {what} within {within:?}; other events: {:?}",
                    self.backlog
                ),
            }
        }
    }

    /// Watches the events for `during` and fails on one that `unwanted` accepts.
    async fn expect_no_event(
        &mut self,
        unwanted: impl Fn(&BackendEvent) -> bool,
        during: Duration,
        what: &str,
    ) {
        if let Some(event) = self.backlog.iter().find(|e| unwanted(e)) {
            panic!("unexpected {what}: {event:?}");
        }
        let Some(events) = self.events.as_mut() else {
            return;
        };
        let deadline = Instant::now() + during;
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline.into(), events.next()).await {
            assert!(!unwanted(&event), "unexpected {what}: {event:?}");
            self.backlog.push_back(event);
        }
    }
}

/// An execution's events, collected.
#[derive(Debug, Default)]
struct Outcome {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    terminal: Option<ExecutionEvent>,
}

impl Outcome {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    fn take(&mut self, event: ExecutionEvent) {
        assert!(
            self.terminal.is_none(),
            "an event after the terminal one: {event:?} after {:?}",
            self.terminal
        );
        match event {
            ExecutionEvent::Stdout(bytes) => self.stdout.extend_from_slice(&bytes),
            ExecutionEvent::Stderr(bytes) => self.stderr.extend_from_slice(&bytes),
            terminal => self.terminal = Some(terminal),
        }
    }

    /// Takes events until the stream ends, failing if that takes longer than `within`.
    async fn collect(
        &mut self,
        events: &mut tokio::sync::mpsc::Receiver<ExecutionEvent>,
        within: Duration,
    ) {
        let deadline = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline.into(), events.recv()).await {
                Ok(Some(event)) => self.take(event),
                Ok(None) => return,
                Err(_) => panic!("the execution did not end within {within:?}: {self:?}"),
            }
        }
    }

    /// Takes events until stdout contains `text`, failing if the execution ends (stdin is still
    /// open) or that takes longer than `within`.
    async fn await_stdout(
        &mut self,
        events: &mut tokio::sync::mpsc::Receiver<ExecutionEvent>,
        text: &str,
        within: Duration,
    ) {
        let deadline = Instant::now() + within;
        while !self.out().contains(text) {
            match tokio::time::timeout_at(deadline.into(), events.recv()).await {
                Ok(Some(event)) => self.take(event),
                Ok(None) => panic!("the execution ended before stdin was closed: {self:?}"),
                Err(_) => {
                    panic!("{text:?} from stdin never reached stdout within {within:?}: {self:?}")
                }
            }
            assert!(
                self.terminal.is_none(),
                "the execution ended while stdin was open: {self:?}"
            );
        }
    }

    fn expect_exit(&self, code: u8) {
        match &self.terminal {
            Some(ExecutionEvent::Exit(got)) => assert_eq!(
                *got,
                code,
                "exit code (stdout {:?}, stderr {:?})",
                self.out(),
                self.err()
            ),
            other => panic!(
                "expected Exit({code}), the execution ended with {other:?} (stdout {:?}, stderr {:?})",
                self.out(),
                self.err()
            ),
        }
    }
}

fn file(path: &str, content: &'static str) -> FileCopy {
    FileCopy {
        path: path.into(),
        content: Bytes::from_static(content.as_bytes()),
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn header<'h>(listing: &'h [FileHeader], name: &str) -> &'h FileHeader {
    listing
        .iter()
        .find(|h| h.name == name)
        .unwrap_or_else(|| panic!("{name} is not listed: {listing:?}"))
}

fn state_of(records: &[RunnerRecord], id: &RunnerId) -> Option<RecordedState> {
    records.iter().find(|r| r.info.id == *id).map(|r| r.state)
}

fn expect_used(records: &[RunnerRecord], id: &RunnerId, marked: UsedState) {
    match state_of(records, id) {
        Some(RecordedState::Used(got)) => {
            assert_eq!(
                got.inactivity_timeout, marked.inactivity_timeout,
                "the inactivity timeout read back for {id}"
            );
            match (got.deadline, marked.deadline) {
                (None, None) => {}
                (Some(got), Some(marked)) => {
                    let apart = got
                        .duration_since(marked)
                        .or_else(|_| marked.duration_since(got))
                        .unwrap_or_default();
                    assert!(
                        apart <= Duration::from_secs(1),
                        "the deadline read back for {id} is {apart:?} off"
                    );
                }
                (got, marked) => {
                    panic!("the deadline read back for {id} is {got:?}, was marked {marked:?}")
                }
            }
        }
        other => panic!("a runner marked used was read back as {other:?}: {records:?}"),
    }
}

fn expect_environment(environments: &[EnvironmentSpec], spec: &EnvironmentSpec, when: &str) {
    let found: Vec<&EnvironmentSpec> = environments.iter().filter(|e| e.id == spec.id).collect();
    assert_eq!(
        found,
        [spec],
        "environment {} as load_environments returns it {when}",
        spec.id
    );
}
