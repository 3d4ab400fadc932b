//! [`PrewarmingPool`]: the idle runners of one environment.
//!
//! Pure bookkeeping, no I/O: taking a runner is O(1) and never waits for the backend. The pool
//! also counts creations in flight (calls to the backend not yet answered) and pending runners
//! (accepted by the backend, not yet ready) so refills never overshoot the target size.

use indexmap::IndexMap;
use tokio::time::Instant;

use crate::executor::RunnerInfo;
use crate::ids::RunnerId;

/// A runner the backend accepted but has not reported ready yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRunner {
    /// The runner.
    pub info: RunnerInfo,
    /// The environment generation it was created from.
    pub generation: u64,
    /// When its creation was accepted.
    pub since: Instant,
}

/// The idle runners of one environment and how many more are being created.
#[derive(Debug, Default)]
pub struct PrewarmingPool {
    idle: IndexMap<RunnerId, RunnerInfo>,
    pending: IndexMap<RunnerId, PendingRunner>,
    target: u32,
    creating: u32,
}

impl PrewarmingPool {
    /// An empty pool that wants `target` idle runners.
    pub fn new(target: u32) -> Self {
        Self {
            idle: IndexMap::new(),
            pending: IndexMap::new(),
            target,
            creating: 0,
        }
    }

    /// Takes any idle runner, in O(1).
    pub fn take(&mut self) -> Option<RunnerInfo> {
        self.idle.pop().map(|(_, info)| info)
    }

    /// Adds an idle runner. Returns `false` (and changes nothing) if it is already in the pool.
    pub fn insert(&mut self, info: RunnerInfo) -> bool {
        if self.idle.contains_key(&info.id) {
            return false;
        }
        self.idle.insert(info.id.clone(), info);
        true
    }

    /// Removes a runner by id, in O(1).
    pub fn remove(&mut self, id: &RunnerId) -> Option<RunnerInfo> {
        self.idle.swap_remove(id)
    }

    /// Whether the runner is idle in this pool.
    pub fn contains(&self, id: &RunnerId) -> bool {
        self.idle.contains_key(id)
    }

    /// The ids of the idle runners.
    pub fn ids(&self) -> impl Iterator<Item = &RunnerId> {
        self.idle.keys()
    }

    /// Removes every idle runner.
    pub fn drain(&mut self) -> Vec<RunnerInfo> {
        self.idle.drain(..).map(|(_, info)| info).collect()
    }

    /// Removes idle runners above the target size.
    pub fn drain_surplus(&mut self) -> Vec<RunnerInfo> {
        let keep = usize::try_from(self.target).unwrap_or(usize::MAX);
        let mut surplus = Vec::new();
        while self.idle.len() > keep {
            if let Some(info) = self.take() {
                surplus.push(info);
            }
        }
        surplus
    }

    /// Number of idle runners.
    pub fn len(&self) -> u32 {
        u32::try_from(self.idle.len()).unwrap_or(u32::MAX)
    }

    /// Whether no runner is idle.
    pub fn is_empty(&self) -> bool {
        self.idle.is_empty()
    }

    /// The wanted number of idle runners.
    pub fn target(&self) -> u32 {
        self.target
    }

    /// Changes the wanted number of idle runners.
    pub fn set_target(&mut self, target: u32) {
        self.target = target;
    }

    /// Runners being created right now.
    pub fn creating(&self) -> u32 {
        self.creating
    }

    /// Runners accepted by the backend and not ready yet.
    pub fn pending(&self) -> u32 {
        u32::try_from(self.pending.len()).unwrap_or(u32::MAX)
    }

    /// Whether a runner is on its way: a creation call in flight or a pending runner.
    pub fn expecting(&self) -> bool {
        self.creating > 0 || !self.pending.is_empty()
    }

    /// Records a runner the backend accepted but has not reported ready. Returns `false` (and
    /// changes nothing) if it is already known to the pool.
    pub fn add_pending(&mut self, runner: PendingRunner) -> bool {
        if self.idle.contains_key(&runner.info.id) || self.pending.contains_key(&runner.info.id) {
            return false;
        }
        self.pending.insert(runner.info.id.clone(), runner);
        true
    }

    /// Removes a pending runner by id (it became ready, failed or timed out), in O(1).
    pub fn remove_pending(&mut self, id: &RunnerId) -> Option<PendingRunner> {
        self.pending.swap_remove(id)
    }

    /// Whether the runner is pending in this pool.
    pub fn is_pending(&self, id: &RunnerId) -> bool {
        self.pending.contains_key(id)
    }

    /// Removes and returns the pending runners accepted at or before `cutoff`.
    pub fn drain_pending_since(&mut self, cutoff: Instant) -> Vec<PendingRunner> {
        let late: Vec<RunnerId> = self
            .pending
            .values()
            .filter(|p| p.since <= cutoff)
            .map(|p| p.info.id.clone())
            .collect();
        late.iter()
            .filter_map(|id| self.pending.swap_remove(id))
            .collect()
    }

    /// When the oldest pending runner was accepted.
    pub fn oldest_pending(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.since).min()
    }

    /// Removes every pending runner.
    pub fn drain_pending(&mut self) -> Vec<PendingRunner> {
        self.pending.drain(..).map(|(_, p)| p).collect()
    }

    /// How many more runners must be created to reach the target.
    pub fn deficit(&self) -> u32 {
        self.target.saturating_sub(
            self.len()
                .saturating_add(self.creating)
                .saturating_add(self.pending()),
        )
    }

    /// Reserves one creation if the pool is short; the caller must later call
    /// [`PrewarmingPool::creation_finished`].
    pub fn reserve_creation(&mut self) -> bool {
        if self.deficit() == 0 {
            return false;
        }
        self.creating += 1;
        true
    }

    /// Ends a reserved creation; a created runner is then added with [`PrewarmingPool::insert`].
    pub fn creation_finished(&mut self) {
        self.creating = self.creating.saturating_sub(1);
    }

    /// Whether another idle runner is welcome (below target).
    pub fn wants_more(&self) -> bool {
        self.len() < self.target
    }

    /// Whether a runner that just became ready is welcome: the idle runners plus the other
    /// pending ones stay within the target.
    pub fn wants_ready(&self) -> bool {
        self.len().saturating_add(self.pending()) < self.target
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::EnvironmentId;

    fn info(n: u32) -> RunnerInfo {
        RunnerInfo {
            id: RunnerId::new(format!("1-{n}")),
            environment: EnvironmentId::new(1).unwrap(),
            mapped_ports: vec![],
        }
    }

    #[test]
    fn reservations_never_overshoot_the_target() {
        let mut pool = PrewarmingPool::new(3);
        assert!(pool.reserve_creation());
        assert!(pool.reserve_creation());
        assert!(pool.reserve_creation());
        assert!(!pool.reserve_creation());
        pool.creation_finished();
        pool.insert(info(1));
        assert_eq!(pool.deficit(), 0);
        pool.take();
        assert_eq!(pool.deficit(), 1);
    }

    #[test]
    fn pending_runners_count_toward_the_target_and_expire_by_age() {
        let mut pool = PrewarmingPool::new(2);
        let now = Instant::now();
        assert!(pool.add_pending(PendingRunner {
            info: info(1),
            generation: 0,
            since: now,
        }));
        assert!(!pool.add_pending(PendingRunner {
            info: info(1),
            generation: 0,
            since: now,
        }));
        assert_eq!(pool.deficit(), 1);
        assert!(pool.expecting());
        assert!(pool.reserve_creation());
        assert!(!pool.reserve_creation());
        pool.creation_finished();
        assert!(pool.add_pending(PendingRunner {
            info: info(2),
            generation: 0,
            since: now + std::time::Duration::from_secs(5),
        }));
        let late = pool.drain_pending_since(now + std::time::Duration::from_secs(1));
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].info, info(1));
        assert!(pool.is_pending(&info(2).id));
        assert_eq!(
            pool.remove_pending(&info(2).id).map(|p| p.info),
            Some(info(2))
        );
        assert!(!pool.expecting());
        assert_eq!(pool.deficit(), 2);
    }

    #[test]
    fn duplicates_are_refused_and_removal_is_by_id() {
        let mut pool = PrewarmingPool::new(5);
        assert!(pool.insert(info(1)));
        assert!(!pool.insert(info(1)));
        assert!(pool.insert(info(2)));
        assert_eq!(pool.remove(&info(1).id), Some(info(1)));
        assert_eq!(pool.len(), 1);
        assert!(!pool.contains(&info(1).id));
    }

    #[test]
    fn shrinking_drains_only_the_surplus() {
        let mut pool = PrewarmingPool::new(4);
        for n in 0..4 {
            pool.insert(info(n));
        }
        pool.set_target(1);
        assert_eq!(pool.drain_surplus().len(), 3);
        assert_eq!(pool.len(), 1);
    }
}
