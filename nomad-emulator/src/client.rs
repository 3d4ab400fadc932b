//! The emulated Nomad client (nomad.md §5.5): allocation lifecycles (start, stop, task exits
//! under the restart policy, failure and reschedule) driving the [`AllocationRuntime`].
//!
//! Every step is one `AllocationUpdated` commit. Delayed steps carry the allocation's `epoch`
//! and do nothing when a newer lifecycle change happened in between.
//!
//! [`AllocationRuntime`]: crate::runtime::AllocationRuntime

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::emulator::Inner;
use crate::model::{Alloc, Eval, TaskState, now_ns};
use crate::runtime::{PortLaunch, SessionEnd, TaskLaunch};
use crate::scheduler;
use crate::shapes::task_event;
use crate::state::Txn;

/// Why an allocation's task stopped on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Exit {
    /// The task exited with this code.
    Crash(i32),
    /// The memory limit killed it.
    Oom,
    /// The driver could not start it.
    DriverFailure(String),
    /// A user asked for a restart (does not count against the policy).
    UserRestart,
    /// Its sandbox did not survive an emulator restart.
    SandboxLost,
}

fn policy_num(policy: Option<&Value>, k: &str) -> i64 {
    policy
        .and_then(|p| p.get(k))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

fn ns_to_duration(ns: i64) -> Duration {
    Duration::from_nanos(u64::try_from(ns).unwrap_or(0))
}

fn scaled_ns(inner: &Inner, ns: i64) -> i64 {
    i64::try_from(inner.config.scaled(ns_to_duration(ns)).as_nanos()).unwrap_or(i64::MAX)
}

/// The (unscaled) delay before `prev` may be rescheduled, or `None` when its reschedule
/// policy is used up.
pub(crate) fn reschedule_delay(prev: &Alloc, inner: &Inner) -> Option<i64> {
    let group = prev.group_spec()?;
    let p = group.get("ReschedulePolicy");
    let unlimited = p
        .and_then(|p| p.get("Unlimited"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let attempts = policy_num(p, "Attempts");
    let interval = scaled_ns(inner, policy_num(p, "Interval"));
    let now = now_ns();
    let recent = prev
        .reschedule_events
        .iter()
        .filter(|e| unlimited || interval == 0 || now - e.reschedule_time < interval)
        .count();
    if !unlimited && i64::try_from(recent).unwrap_or(i64::MAX) >= attempts {
        return None;
    }
    let delay = policy_num(p, "Delay");
    let max = policy_num(p, "MaxDelay");
    let n = u32::try_from(prev.reschedule_events.len()).unwrap_or(u32::MAX);
    let raw = match p
        .and_then(|p| p.get("DelayFunction"))
        .and_then(Value::as_str)
    {
        Some("exponential") => delay.saturating_mul(2_i64.saturating_pow(n)),
        Some("fibonacci") => {
            let (mut a, mut b) = (delay, delay);
            for _ in 0..n {
                let c = a.saturating_add(b);
                a = b;
                b = c;
            }
            a
        }
        _ => delay,
    };
    Some(if max > 0 { raw.min(max) } else { raw })
}

/// The runtime's view of an allocation: its main (first) task, resources, ports and env.
pub(crate) fn launch(a: &Alloc, region: &str) -> TaskLaunch {
    let group = a.group_spec().unwrap_or(Value::Null);
    let task = group.pointer("/Tasks/0").cloned().unwrap_or(Value::Null);
    let s = |v: &Value, k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let task_name = s(&task, "Name");
    let res = task.get("Resources");
    let n = |k: &str| {
        res.and_then(|r| r.get(k))
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(0)
    };
    let config = task.get("Config");
    let network_mode = config
        .and_then(|c| c.get("network_mode"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let has_network = group
        .get("Networks")
        .and_then(Value::as_array)
        .is_some_and(|n| !n.is_empty());
    let index = a
        .name
        .rfind('[')
        .and_then(|i| a.name.get(i + 1..a.name.len().saturating_sub(1)))
        .unwrap_or("0");
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let job_name = s(&a.job, "Name");
    for (k, v) in [
        ("NOMAD_ALLOC_ID", a.id.clone()),
        ("NOMAD_ALLOC_NAME", a.name.clone()),
        ("NOMAD_ALLOC_INDEX", index.to_owned()),
        ("NOMAD_JOB_ID", a.job_id.clone()),
        ("NOMAD_JOB_NAME", job_name),
        ("NOMAD_GROUP_NAME", a.task_group.clone()),
        ("NOMAD_TASK_NAME", task_name.clone()),
        ("NOMAD_NAMESPACE", a.namespace.clone()),
        ("NOMAD_REGION", region.to_owned()),
        ("NOMAD_DC", "dc1".to_owned()),
        ("NOMAD_CPU_LIMIT", n("CPU").to_string()),
        ("NOMAD_MEMORY_LIMIT", n("MemoryMB").to_string()),
        ("NOMAD_MEMORY_MAX_LIMIT", n("MemoryMaxMB").to_string()),
        ("NOMAD_ALLOC_DIR", "/alloc".to_owned()),
        ("NOMAD_TASK_DIR", "/local".to_owned()),
        ("NOMAD_SECRETS_DIR", "/secrets".to_owned()),
    ] {
        env.insert(k.to_owned(), v);
    }
    for meta in [a.job.get("Meta"), group.get("Meta"), task.get("Meta")]
        .into_iter()
        .flatten()
    {
        for (k, v) in meta.as_object().into_iter().flatten() {
            if let Some(v) = v.as_str() {
                env.insert(format!("NOMAD_META_{k}"), v.to_owned());
            }
        }
    }
    for p in &a.ports {
        env.insert(format!("NOMAD_PORT_{}", p.label), p.to.to_string());
        env.insert(format!("NOMAD_HOST_PORT_{}", p.label), p.value.to_string());
        env.insert(format!("NOMAD_IP_{}", p.label), p.host_ip.clone());
        env.insert(
            format!("NOMAD_ADDR_{}", p.label),
            format!("{}:{}", p.host_ip, p.value),
        );
    }
    for (k, v) in task
        .get("Env")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        if let Some(v) = v.as_str() {
            env.insert(k.clone(), v.to_owned());
        }
    }
    let max = n("MemoryMaxMB");
    TaskLaunch {
        alloc_id: a.id.clone(),
        job_id: a.job_id.clone(),
        namespace: a.namespace.clone(),
        group: a.task_group.clone(),
        task: task_name,
        image: config
            .and_then(|c| c.get("image"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        cpu_mhz: n("CPU"),
        memory_mb: n("MemoryMB"),
        memory_max_mb: (max > n("MemoryMB")).then_some(max),
        network: network_mode != "none" && has_network,
        ports: a
            .ports
            .iter()
            .map(|p| PortLaunch {
                label: p.label.clone(),
                host_port: p.value,
                to: p.to,
                host_ip: p.host_ip.clone(),
            })
            .collect(),
        env,
    }
}

/// Applies `f` to the allocation and commits it as `AllocationUpdated`, if it still lives in
/// `epoch` and is desired to run. Returns whether it did.
fn update(inner: &Inner, id: &str, epoch: u64, f: impl FnOnce(&mut Alloc)) -> bool {
    let mut st = inner.lock();
    let Some(a) = st.allocs.get_mut(id) else {
        return false;
    };
    if a.epoch != epoch || a.desired_status != "run" {
        return false;
    }
    f(a);
    let mut tx = Txn::new("AllocationUpdated");
    tx.alloc(id);
    st.commit(tx);
    true
}

fn for_each_task(a: &mut Alloc, mut f: impl FnMut(&mut TaskState)) {
    let names = a.task_names();
    let states = a.task_states.get_or_insert_with(BTreeMap::new);
    for n in names {
        f(states.entry(n).or_insert_with(TaskState::pending));
    }
}

/// Starts a newly placed allocation.
pub(crate) fn start(inner: &Arc<Inner>, id: String) {
    let Some(epoch) = inner.lock().allocs.get(&id).map(|a| a.epoch) else {
        return;
    };
    let inner2 = inner.clone();
    inner.spawn(async move { run_start(inner2, id, epoch, true).await });
}

async fn run_start(inner: Arc<Inner>, id: String, epoch: u64, first: bool) {
    let half = inner.config.alloc_start_delay / 2;
    if first {
        if !inner.sleep(half).await {
            return;
        }
        let ok = update(&inner, &id, epoch, |a| {
            let docker = a
                .group_spec()
                .and_then(|g| g.pointer("/Tasks/0/Driver").cloned())
                .is_some_and(|d| d == "docker");
            let image = launch(a, "global").image.unwrap_or_default();
            a.client_status = "pending".into();
            a.client_description = "No tasks have started".into();
            for_each_task(a, |ts| {
                ts.events.push(task_event("Received", &[], json!({})));
                ts.events.push(task_event(
                    "Task Setup",
                    &[("message", "Building Task Directory".into())],
                    json!({"Message": "Building Task Directory"}),
                ));
                if docker {
                    let msg = format!("Downloading image {image}");
                    ts.events.push(task_event(
                        "Driver",
                        &[("driver_message", msg.clone())],
                        json!({"DriverMessage": msg}),
                    ));
                }
            });
        });
        if !ok {
            return;
        }
    }
    let Some((job_id, launch_spec)) = ({
        let st = inner.lock();
        st.allocs
            .get(&id)
            .map(|a| (a.job_id.clone(), launch(a, "global")))
    }) else {
        return;
    };
    if let Some(msg) = inner.faults().take_fail_start(&job_id) {
        task_exit(&inner, &id, Exit::DriverFailure(msg));
        return;
    }
    if let Err(e) = inner.runtime.start(&launch_spec).await {
        task_exit(&inner, &id, Exit::DriverFailure(e.0));
        return;
    }
    if first && !inner.sleep(inner.config.alloc_start_delay - half).await {
        return;
    }
    if inner.faults().is_held(&job_id) {
        inner.held().insert(id, epoch);
        return;
    }
    finish_start(&inner, &id, epoch);
}

/// The task is up: `running`, `Started`.
pub(crate) fn finish_start(inner: &Inner, id: &str, epoch: u64) {
    update(inner, id, epoch, |a| {
        let now = now_ns();
        a.client_status = "running".into();
        a.client_description = "Tasks are running".into();
        for_each_task(a, |ts| {
            ts.state = "running".into();
            ts.started_at = Some(now);
            ts.finished_at = None;
            ts.events.push(task_event("Started", &[], json!({})));
        });
    });
}

/// Stops an allocation that became desired-stop: sandbox gone, `Killing`/`Terminated`/`Killed`,
/// `complete`.
pub(crate) fn stop(inner: &Arc<Inner>, id: String) {
    let inner2 = inner.clone();
    inner.spawn(async move {
        inner2.runtime.stop(&id).await;
        let done = {
            let mut st = inner2.lock();
            match st.allocs.get_mut(&id) {
                Some(a) if a.desired_status == "stop" && !a.client_terminal() => {
                    let now = now_ns();
                    let kill_timeout = a
                        .group_spec()
                        .and_then(|g| g.pointer("/Tasks/0/KillTimeout").and_then(Value::as_i64))
                        .unwrap_or(0);
                    a.client_status = "complete".into();
                    a.client_description = "All tasks have completed".into();
                    for_each_task(a, |ts| {
                        ts.events.push(task_event(
                            "Killing",
                            &[("kill_timeout", kill_timeout.to_string())],
                            json!({"KillTimeout": kill_timeout}),
                        ));
                        ts.events.push(task_event(
                            "Terminated",
                            &[
                                ("exit_code", "137".into()),
                                ("signal", "9".into()),
                                ("oom_killed", "false".into()),
                            ],
                            json!({"ExitCode": 137, "Signal": 9}),
                        ));
                        ts.events.push(task_event("Killed", &[], json!({})));
                        ts.state = "dead".into();
                        ts.failed = false;
                        ts.finished_at = Some(now);
                    });
                    let mut tx = Txn::new("AllocationUpdated");
                    tx.alloc(&id);
                    st.commit(tx);
                    true
                }
                _ => false,
            }
        };
        if done {
            schedule_gc(&inner2, &id);
            scheduler::unblock(&inner2);
        }
    });
}

/// Forgets a terminal allocation of a purged job after `gc_delay`.
pub(crate) fn schedule_gc(inner: &Arc<Inner>, id: &str) {
    let Some(delay) = inner.config.gc_delay else {
        return;
    };
    let inner2 = inner.clone();
    let id = id.to_owned();
    inner.spawn(async move {
        if !inner2.sleep(delay).await {
            return;
        }
        let mut st = inner2.lock();
        let purged = st.allocs.get(&id).is_some_and(|a| {
            a.is_terminal()
                && !st
                    .jobs
                    .contains_key(&(a.namespace.clone(), a.job_id.clone()))
        });
        if purged {
            st.allocs.remove(&id);
            st.index += 1;
            st.tables.allocs = st.index;
            let i = st.index;
            st.index_tx.send_replace(i);
        }
    });
}

/// An allocation on a lost node: its sessions are reset and its sandbox removed.
pub(crate) fn lost(inner: &Arc<Inner>, id: String) {
    let inner2 = inner.clone();
    inner.spawn(async move {
        inner2.runtime.end_sessions(&id, SessionEnd::Reset).await;
        inner2.runtime.stop(&id).await;
        schedule_gc(&inner2, &id);
    });
}

/// The task of allocation `id` stopped (`exit`): restart within the policy, or fail and maybe
/// reschedule. Returns false when the allocation is not live.
pub(crate) fn task_exit(inner: &Arc<Inner>, id: &str, exit: Exit) -> bool {
    let oom_code = inner.config.oom_exec_exit_code;
    let mut st = inner.lock();
    let Some(a) = st.allocs.get_mut(id) else {
        return false;
    };
    if a.desired_status != "run" || a.client_terminal() {
        return false;
    }
    let group = a.group_spec().unwrap_or(Value::Null);
    let policy = group
        .pointer("/Tasks/0/RestartPolicy")
        .or_else(|| group.get("RestartPolicy"))
        .cloned();
    let attempts = policy_num(policy.as_ref(), "Attempts");
    let interval_raw = policy_num(policy.as_ref(), "Interval");
    let interval = scaled_ns(inner, interval_raw);
    let delay_raw = policy_num(policy.as_ref(), "Delay");
    let mode = policy
        .as_ref()
        .and_then(|p| p.get("Mode"))
        .and_then(Value::as_str)
        .unwrap_or("fail")
        .to_owned();
    let now = now_ns();
    a.restart_times.retain(|t| now - t < interval.max(1));
    let within = i64::try_from(a.restart_times.len()).unwrap_or(i64::MAX) < attempts;
    let restart = match exit {
        Exit::UserRestart => true,
        Exit::SandboxLost => false,
        _ => within || mode == "delay",
    };
    let (exit_code, oom, message) = match &exit {
        Exit::Crash(c) => (*c, false, format!("Exit Code: {c}")),
        Exit::Oom => (137, true, "OOM Killed".to_owned()),
        Exit::DriverFailure(m) => (0, false, m.clone()),
        Exit::UserRestart => (0, false, "Restart requested".to_owned()),
        Exit::SandboxLost => (
            137,
            false,
            "sandbox did not survive the emulator restart".to_owned(),
        ),
    };
    let delay = if matches!(exit, Exit::UserRestart) {
        0
    } else {
        delay_raw
    };
    let term = match &exit {
        Exit::DriverFailure(m) => task_event(
            "Driver Failure",
            &[("driver_error", m.clone())],
            json!({"DriverError": m}),
        ),
        _ => task_event(
            "Terminated",
            &[
                ("exit_code", exit_code.to_string()),
                ("signal", "0".into()),
                ("oom_killed", oom.to_string()),
                ("exit_message", message.clone()),
            ],
            json!({"ExitCode": exit_code}),
        ),
    };
    a.epoch += 1;
    let epoch = a.epoch;
    let mut tx = Txn::new("AllocationUpdated");
    tx.alloc(id);
    let mut followup: Option<Eval> = None;
    if restart {
        let reason = if matches!(exit, Exit::UserRestart) {
            "User requested restart"
        } else {
            "Restart within policy"
        };
        if !matches!(exit, Exit::UserRestart) {
            a.restart_times.push(now);
        }
        a.client_status = "pending".into();
        a.client_description = "No tasks have started".into();
        for_each_task(a, |ts| {
            if matches!(exit, Exit::UserRestart) {
                ts.events.push(task_event(
                    "Restart Signaled",
                    &[("restart_reason", reason.into())],
                    json!({"RestartReason": reason}),
                ));
            }
            ts.events.push(term.clone());
            ts.events.push(task_event(
                "Restarting",
                &[
                    ("restart_reason", reason.into()),
                    ("start_delay", delay.to_string()),
                ],
                json!({"RestartReason": reason, "StartDelay": delay}),
            ));
            ts.state = "pending".into();
            ts.restarts += 1;
            ts.last_restart = Some(now);
        });
    } else {
        let reason = format!(
            "Exceeded allowed attempts {attempts} in interval {}s and mode is \"{mode}\"",
            interval_raw / 1_000_000_000
        );
        a.client_status = "failed".into();
        a.client_description = "Failed tasks".into();
        for_each_task(a, |ts| {
            ts.events.push(term.clone());
            ts.events.push(task_event(
                "Not Restarting",
                &[
                    ("restart_reason", reason.clone()),
                    ("fails_task", "true".into()),
                ],
                json!({"RestartReason": reason, "FailsTask": true}),
            ));
            ts.state = "dead".into();
            ts.failed = true;
            ts.finished_at = Some(now);
        });
        if let Some(d) = reschedule_delay(a, inner) {
            let mut e = Eval::pending(&a.namespace, &a.job_id, &a.job_type, 50, "alloc-failure");
            e.wait_until = Some(now + scaled_ns(inner, d));
            a.followup_eval_id = e.id.clone();
            tx.eval(&e.id);
            followup = Some(e);
        }
    }
    if let Some(e) = &followup {
        if let Some(j) = st.jobs.get(&(e.namespace.clone(), e.job_id.clone())) {
            let mut e2 = e.clone();
            e2.priority = j.priority();
            e2.job_modify_index = j.job_modify_index;
            st.evals.insert(e2.id.clone(), e2);
        } else {
            st.evals.insert(e.id.clone(), e.clone());
        }
    }
    st.commit(tx);
    drop(st);
    let end = if oom {
        SessionEnd::Exit(oom_code)
    } else {
        SessionEnd::Reset
    };
    let inner2 = inner.clone();
    let id = id.to_owned();
    let restart_delay = ns_to_duration(scaled_ns(inner, delay));
    inner.spawn(async move {
        inner2.runtime.end_sessions(&id, end).await;
        if restart {
            if inner2.sleep(restart_delay).await {
                run_start(inner2, id, epoch, false).await;
            }
        } else {
            inner2.runtime.stop(&id).await;
            if let Some(e) = followup {
                scheduler::enqueue(&inner2, e.id.clone(), e.wait_until);
            }
            scheduler::unblock(&inner2);
        }
    });
    true
}

/// Continues held allocations of jobs starting with `prefix`.
pub(crate) fn release(inner: &Arc<Inner>, prefix: &str) {
    let held: Vec<(String, u64)> = {
        let st = inner.lock();
        let mut h = inner.held();
        let ids: Vec<String> = h
            .keys()
            .filter(|id| {
                st.allocs
                    .get(*id)
                    .is_some_and(|a| a.job_id.starts_with(prefix))
            })
            .cloned()
            .collect();
        ids.into_iter()
            .filter_map(|id| h.remove(&id).map(|e| (id, e)))
            .collect()
    };
    for (id, epoch) in held {
        finish_start(inner, &id, epoch);
    }
}
