//! Nomad's JSON shapes of the emulator's records (nomad.md §6.1): what the HTTP API answers and
//! what events carry. Absent objects are `null` and absent strings `""`, as Go marshals them.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::model::{Alloc, Eval, JobRecord, Node, TaskState, group_of};

/// A unix-nanosecond time as Go's RFC 3339 text with nanoseconds (`2017-05-25T23:41:23.240184101Z`).
pub(crate) fn rfc3339(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let nanos = ns.rem_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let frac = if nanos == 0 {
        String::new()
    } else {
        let s = format!(".{nanos:09}");
        s.trim_end_matches('0').to_owned()
    };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}{frac}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn opt_time(t: Option<i64>) -> Value {
    t.map_or(Value::Null, |t| Value::String(rfc3339(t)))
}

fn empty_to_null<T: serde::Serialize>(v: &[T]) -> Value {
    if v.is_empty() { Value::Null } else { json!(v) }
}

/// Top-level job fields Go always marshals; filled with `null` or `""` when the spec lacks them.
const JOB_NULL_FIELDS: &[&str] = &[
    "Constraints",
    "Affinities",
    "Spreads",
    "Update",
    "Multiregion",
    "Periodic",
    "ParameterizedJob",
    "Reschedule",
    "Migrate",
    "Meta",
    "Payload",
    "UI",
    "VersionTag",
];
const JOB_EMPTY_STRING_FIELDS: &[&str] = &[
    "ConsulToken",
    "VaultToken",
    "ConsulNamespace",
    "VaultNamespace",
    "NomadTokenID",
];

/// The full job JSON (`GET /v1/job/:id`, Job events, embedded in allocations).
pub(crate) fn job(rec: &JobRecord) -> Value {
    let mut v = rec.spec.clone();
    if let Value::Object(m) = &mut v {
        for k in JOB_NULL_FIELDS {
            m.entry(*k).or_insert(Value::Null);
        }
        for k in JOB_EMPTY_STRING_FIELDS {
            m.entry(*k).or_insert_with(|| Value::String(String::new()));
        }
        m.insert("Stop".into(), json!(rec.stop));
        m.insert("Status".into(), json!(rec.status));
        m.insert("StatusDescription".into(), json!(""));
        m.insert("Stable".into(), json!(false));
        m.insert("Version".into(), json!(rec.version));
        m.insert("SubmitTime".into(), json!(rec.submit_time));
        m.insert("CreateIndex".into(), json!(rec.create_index));
        m.insert("ModifyIndex".into(), json!(rec.modify_index));
        m.insert("JobModifyIndex".into(), json!(rec.job_modify_index));
    }
    v
}

/// Per-group counts of a job's allocations for `JobSummary`.
pub(crate) fn job_summary(rec: &JobRecord, allocs: &[&Alloc]) -> Value {
    let mut summary = Map::new();
    for g in rec.groups() {
        let Some(name) = g.get("Name").and_then(Value::as_str) else {
            continue;
        };
        let mut counts: BTreeMap<&str, u64> = [
            "Queued", "Complete", "Failed", "Running", "Starting", "Lost", "Unknown",
        ]
        .into_iter()
        .map(|k| (k, 0))
        .collect();
        counts.insert("Queued", rec.queued.get(name).copied().unwrap_or(0));
        for a in allocs.iter().filter(|a| a.task_group == name) {
            let key = match a.client_status.as_str() {
                "pending" => "Starting",
                "running" => "Running",
                "complete" => "Complete",
                "failed" => "Failed",
                "lost" => "Lost",
                _ => "Unknown",
            };
            *counts.entry(key).or_insert(0) += 1;
        }
        summary.insert(name.to_owned(), json!(counts));
    }
    json!({
        "JobID": rec.id, "Namespace": rec.namespace, "Summary": summary,
        "Children": {"Pending": 0, "Running": 0, "Dead": 0},
        "CreateIndex": rec.create_index, "ModifyIndex": rec.modify_index,
    })
}

/// A `JobListStub` (`GET /v1/jobs`).
pub(crate) fn job_stub(rec: &JobRecord, allocs: &[&Alloc], with_meta: bool) -> Value {
    let s = &rec.spec;
    let get = |k: &str| s.get(k).cloned().unwrap_or(Value::Null);
    let mut v = json!({
        "ID": rec.id, "ParentID": s.get("ParentID").cloned().unwrap_or(json!("")),
        "Name": get("Name"), "Namespace": rec.namespace, "Datacenters": get("Datacenters"),
        "NodePool": get("NodePool"), "Multiregion": get("Multiregion"), "Type": rec.job_type(),
        "Priority": rec.priority(), "Periodic": s.get("Periodic").is_some_and(|p| !p.is_null()),
        "ParameterizedJob": s.get("ParameterizedJob").is_some_and(|p| !p.is_null()),
        "Stop": rec.stop, "Status": rec.status, "StatusDescription": "",
        "JobSummary": job_summary(rec, allocs),
        "CreateIndex": rec.create_index, "ModifyIndex": rec.modify_index,
        "JobModifyIndex": rec.job_modify_index, "SubmitTime": rec.submit_time,
    });
    if with_meta && let Value::Object(m) = &mut v {
        m.insert("Meta".into(), get("Meta"));
    }
    v
}

/// A Nomad `TaskEvent` with every field Go marshals.
pub(crate) fn task_event(kind: &str, details: &[(&str, String)], extra: Value) -> Value {
    let details: Map<String, Value> = details
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::String(v.clone())))
        .collect();
    let display = match kind {
        "Received" => "Task received by client".to_owned(),
        "Task Setup" => "Building Task Directory".to_owned(),
        "Started" => "Task started by client".to_owned(),
        "Killing" => "Sent interrupt. Waiting 0s before force killing".to_owned(),
        "Killed" => "Task successfully killed".to_owned(),
        _ => details
            .get("exit_message")
            .or_else(|| details.get("restart_reason"))
            .or_else(|| details.get("driver_message"))
            .or_else(|| details.get("driver_error"))
            .and_then(Value::as_str)
            .unwrap_or(kind)
            .to_owned(),
    };
    let mut ev = json!({
        "Type": kind, "Time": crate::model::now_ns(), "Message": "", "DisplayMessage": display,
        "Details": details, "FailsTask": false, "RestartReason": "", "SetupError": "",
        "DriverError": "", "DriverMessage": "", "ExitCode": 0, "Signal": 0, "KillReason": "",
        "KillTimeout": 0, "KillError": "", "StartDelay": 0, "DownloadError": "",
        "ValidationError": "", "DiskLimit": 0, "FailedSibling": "", "VaultError": "",
        "TaskSignalReason": "", "TaskSignal": "", "GenericSource": "",
    });
    if let (Value::Object(m), Value::Object(x)) = (&mut ev, extra) {
        m.extend(x);
    }
    ev
}

fn task_state(ts: &TaskState) -> Value {
    json!({
        "State": ts.state, "Failed": ts.failed, "Restarts": ts.restarts,
        "LastRestart": opt_time(ts.last_restart), "StartedAt": opt_time(ts.started_at),
        "FinishedAt": opt_time(ts.finished_at), "Events": ts.events, "TaskHandle": null,
    })
}

fn task_states(a: &Alloc) -> Value {
    a.task_states.as_ref().map_or(Value::Null, |m| {
        Value::Object(m.iter().map(|(k, v)| (k.clone(), task_state(v))).collect())
    })
}

fn task_resources(task: &Value) -> (u64, u64, u64) {
    let r = task.get("Resources");
    let n = |k: &str| {
        r.and_then(|r| r.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    (n("CPU"), n("MemoryMB"), n("MemoryMaxMB"))
}

fn ports_json(a: &Alloc) -> (Value, Value) {
    if a.ports.is_empty() && a.network_mode.is_none() {
        return (Value::Null, Value::Null);
    }
    let dynamic: Vec<Value> = a
        .ports
        .iter()
        .map(|p| json!({"Label": p.label, "Value": p.value, "To": p.to, "HostNetwork": "default"}))
        .collect();
    let ports: Vec<Value> = a
        .ports
        .iter()
        .map(|p| json!({"Label": p.label, "Value": p.value, "To": p.to, "HostIP": p.host_ip}))
        .collect();
    let networks = json!([{
        "Mode": a.network_mode.clone().unwrap_or_else(|| "host".into()), "Device": "", "CIDR": "",
        "IP": "127.0.0.1", "Hostname": "", "MBits": 0, "DNS": null, "ReservedPorts": null,
        "DynamicPorts": empty_to_null(&dynamic),
    }]);
    (networks, empty_to_null(&ports))
}

fn allocated_resources(a: &Alloc) -> Value {
    let group = a.group_spec().unwrap_or(Value::Null);
    let mut tasks = Map::new();
    for t in group
        .get("Tasks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = t.get("Name").and_then(Value::as_str).unwrap_or_default();
        let (cpu, mem, max) = task_resources(t);
        tasks.insert(
            name.to_owned(),
            json!({"Cpu": {"CpuShares": cpu, "ReservedCores": null}, "Memory": {"MemoryMB": mem, "MemoryMaxMB": max},
                   "Networks": null, "Devices": null}),
        );
    }
    let (networks, ports) = ports_json(a);
    json!({
        "Tasks": tasks, "TaskLifecycles": null,
        "Shared": {"DiskMB": a.resources.disk_mb, "Networks": networks, "Ports": ports},
    })
}

fn reschedule_tracker(a: &Alloc) -> Value {
    if a.reschedule_events.is_empty() {
        return Value::Null;
    }
    let events: Vec<Value> = a
        .reschedule_events
        .iter()
        .map(|e| {
            json!({"RescheduleTime": e.reschedule_time, "PrevAllocID": e.prev_alloc_id,
                   "PrevNodeID": e.prev_node_id, "Delay": e.delay})
        })
        .collect();
    json!({ "Events": events })
}

/// The fields the stub and the full allocation share.
fn alloc_common(a: &Alloc) -> Map<String, Value> {
    let v = json!({
        "ID": a.id, "EvalID": a.eval_id, "Name": a.name, "Namespace": a.namespace,
        "NodeID": a.node_id, "NodeName": a.node_name, "JobID": a.job_id, "JobVersion": a.job_version,
        "TaskGroup": a.task_group, "DesiredStatus": a.desired_status,
        "DesiredDescription": a.desired_description, "ClientStatus": a.client_status,
        "ClientDescription": a.client_description,
        "DesiredTransition": {"Migrate": null, "Reschedule": null, "ForceReschedule": null, "NoShutdownDelay": null},
        "TaskStates": task_states(a), "DeploymentStatus": null, "FollowupEvalID": a.followup_eval_id,
        "NextAllocation": a.next_allocation, "RescheduleTracker": reschedule_tracker(a),
        "PreemptedAllocations": null, "PreemptedByAllocation": "",
        "CreateIndex": a.create_index, "ModifyIndex": a.modify_index,
        "CreateTime": a.create_time, "ModifyTime": a.modify_time,
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// The full allocation; `with_job` embeds the job version it runs (events carry `null`).
pub(crate) fn alloc(a: &Alloc, with_job: bool) -> Value {
    let mut m = alloc_common(a);
    let group = a.group_spec().unwrap_or(Value::Null);
    let mut task_res = Map::new();
    for t in group
        .get("Tasks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = t.get("Name").and_then(Value::as_str).unwrap_or_default();
        let (cpu, mem, max) = task_resources(t);
        task_res.insert(
            name.to_owned(),
            json!({"CPU": cpu, "Cores": 0, "MemoryMB": mem, "MemoryMaxMB": max, "DiskMB": 0,
                   "IOPS": 0, "Networks": null, "Devices": null}),
        );
    }
    let r = a.resources;
    let extra = json!({
        "Job": if with_job { (*a.job).clone() } else { Value::Null },
        "Resources": {"CPU": r.cpu, "Cores": 0, "MemoryMB": r.memory_mb, "MemoryMaxMB": r.memory_max_mb,
                      "DiskMB": r.disk_mb, "IOPS": 0, "Networks": null, "Devices": null},
        "TaskResources": task_res,
        "AllocatedResources": allocated_resources(a),
        "Metrics": {"NodesEvaluated": 1, "NodesFiltered": 0, "NodesInPool": 1, "NodesAvailable": {"dc1": 1},
                    "ClassFiltered": null, "ConstraintFiltered": null, "NodesExhausted": 0,
                    "ClassExhausted": null, "DimensionExhausted": null, "QuotaExhausted": null,
                    "ResourcesExhausted": null, "Scores": null, "ScoreMetaData": null,
                    "AllocationTime": 20000, "CoalescedFailures": 0},
        "DeploymentID": "", "PreviousAllocation": a.previous_allocation,
        "AllocModifyIndex": a.alloc_modify_index, "NetworkStatus": null, "Services": null,
        "SignedIdentities": null,
    });
    if let Value::Object(x) = extra {
        m.extend(x);
    }
    Value::Object(m)
}

/// An `AllocListStub`; `resources` adds `AllocatedResources`, `task_states == false` nulls them.
pub(crate) fn alloc_stub(a: &Alloc, resources: bool, task_states_on: bool) -> Value {
    let mut m = alloc_common(a);
    m.insert("JobType".into(), json!(a.job_type));
    if resources {
        m.insert("AllocatedResources".into(), allocated_resources(a));
    }
    if !task_states_on {
        m.insert("TaskStates".into(), Value::Null);
    }
    Value::Object(m)
}

/// An evaluation.
pub(crate) fn eval(e: &Eval) -> Value {
    json!({
        "ID": e.id, "Namespace": e.namespace, "Priority": e.priority, "Type": e.job_type,
        "TriggeredBy": e.triggered_by, "JobID": e.job_id, "JobModifyIndex": e.job_modify_index,
        "NodeID": e.node_id, "NodeModifyIndex": e.node_modify_index, "DeploymentID": "",
        "Status": e.status, "StatusDescription": e.status_description, "Wait": 0,
        "WaitUntil": opt_time(e.wait_until), "NextEval": e.next_eval, "PreviousEval": e.previous_eval,
        "BlockedEval": e.blocked_eval, "RelatedEvals": null,
        "FailedTGAllocs": e.failed_tg_allocs, "ClassEligibility": null, "QuotaLimitReached": "",
        "EscapedComputedClass": false, "AnnotatePlan": false,
        "QueuedAllocations": e.queued_allocations, "LeaderACL": "", "SnapshotIndex": e.snapshot_index,
        "CreateIndex": e.create_index, "ModifyIndex": e.modify_index,
        "CreateTime": e.create_time, "ModifyTime": e.modify_time,
    })
}

fn drivers() -> Value {
    let d = json!({"Attributes": null, "Detected": true, "Healthy": true,
                   "HealthDescription": "Healthy", "UpdateTime": rfc3339(crate::model::now_ns())});
    json!({"docker": d, "exec": d, "raw_exec": d})
}

/// A full node (`GET /v1/node/:id`, Node events); `http_addr` is the emulator's `host:port`.
pub(crate) fn node(n: &Node, http_addr: &str) -> Value {
    json!({
        "ID": n.id, "SecretID": "", "Datacenter": "dc1", "Name": n.name, "HTTPAddr": http_addr,
        "TLSEnabled": false, "Attributes": {"driver.docker": "1", "driver.exec": "1", "unique.network.ip-address": "127.0.0.1",
                                            "nomad.version": "2.0.6", "kernel.name": "linux"},
        "NodeResources": {"Cpu": {"CpuShares": n.cpu_mhz, "TotalCpuCores": 1, "ReservableCpuCores": null},
                          "Memory": {"MemoryMB": n.memory_mb}, "Disk": {"DiskMB": 100000},
                          "Networks": null, "NodeNetworks": null, "Devices": null,
                          "MinDynamicPort": 20000, "MaxDynamicPort": 32000},
        "ReservedResources": null, "Resources": null, "Reserved": null, "Links": null, "Meta": null,
        "NodeClass": "", "NodePool": "default", "ComputedClass": "", "Drain": false,
        "DrainStrategy": null, "SchedulingEligibility": "eligible", "Status": n.status,
        "StatusDescription": "", "StatusUpdatedAt": n.status_updated_at / 1_000_000_000,
        "Events": null, "Drivers": drivers(), "HostVolumes": null, "HostNetworks": null,
        "CSIControllerPlugins": null, "CSINodePlugins": null, "LastDrain": null,
        "CreateIndex": n.create_index, "ModifyIndex": n.modify_index,
    })
}

/// A `NodeListStub` (`GET /v1/nodes`).
pub(crate) fn node_stub(n: &Node, http_addr: &str) -> Value {
    let addr = http_addr.split(':').next().unwrap_or("127.0.0.1");
    json!({
        "Address": addr, "ID": n.id, "Attributes": null, "Datacenter": "dc1", "Name": n.name,
        "NodeClass": "", "NodePool": "default", "Version": "2.0.6", "Drain": false,
        "SchedulingEligibility": "eligible", "Status": n.status, "StatusDescription": "",
        "Drivers": drivers(), "NodeResources": null, "ReservedResources": null, "LastDrain": null,
        "CreateIndex": n.create_index, "ModifyIndex": n.modify_index,
    })
}

/// The group spec of `job` named `group`, with `Count` removed (destructive-update comparison).
pub(crate) fn group_without_count(job: &Value, group: &str) -> Option<Value> {
    let mut g = group_of(job, group)?;
    if let Value::Object(m) = &mut g {
        m.remove("Count");
    }
    Some(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_like_go() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(1_495_755_683_240_184_101),
            "2017-05-25T23:41:23.240184101Z"
        );
        assert_eq!(rfc3339(951_782_400_500_000_000), "2000-02-29T00:00:00.5Z");
    }
}
