//! What the backend knows about its runners, fed by the event stream and by listings, as a pure
//! state machine: [`Tracker::apply`] takes one stream event and returns the [`Action`]s it
//! implies (events for the manager, jobs to purge). No I/O, so every Poseidon bug class is a
//! unit test here.
//!
//! Rules (nomad.md §3.2, with Poseidon's known bugs fixed):
//! - a runner is ready when its allocation is reported `running`, never before (#717);
//! - every allocation update is applied at most once, ordered by its `ModifyIndex`, so a replay
//!   or an event older than a listing changes nothing (#470/#598);
//! - an allocation that restarts in place (OOM kill: #397, or a crash), fails, is lost or is
//!   replaced by a reschedule ends the runner: it is reported stopped (OOM as
//!   [`DestroyReason::OomKilled`]), never handed out again, and its job is purged so a
//!   rescheduled copy cannot leak (#601). The manager creates a fresh replacement.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use runner_core::{
    BackendEvent, DestroyReason, EnvironmentId, EnvironmentSpec, MappedPort, RunnerId, RunnerInfo,
};
use serde_json::Value;

use crate::jobs;
use crate::stream::Event;

/// Most allocations remembered (terminal ones are forgotten first).
const MAX_ALLOCS: usize = 20_000;
/// Most evaluation outcomes remembered for registrations still waiting.
const MAX_EVALS: usize = 4096;

/// An allocation as far as runners are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocView {
    /// Its id.
    pub id: String,
    /// Its job.
    pub job_id: String,
    /// `pending`, `running`, `complete`, `failed`, `lost`, `unknown`.
    pub client_status: String,
    /// `run`, `stop`, `evict`.
    pub desired_status: String,
    /// Raft index of its latest change.
    pub modify_index: u64,
    /// Raft index of its creation (newest wins).
    pub create_index: u64,
    /// The allocation it replaces, if any.
    pub previous_allocation: String,
    /// Its exposed ports.
    pub ports: Vec<MappedPort>,
    /// How often the main task restarted in place.
    pub restarts: u64,
    /// Whether the main task's latest termination was an OOM kill.
    pub oom_killed: bool,
}

impl AllocView {
    /// Reads an allocation (full, stub or event payload) tolerantly.
    pub fn parse(v: &Value) -> Option<AllocView> {
        let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
        let id = s("ID");
        let job_id = s("JobID");
        if id.is_empty() || job_id.is_empty() {
            return None;
        }
        let task = &v["TaskStates"][jobs::MAIN_TASK];
        let oom_killed = task["Events"]
            .as_array()
            .and_then(|events| {
                events
                    .iter()
                    .rev()
                    .find(|e| e["Type"].as_str() == Some("Terminated"))
            })
            .is_some_and(|e| {
                matches!(&e["Details"]["oom_killed"], Value::String(s) if s == "true")
                    || e["Details"]["oom_killed"] == Value::Bool(true)
            });
        Some(AllocView {
            id,
            job_id,
            client_status: s("ClientStatus"),
            desired_status: s("DesiredStatus"),
            modify_index: v["ModifyIndex"].as_u64().unwrap_or(0),
            create_index: v["CreateIndex"].as_u64().unwrap_or(0),
            previous_allocation: s("PreviousAllocation"),
            ports: jobs::mapped_ports(v),
            restarts: task["Restarts"].as_u64().unwrap_or(0),
            oom_killed,
        })
    }

    fn terminal(&self) -> bool {
        matches!(self.client_status.as_str(), "complete" | "failed" | "lost")
            || matches!(self.desired_status.as_str(), "stop" | "evict")
    }

    fn running(&self) -> bool {
        self.client_status == "running" && self.desired_status == "run"
    }
}

/// Where a runner is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Its job exists; no allocation has run yet.
    Pending {
        /// When it was created (or found).
        since: Instant,
        /// Created by this process (ready is [`BackendEvent::RunnerReady`]) or found on
        /// recovery (ready is [`BackendEvent::RunnerStarted`]).
        created_here: bool,
    },
    /// Its allocation runs: it executes commands.
    Ready,
    /// Stopped or destroyed; never handed out again.
    Gone,
}

/// One runner job.
#[derive(Debug, Clone)]
pub struct RunnerTrack {
    /// Its environment.
    pub environment: EnvironmentId,
    /// Its life.
    pub phase: Phase,
    /// The allocation it runs in (the newest one of its job).
    pub alloc: Option<String>,
    /// Its mapped ports.
    pub ports: Vec<MappedPort>,
    /// The job as last read or registered, for meta updates without a read.
    pub job: Option<Value>,
    /// Found on recovery rather than created by this process.
    pub recovered: bool,
    /// The manager asked to destroy it: its end is not reported.
    pub destroying: bool,
    /// Why it stopped on its own, once it did.
    pub stopped: Option<DestroyReason>,
}

/// What an evaluation ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvalOutcome {
    /// Everything was placed.
    Complete,
    /// Allocations could not be placed (`FailedTGAllocs`).
    PlacementFailed(String),
    /// The evaluation failed or was cancelled.
    Failed(String),
}

impl EvalOutcome {
    /// Judges a terminal evaluation; `None` while it is still pending or blocked.
    pub fn of(eval: &Value) -> Option<EvalOutcome> {
        let status = eval["Status"].as_str().unwrap_or("");
        if !matches!(status, "complete" | "failed" | "canceled") {
            return None;
        }
        if let Some(failed) = eval["FailedTGAllocs"].as_object()
            && !failed.is_empty()
        {
            let groups: Vec<String> = failed
                .iter()
                .map(|(group, m)| {
                    let exhausted = m["DimensionExhausted"]
                        .as_object()
                        .map(|d| d.keys().cloned().collect::<Vec<_>>().join(", "))
                        .unwrap_or_default();
                    format!(
                        "{group} (nodes evaluated {}, exhausted {}{})",
                        m["NodesEvaluated"].as_u64().unwrap_or(0),
                        m["NodesExhausted"].as_u64().unwrap_or(0),
                        if exhausted.is_empty() {
                            String::new()
                        } else {
                            format!(": {exhausted}")
                        }
                    )
                })
                .collect();
            return Some(EvalOutcome::PlacementFailed(format!(
                "evaluation {} failed to place all allocations: {}",
                eval["ID"].as_str().unwrap_or(""),
                groups.join("; ")
            )));
        }
        if status == "complete" {
            Some(EvalOutcome::Complete)
        } else {
            Some(EvalOutcome::Failed(format!(
                "evaluation {} {status}: {}",
                eval["ID"].as_str().unwrap_or(""),
                eval["StatusDescription"].as_str().unwrap_or("")
            )))
        }
    }
}

/// Something the executor must do after a change of state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Tell the manager.
    Emit(BackendEvent),
    /// Purge this job from Nomad (a stopped runner, so nothing of it lingers or comes back).
    Purge(String),
    /// Read this environment's template and settle whether it appeared or vanished.
    CheckEnvironment(EnvironmentId),
}

/// A runner job found by a listing.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The runner.
    pub id: RunnerId,
    /// The job as read.
    pub job: Value,
    /// Its allocations as listed.
    pub allocs: Vec<Value>,
}

/// What a listing concluded about one runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListedState {
    /// Its allocation runs; the manager may pool or adopt it.
    Ready(RunnerInfo),
    /// Not running yet (or being handled): not reported.
    NotReady,
}

/// The backend's knowledge of runners, allocations, environments and evaluations.
#[derive(Debug, Default)]
pub struct Tracker {
    runners: HashMap<RunnerId, RunnerTrack>,
    allocs: HashMap<String, AllocView>,
    alloc_order: VecDeque<String>,
    environments: HashSet<EnvironmentId>,
    deleting_environments: HashSet<EnvironmentId>,
    evals: HashMap<String, EvalOutcome>,
    eval_order: VecDeque<String>,
    environments_loaded: bool,
    deferred_checks: HashSet<EnvironmentId>,
}

impl Tracker {
    /// The runner's record.
    pub fn runner(&self, id: &RunnerId) -> Option<&RunnerTrack> {
        self.runners.get(id)
    }

    /// The runner's record, to change.
    pub fn runner_mut(&mut self, id: &RunnerId) -> Option<&mut RunnerTrack> {
        self.runners.get_mut(id)
    }

    /// The runners of `environment`.
    pub fn runners_of(&self, environment: EnvironmentId) -> Vec<RunnerId> {
        self.runners
            .iter()
            .filter(|(_, t)| t.environment == environment)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A runner this process is creating: pending until its allocation runs.
    pub fn creating(&mut self, id: RunnerId, environment: EnvironmentId, job: Value, now: Instant) {
        self.runners.insert(
            id,
            RunnerTrack {
                environment,
                phase: Phase::Pending {
                    since: now,
                    created_here: true,
                },
                alloc: None,
                ports: Vec::new(),
                job: Some(job),
                recovered: false,
                destroying: false,
                stopped: None,
            },
        );
    }

    /// The manager destroys the runner: it is gone, and its end is not reported.
    pub fn destroying(&mut self, id: &RunnerId) {
        if let Some(t) = self.runners.get_mut(id) {
            t.destroying = true;
            t.phase = Phase::Gone;
        }
    }

    /// Forgets a runner whose job is purged.
    pub fn forget(&mut self, id: &RunnerId) {
        self.runners.remove(id);
    }

    /// An environment known to exist (registered or loaded): its template's events are ours.
    pub fn environment_known(&mut self, id: EnvironmentId) {
        self.deleting_environments.remove(&id);
        self.environments.insert(id);
    }

    /// The manager deletes the environment: its template's deregistration is not reported.
    pub fn environment_deleting(&mut self, id: EnvironmentId) {
        self.environments.remove(&id);
        self.deleting_environments.insert(id);
    }

    /// The templates were listed once (after the stream started): template events are checked
    /// from now on, and those that arrived meanwhile now.
    pub fn environments_loaded(&mut self) -> Vec<Action> {
        self.environments_loaded = true;
        self.deferred_checks
            .drain()
            .map(Action::CheckEnvironment)
            .collect()
    }

    /// Settles an environment after its template was read: `Some(spec)` when the template
    /// exists (and is not stopped), `None` when it is gone. Returns the event for the manager.
    pub fn settle_environment(
        &mut self,
        id: EnvironmentId,
        template: Option<EnvironmentSpec>,
    ) -> Option<BackendEvent> {
        if self.deleting_environments.contains(&id) {
            return None;
        }
        match template {
            Some(spec) if self.environments.insert(id) => {
                Some(BackendEvent::EnvironmentAppeared(spec))
            }
            None if self.environments.remove(&id) => Some(BackendEvent::EnvironmentVanished(id)),
            _ => None,
        }
    }

    /// The known environments.
    pub fn environments(&self) -> Vec<EnvironmentId> {
        self.environments.iter().copied().collect()
    }

    /// The ports of the newest allocation of `job` seen so far (placed, maybe not running).
    pub fn newest_ports(&self, job: &str) -> Option<Vec<MappedPort>> {
        self.allocs
            .values()
            .filter(|a| a.job_id == job)
            .max_by_key(|a| a.create_index)
            .map(|a| a.ports.clone())
    }

    /// The outcome of an evaluation, if the stream reported it.
    pub fn eval_outcome(&self, id: &str) -> Option<EvalOutcome> {
        self.evals.get(id).cloned()
    }

    /// Applies one stream event.
    pub fn apply(&mut self, event: &Event, now: Instant) -> Vec<Action> {
        match event.topic.as_str() {
            "Allocation" => match AllocView::parse(&event.payload["Allocation"]) {
                Some(alloc) => self.on_alloc(alloc, now),
                None => Vec::new(),
            },
            "Job" => self.on_job(event),
            "Evaluation" => {
                let eval = &event.payload["Evaluation"];
                if let (Some(id), Some(outcome)) = (eval["ID"].as_str(), EvalOutcome::of(eval)) {
                    self.remember_eval(id.to_string(), outcome);
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    fn remember_eval(&mut self, id: String, outcome: EvalOutcome) {
        if self.evals.insert(id.clone(), outcome).is_none() {
            self.eval_order.push_back(id);
        }
        while self.eval_order.len() > MAX_EVALS {
            if let Some(old) = self.eval_order.pop_front() {
                self.evals.remove(&old);
            }
        }
    }

    /// Stores `alloc` unless an equal or newer state of it is known; returns whether it is new.
    fn store_alloc(&mut self, alloc: &AllocView) -> bool {
        if let Some(known) = self.allocs.get(&alloc.id)
            && alloc.modify_index <= known.modify_index
        {
            return false;
        }
        if self
            .allocs
            .insert(alloc.id.clone(), alloc.clone())
            .is_none()
        {
            self.alloc_order.push_back(alloc.id.clone());
        }
        if self.alloc_order.len() > MAX_ALLOCS {
            // Forget the oldest terminal allocation, or the oldest at all.
            let at = self
                .alloc_order
                .iter()
                .position(|id| self.allocs.get(id).is_none_or(AllocView::terminal))
                .unwrap_or(0);
            if let Some(id) = self.alloc_order.remove(at) {
                self.allocs.remove(&id);
            }
        }
        true
    }

    fn on_alloc(&mut self, alloc: AllocView, now: Instant) -> Vec<Action> {
        if jobs::environment_of_runner(&alloc.job_id).is_none() || !self.store_alloc(&alloc) {
            return Vec::new();
        }
        let id = RunnerId::new(alloc.job_id.as_str());
        self.judge(&id, &alloc, now)
    }

    /// Decides what `alloc` (the latest state of one of `id`'s allocations) means for the runner.
    fn judge(&mut self, id: &RunnerId, alloc: &AllocView, now: Instant) -> Vec<Action> {
        let Some(track) = self.runners.get(id) else {
            return Vec::new();
        };
        if track.phase == Phase::Gone {
            return Vec::new();
        }
        if let Some(current) = &track.alloc
            && *current != alloc.id
        {
            let current_is_newer = self
                .allocs
                .get(current)
                .is_some_and(|c| c.create_index > alloc.create_index);
            if current_is_newer {
                // An older allocation of the job changing: nothing for the runner.
                return Vec::new();
            }
            if track.phase == Phase::Ready {
                // A new allocation replaces the one the runner ran in (reschedule, lost node):
                // a fresh container without the client's files or processes.
                return self.stop(
                    id,
                    DestroyReason::Stopped("its allocation was replaced".into()),
                );
            }
        }
        if alloc.terminal() {
            let why = match alloc.client_status.as_str() {
                "failed" => "its allocation failed",
                "lost" => "its allocation was lost",
                "complete" => "its allocation completed",
                _ => "its allocation was stopped",
            };
            let reason = if alloc.oom_killed {
                DestroyReason::OomKilled
            } else {
                DestroyReason::Stopped(why.into())
            };
            return self.stop(id, reason);
        }
        let was_ready_here =
            track.phase == Phase::Ready && track.alloc.as_deref() == Some(&alloc.id);
        if alloc.restarts > 0 || (was_ready_here && !alloc.running()) {
            // Restarted in place: the container's processes and files are gone.
            let reason = if alloc.oom_killed {
                DestroyReason::OomKilled
            } else {
                DestroyReason::Stopped("its task restarted".into())
            };
            return self.stop(id, reason);
        }
        if !alloc.previous_allocation.is_empty() && track.phase == Phase::Ready {
            return self.stop(
                id,
                DestroyReason::Stopped("its allocation was replaced".into()),
            );
        }
        let Some(track) = self.runners.get_mut(id) else {
            return Vec::new();
        };
        track.alloc = Some(alloc.id.clone());
        if !alloc.running() {
            return Vec::new();
        }
        track.ports = alloc.ports.clone();
        match track.phase {
            Phase::Pending {
                since,
                created_here,
            } => {
                track.phase = Phase::Ready;
                let startup = now.saturating_duration_since(since);
                let event = if created_here {
                    BackendEvent::RunnerReady {
                        runner: id.clone(),
                        startup,
                    }
                } else {
                    BackendEvent::RunnerStarted {
                        info: RunnerInfo {
                            id: id.clone(),
                            environment: track.environment,
                            mapped_ports: track.ports.clone(),
                        },
                        startup,
                    }
                };
                vec![Action::Emit(event)]
            }
            Phase::Ready | Phase::Gone => Vec::new(),
        }
    }

    fn stop(&mut self, id: &RunnerId, reason: DestroyReason) -> Vec<Action> {
        let Some(track) = self.runners.get_mut(id) else {
            return Vec::new();
        };
        if track.phase == Phase::Gone {
            return Vec::new();
        }
        track.phase = Phase::Gone;
        if track.destroying {
            return Vec::new();
        }
        track.stopped = Some(reason.clone());
        vec![
            Action::Emit(BackendEvent::RunnerStopped {
                runner: id.clone(),
                reason,
            }),
            Action::Purge(id.to_string()),
        ]
    }

    fn on_job(&mut self, event: &Event) -> Vec<Action> {
        let job = &event.payload["Job"];
        let job_id = job["ID"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or(&event.key)
            .to_string();
        let deregistered = event.kind == "JobDeregistered";
        if let Some(env) = jobs::environment_of_template(&job_id) {
            if !self.environments_loaded {
                // Replayed while the templates are still being listed: checked afterwards.
                self.deferred_checks.insert(env);
                return Vec::new();
            }
            // The stream replays history on subscription, so an event only says "look again":
            // the template's current state on Nomad decides (see `settle_environment`).
            let known = self.environments.contains(&env);
            let deleting = self.deleting_environments.contains(&env);
            let maybe_changed = if deregistered {
                known && !deleting
            } else {
                event.kind == "JobRegistered" && !known && !deleting
            };
            return if maybe_changed {
                vec![Action::CheckEnvironment(env)]
            } else {
                Vec::new()
            };
        }
        let id = RunnerId::new(job_id.as_str());
        if deregistered {
            let reason = DestroyReason::Stopped("its job was deregistered".into());
            let mut actions = self.stop(&id, reason);
            // Already deregistered by someone else: nothing to purge unless it is only stopped.
            if event.payload["Deleted"] == Value::Bool(true) {
                actions.retain(|a| !matches!(a, Action::Purge(_)));
            }
            return actions;
        }
        if let Some(track) = self.runners.get_mut(&id)
            && job.is_object()
            && track.phase != Phase::Gone
        {
            track.job = Some(job.clone());
        }
        Vec::new()
    }

    /// Reconciles `environment`'s runners with a listing of its jobs (read after the stream
    /// started, so no change in between is missed). Returns each listed runner's state and the
    /// actions the listing implies (runners that vanished meanwhile are reported stopped;
    /// found runners that cannot be used are purged).
    pub fn reconcile(
        &mut self,
        environment: EnvironmentId,
        listed: Vec<Listed>,
        now: Instant,
    ) -> (Vec<(RunnerId, ListedState)>, Vec<Action>) {
        let mut actions = Vec::new();
        let mut states = Vec::new();
        let present: HashSet<RunnerId> = listed.iter().map(|l| l.id.clone()).collect();
        for l in listed {
            let mut views: Vec<AllocView> = l.allocs.iter().filter_map(AllocView::parse).collect();
            for v in &mut views {
                self.store_alloc(v);
                // The newest state known, from the stream or the listing.
                if let Some(known) = self.allocs.get(&v.id) {
                    *v = known.clone();
                }
            }
            views.sort_by_key(|v| std::cmp::Reverse(v.create_index));
            let newest = views.into_iter().next();
            if !self.runners.contains_key(&l.id) {
                let usable = match &newest {
                    None => true,
                    Some(a) => {
                        !a.terminal()
                            && a.restarts == 0
                            && a.previous_allocation.is_empty()
                            && matches!(a.client_status.as_str(), "pending" | "running")
                    }
                };
                if !usable {
                    actions.push(Action::Purge(l.id.to_string()));
                    continue;
                }
                self.runners.insert(
                    l.id.clone(),
                    RunnerTrack {
                        environment,
                        phase: Phase::Pending {
                            since: now,
                            created_here: false,
                        },
                        alloc: None,
                        ports: Vec::new(),
                        job: Some(l.job.clone()),
                        recovered: true,
                        destroying: false,
                        stopped: None,
                    },
                );
                if let Some(a) = &newest
                    && a.running()
                    && let Some(t) = self.runners.get_mut(&l.id)
                {
                    t.phase = Phase::Ready;
                    t.alloc = Some(a.id.clone());
                    t.ports = a.ports.clone();
                }
            } else {
                if let Some(t) = self.runners.get_mut(&l.id)
                    && t.phase != Phase::Gone
                {
                    t.job = Some(l.job.clone());
                }
                if let Some(a) = &newest {
                    let judged = self.judge(&l.id, a, now);
                    actions.extend(judged);
                }
            }
            let Some(t) = self.runners.get(&l.id) else {
                continue;
            };
            let state = match t.phase {
                Phase::Ready => ListedState::Ready(RunnerInfo {
                    id: l.id.clone(),
                    environment,
                    mapped_ports: t.ports.clone(),
                }),
                Phase::Pending { .. } | Phase::Gone => ListedState::NotReady,
            };
            states.push((l.id, state));
        }
        // Runners that ran but whose jobs are gone now stopped while nobody watched.
        for id in self.runners_of(environment) {
            if !present.contains(&id)
                && self
                    .runners
                    .get(&id)
                    .is_some_and(|t| t.phase == Phase::Ready)
            {
                let reason = DestroyReason::Stopped("its job vanished".into());
                actions.extend(
                    self.stop(&id, reason)
                        .into_iter()
                        .filter(|a| !matches!(a, Action::Purge(_))),
                );
            }
        }
        (states, actions)
    }
}

/// The spec of every listed template (for [`Tracker::environment_known`]).
pub fn specs_of_templates(jobs: &[Value]) -> Vec<EnvironmentSpec> {
    jobs.iter().filter_map(jobs::spec_of_template).collect()
}

/// How long a pending runner has waited, for logs.
pub fn pending_for(track: &RunnerTrack, now: Instant) -> Option<Duration> {
    match track.phase {
        Phase::Pending { since, .. } => Some(now.saturating_duration_since(since)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn env() -> EnvironmentId {
        EnvironmentId::new(10).unwrap()
    }

    fn alloc(id: &str, job: &str, client: &str, desired: &str, modify: u64, create: u64) -> Value {
        json!({"ID": id, "JobID": job, "ClientStatus": client, "DesiredStatus": desired,
               "ModifyIndex": modify, "CreateIndex": create, "PreviousAllocation": "",
               "TaskStates": null, "Job": null,
               "AllocatedResources": {"Shared": {"Ports": [{"Label": "80", "Value": 20001, "To": 80, "HostIP": "127.0.0.1"}]}}})
    }

    fn alloc_event(a: Value) -> Event {
        Event {
            topic: "Allocation".into(),
            kind: "AllocationUpdated".into(),
            key: a["ID"].as_str().unwrap().into(),
            payload: json!({ "Allocation": a }),
        }
    }

    fn oom(mut a: Value, restarts: u64) -> Value {
        a["TaskStates"] = json!({"default-task": {"State": "pending", "Restarts": restarts, "Events": [
            {"Type": "Terminated", "Details": {"exit_code": "137", "oom_killed": "true"}},
            {"Type": "Restarting", "Details": {"restart_reason": "Restart within policy"}}]}});
        a
    }

    fn created(t: &mut Tracker, id: &str, now: Instant) -> RunnerId {
        let id = RunnerId::new(id);
        t.creating(id.clone(), env(), json!({"ID": id.as_str()}), now);
        id
    }

    fn emitted(actions: &[Action]) -> Vec<&BackendEvent> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Emit(e) => Some(e),
                Action::Purge(_) | Action::CheckEnvironment(_) => None,
            })
            .collect()
    }

    #[test]
    fn a_runner_is_ready_only_when_its_allocation_runs_717() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        let r = created(&mut t, "10-a", t0);
        // PlanResult and the client's pending update: not ready.
        assert!(
            t.apply(&alloc_event(alloc("A", "10-a", "pending", "run", 5, 5)), t0)
                .is_empty()
        );
        assert!(
            t.apply(&alloc_event(alloc("A", "10-a", "pending", "run", 6, 5)), t0)
                .is_empty()
        );
        assert!(matches!(t.runner(&r).unwrap().phase, Phase::Pending { .. }));
        let later = t0 + Duration::from_millis(250);
        let a = t.apply(
            &alloc_event(alloc("A", "10-a", "running", "run", 7, 5)),
            later,
        );
        assert_eq!(
            a,
            vec![Action::Emit(BackendEvent::RunnerReady {
                runner: r.clone(),
                startup: Duration::from_millis(250)
            })]
        );
        assert_eq!(
            t.runner(&r).unwrap().ports[0].host_address,
            "127.0.0.1:20001"
        );
        // A claim's in-place update (same statuses, new index) changes nothing.
        assert!(
            t.apply(
                &alloc_event(alloc("A", "10-a", "running", "run", 9, 5)),
                later
            )
            .is_empty()
        );
    }

    #[test]
    fn replayed_and_stale_events_are_applied_once_470_598() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        // Replayed history arrives before the runner is known (the stream starts before the
        // listing): kept, not acted on.
        assert!(
            t.apply(
                &alloc_event(oom(alloc("A", "10-a", "pending", "run", 3, 2), 0)),
                t0
            )
            .is_empty()
        );
        let running = alloc("A", "10-a", "running", "run", 8, 2);
        assert!(t.apply(&alloc_event(running.clone()), t0).is_empty());
        // The listing shows the runner running; it is recovered ready, not stopped.
        let (states, actions) = t.reconcile(
            env(),
            vec![Listed {
                id: RunnerId::new("10-a"),
                job: json!({"ID": "10-a"}),
                allocs: vec![alloc("A", "10-a", "pending", "run", 4, 2)],
            }],
            t0,
        );
        assert!(actions.is_empty(), "{actions:?}");
        assert!(matches!(states[0].1, ListedState::Ready(_)));
        // The old pending update replayed again after a resume changes nothing.
        assert!(
            t.apply(&alloc_event(alloc("A", "10-a", "pending", "run", 4, 2)), t0)
                .is_empty()
        );
        assert_eq!(
            t.runner(&RunnerId::new("10-a")).unwrap().phase,
            Phase::Ready
        );
    }

    #[test]
    fn an_oom_restart_stops_the_runner_for_good_397() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        let r = created(&mut t, "10-a", t0);
        t.apply(&alloc_event(alloc("A", "10-a", "running", "run", 7, 5)), t0);
        let a = t.apply(
            &alloc_event(oom(alloc("A", "10-a", "pending", "run", 9, 5), 1)),
            t0,
        );
        assert_eq!(
            a,
            vec![
                Action::Emit(BackendEvent::RunnerStopped {
                    runner: r.clone(),
                    reason: DestroyReason::OomKilled
                }),
                Action::Purge("10-a".into())
            ]
        );
        // Running again after the restart: never handed out again.
        assert!(
            t.apply(
                &alloc_event(alloc("A", "10-a", "running", "run", 11, 5)),
                t0
            )
            .is_empty()
        );
        assert_eq!(t.runner(&r).unwrap().phase, Phase::Gone);
    }

    #[test]
    fn a_rescheduled_or_lost_runner_is_stopped_and_its_job_purged_601() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        let r = created(&mut t, "10-a", t0);
        t.apply(&alloc_event(alloc("A", "10-a", "running", "run", 7, 5)), t0);
        // The replacement is written before the old allocation in the PlanResult batch.
        let mut replacement = alloc("B", "10-a", "pending", "run", 20, 20);
        replacement["PreviousAllocation"] = json!("A");
        let a = t.apply(&alloc_event(replacement), t0);
        assert_eq!(a.len(), 2, "{a:?}");
        assert!(matches!(
            emitted(&a)[0],
            BackendEvent::RunnerStopped {
                reason: DestroyReason::Stopped(_),
                ..
            }
        ));
        assert!(a.contains(&Action::Purge("10-a".into())));
        assert!(
            t.apply(&alloc_event(alloc("A", "10-a", "lost", "stop", 20, 5)), t0)
                .is_empty()
        );
        assert!(
            t.apply(
                &alloc_event(alloc("B", "10-a", "running", "run", 25, 20)),
                t0
            )
            .is_empty()
        );
        assert_eq!(t.runner(&r).unwrap().phase, Phase::Gone);

        let r2 = created(&mut t, "10-b", t0);
        t.apply(
            &alloc_event(alloc("C", "10-b", "running", "run", 30, 30)),
            t0,
        );
        let a = t.apply(&alloc_event(alloc("C", "10-b", "lost", "stop", 31, 30)), t0);
        assert_eq!(emitted(&a).len(), 1);
        assert!(a.contains(&Action::Purge(r2.to_string())));
    }

    #[test]
    fn a_destruction_the_manager_asked_for_is_not_reported() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        let r = created(&mut t, "10-a", t0);
        t.apply(&alloc_event(alloc("A", "10-a", "running", "run", 7, 5)), t0);
        t.destroying(&r);
        assert!(
            t.apply(
                &alloc_event(alloc("A", "10-a", "running", "stop", 8, 5)),
                t0
            )
            .is_empty()
        );
        let dereg = Event {
            topic: "Job".into(),
            kind: "JobDeregistered".into(),
            key: "10-a".into(),
            payload: json!({"Job": {"ID": "10-a"}, "Deleted": true}),
        };
        assert!(t.apply(&dereg, t0).is_empty());
    }

    #[test]
    fn an_external_purge_is_reported_without_purging_again() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        let r = created(&mut t, "10-a", t0);
        t.apply(&alloc_event(alloc("A", "10-a", "running", "run", 7, 5)), t0);
        let dereg = Event {
            topic: "Job".into(),
            kind: "JobDeregistered".into(),
            key: "10-a".into(),
            payload: json!({"Job": {"ID": "10-a"}, "Deleted": true}),
        };
        let a = t.apply(&dereg, t0);
        assert_eq!(
            a,
            vec![Action::Emit(BackendEvent::RunnerStopped {
                runner: r,
                reason: DestroyReason::Stopped("its job was deregistered".into())
            })]
        );
    }

    #[test]
    fn recovery_adopts_running_runners_waits_for_pending_ones_and_purges_broken_ones_358_716() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        let listed = |id: &str, allocs: Vec<Value>| Listed {
            id: RunnerId::new(id),
            job: json!({"ID": id}),
            allocs,
        };
        let mut restarted = alloc("C", "10-c", "running", "run", 9, 9);
        restarted["TaskStates"] = json!({"default-task": {"Restarts": 1}});
        let (states, actions) = t.reconcile(
            env(),
            vec![
                listed("10-a", vec![alloc("A", "10-a", "running", "run", 5, 5)]),
                listed("10-b", vec![alloc("B", "10-b", "pending", "run", 6, 6)]),
                listed("10-c", vec![restarted]),
                listed("10-d", vec![alloc("D", "10-d", "failed", "run", 7, 7)]),
            ],
            t0,
        );
        let state = |id: &str| {
            states
                .iter()
                .find(|(r, _)| r.as_str() == id)
                .map(|(_, s)| s.clone())
        };
        assert!(matches!(state("10-a"), Some(ListedState::Ready(_))));
        assert_eq!(state("10-b"), Some(ListedState::NotReady));
        assert_eq!(state("10-c"), None);
        assert_eq!(state("10-d"), None);
        assert!(actions.contains(&Action::Purge("10-c".into())));
        assert!(actions.contains(&Action::Purge("10-d".into())));
        // The pending one is adopted when it runs: RunnerStarted, so the pool counts it once
        // (no drift after restarts).
        let a = t.apply(
            &alloc_event(alloc("B", "10-b", "running", "run", 10, 6)),
            t0,
        );
        assert!(matches!(
            emitted(&a)[..],
            [BackendEvent::RunnerStarted { .. }]
        ));
        // A second reload lists the same runners, none twice, none lost.
        let (states, actions) = t.reconcile(
            env(),
            vec![
                listed("10-a", vec![alloc("A", "10-a", "running", "run", 5, 5)]),
                listed("10-b", vec![alloc("B", "10-b", "running", "run", 10, 6)]),
            ],
            t0,
        );
        assert!(actions.is_empty(), "{actions:?}");
        assert_eq!(states.len(), 2);
        assert!(
            states
                .iter()
                .all(|(_, s)| matches!(s, ListedState::Ready(_)))
        );
        // 10-a's job vanished while the stream was away: reported stopped on the next listing.
        let (_, actions) = t.reconcile(
            env(),
            vec![listed(
                "10-b",
                vec![alloc("B", "10-b", "running", "run", 10, 6)],
            )],
            t0,
        );
        assert!(matches!(
            emitted(&actions)[..],
            [BackendEvent::RunnerStopped { runner, .. }] if runner.as_str() == "10-a"
        ));
    }

    #[test]
    fn a_listing_does_not_hand_out_a_runner_still_being_created() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        created(&mut t, "10-a", t0);
        // Its job is not listed yet (registration in flight) and its allocation is pending.
        let (states, actions) = t.reconcile(env(), vec![], t0);
        assert!(states.is_empty() && actions.is_empty());
        let (states, _) = t.reconcile(
            env(),
            vec![Listed {
                id: RunnerId::new("10-a"),
                job: json!({"ID": "10-a"}),
                allocs: vec![alloc("A", "10-a", "pending", "run", 5, 5)],
            }],
            t0,
        );
        assert_eq!(states[0].1, ListedState::NotReady);
    }

    #[test]
    fn evaluations_and_templates_are_followed() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        let eval = |status: &str, failed: Value| Event {
            topic: "Evaluation".into(),
            kind: "EvaluationUpdated".into(),
            key: "E".into(),
            payload: json!({"Evaluation": {"ID": "E", "Status": status, "FailedTGAllocs": failed}}),
        };
        t.apply(&eval("pending", Value::Null), t0);
        assert_eq!(t.eval_outcome("E"), None);
        t.apply(
            &eval("complete", json!({"default-group": {"NodesEvaluated": 1, "NodesExhausted": 1, "DimensionExhausted": {"memory": 1}}})),
            t0,
        );
        assert!(
            matches!(t.eval_outcome("E"), Some(EvalOutcome::PlacementFailed(m)) if m.contains("memory"))
        );

        let spec = EnvironmentSpec {
            id: EnvironmentId::new(12).unwrap(),
            image: "img".into(),
            prewarming_pool_size: 1,
            cpu_limit: 20,
            memory_limit: 64,
            network_access: false,
            exposed_ports: vec![],
        };
        let template = crate::jobs::JobShape::default().template(&spec);
        assert!(t.environments_loaded().is_empty());
        let registered = Event {
            topic: "Job".into(),
            kind: "JobRegistered".into(),
            key: "template-12".into(),
            payload: json!({"Job": template}),
        };
        // An event only asks to look; the template's current state decides.
        assert_eq!(
            t.apply(&registered, t0),
            vec![Action::CheckEnvironment(spec.id)]
        );
        assert_eq!(
            t.settle_environment(spec.id, Some(spec.clone())),
            Some(BackendEvent::EnvironmentAppeared(spec.clone()))
        );
        assert!(t.apply(&registered, t0).is_empty());
        let gone = Event {
            kind: "JobDeregistered".into(),
            ..registered.clone()
        };
        assert_eq!(t.apply(&gone, t0), vec![Action::CheckEnvironment(spec.id)]);
        // A replayed deregistration of a template that exists again changes nothing.
        assert_eq!(t.settle_environment(spec.id, Some(spec.clone())), None);
        assert_eq!(
            t.settle_environment(spec.id, None),
            Some(BackendEvent::EnvironmentVanished(spec.id))
        );
        // One the manager deletes itself is not reported.
        t.environment_known(spec.id);
        t.environment_deleting(spec.id);
        assert!(t.apply(&gone, t0).is_empty());
        assert_eq!(t.settle_environment(spec.id, None), None);
    }
}
