//! One environment under management: its specification, its [`PrewarmingPool`] and the task that
//! refills the pool.
//!
//! The refill task never blocks a claim: claims only take from the pool and wake the task. Each
//! environment refills on its own (a slow or failing environment cannot starve another), with
//! bounded concurrency, and backs off exponentially, capped, while the backend fails. A failure
//! that will not go away by retrying ([`BackendError::is_permanent`]) stops the refilling until
//! the specification changes; the reason is kept for statistics, metrics and `/health`. A
//! creation the backend accepted as pending counts toward the pool until the backend reports it
//! ready; one that is not ready within the start-up timeout is destroyed and replaced.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::RunnerManager;
use crate::backoff::Backoff;
use crate::destroy::DestroyReason;
use crate::environment::{EnvironmentSpec, EnvironmentStatistics};
use crate::executor::{BackendError, Creation, RunnerInfo};
use crate::ids::{EnvironmentId, RunnerId};
use crate::pool::{PendingRunner, PrewarmingPool};
use crate::traits::Environment;

#[derive(Debug)]
struct State {
    spec: Arc<EnvironmentSpec>,
    /// Bumped whenever the specification changes so runners created from an older one are
    /// destroyed instead of pooled.
    generation: u64,
    pool: PrewarmingPool,
    closed: bool,
    /// Why runners of the current specification cannot be created; refilling stops while set.
    creation_failure: Option<String>,
    /// Runners reported ready before their creation call returned (an event can overtake the
    /// answer); matched when the answer arrives. Bounded.
    early_ready: std::collections::HashSet<RunnerId>,
    /// Runners reported stopped before their creation call returned; dropped when it does.
    early_stopped: std::collections::HashSet<RunnerId>,
    /// Consecutive failed creations and the latest error, while the backend keeps failing.
    failures: u32,
    last_error: Option<String>,
}

/// Most runner ids remembered as ready before their creation call returned.
const MAX_EARLY_READY: usize = 1024;

/// What became of a runner offered to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Offer {
    /// It is idle in the pool now.
    Pooled,
    /// It is already idle, pending or used: nothing changed.
    Known,
    /// The pool does not want it (closed or full): destroy it.
    Unwanted,
}

/// Where a runner that stopped on its own was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StoppedRunner {
    /// Idle (now removed from the pool).
    Idle,
    /// Pending.
    Pending,
    /// Held by a client.
    Used,
    /// Not in this environment.
    Unknown,
}

/// What became of a runner the backend reported ready.
#[derive(Debug)]
pub(super) enum ReadyOutcome {
    /// It is idle in the pool now.
    Pooled,
    /// It is no longer wanted (environment changed, closed or full): destroy it.
    Unwanted(RunnerInfo),
    /// Not a pending runner of this environment.
    Unknown,
}

/// An environment with its prewarming pool. Obtained through [`crate::Manager::environment`].
#[derive(Debug)]
pub struct ManagedEnvironment {
    id: EnvironmentId,
    state: Mutex<State>,
    used: AtomicI64,
    refill: Notify,
    /// Woken whenever a runner becomes idle, for claims waiting on an empty pool.
    idle_added: Notify,
    alert_pending: AtomicBool,
    stop: CancellationToken,
}

impl ManagedEnvironment {
    pub(super) fn new(spec: EnvironmentSpec, stop: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            id: spec.id,
            state: Mutex::new(State {
                pool: PrewarmingPool::new(spec.prewarming_pool_size),
                spec: Arc::new(spec),
                generation: 0,
                closed: false,
                creation_failure: None,
                early_ready: std::collections::HashSet::new(),
                early_stopped: std::collections::HashSet::new(),
                failures: 0,
                last_error: None,
            }),
            used: AtomicI64::new(0),
            refill: Notify::new(),
            idle_added: Notify::new(),
            alert_pending: AtomicBool::new(false),
            stop,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The environment's id.
    pub fn id(&self) -> EnvironmentId {
        self.id
    }

    pub(super) fn target(&self) -> u32 {
        self.lock().pool.target()
    }

    /// Takes an idle runner and hands it to `register` while the pool is locked, so the runner
    /// is never in neither place: an environment deletion or a stop event that looks at the pool
    /// and the used runners sees it in exactly one. `None` when the pool is empty or closed.
    pub(super) fn claim_with<T>(&self, register: impl FnOnce(RunnerInfo) -> T) -> Option<T> {
        let mut state = self.lock();
        if state.closed {
            return None;
        }
        let info = state.pool.take()?;
        self.used.fetch_add(1, Ordering::SeqCst);
        Some(register(info))
    }

    /// Runs `f` with the pool locked (to decide atomically where a runner is).
    pub(super) fn with_pool<T>(&self, f: impl FnOnce(&mut PrewarmingPool) -> T) -> T {
        f(&mut self.lock().pool)
    }

    /// Whether a runner is on its way to the pool: a creation in flight or pending, or one about
    /// to start (the pool is short and its creations are not failing).
    pub(super) fn expecting_runner(&self) -> bool {
        let state = self.lock();
        !state.closed
            && (state.pool.expecting() || (state.pool.deficit() > 0 && state.failures == 0))
    }

    /// A future that completes when a runner becomes idle; create it before checking the pool.
    pub(super) fn idle_added(&self) -> tokio::sync::futures::Notified<'_> {
        self.idle_added.notified()
    }

    pub(super) fn contains_idle(&self, id: &RunnerId) -> bool {
        self.lock().pool.contains(id)
    }

    pub(super) fn remove_idle(&self, id: &RunnerId) -> Option<RunnerInfo> {
        self.lock().pool.remove(id)
    }

    /// The ids of the idle runners right now.
    pub(super) fn idle_ids(&self) -> Vec<RunnerId> {
        self.lock().pool.ids().cloned().collect()
    }

    /// Keeps only the idle runners for which `keep` holds.
    pub(super) fn retain_idle(&self, keep: impl Fn(&RunnerId) -> bool) {
        let mut state = self.lock();
        let gone: Vec<RunnerId> = state.pool.ids().filter(|id| !keep(id)).cloned().collect();
        for id in gone {
            state.pool.remove(&id);
        }
    }

    /// Adds a runner to the pool if it is below target.
    ///
    /// `is_used` tells whether a client holds the runner; it is asked with the pool locked, so a
    /// runner claimed meanwhile is never put back. A pending runner stays pending.
    pub(super) fn offer_idle(
        &self,
        info: RunnerInfo,
        is_used: impl Fn(&RunnerId) -> bool,
    ) -> Offer {
        let mut state = self.lock();
        if state.pool.contains(&info.id) || state.pool.is_pending(&info.id) || is_used(&info.id) {
            return Offer::Known;
        }
        if state.closed || !state.pool.wants_more() {
            return Offer::Unwanted;
        }
        state.pool.insert(info);
        self.idle_added.notify_waiters();
        Offer::Pooled
    }

    pub(super) fn used_changed(&self, delta: i64) {
        self.used.fetch_add(delta, Ordering::SeqCst);
    }

    pub(super) fn wake_refill(&self) {
        self.refill.notify_one();
    }

    /// Sets a new pool size; returns the idle runners above it, to be destroyed.
    pub(super) fn resize(&self, target: u32) -> Vec<RunnerInfo> {
        let mut state = self.lock();
        let mut spec = (*state.spec).clone();
        spec.prewarming_pool_size = target;
        state.spec = Arc::new(spec);
        state.pool.set_target(target);
        state.pool.drain_surplus()
    }

    /// Replaces the specification; returns every idle and pending runner, to be destroyed.
    pub(super) fn replace(&self, spec: EnvironmentSpec) -> Vec<RunnerInfo> {
        let mut state = self.lock();
        state.pool.set_target(spec.prewarming_pool_size);
        state.spec = Arc::new(spec);
        state.generation += 1;
        state.creation_failure = None;
        state.failures = 0;
        state.last_error = None;
        let mut stale = state.pool.drain();
        stale.extend(state.pool.drain_pending().into_iter().map(|p| p.info));
        stale
    }

    /// Records that runners of `generation` cannot be created; returns whether this is news
    /// (the first such failure of the current specification).
    fn fail_permanently(&self, generation: u64, reason: String) -> bool {
        let mut state = self.lock();
        if generation != state.generation || state.creation_failure.is_some() {
            return false;
        }
        state.creation_failure = Some(reason);
        true
    }

    /// Stops the refill task and returns every idle and pending runner, to be destroyed. Once
    /// this returns, no claim can take a runner of this environment any more.
    pub(super) fn close(&self) -> Vec<RunnerInfo> {
        self.stop.cancel();
        let mut state = self.lock();
        state.closed = true;
        state.pool.set_target(0);
        let mut all = state.pool.drain();
        all.extend(state.pool.drain_pending().into_iter().map(|p| p.info));
        self.idle_added.notify_waiters();
        all
    }

    /// A pending runner became ready: pooled if still wanted.
    pub(super) fn ready(&self, id: &RunnerId) -> ReadyOutcome {
        let mut state = self.lock();
        let Some(pending) = state.pool.remove_pending(id) else {
            if state.pool.creating() > 0 && !state.pool.contains(id) {
                if state.early_ready.len() >= MAX_EARLY_READY {
                    state.early_ready.clear();
                }
                state.early_ready.insert(id.clone());
            }
            return ReadyOutcome::Unknown;
        };
        state.failures = 0;
        state.last_error = None;
        if state.pool.contains(id) {
            return ReadyOutcome::Pooled;
        }
        if state.closed || pending.generation != state.generation || !state.pool.wants_more() {
            return ReadyOutcome::Unwanted(pending.info);
        }
        state.pool.insert(pending.info);
        self.idle_added.notify_waiters();
        ReadyOutcome::Pooled
    }

    /// Finds where a runner that stopped on its own is, with the pool locked (a claim moves a
    /// runner from idle to used under the same lock): an idle one is removed at once, a pending
    /// one is left for [`ManagedEnvironment::pending_stopped`]. When it is nowhere while
    /// creations are in flight, the stop is remembered so the creation's answer does not bring
    /// the runner back.
    pub(super) fn locate_stopped(
        &self,
        id: &RunnerId,
        is_used: impl Fn(&RunnerId) -> bool,
    ) -> StoppedRunner {
        let mut state = self.lock();
        if state.pool.remove(id).is_some() {
            return StoppedRunner::Idle;
        }
        if state.pool.is_pending(id) {
            return StoppedRunner::Pending;
        }
        if is_used(id) {
            return StoppedRunner::Used;
        }
        if state.pool.creating() > 0 {
            if state.early_stopped.len() >= MAX_EARLY_READY {
                state.early_stopped.clear();
            }
            state.early_stopped.insert(id.clone());
        }
        StoppedRunner::Unknown
    }

    /// Removes a pending runner that stopped before it was ready; `true` if it was pending.
    pub(super) fn pending_stopped(&self, id: &RunnerId, why: &str) -> bool {
        let mut state = self.lock();
        if state.pool.remove_pending(id).is_none() {
            return false;
        }
        state.failures = state.failures.saturating_add(1);
        state.last_error = Some(format!("a runner stopped before it was ready: {why}"));
        true
    }

    /// Removes the pending runners accepted at or before `cutoff` (their start-up timed out).
    fn expire_pending(&self, cutoff: Instant) -> Vec<PendingRunner> {
        let mut state = self.lock();
        let late = state.pool.drain_pending_since(cutoff);
        if !late.is_empty() {
            state.failures = state.failures.saturating_add(1);
            state.last_error = Some(format!(
                "{} runner(s) did not become ready within the start-up timeout",
                late.len()
            ));
        }
        late
    }

    /// When the oldest pending runner was accepted.
    fn oldest_pending(&self) -> Option<Instant> {
        self.lock().pool.oldest_pending()
    }

    fn creation_failed(&self, error: &BackendError) {
        let mut state = self.lock();
        state.pool.creation_finished();
        state.failures = state.failures.saturating_add(1);
        state.last_error = Some(error.to_string());
    }

    pub(super) fn begin_alert(&self) -> bool {
        !self.alert_pending.swap(true, Ordering::SeqCst)
    }

    pub(super) fn end_alert(&self) {
        self.alert_pending.store(false, Ordering::SeqCst);
    }

    /// Reserves one creation if the pool is short: the spec to create from and its generation.
    fn reserve(&self) -> Option<(Arc<EnvironmentSpec>, u64)> {
        let mut state = self.lock();
        if state.closed || state.creation_failure.is_some() || !state.pool.reserve_creation() {
            return None;
        }
        Some((Arc::clone(&state.spec), state.generation))
    }

    /// Ends a creation; pools the runner (or records it pending) if it is still wanted, else
    /// hands it back for destroying. `is_used` is asked with the pool locked: a reload may have
    /// pooled the runner already and a client claimed it since.
    fn finish(
        &self,
        created: Option<(Creation, u64)>,
        is_used: impl Fn(&RunnerId) -> bool,
    ) -> Option<RunnerInfo> {
        let mut state = self.lock();
        state.pool.creation_finished();
        let (creation, generation) = created?;
        if state.early_stopped.remove(&creation.info().id) {
            state.failures = state.failures.saturating_add(1);
            state.last_error = Some("a runner stopped before it was ready".into());
            return None;
        }
        let (info, ready) = match creation {
            Creation::Ready(info) => (info, true),
            Creation::Pending(info) => {
                let early = state.early_ready.remove(&info.id);
                (info, early)
            }
        };
        if ready {
            state.failures = 0;
            state.last_error = None;
        }
        if state.pool.contains(&info.id) || state.pool.is_pending(&info.id) || is_used(&info.id) {
            // A reload found it already (and a client may hold it by now).
            return None;
        }
        if state.closed || generation != state.generation {
            return Some(info);
        }
        if !ready {
            let since = Instant::now();
            state.pool.add_pending(PendingRunner {
                info,
                generation,
                since,
            });
            return None;
        }
        if !state.pool.wants_more() {
            return Some(info);
        }
        if state.pool.insert(info.clone()) {
            self.idle_added.notify_waiters();
            None
        } else {
            Some(info)
        }
    }
}

impl Environment for ManagedEnvironment {
    fn spec(&self) -> EnvironmentSpec {
        (*self.lock().spec).clone()
    }

    fn statistics(&self) -> EnvironmentStatistics {
        let state = self.lock();
        EnvironmentStatistics {
            id: self.id,
            prewarming_pool_size: state.pool.target(),
            idle_runners: state.pool.len(),
            used_runners: u32::try_from(self.used.load(Ordering::SeqCst).max(0))
                .unwrap_or(u32::MAX),
            pending_runners: state.pool.pending().saturating_add(state.pool.creating()),
            failing: state.failures > 0,
            last_error: state.last_error.clone(),
        }
    }

    fn creation_failure(&self) -> Option<String> {
        self.lock().creation_failure.clone()
    }
}

/// A creation's answer, the generation it was made for, and how long the call took.
type Created = (Result<Creation, BackendError>, u64, std::time::Duration);

impl RunnerManager {
    /// Starts the task that keeps `env`'s pool at its target size.
    pub(super) fn spawn_refill(&self, env: Arc<ManagedEnvironment>) {
        let Some(manager) = self.weak.upgrade() else {
            return;
        };
        tokio::spawn(async move { manager.refill_loop(env).await });
    }

    async fn refill_loop(self: Arc<Self>, env: Arc<ManagedEnvironment>) {
        let mut backoff = Backoff::new(self.config.backoff);
        let mut retry_at: Option<Instant> = None;
        let mut inflight: JoinSet<Created> = JoinSet::new();
        let startup_timeout = self.config.startup_timeout;
        loop {
            let late = Instant::now()
                .checked_sub(startup_timeout)
                .map(|cutoff| env.expire_pending(cutoff))
                .unwrap_or_default();
            if !late.is_empty() {
                let delay = backoff.fail();
                retry_at = Some(Instant::now() + delay);
                for pending in late {
                    warn!(runner_id = %pending.info.id, environment_id = %env.id, timeout = ?startup_timeout, "runner not ready within the start-up timeout; replacing it");
                    self.destroy_in_background(pending.info.id, DestroyReason::StartupTimeout);
                }
            }
            let may_start = retry_at.is_none_or(|t| t <= Instant::now());
            if may_start {
                retry_at = None;
                while inflight.len() < self.config.refill_concurrency.max(1) {
                    if self.live_runners() >= self.config.max_runners {
                        debug!(environment_id = %env.id, "runner cap reached; not refilling");
                        break;
                    }
                    let Some((spec, generation)) = env.reserve() else {
                        break;
                    };
                    let backend = Arc::clone(&self.backend);
                    inflight.spawn(async move {
                        let started = Instant::now();
                        let created = backend.create_runner(&spec).await;
                        (created, generation, started.elapsed())
                    });
                }
            }
            let next_expiry = env.oldest_pending().map(|t| t + startup_timeout);
            tokio::select! {
                () = env.stop.cancelled() => break,
                Some(joined) = inflight.join_next(), if !inflight.is_empty() => {
                    match joined {
                        Ok((Ok(creation), generation, took)) => {
                            backoff.succeed();
                            if let Creation::Ready(info) = &creation {
                                self.observer.runner_started(&info.id, env.id, took);
                            }
                            debug!(runner_id = %creation.info().id, environment_id = %env.id, ready = matches!(creation, Creation::Ready(_)), "runner created");
                            if let Some(unwanted) = env.finish(Some((creation, generation)), |id| self.is_taken(id)) {
                                self.destroy_in_background(unwanted.id, DestroyReason::EnvironmentUpdated);
                            }
                        }
                        Ok((Err(err), generation, _)) if err.is_permanent() => {
                            env.creation_failed(&err);
                            self.observer.runner_creation_failed(env.id, &err);
                            backoff.succeed();
                            if env.fail_permanently(generation, err.to_string()) {
                                error!(environment_id = %env.id, error = %err, "runners of this environment cannot be created; refilling stops until the environment is changed");
                            }
                        }
                        Ok((Err(err), _, _)) => {
                            env.creation_failed(&err);
                            self.observer.runner_creation_failed(env.id, &err);
                            let delay = backoff.fail();
                            warn!(environment_id = %env.id, error = %err, ?delay, failures = backoff.failures(), "creating a runner failed; backing off");
                            retry_at = Some(Instant::now() + delay);
                        }
                        Err(join_err) => {
                            env.finish(None, |_| false);
                            warn!(environment_id = %env.id, error = %join_err, "runner creation task failed");
                        }
                    }
                }
                () = async { if let Some(t) = retry_at { tokio::time::sleep_until(t).await } else { std::future::pending().await } }, if retry_at.is_some() => {}
                () = async { if let Some(t) = next_expiry { tokio::time::sleep_until(t).await } else { std::future::pending().await } }, if next_expiry.is_some() => {}
                () = env.refill.notified() => {}
            }
        }
        // The environment is gone or the manager stops: runners still being created are destroyed
        // once they exist (on shutdown they are left for the next start to recover).
        let shutting_down = self.shutdown.is_cancelled();
        while let Some(joined) = inflight.join_next().await {
            if let Ok((Ok(creation), _, _)) = joined {
                env.finish(None, |_| false);
                if !shutting_down {
                    self.destroy_in_background(
                        creation.info().id.clone(),
                        DestroyReason::EnvironmentDeleted,
                    );
                }
            }
        }
        info!(environment_id = %env.id, "refill task ended");
    }

    /// Runners that exist or are being created: idle, creating and used, over all environments.
    fn live_runners(&self) -> usize {
        let pooled: usize = self
            .read_envs()
            .values()
            .map(|e| {
                let state = e.lock();
                (state.pool.len() + state.pool.creating() + state.pool.pending()) as usize
            })
            .sum();
        pooled + self.used_count()
    }
}
