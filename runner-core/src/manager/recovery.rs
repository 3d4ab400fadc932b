//! Recovery: rebuilding the manager's state from the backend after a restart, and reloading an
//! environment's runners when the pool alert or the backend asks for it.
//!
//! Rules: used runners keep their files and their remaining inactivity timeout; idle runners
//! refill the pool up to its target; a runner whose state is uncertain, that appears twice, or
//! that the pool does not need is destroyed; nothing is ever handed out twice.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use super::environment::Offer;
use super::{ManagedEnvironment, RunnerManager};
use crate::destroy::DestroyReason;
use crate::error::ManagerError;
use crate::executor::{RecordedState, RunnerRecord};
use crate::ids::RunnerId;
use crate::traits::Runner;

/// What a recovery found, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Environments restored.
    pub environments: usize,
    /// Used runners reattached.
    pub used: usize,
    /// Idle runners put back into pools.
    pub idle: usize,
    /// Runners destroyed (uncertain, duplicate, surplus or expired).
    pub destroyed: usize,
}

impl RunnerManager {
    /// Restores environments and runners from the backend and starts the background tasks. Call
    /// once, before serving.
    pub async fn recover(&self) -> Result<RecoveryReport, ManagerError> {
        let _guard = self.env_changes.lock().await;
        let specs = self.backend.load_environments().await?;
        let mut report = RecoveryReport::default();
        for spec in specs {
            if self.managed(spec.id).is_some() {
                continue;
            }
            let env =
                super::environment::ManagedEnvironment::new(spec, self.shutdown.child_token());
            self.write_envs().insert(env.id(), Arc::clone(&env));
            report.environments += 1;
            match self.reload_environment_counting(&env, &mut report).await {
                Ok(()) => {}
                Err(err) => {
                    warn!(environment_id = %env.id(), error = %err, "loading runners failed")
                }
            }
            self.spawn_refill(env);
        }
        self.spawn_event_loop();
        info!(
            environments = report.environments,
            used = report.used,
            idle = report.idle,
            destroyed = report.destroyed,
            "recovered from the backend"
        );
        Ok(report)
    }

    /// Reloads every environment's runners from the backend.
    pub(super) async fn reload_all(&self) -> Result<(), ManagerError> {
        let _guard = self.env_changes.lock().await;
        let envs: Vec<_> = self.read_envs().values().cloned().collect();
        for env in envs {
            self.reload_environment(&env).await?;
        }
        Ok(())
    }

    /// Reconciles one environment with the backend's runner records. The caller holds
    /// `env_changes`.
    pub(super) async fn reload_environment(
        &self,
        env: &Arc<ManagedEnvironment>,
    ) -> Result<(), ManagerError> {
        let mut report = RecoveryReport::default();
        self.reload_environment_counting(env, &mut report).await
    }

    async fn reload_environment_counting(
        &self,
        env: &Arc<ManagedEnvironment>,
        report: &mut RecoveryReport,
    ) -> Result<(), ManagerError> {
        // What this process held before reading the backend: only those can have been lost.
        // Runners created, claimed or destroyed while the records are read are left alone.
        let used_before: HashSet<RunnerId> = self
            .read_used()
            .values()
            .filter(|r| r.environment() == env.id())
            .map(|r| r.id().clone())
            .collect();
        let idle_before: HashSet<RunnerId> = env.idle_ids().into_iter().collect();
        self.install_tombstones();
        let records = self.backend.load_runners(env.id()).await;
        let records = match records {
            Ok(records) => records,
            Err(err) => {
                self.set_tombstones(None);
                return Err(err.into());
            }
        };
        let mut seen: HashSet<RunnerId> = HashSet::new();
        let mut duplicates: HashSet<RunnerId> = HashSet::new();
        for record in &records {
            if !seen.insert(record.info.id.clone()) {
                duplicates.insert(record.info.id.clone());
            }
        }
        // Runners we hold that the backend no longer has are gone.
        let lost_used: Vec<RunnerId> = used_before
            .iter()
            .filter(|id| !seen.contains(*id) && self.read_used().contains_key(*id))
            .cloned()
            .collect();
        for id in lost_used {
            let _ = self
                .destroy_used(
                    &id,
                    DestroyReason::Stopped("the backend lost the runner".into()),
                )
                .await;
        }
        env.retain_idle(|id| {
            !idle_before.contains(id) || (seen.contains(id) && !duplicates.contains(id))
        });

        let mut handled: HashSet<RunnerId> = HashSet::new();
        for RunnerRecord { info, state } in records {
            // Runners destroyed since the snapshot was taken (also while this loop awaits) must
            // not come back.
            if !handled.insert(info.id.clone()) || self.is_tombstoned(&info.id) {
                continue;
            }
            if duplicates.contains(&info.id) {
                warn!(runner_id = %info.id, "runner recorded twice; destroying it");
                self.forget_and_destroy(&info.id, DestroyReason::Replaced)
                    .await;
                report.destroyed += 1;
                continue;
            }
            if self.is_used(&info.id) {
                // Still held by a client of this process: keep the object (and its executions).
                continue;
            }
            match state {
                RecordedState::Used(used) => {
                    let remaining = used.deadline.map(|d| {
                        d.duration_since(SystemTime::now())
                            .unwrap_or(Duration::ZERO)
                    });
                    if !used.inactivity_timeout.is_zero() && remaining == Some(Duration::ZERO) {
                        info!(runner_id = %info.id, "used runner expired while the manager was down");
                        self.destroy_in_background(info.id, DestroyReason::InactivityTimeout);
                        report.destroyed += 1;
                        continue;
                    }
                    // Decided with the pool locked: a runner returned meanwhile is tombstoned
                    // and no longer used, atomically (see `destroy_used`).
                    let adopted = env.with_pool(|pool| {
                        if self.is_taken(&info.id) {
                            return false;
                        }
                        if pool.remove(&info.id).is_some() {
                            warn!(runner_id = %info.id, "runner was idle here but is recorded used; treating it as used");
                        }
                        self.register_used(info, used.inactivity_timeout, remaining);
                        true
                    });
                    if adopted {
                        env.used_changed(1);
                        report.used += 1;
                    }
                }
                RecordedState::Idle => {
                    if env.contains_idle(&info.id) {
                        continue;
                    }
                    // `is_taken`, not only the tombstones: a runner destroyed or stopped just
                    // before this reload began may still be in its records.
                    match env.offer_idle(info.clone(), |id| self.is_taken(id)) {
                        Offer::Pooled => report.idle += 1,
                        Offer::Known => {}
                        Offer::Unwanted => {
                            self.destroy_in_background(info.id, DestroyReason::EnvironmentUpdated);
                            report.destroyed += 1;
                        }
                    }
                }
                RecordedState::Uncertain => {
                    if env.remove_idle(&info.id).is_some() {
                        // It was idle in this very process, so its state is known after all.
                        env.offer_idle(info, |id| self.is_taken(id));
                        continue;
                    }
                    info!(runner_id = %info.id, "runner state uncertain after a crash; destroying it");
                    self.destroy_in_background(info.id, DestroyReason::Replaced);
                    report.destroyed += 1;
                }
            }
        }
        self.set_tombstones(None);
        env.wake_refill();
        Ok(())
    }

    /// Whether `id` was destroyed while the running reload reads and applies the records.
    pub(super) fn is_tombstoned(&self, id: &RunnerId) -> bool {
        self.tombstones
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(|set| set.contains(id))
    }

    /// Starts recording tombstones for a reload about to read the backend's records, seeded
    /// with the runners whose destruction is under way (they may still be in those records).
    ///
    /// The set is installed *before* the runners being destroyed are read: `destroying` adds a
    /// runner to that set before tombstoning it, so a destruction that starts concurrently is
    /// either tombstoned by itself or read here. Reading first and installing second missed a
    /// destruction that started in between; the reload then pooled the returned runner again
    /// from its records and handed it to a second client.
    fn install_tombstones(&self) {
        self.set_tombstones(Some(HashSet::new()));
        let in_flight: Vec<RunnerId> = self
            .destroying
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect();
        if let Some(set) = self
            .tombstones
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_mut()
        {
            set.extend(in_flight);
        }
    }

    /// Replaces the tombstone set, returning the previous one.
    fn set_tombstones(&self, new: Option<HashSet<RunnerId>>) -> Option<HashSet<RunnerId>> {
        std::mem::replace(
            &mut *self
                .tombstones
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            new,
        )
    }

    async fn forget_and_destroy(&self, id: &RunnerId, reason: DestroyReason) {
        if self.destroy_used(id, reason.clone()).await.is_ok() {
            return;
        }
        for env in self.read_envs().values() {
            env.remove_idle(id);
        }
        self.destroy_in_background(id.clone(), reason);
    }
}
