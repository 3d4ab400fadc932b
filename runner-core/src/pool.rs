//! [`PrewarmingPool`]: the idle runners of one environment.
//!
//! Pure bookkeeping, no I/O: taking a runner is O(1) and never waits for the backend. The pool
//! also counts creations in flight so refills never overshoot the target size.

use indexmap::IndexMap;

use crate::executor::RunnerInfo;
use crate::ids::RunnerId;

/// The idle runners of one environment and how many more are being created.
#[derive(Debug, Default)]
pub struct PrewarmingPool {
    idle: IndexMap<RunnerId, RunnerInfo>,
    target: u32,
    creating: u32,
}

impl PrewarmingPool {
    /// An empty pool that wants `target` idle runners.
    pub fn new(target: u32) -> Self {
        Self {
            idle: IndexMap::new(),
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

    /// How many more runners must be created to reach the target.
    pub fn deficit(&self) -> u32 {
        self.target
            .saturating_sub(self.len().saturating_add(self.creating))
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
