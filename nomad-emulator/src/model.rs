//! The records the emulated cluster keeps: nodes, jobs, evaluations and allocations.
//!
//! They hold what the emulator needs; `shapes` turns them into Nomad's JSON.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The current wall clock in unix nanoseconds.
pub(crate) fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A fresh random UUID in Nomad's textual form.
pub(crate) fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// One node of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Node {
    pub id: String,
    pub name: String,
    /// `ready`, `down` or `initializing`.
    pub status: String,
    pub cpu_mhz: u64,
    pub memory_mb: u64,
    pub create_index: u64,
    pub modify_index: u64,
    pub status_updated_at: i64,
}

/// A job as stored: the canonical spec plus the fields the server owns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct JobRecord {
    pub namespace: String,
    pub id: String,
    /// The canonical spec without server fields (no `null`s).
    pub spec: Value,
    pub version: u64,
    pub status: String,
    pub stop: bool,
    pub create_index: u64,
    pub modify_index: u64,
    pub job_modify_index: u64,
    pub submit_time: i64,
    /// Per group, how many allocations the last evaluation could not place.
    #[serde(default)]
    pub queued: BTreeMap<String, u64>,
}

impl JobRecord {
    /// `Type` of the job (`service` when unset).
    pub fn job_type(&self) -> String {
        self.spec
            .get("Type")
            .and_then(Value::as_str)
            .unwrap_or("service")
            .to_owned()
    }

    /// `Priority` of the job.
    pub fn priority(&self) -> i64 {
        self.spec
            .get("Priority")
            .and_then(Value::as_i64)
            .unwrap_or(50)
    }

    /// The spec's task groups.
    pub fn groups(&self) -> Vec<Value> {
        self.spec
            .get("TaskGroups")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }
}

/// An evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Eval {
    pub id: String,
    pub namespace: String,
    pub priority: i64,
    pub job_type: String,
    pub triggered_by: String,
    pub job_id: String,
    pub job_modify_index: u64,
    pub node_id: String,
    pub node_modify_index: u64,
    /// `pending`, `blocked`, `complete`, `failed` or `canceled`.
    pub status: String,
    pub status_description: String,
    pub wait_until: Option<i64>,
    pub next_eval: String,
    pub previous_eval: String,
    pub blocked_eval: String,
    pub failed_tg_allocs: Option<BTreeMap<String, Value>>,
    pub queued_allocations: Option<BTreeMap<String, u64>>,
    pub snapshot_index: u64,
    pub create_index: u64,
    pub modify_index: u64,
    pub create_time: i64,
    pub modify_time: i64,
}

impl Eval {
    /// A pending evaluation of `job` triggered by `triggered_by`.
    pub fn pending(
        namespace: &str,
        job_id: &str,
        job_type: &str,
        priority: i64,
        triggered_by: &str,
    ) -> Self {
        let now = now_ns();
        Self {
            id: new_id(),
            namespace: namespace.to_owned(),
            priority,
            job_type: job_type.to_owned(),
            triggered_by: triggered_by.to_owned(),
            job_id: job_id.to_owned(),
            job_modify_index: 0,
            node_id: String::new(),
            node_modify_index: 0,
            status: "pending".to_owned(),
            status_description: String::new(),
            wait_until: None,
            next_eval: String::new(),
            previous_eval: String::new(),
            blocked_eval: String::new(),
            failed_tg_allocs: None,
            queued_allocations: None,
            snapshot_index: 0,
            create_index: 0,
            modify_index: 0,
            create_time: now,
            modify_time: now,
        }
    }

    /// Whether the scheduler is done with it.
    pub fn is_terminal(&self) -> bool {
        matches!(self.status.as_str(), "complete" | "failed" | "canceled")
    }
}

/// A placed dynamic port.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct PortMapping {
    pub label: String,
    pub value: u16,
    pub to: u16,
    pub host_ip: String,
}

/// One entry of an allocation's `RescheduleTracker`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RescheduleEvent {
    pub reschedule_time: i64,
    pub prev_alloc_id: String,
    pub prev_node_id: String,
    pub delay: i64,
}

/// The state of one task of an allocation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TaskState {
    /// `pending`, `running` or `dead`.
    pub state: String,
    pub failed: bool,
    pub restarts: u64,
    pub last_restart: Option<i64>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// Nomad `TaskEvent` objects, built by `shapes::task_event`.
    pub events: Vec<Value>,
}

impl TaskState {
    /// A task that has not started.
    pub fn pending() -> Self {
        Self {
            state: "pending".to_owned(),
            failed: false,
            restarts: 0,
            last_restart: None,
            started_at: None,
            finished_at: None,
            events: Vec::new(),
        }
    }
}

/// The resources of an allocation's group, summed over its tasks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default)]
pub(crate) struct GroupResources {
    pub cpu: u64,
    pub memory_mb: u64,
    pub memory_max_mb: u64,
    pub disk_mb: u64,
}

/// An allocation plus the client's bookkeeping about it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Alloc {
    pub id: String,
    pub namespace: String,
    pub eval_id: String,
    pub name: String,
    pub node_id: String,
    pub node_name: String,
    pub job_id: String,
    pub job_type: String,
    pub job_version: u64,
    /// The full job JSON at `job_version`, as the allocation runs it.
    pub job: Arc<Value>,
    pub task_group: String,
    pub resources: GroupResources,
    pub network_mode: Option<String>,
    pub ports: Vec<PortMapping>,
    pub desired_status: String,
    pub desired_description: String,
    pub client_status: String,
    pub client_description: String,
    pub task_states: Option<BTreeMap<String, TaskState>>,
    pub previous_allocation: String,
    pub next_allocation: String,
    pub reschedule_events: Vec<RescheduleEvent>,
    pub followup_eval_id: String,
    pub create_index: u64,
    pub modify_index: u64,
    pub alloc_modify_index: u64,
    pub create_time: i64,
    pub modify_time: i64,
    /// Restart times (unix ns) the restart policy counts.
    pub restart_times: Vec<i64>,
    /// Bumped on every lifecycle change, so delayed client steps of an older life do nothing.
    pub epoch: u64,
}

impl Alloc {
    /// Whether the server or the client considers it finished (§2.5).
    pub fn is_terminal(&self) -> bool {
        matches!(self.desired_status.as_str(), "stop" | "evict") || self.client_terminal()
    }

    /// Whether the client considers it finished.
    pub fn client_terminal(&self) -> bool {
        matches!(self.client_status.as_str(), "complete" | "failed" | "lost")
    }

    /// Whether it holds resources on its node.
    pub fn uses_resources(&self) -> bool {
        !self.is_terminal()
    }

    /// The names of the tasks of its group.
    pub fn task_names(&self) -> Vec<String> {
        group_of(&self.job, &self.task_group)
            .map(|g| task_names(&g))
            .unwrap_or_default()
    }

    /// Its group's spec in its job version.
    pub fn group_spec(&self) -> Option<Value> {
        group_of(&self.job, &self.task_group)
    }
}

/// The task group `name` of a job JSON.
pub(crate) fn group_of(job: &Value, name: &str) -> Option<Value> {
    job.get("TaskGroups")?
        .as_array()?
        .iter()
        .find(|g| g.get("Name").and_then(Value::as_str) == Some(name))
        .cloned()
}

/// The task names of a group JSON.
pub(crate) fn task_names(group: &Value) -> Vec<String> {
    group
        .get("Tasks")
        .and_then(Value::as_array)
        .map(|ts| {
            ts.iter()
                .filter_map(|t| t.get("Name").and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
