//! One environment under management: its specification, its [`PrewarmingPool`] and the task that
//! refills the pool.
//!
//! The refill task never blocks a claim: claims only take from the pool and wake the task. It
//! creates runners with bounded concurrency (a semaphore shared by all environments) and backs
//! off exponentially, capped, while the backend fails. A failure that will not go away by
//! retrying ([`BackendError::is_permanent`]) stops the refilling until the specification
//! changes; the reason is kept for statistics, metrics and `/health`.

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
use crate::executor::{BackendError, RunnerInfo};
use crate::ids::{EnvironmentId, RunnerId};
use crate::pool::PrewarmingPool;
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
}

/// An environment with its prewarming pool. Obtained through [`crate::Manager::environment`].
#[derive(Debug)]
pub struct ManagedEnvironment {
    id: EnvironmentId,
    state: Mutex<State>,
    used: AtomicI64,
    refill: Notify,
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
            }),
            used: AtomicI64::new(0),
            refill: Notify::new(),
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

    pub(super) fn take_idle(&self) -> Option<RunnerInfo> {
        self.lock().pool.take()
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

    /// Adds a runner to the pool if it is below target; returns whether it was taken.
    pub(super) fn offer_idle(&self, info: RunnerInfo) -> bool {
        let mut state = self.lock();
        !state.closed && state.pool.wants_more() && state.pool.insert(info)
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

    /// Replaces the specification; returns every idle runner, to be destroyed.
    pub(super) fn replace(&self, spec: EnvironmentSpec) -> Vec<RunnerInfo> {
        let mut state = self.lock();
        state.pool.set_target(spec.prewarming_pool_size);
        state.spec = Arc::new(spec);
        state.generation += 1;
        state.creation_failure = None;
        state.pool.drain()
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

    /// Stops the refill task and returns every idle runner, to be destroyed.
    pub(super) fn close(&self) -> Vec<RunnerInfo> {
        self.stop.cancel();
        let mut state = self.lock();
        state.closed = true;
        state.pool.set_target(0);
        state.pool.drain()
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

    /// Ends a creation; pools the runner if it is still wanted, else hands it back for destroying.
    fn finish(&self, created: Option<(RunnerInfo, u64)>) -> Option<RunnerInfo> {
        let mut state = self.lock();
        state.pool.creation_finished();
        let (info, generation) = created?;
        if state.pool.contains(&info.id) {
            // A reload found and pooled it already.
            return None;
        }
        if state.closed || generation != state.generation || !state.pool.wants_more() {
            return Some(info);
        }
        if state.pool.insert(info.clone()) {
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
        }
    }

    fn creation_failure(&self) -> Option<String> {
        self.lock().creation_failure.clone()
    }
}

type Created = (Result<RunnerInfo, BackendError>, u64);

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
        loop {
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
                    let permits = Arc::clone(&self.creations);
                    inflight.spawn(async move {
                        let _permit = permits.acquire_owned().await;
                        (backend.create_runner(&spec).await, generation)
                    });
                }
            }
            tokio::select! {
                () = env.stop.cancelled() => break,
                Some(joined) = inflight.join_next(), if !inflight.is_empty() => {
                    match joined {
                        Ok((Ok(info), generation)) => {
                            backoff.succeed();
                            debug!(runner_id = %info.id, environment_id = %env.id, "runner created");
                            if let Some(unwanted) = env.finish(Some((info, generation))) {
                                self.destroy_in_background(unwanted.id, DestroyReason::EnvironmentUpdated);
                            }
                        }
                        Ok((Err(err), generation)) if err.is_permanent() => {
                            env.finish(None);
                            backoff.succeed();
                            if env.fail_permanently(generation, err.to_string()) {
                                error!(environment_id = %env.id, error = %err, "runners of this environment cannot be created; refilling stops until the environment is changed");
                            }
                        }
                        Ok((Err(err), _)) => {
                            env.finish(None);
                            let delay = backoff.fail();
                            warn!(environment_id = %env.id, error = %err, ?delay, failures = backoff.failures(), "creating a runner failed; backing off");
                            retry_at = Some(Instant::now() + delay);
                        }
                        Err(join_err) => {
                            env.finish(None);
                            warn!(environment_id = %env.id, error = %join_err, "runner creation task failed");
                        }
                    }
                }
                () = async { if let Some(t) = retry_at { tokio::time::sleep_until(t).await } else { std::future::pending().await } }, if retry_at.is_some() => {}
                () = env.refill.notified() => {}
            }
        }
        // The environment is gone or the manager stops: runners still being created are destroyed
        // once they exist (on shutdown they are left for the next start to recover).
        let shutting_down = self.shutdown.is_cancelled();
        while let Some(joined) = inflight.join_next().await {
            if let Ok((Ok(info), _)) = joined {
                env.finish(None);
                if !shutting_down {
                    self.destroy_in_background(info.id, DestroyReason::EnvironmentDeleted);
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
                (state.pool.len() + state.pool.creating()) as usize
            })
            .sum();
        pooled + self.used_count()
    }
}
