//! [`RunnerManager`]: the concrete [`Manager`] over any [`ExecutorApi`].
//!
//! It owns the environments with their prewarming pools, the registry of used runners and the
//! tasks that refill pools, expire inactive runners and follow the backend's events. A claim
//! never waits for the backend; everything that talks to the backend after a claim (marking the
//! runner used, refilling the pool) runs in the background with capped exponential backoff.

mod environment;
mod execution;
mod recovery;
mod runner;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use environment::ManagedEnvironment;
pub use recovery::RecoveryReport;
pub use runner::UsedRunner;

use crate::backoff::{Backoff, BackoffPolicy};
use crate::destroy::DestroyReason;
use crate::environment::{EnvironmentSpec, SpecBounds, ValidationError};
use crate::error::ManagerError;
use crate::executor::{
    BackendError, BackendEvent, ExecutorApi, RunnerInfo, RunnerState, UsedState,
};
use crate::ids::{EnvironmentId, RunnerId};
use crate::observe::{ManagerObserver, NoopObserver};
use crate::traits::{Environment, Manager, PutOutcome, Runner};
use environment::{Offer, ReadyOutcome, StoppedRunner};

/// How long shutdown waits for background backend calls.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Default of [`ManagerConfig::max_pending_bytes`]: a few requests of the largest size exec takes.
pub const DEFAULT_MAX_PENDING_BYTES: usize = 4 << 20;

/// How the manager behaves; every field has a sensible default.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Bounds every environment specification must respect.
    pub bounds: SpecBounds,
    /// The most runners (idle targets plus used) all environments together may have.
    pub max_runners: usize,
    /// Runner creation calls running at once per environment (each environment refills on its
    /// own, so a slow one cannot starve another).
    pub refill_concurrency: usize,
    /// How long a runner the backend accepted as pending may take to become ready before it is
    /// destroyed and replaced.
    pub startup_timeout: Duration,
    /// How long a claim on an empty pool waits for a runner that is on its way (created or
    /// pending); a pool with nothing on its way fails the claim at once.
    pub claim_wait: Duration,
    /// Delays between retries of failed backend calls.
    pub backoff: BackoffPolicy,
    /// Attempts for background calls that must eventually succeed (mark used, destroy).
    pub max_attempts: u32,
    /// How long a stored execution request may wait for its WebSocket.
    pub execution_ttl: Duration,
    /// Most stored, not yet started execution requests per runner.
    pub max_pending_executions: usize,
    /// Most bytes of stored, not yet started execution requests per runner (see
    /// [`crate::ExecutionRequest::stored_size`]); one request may use them all.
    pub max_pending_bytes: usize,
    /// Optional cap on the output bytes of one execution.
    pub output_limit: Option<u64>,
    /// How long a cancelled execution may take to end before its runner is destroyed.
    pub stop_grace: Duration,
    /// Pool alert: `/health` fails when idle/pool is below this (0 = never).
    pub alert_threshold: f64,
    /// Pool alert: reload an environment's runners from the backend after it has been below the
    /// threshold this long (`None` = never reload).
    pub alert_reload_delay: Option<Duration>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            bounds: SpecBounds::default(),
            max_runners: 1_000,
            refill_concurrency: 4,
            startup_timeout: Duration::from_secs(120),
            claim_wait: Duration::from_secs(2),
            backoff: BackoffPolicy::default(),
            max_attempts: 8,
            execution_ttl: Duration::from_secs(300),
            max_pending_executions: 256,
            max_pending_bytes: DEFAULT_MAX_PENDING_BYTES,
            output_limit: None,
            stop_grace: Duration::from_secs(3),
            alert_threshold: 0.0,
            alert_reload_delay: None,
        }
    }
}

/// The runner manager. Create it with [`RunnerManager::new`], call [`RunnerManager::recover`]
/// once before serving, and [`RunnerManager::shutdown`] to stop its tasks (runners stay).
#[derive(Debug)]
pub struct RunnerManager {
    backend: Arc<dyn ExecutorApi>,
    config: ManagerConfig,
    environments: RwLock<BTreeMap<EnvironmentId, Arc<ManagedEnvironment>>>,
    used: RwLock<HashMap<RunnerId, Arc<UsedRunner>>>,
    /// Serialises environment changes (PUT/DELETE/reload) so they do not interleave.
    env_changes: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
    weak: Weak<RunnerManager>,
    /// Runners destroyed while a reload is reading the backend's records: the reload's snapshot
    /// may still list them, and they must not come back.
    tombstones: std::sync::Mutex<Option<std::collections::HashSet<RunnerId>>>,
    /// Runners whose destruction on the backend has started and not yet ended: a reload that
    /// starts meanwhile may still read their records, and they must not come back either.
    destroying: Arc<std::sync::Mutex<std::collections::HashSet<RunnerId>>>,
    /// The latest destroyed runners (bounded): a creation answer or a record that names one of
    /// them arrives late and must not bring it back.
    recently_destroyed: std::sync::Mutex<RecentSet>,
    /// Background backend calls (used-marks, destructions) that shutdown waits for, so a clean
    /// shutdown does not leave a claim unrecorded or a replaced runner alive.
    tasks: tokio_util::task::TaskTracker,
    /// Told about start-ups, destructions, executions and failed creations (metrics).
    observer: Arc<dyn ManagerObserver>,
}

impl RunnerManager {
    /// A manager over `backend`; it knows no environment until [`RunnerManager::recover`] or a
    /// `put_environment`.
    pub fn new(backend: Arc<dyn ExecutorApi>, config: ManagerConfig) -> Arc<Self> {
        Self::with_observer(backend, config, Arc::new(NoopObserver))
    }

    /// A manager over `backend` that reports what it does to `observer` (see
    /// [`ManagerObserver`] for what is reported when).
    pub fn with_observer(
        backend: Arc<dyn ExecutorApi>,
        config: ManagerConfig,
        observer: Arc<dyn ManagerObserver>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|weak| Self {
            backend,
            config,
            environments: RwLock::new(BTreeMap::new()),
            used: RwLock::new(HashMap::new()),
            env_changes: tokio::sync::Mutex::new(()),
            shutdown: CancellationToken::new(),
            weak: weak.clone(),
            tombstones: std::sync::Mutex::new(None),
            destroying: Arc::default(),
            recently_destroyed: std::sync::Mutex::new(RecentSet::default()),
            tasks: tokio_util::task::TaskTracker::new(),
            observer,
        })
    }

    /// The observer this manager reports to.
    pub fn observer(&self) -> &Arc<dyn ManagerObserver> {
        &self.observer
    }

    /// The configuration.
    pub fn config(&self) -> &ManagerConfig {
        &self.config
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn ExecutorApi> {
        &self.backend
    }

    /// Stops every background task of the manager. Runners stay on the backend for the next
    /// start; used runners' executions are not interrupted by this call.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_WAIT, self.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                "background backend calls still running at shutdown; the next start reconciles them"
            );
        }
        let used: Vec<_> = self.read_used().values().cloned().collect();
        for runner in used {
            runner.stop_timer();
        }
        info!("runner manager stopped");
    }

    /// The concrete used runner with this id, if any.
    pub fn used_runner(&self, id: &RunnerId) -> Option<Arc<UsedRunner>> {
        self.read_used().get(id).cloned()
    }

    /// Number of used runners over all environments.
    pub fn used_count(&self) -> usize {
        self.read_used().len()
    }

    fn read_envs(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, BTreeMap<EnvironmentId, Arc<ManagedEnvironment>>> {
        self.environments
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write_envs(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, BTreeMap<EnvironmentId, Arc<ManagedEnvironment>>> {
        self.environments
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn read_used(&self) -> std::sync::RwLockReadGuard<'_, HashMap<RunnerId, Arc<UsedRunner>>> {
        self.used.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_used(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<RunnerId, Arc<UsedRunner>>> {
        self.used.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_used(&self, id: &RunnerId) -> bool {
        self.read_used().contains_key(id)
    }

    /// Whether the runner is used, or was destroyed recently (or while a reload runs): either
    /// way it must not be pooled.
    fn is_taken(&self, id: &RunnerId) -> bool {
        self.is_used(id)
            || self
                .recently_destroyed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(id)
            || self.is_tombstoned(id)
    }

    fn managed(&self, id: EnvironmentId) -> Option<Arc<ManagedEnvironment>> {
        self.read_envs().get(&id).cloned()
    }

    /// Total runners counted against `max_runners`: the idle targets plus used runners.
    fn committed_runners(&self, except: Option<EnvironmentId>) -> usize {
        let targets: usize = self
            .read_envs()
            .values()
            .filter(|e| Some(e.id()) != except)
            .map(|e| e.target() as usize)
            .sum();
        targets + self.used_count()
    }

    fn check_runner_cap(&self, spec: &EnvironmentSpec) -> Result<(), ValidationError> {
        let total = self.committed_runners(Some(spec.id)) + spec.prewarming_pool_size as usize;
        if total > self.config.max_runners {
            return Err(ValidationError::new(
                "prewarmingPoolSize",
                format!(
                    "the runner limit of {} would be exceeded ({total} runners)",
                    self.config.max_runners
                ),
            ));
        }
        Ok(())
    }

    /// Adds an environment to the registry and starts its refill task.
    fn install_environment(&self, spec: EnvironmentSpec) -> Arc<ManagedEnvironment> {
        let env = ManagedEnvironment::new(spec, self.shutdown.child_token());
        self.write_envs().insert(env.id(), Arc::clone(&env));
        self.spawn_refill(Arc::clone(&env));
        env
    }

    /// Marks a runner as being destroyed on the backend until the returned guard is dropped, and
    /// as destroyed for a reload that runs meanwhile.
    ///
    /// The runner joins the set of runners being destroyed *before* it is tombstoned: a reload
    /// installs its tombstones first and reads that set second (see
    /// `RunnerManager::install_tombstones`), so whichever way the two interleave, the reload
    /// knows the runner.
    fn destroying(&self, runner: &RunnerId) -> DestroyingGuard {
        self.destroying
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(runner.clone());
        self.forget(runner);
        DestroyingGuard {
            set: Arc::clone(&self.destroying),
            runner: runner.clone(),
        }
    }

    /// Remembers that a runner is gone (destroyed, or stopped on its own), so that no reload
    /// record, creation answer or event brings it back into a pool.
    fn forget(&self, runner: &RunnerId) {
        self.recently_destroyed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(runner.clone());
        self.note_destroyed(runner);
    }

    /// Remembers a destroyed runner while a reload runs (see `tombstones`).
    fn note_destroyed(&self, runner: &RunnerId) {
        if let Some(set) = self
            .tombstones
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            set.insert(runner.clone());
        }
    }

    /// Destroys a runner on the backend in the background, retrying with backoff; reports the
    /// destruction to the observer.
    fn destroy_in_background(&self, runner: RunnerId, reason: DestroyReason) {
        self.observer.runner_destroyed(&reason);
        self.retry_destroy_in_background(runner, reason);
    }

    /// Destroys a runner on the backend in the background, retrying with backoff, without
    /// reporting it (the destruction was reported when it was decided).
    fn retry_destroy_in_background(&self, runner: RunnerId, reason: DestroyReason) {
        let guard = self.destroying(&runner);
        let backend = Arc::clone(&self.backend);
        let policy = self.config.backoff;
        let attempts = self.config.max_attempts;
        self.tasks.spawn(async move {
            destroy_with_retry(backend.as_ref(), &runner, &reason, policy, attempts).await;
            drop(guard);
        });
    }

    /// Removes a used runner and destroys it; its running executions get `reason`'s message.
    async fn destroy_used(&self, id: &RunnerId, reason: DestroyReason) -> Result<(), ManagerError> {
        // Marked as being destroyed and removed from the used runners with its pool locked, so
        // a reload deciding about the same runner (under that lock) sees one or the other.
        let environment = self.read_used().get(id).map(|r| r.environment());
        let unregister = || {
            let guard = self.destroying(id);
            (guard, self.write_used().remove(id))
        };
        let (guard, runner) = match environment.and_then(|e| self.managed(e)) {
            Some(env) => env.with_pool(|_| unregister()),
            None => unregister(),
        };
        let Some(runner) = runner else {
            return Err(ManagerError::UnknownRunner(id.clone()));
        };
        if let Some(env) = self.managed(runner.environment()) {
            env.used_changed(-1);
            self.check_pool_alert(&env);
        }
        // A used runner fewer may bring any pool that stopped at the runner cap back to work.
        for env in self.read_envs().values() {
            env.wake_refill();
        }
        runner.mark_destroyed(reason.clone());
        self.observer.runner_destroyed(&reason);
        info!(runner_id = %id, environment_id = %runner.environment(), reason = reason.label(), "destroying used runner");
        if reason.is_local() {
            return Ok(());
        }
        match self.backend.destroy_runner(id, &reason).await {
            Ok(()) => drop(guard),
            Err(err) => {
                drop(guard);
                warn!(runner_id = %id, error = %err, "destroying runner failed; retrying in the background");
                self.retry_destroy_in_background(id.clone(), reason);
            }
        }
        Ok(())
    }

    /// Called by a used runner's inactivity timer.
    fn on_inactivity_timeout(&self, id: RunnerId) {
        let Some(manager) = self.weak.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let _ = manager
                .destroy_used(&id, DestroyReason::InactivityTimeout)
                .await;
        });
    }

    /// Marks a claimed runner used on the backend, retrying with backoff.
    fn mark_used_in_background(&self, id: RunnerId, state: UsedState) {
        let backend = Arc::clone(&self.backend);
        let policy = self.config.backoff;
        let attempts = self.config.max_attempts;
        let state = RunnerState::Used(state);
        self.tasks.spawn(async move {
            retry(policy, attempts, &id, "marking the runner used", || {
                backend.mark_runner(&id, &state)
            })
            .await;
        });
    }

    /// Starts following the backend's event stream.
    fn spawn_event_loop(&self) {
        let Some(manager) = self.weak.upgrade() else {
            return;
        };
        let mut events = self.backend.events();
        let stop = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    () = stop.cancelled() => return,
                    event = events.next() => event,
                };
                let Some(event) = event else {
                    debug!("backend event stream ended");
                    return;
                };
                manager.handle_event(event).await;
            }
        });
    }

    async fn handle_event(&self, event: BackendEvent) {
        match event {
            BackendEvent::RunnerStopped { runner, reason } => {
                self.runner_stopped(runner, reason).await
            }
            BackendEvent::RunnerStarted { info, startup } => {
                let known = self.read_used().contains_key(&info.id)
                    || self
                        .read_envs()
                        .values()
                        .any(|e| e.with_pool(|p| p.contains(&info.id) || p.is_pending(&info.id)));
                if known {
                    return;
                }
                let offer = self
                    .managed(info.environment)
                    .map(|env| env.offer_idle(info.clone(), |id| self.is_taken(id)));
                match offer {
                    Some(Offer::Pooled) => {
                        self.observer
                            .runner_started(&info.id, info.environment, startup);
                        debug!(runner_id = %info.id, ?startup, "backend started an idle runner");
                    }
                    Some(Offer::Known) => {}
                    Some(Offer::Unwanted) | None => {
                        self.destroy_in_background(info.id, DestroyReason::Replaced);
                    }
                }
            }
            BackendEvent::RunnerReady { runner, startup } => {
                for env in self.candidate_environments(&runner) {
                    match env.ready(&runner) {
                        ReadyOutcome::Pooled => {
                            self.observer.runner_started(&runner, env.id(), startup);
                            debug!(runner_id = %runner, environment_id = %env.id(), ?startup, "runner ready");
                            self.check_pool_alert(&env);
                            return;
                        }
                        ReadyOutcome::Unwanted(info) => {
                            debug!(runner_id = %runner, environment_id = %env.id(), "runner ready but no longer wanted");
                            self.destroy_in_background(info.id, DestroyReason::EnvironmentUpdated);
                            env.wake_refill();
                            return;
                        }
                        ReadyOutcome::Unknown => {}
                    }
                }
                debug!(runner_id = %runner, "ready event for a runner that is not pending");
            }
            BackendEvent::Resynchronize => {
                if let Err(err) = self.reload_all().await {
                    warn!(error = %err, "reloading runners after a backend resynchronisation failed");
                }
            }
            BackendEvent::EnvironmentAppeared(spec) => {
                let _guard = self.env_changes.lock().await;
                if self.managed(spec.id).is_some() {
                    debug!(environment_id = %spec.id, "backend reports a known environment");
                    return;
                }
                info!(environment_id = %spec.id, "environment appeared on the backend; adopting it");
                let env = self.install_environment(spec);
                if let Err(err) = self.reload_environment(&env).await {
                    warn!(environment_id = %env.id(), error = %err, "loading the runners of an adopted environment failed");
                }
            }
            BackendEvent::EnvironmentVanished(id) => {
                let _guard = self.env_changes.lock().await;
                if self.remove_environment(id).await.is_ok() {
                    warn!(environment_id = %id, "environment vanished from the backend; its runners are destroyed");
                }
            }
        }
    }

    /// The environments a runner may belong to: the one its id names first, then every other.
    fn candidate_environments(&self, runner: &RunnerId) -> Vec<Arc<ManagedEnvironment>> {
        let named = runner.environment();
        let envs = self.read_envs();
        let mut out: Vec<_> = named
            .and_then(|e| envs.get(&e).cloned())
            .into_iter()
            .collect();
        out.extend(envs.values().filter(|e| Some(e.id()) != named).cloned());
        out
    }

    /// A runner stopped on its own. It is idle, pending or used in exactly one place (a claim
    /// moves it from idle to used with the pool locked), so the check happens under that lock.
    ///
    /// The runner is gone on the backend, so it is forgotten first, whatever its reason (a local
    /// one destroys nothing on the backend): a reload may have pooled it from a record read
    /// while its creation was still under way, and the creation's answer, arriving after this
    /// event removed it from the pool, must not pool it again.
    async fn runner_stopped(&self, runner: RunnerId, reason: DestroyReason) {
        enum Found {
            Idle(Arc<ManagedEnvironment>),
            Pending(Arc<ManagedEnvironment>),
            Used,
        }
        self.forget(&runner);
        let mut found = None;
        for env in self.candidate_environments(&runner) {
            found = match env.locate_stopped(&runner, |id| self.is_used(id)) {
                StoppedRunner::Idle => Some(Found::Idle(env)),
                StoppedRunner::Pending => Some(Found::Pending(env)),
                StoppedRunner::Used => Some(Found::Used),
                StoppedRunner::Unknown => continue,
            };
            break;
        }
        if found.is_none() && self.is_used(&runner) {
            found = Some(Found::Used);
        }
        match found {
            Some(Found::Used) => {
                let _ = self.destroy_used(&runner, reason).await;
            }
            Some(Found::Idle(env)) => {
                info!(runner_id = %runner, environment_id = %env.id(), reason = reason.label(), "idle runner stopped");
                if reason.is_local() {
                    self.observer.runner_destroyed(&reason);
                } else {
                    self.destroy_in_background(runner, reason);
                }
                env.wake_refill();
                self.check_pool_alert(&env);
            }
            Some(Found::Pending(env)) => {
                if env.pending_stopped(&runner, &reason.to_string()) {
                    warn!(runner_id = %runner, environment_id = %env.id(), reason = reason.label(), "runner stopped before it was ready");
                    if reason.is_local() {
                        self.observer.runner_destroyed(&reason);
                    } else {
                        self.destroy_in_background(runner, reason);
                    }
                    env.wake_refill();
                }
            }
            None => debug!(runner_id = %runner, "stop event for an unknown runner"),
        }
    }

    /// Schedules a reload when an environment's pool stays below the alert threshold.
    fn check_pool_alert(&self, env: &Arc<ManagedEnvironment>) {
        let Some(delay) = self.config.alert_reload_delay else {
            return;
        };
        if !env.is_depleting(self.config.alert_threshold) || !env.begin_alert() {
            return;
        }
        let Some(manager) = self.weak.upgrade() else {
            env.end_alert();
            return;
        };
        let env = Arc::clone(env);
        tokio::spawn(async move {
            tokio::select! {
                () = manager.shutdown.cancelled() => {}
                () = tokio::time::sleep(delay) => {
                    if env.is_depleting(manager.config.alert_threshold) && manager.managed(env.id()).is_some() {
                        warn!(environment_id = %env.id(), "prewarming pool still depleted; reloading its runners");
                        let _guard = manager.env_changes.lock().await;
                        if let Err(err) = manager.reload_environment(&env).await {
                            warn!(environment_id = %env.id(), error = %err, "reloading runners failed");
                        }
                    }
                }
            }
            env.end_alert();
        });
    }

    async fn claim_runner(
        &self,
        environment: EnvironmentId,
        inactivity_timeout: Duration,
    ) -> Result<Arc<UsedRunner>, ManagerError> {
        let env = self
            .managed(environment)
            .ok_or(ManagerError::UnknownEnvironment(environment))?;
        let deadline = tokio::time::Instant::now() + self.config.claim_wait;
        let runner = loop {
            let idle_added = env.idle_added();
            tokio::pin!(idle_added);
            idle_added.as_mut().enable();
            if let Some(runner) =
                env.claim_with(|info| self.register_used(info, inactivity_timeout, None))
            {
                break runner;
            }
            env.wake_refill();
            self.check_pool_alert(&env);
            if !env.expecting_runner()
                || tokio::time::timeout_at(deadline, idle_added).await.is_err()
            {
                return Err(ManagerError::NoIdleRunner(environment));
            }
        };
        env.wake_refill();
        self.check_pool_alert(&env);
        let deadline = runner.remaining().map(|r| SystemTime::now() + r);
        self.mark_used_in_background(
            runner.id().clone(),
            UsedState {
                inactivity_timeout,
                deadline,
            },
        );
        info!(runner_id = %runner.id(), environment_id = %environment, "runner claimed");
        Ok(runner)
    }

    /// Creates the used-runner object, registers it and starts its timer.
    fn register_used(
        &self,
        info: RunnerInfo,
        inactivity_timeout: Duration,
        remaining: Option<Duration>,
    ) -> Arc<UsedRunner> {
        let runner = UsedRunner::new(
            info,
            inactivity_timeout,
            remaining,
            Arc::clone(&self.backend),
            runner::RunnerSettings::new(&self.config, Arc::clone(&self.observer)),
            self.weak.clone(),
        );
        self.write_used()
            .insert(runner.id().clone(), Arc::clone(&runner));
        let weak = self.weak.clone();
        let id = runner.id().clone();
        runner.start_timer(move || {
            if let Some(manager) = weak.upgrade() {
                manager.on_inactivity_timeout(id);
            }
        });
        runner
    }
}

impl RunnerManager {
    /// Forgets an environment and destroys all its runners (idle, pending and used). The caller
    /// holds `env_changes`. Closing the pool first means no claim can take a runner of it
    /// afterwards, and every claim that did is already among the used runners.
    async fn remove_environment(&self, id: EnvironmentId) -> Result<(), ManagerError> {
        let env = self
            .write_envs()
            .remove(&id)
            .ok_or(ManagerError::UnknownEnvironment(id))?;
        let idle = env.close();
        let used: Vec<RunnerId> = self
            .read_used()
            .values()
            .filter(|r| r.environment() == id)
            .map(|r| r.id().clone())
            .collect();
        let reason = DestroyReason::EnvironmentDeleted;
        let destroy_idle = idle.into_iter().map(|info| {
            let backend = Arc::clone(&self.backend);
            let reason = reason.clone();
            let policy = self.config.backoff;
            let attempts = self.config.max_attempts;
            let guard = self.destroying(&info.id);
            self.observer.runner_destroyed(&reason);
            async move {
                destroy_with_retry(backend.as_ref(), &info.id, &reason, policy, attempts).await;
                drop(guard);
            }
        });
        let destroy_used = used.iter().map(|r| self.destroy_used(r, reason.clone()));
        futures::future::join(
            futures::future::join_all(destroy_idle),
            futures::future::join_all(destroy_used),
        )
        .await;
        Ok(())
    }
}

/// The latest runner ids inserted, at most [`RecentSet::CAPACITY`], forgetting the oldest.
#[derive(Debug, Default)]
struct RecentSet {
    members: std::collections::HashSet<RunnerId>,
    order: std::collections::VecDeque<RunnerId>,
}

impl RecentSet {
    const CAPACITY: usize = 4_096;

    fn insert(&mut self, id: RunnerId) {
        if !self.members.insert(id.clone()) {
            return;
        }
        self.order.push_back(id);
        if self.order.len() > Self::CAPACITY
            && let Some(oldest) = self.order.pop_front()
        {
            self.members.remove(&oldest);
        }
    }

    fn contains(&self, id: &RunnerId) -> bool {
        self.members.contains(id)
    }
}

/// Keeps a runner in the manager's set of runners being destroyed until dropped.
#[derive(Debug)]
struct DestroyingGuard {
    set: Arc<std::sync::Mutex<std::collections::HashSet<RunnerId>>>,
    runner: RunnerId,
}

impl Drop for DestroyingGuard {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.runner);
    }
}

/// Destroys `runner`, retrying failures with capped backoff up to `attempts` times.
async fn destroy_with_retry(
    backend: &dyn ExecutorApi,
    runner: &RunnerId,
    reason: &DestroyReason,
    policy: BackoffPolicy,
    attempts: u32,
) {
    retry(policy, attempts, runner, "destroying the runner", || {
        backend.destroy_runner(runner, reason)
    })
    .await;
}

/// Runs `call` until it succeeds, the runner is gone, or `attempts` calls failed, waiting with
/// capped exponential backoff in between.
async fn retry<F, Fut>(policy: BackoffPolicy, attempts: u32, runner: &RunnerId, what: &str, call: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), crate::executor::BackendError>>,
{
    let mut backoff = Backoff::new(policy);
    loop {
        match call().await {
            Ok(()) | Err(crate::executor::BackendError::RunnerNotFound(_)) => return,
            Err(err) if backoff.failures() + 1 >= attempts => {
                warn!(runner_id = %runner, error = %err, "{what} failed; giving up");
                return;
            }
            Err(err) => {
                let delay = backoff.fail();
                debug!(runner_id = %runner, error = %err, ?delay, "{what} failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[async_trait]
impl Manager for RunnerManager {
    async fn put_environment(&self, spec: EnvironmentSpec) -> Result<PutOutcome, ManagerError> {
        spec.validate(&self.config.bounds)?;
        let _guard = self.env_changes.lock().await;
        self.check_runner_cap(&spec)?;
        self.backend.register_environment(&spec).await?;
        let Some(env) = self.managed(spec.id) else {
            info!(environment_id = %spec.id, "environment created");
            self.install_environment(spec);
            return Ok(PutOutcome::Created);
        };
        let old = env.spec();
        let stale = if old.differs_only_in_pool_size(&spec) {
            info!(environment_id = %spec.id, pool = spec.prewarming_pool_size, "environment pool resized");
            env.resize(spec.prewarming_pool_size)
        } else {
            info!(environment_id = %spec.id, "environment replaced; idle runners are recreated");
            env.replace(spec)
        };
        for info in stale {
            self.destroy_in_background(info.id, DestroyReason::EnvironmentUpdated);
        }
        env.wake_refill();
        Ok(PutOutcome::Replaced)
    }

    async fn delete_environment(&self, id: EnvironmentId) -> Result<(), ManagerError> {
        let _guard = self.env_changes.lock().await;
        self.remove_environment(id).await?;
        // The environment is already gone from memory, so a transient backend failure is retried
        // here rather than left for the client to retry into a 404.
        let mut backoff = Backoff::new(self.config.backoff);
        loop {
            match self.backend.delete_environment(id).await {
                Ok(()) | Err(BackendError::EnvironmentNotFound(_)) => break,
                Err(err) if backoff.failures() + 1 >= self.config.max_attempts => {
                    warn!(environment_id = %id, error = %err, "deleting the environment failed");
                    return Err(err.into());
                }
                Err(err) => {
                    let delay = backoff.fail();
                    debug!(environment_id = %id, error = %err, ?delay, "deleting the environment failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
        info!(environment_id = %id, "environment deleted");
        Ok(())
    }

    fn environment(&self, id: EnvironmentId) -> Option<Arc<dyn Environment>> {
        self.managed(id).map(|e| e as Arc<dyn Environment>)
    }

    fn environments(&self) -> Vec<Arc<dyn Environment>> {
        self.read_envs()
            .values()
            .map(|e| Arc::clone(e) as Arc<dyn Environment>)
            .collect()
    }

    async fn claim(
        &self,
        environment: EnvironmentId,
        inactivity_timeout: Duration,
    ) -> Result<Arc<dyn Runner>, ManagerError> {
        self.claim_runner(environment, inactivity_timeout)
            .await
            .map(|r| r as Arc<dyn Runner>)
    }

    async fn backend_health(&self) -> Result<(), BackendError> {
        self.backend.health().await
    }

    fn runner(&self, id: &RunnerId) -> Result<Arc<dyn Runner>, ManagerError> {
        self.read_used()
            .get(id)
            .cloned()
            .map(|r| r as Arc<dyn Runner>)
            .ok_or_else(|| ManagerError::UnknownRunner(id.clone()))
    }

    async fn return_runner(&self, id: &RunnerId) -> Result<(), ManagerError> {
        self.destroy_used(id, DestroyReason::ApiRequest).await
    }

    fn depleting_environments(&self) -> Vec<EnvironmentId> {
        if self.config.alert_threshold <= 0.0 {
            return Vec::new();
        }
        self.read_envs()
            .values()
            .filter(|e| e.is_depleting(self.config.alert_threshold))
            .map(|e| e.id())
            .collect()
    }
}
