//! The scheduler (nomad.md §5.5): works through pending evaluations, places, stops, updates in
//! place or destructively, records placement failures with a blocked evaluation.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{Value, json};

use crate::client;
use crate::emulator::Inner;
use crate::model::{
    Alloc, Eval, GroupResources, PortMapping, RescheduleEvent, group_of, new_id, now_ns,
};
use crate::shapes;
use crate::state::{State, Txn};

/// What the client must do after a plan was committed.
#[derive(Debug)]
pub(crate) enum ClientAction {
    Start(String),
    Stop(String),
    Lost(String),
}

/// Queues `eval_id` for the scheduler, after `WaitUntil` when it has one.
pub(crate) fn enqueue(inner: &Arc<Inner>, eval_id: String, wait_until: Option<i64>) {
    let delay_ns = wait_until.map_or(0, |w| w - now_ns());
    if delay_ns <= 0 {
        let _ = inner.sched_tx.send(eval_id);
        return;
    }
    let inner2 = inner.clone();
    inner.spawn(async move {
        let d = std::time::Duration::from_nanos(u64::try_from(delay_ns).unwrap_or(0));
        if inner2.sleep(d).await {
            let _ = inner2.sched_tx.send(eval_id);
        }
    });
}

/// Re-runs every blocked evaluation (capacity was freed).
pub(crate) fn unblock(inner: &Arc<Inner>) {
    let ids: Vec<String> = {
        let mut st = inner.lock();
        let blocked: Vec<String> = st
            .evals
            .values()
            .filter(|e| e.status == "blocked")
            .map(|e| e.id.clone())
            .collect();
        if blocked.is_empty() {
            return;
        }
        let mut tx = Txn::new("EvaluationUpdated");
        for id in &blocked {
            if let Some(e) = st.evals.get_mut(id) {
                e.status = "pending".into();
            }
            tx.eval(id);
        }
        st.commit(tx);
        blocked
    };
    for id in ids {
        enqueue(inner, id, None);
    }
}

/// The scheduler loop: one evaluation at a time, `eval_delay` after it was queued.
pub(crate) async fn run(inner: Arc<Inner>, mut rx: tokio::sync::mpsc::UnboundedReceiver<String>) {
    loop {
        let id = tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            id = rx.recv() => match id { Some(id) => id, None => return },
        };
        if !inner.sleep(inner.config.eval_delay).await {
            return;
        }
        let (actions, freed) = process(&inner, &id);
        for a in actions {
            match a {
                ClientAction::Start(id) => client::start(&inner, id),
                ClientAction::Stop(id) => client::stop(&inner, id),
                ClientAction::Lost(id) => client::lost(&inner, id),
            }
        }
        if freed {
            unblock(&inner);
        }
    }
}

struct Placement {
    group: String,
    name: String,
    previous: Option<String>,
    reschedule: bool,
}

fn group_resources(group: &Value) -> GroupResources {
    let mut r = GroupResources::default();
    for t in group
        .get("Tasks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let res = t.get("Resources");
        let n = |k: &str| {
            res.and_then(|r| r.get(k))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        r.cpu += n("CPU");
        r.memory_mb += n("MemoryMB");
        r.memory_max_mb += n("MemoryMaxMB");
    }
    r.disk_mb = group
        .pointer("/EphemeralDisk/SizeMB")
        .and_then(Value::as_u64)
        .unwrap_or(300);
    r
}

fn group_ports(group: &Value) -> (Option<String>, Vec<(String, u16)>) {
    let Some(net) = group.pointer("/Networks/0") else {
        return (None, Vec::new());
    };
    let mode = net.get("Mode").and_then(Value::as_str).unwrap_or("host");
    let ports = net
        .get("DynamicPorts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            let label = p.get("Label").and_then(Value::as_str).unwrap_or_default();
            let to = p
                .get("To")
                .and_then(Value::as_i64)
                .and_then(|t| u16::try_from(t).ok())
                .unwrap_or(0);
            (label.to_owned(), to)
        })
        .collect();
    (Some(mode.to_owned()), ports)
}

fn name_index(name: &str) -> Option<usize> {
    let open = name.rfind('[')?;
    name.get(open + 1..name.len().saturating_sub(1))?
        .parse()
        .ok()
}

/// Free capacity per ready node, ports in use, in node creation order.
struct NodeRoom {
    id: String,
    name: String,
    cpu: i64,
    mem: i64,
    ports: BTreeSet<u16>,
}

fn node_rooms(st: &State, freed: &BTreeSet<String>) -> Vec<NodeRoom> {
    let mut nodes: Vec<_> = st.nodes.values().filter(|n| n.status == "ready").collect();
    nodes.sort_by_key(|n| n.create_index);
    nodes
        .into_iter()
        .map(|n| {
            let mut room = NodeRoom {
                id: n.id.clone(),
                name: n.name.clone(),
                cpu: i64::try_from(n.cpu_mhz).unwrap_or(i64::MAX),
                mem: i64::try_from(n.memory_mb).unwrap_or(i64::MAX),
                ports: BTreeSet::new(),
            };
            for a in st
                .allocs
                .values()
                .filter(|a| a.node_id == n.id && a.uses_resources() && !freed.contains(&a.id))
            {
                room.cpu -= i64::try_from(a.resources.cpu).unwrap_or(0);
                room.mem -= i64::try_from(a.resources.memory_mb).unwrap_or(0);
                room.ports.extend(a.ports.iter().map(|p| p.value));
            }
            room
        })
        .collect()
}

fn pick_port(inner: &Inner, used: &BTreeSet<u16>) -> Option<u16> {
    let range = inner.config.port_range.clone();
    let len = range.end.saturating_sub(range.start);
    if len == 0 {
        return None;
    }
    let start = fastrand::u16(0..len);
    (0..len)
        .map(|i| range.start + (start + i) % len)
        .find(|p| !used.contains(p))
}

/// Runs one evaluation; returns the client's work and whether capacity was freed.
pub(crate) fn process(inner: &Arc<Inner>, eval_id: &str) -> (Vec<ClientAction>, bool) {
    let mut st = inner.lock();
    let Some(eval) = st.evals.get(eval_id).cloned() else {
        return (Vec::new(), false);
    };
    if eval.status != "pending" {
        return (Vec::new(), false);
    }
    let key = (eval.namespace.clone(), eval.job_id.clone());
    let job = st.jobs.get(&key).filter(|j| !j.stop).cloned();
    let job_json = job.as_ref().map(|j| Arc::new(shapes::job(j)));
    let mut groups: Vec<String> = job
        .as_ref()
        .map(|j| {
            j.groups()
                .iter()
                .filter_map(|g| g.get("Name").and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for a in st.job_allocs(&key.0, &key.1) {
        if !groups.contains(&a.task_group) {
            groups.push(a.task_group.clone());
        }
    }

    let mut stops: Vec<(String, &'static str, bool)> = Vec::new();
    let mut places: Vec<Placement> = Vec::new();
    let mut inplace: Vec<String> = Vec::new();
    for g in &groups {
        let spec = job_json.as_ref().and_then(|j| group_of(j, g));
        let desired = spec
            .as_ref()
            .and_then(|s| s.get("Count"))
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        let mut allocs: Vec<&Alloc> = st
            .job_allocs(&key.0, &key.1)
            .into_iter()
            .filter(|a| &a.task_group == g && a.desired_status == "run")
            .collect();
        allocs.sort_by_key(|a| (a.create_index, a.name.clone()));
        let mut keep: Vec<&Alloc> = Vec::new();
        let mut replace: Vec<(&Alloc, bool)> = Vec::new();
        for a in allocs {
            let node_down = st.nodes.get(&a.node_id).is_none_or(|n| n.status == "down");
            match a.client_status.as_str() {
                "lost" | "complete" => {}
                _ if node_down && !a.client_terminal() => {
                    stops.push((a.id.clone(), "alloc is lost since its node is down", true));
                    replace.push((a, false));
                }
                "failed" if a.followup_eval_id == eval.id => {
                    stops.push((
                        a.id.clone(),
                        "alloc was rescheduled because it failed",
                        false,
                    ));
                    replace.push((a, true));
                }
                _ => keep.push(a),
            }
        }
        let total = keep.len() + replace.len();
        if total > desired {
            let mut surplus = total - desired;
            while surplus > 0 && replace.pop().is_some() {
                surplus -= 1;
            }
            while surplus > 0 {
                let Some(a) = keep.pop() else { break };
                stops.push((a.id.clone(), "alloc not needed due to job update", false));
                surplus -= 1;
            }
        }
        let mut used_names: BTreeSet<usize> = keep
            .iter()
            .chain(replace.iter().map(|(a, _)| a))
            .filter_map(|a| name_index(&a.name))
            .collect();
        for (a, reschedule) in &replace {
            places.push(Placement {
                group: g.clone(),
                name: a.name.clone(),
                previous: Some(a.id.clone()),
                reschedule: *reschedule,
            });
        }
        let missing = desired.saturating_sub(keep.len() + replace.len());
        for _ in 0..missing {
            let idx = (0..).find(|i| !used_names.contains(i)).unwrap_or(0);
            used_names.insert(idx);
            places.push(Placement {
                group: g.clone(),
                name: format!("{}.{g}[{idx}]", key.1),
                previous: None,
                reschedule: false,
            });
        }
        if let (Some(job), Some(job_json)) = (&job, &job_json) {
            for a in keep.iter().filter(|a| a.client_status != "failed") {
                if a.job_version == job.version {
                    continue;
                }
                if shapes::group_without_count(&a.job, g)
                    != shapes::group_without_count(job_json, g)
                {
                    stops.push((
                        a.id.clone(),
                        "alloc is being updated due to job update",
                        false,
                    ));
                    places.push(Placement {
                        group: g.clone(),
                        name: a.name.clone(),
                        previous: Some(a.id.clone()),
                        reschedule: false,
                    });
                } else {
                    inplace.push(a.id.clone());
                }
            }
        }
    }

    // Placement with capacity.
    let freed: BTreeSet<String> = stops.iter().map(|s| s.0.clone()).collect();
    let mut rooms = node_rooms(&st, &freed);
    let node_count = st.nodes.len();
    let mut new_allocs: Vec<Alloc> = Vec::new();
    let mut failures: BTreeMap<String, (u64, &'static str)> = BTreeMap::new();
    let now = now_ns();
    for p in &places {
        let (Some(job), Some(job_json)) = (&job, &job_json) else {
            continue;
        };
        let Some(spec) = group_of(job_json, &p.group) else {
            continue;
        };
        let res = group_resources(&spec);
        let (mode, wanted_ports) = group_ports(&spec);
        let mut dim = "memory";
        let mut chosen = None;
        for room in rooms.iter_mut() {
            if room.mem < i64::try_from(res.memory_mb).unwrap_or(i64::MAX) {
                dim = "memory";
                continue;
            }
            if room.cpu < i64::try_from(res.cpu).unwrap_or(i64::MAX) {
                dim = "cpu";
                continue;
            }
            let mut ports = Vec::new();
            let mut used = room.ports.clone();
            for (label, to) in &wanted_ports {
                let Some(v) = pick_port(inner, &used) else {
                    break;
                };
                used.insert(v);
                ports.push(PortMapping {
                    label: label.clone(),
                    value: v,
                    to: if *to == 0 { v } else { *to },
                    host_ip: "127.0.0.1".into(),
                });
            }
            if ports.len() != wanted_ports.len() {
                dim = "network: dynamic port selection failed";
                continue;
            }
            room.mem -= i64::try_from(res.memory_mb).unwrap_or(0);
            room.cpu -= i64::try_from(res.cpu).unwrap_or(0);
            room.ports = used;
            chosen = Some((room.id.clone(), room.name.clone(), ports));
            break;
        }
        let Some((node_id, node_name, ports)) = chosen else {
            let f = failures.entry(p.group.clone()).or_insert((0, dim));
            f.0 += 1;
            f.1 = dim;
            continue;
        };
        let previous = p.previous.as_ref().and_then(|id| st.allocs.get(id));
        let mut reschedule_events = previous
            .filter(|_| p.reschedule)
            .map(|a| a.reschedule_events.clone())
            .unwrap_or_default();
        if p.reschedule
            && let Some(prev) = previous
        {
            reschedule_events.push(RescheduleEvent {
                reschedule_time: now,
                prev_alloc_id: prev.id.clone(),
                prev_node_id: prev.node_id.clone(),
                delay: client::reschedule_delay(prev, inner).unwrap_or(0),
            });
        }
        new_allocs.push(Alloc {
            id: new_id(),
            namespace: key.0.clone(),
            eval_id: eval.id.clone(),
            name: p.name.clone(),
            node_id,
            node_name,
            job_id: key.1.clone(),
            job_type: job.job_type(),
            job_version: job.version,
            job: job_json.clone(),
            task_group: p.group.clone(),
            resources: res,
            network_mode: mode,
            ports,
            desired_status: "run".into(),
            desired_description: String::new(),
            client_status: "pending".into(),
            client_description: String::new(),
            task_states: None,
            previous_allocation: p.previous.clone().unwrap_or_default(),
            next_allocation: String::new(),
            reschedule_events,
            followup_eval_id: String::new(),
            create_index: 0,
            modify_index: 0,
            alloc_modify_index: 0,
            create_time: now,
            modify_time: now,
            restart_times: Vec::new(),
            epoch: 0,
        });
    }

    let mut actions = Vec::new();
    // PlanResult: the evaluation, new allocations, then stopped and updated ones.
    if !new_allocs.is_empty() || !stops.is_empty() || !inplace.is_empty() {
        let mut tx = Txn::new("PlanResult");
        tx.eval(&eval.id);
        let mut next_of: BTreeMap<String, String> = BTreeMap::new();
        for a in new_allocs {
            if !a.previous_allocation.is_empty() {
                next_of.insert(a.previous_allocation.clone(), a.id.clone());
            }
            actions.push(ClientAction::Start(a.id.clone()));
            tx.alloc(&a.id);
            st.allocs.insert(a.id.clone(), a);
        }
        for (id, desc, lost) in &stops {
            if let Some(a) = st.allocs.get_mut(id) {
                a.desired_status = "stop".into();
                a.desired_description = (*desc).into();
                if let Some(n) = next_of.get(id) {
                    a.next_allocation = n.clone();
                }
                a.epoch += 1;
                if *lost {
                    a.client_status = "lost".into();
                    a.client_description = "alloc is lost since its node is down".into();
                    actions.push(ClientAction::Lost(id.clone()));
                } else if !a.client_terminal() {
                    actions.push(ClientAction::Stop(id.clone()));
                }
                tx.alloc(id);
            }
        }
        let next_index = st.index + 1;
        for id in &inplace {
            if let (Some(a), Some(job), Some(job_json)) = (st.allocs.get_mut(id), &job, &job_json) {
                a.job_version = job.version;
                a.job = job_json.clone();
                a.eval_id = eval.id.clone();
                a.alloc_modify_index = next_index;
                tx.alloc(id);
            }
        }
        st.commit(tx);
    }

    // EvaluationUpdated: the evaluation completes (or stays blocked), maybe a blocked one.
    let mut tx = Txn::new("EvaluationUpdated");
    let queued: BTreeMap<String, u64> = groups
        .iter()
        .map(|g| (g.clone(), failures.get(g).map_or(0, |f| f.0)))
        .collect();
    let ready = st.nodes.values().filter(|n| n.status == "ready").count();
    let was_blocked = eval.status_description == BLOCKED_DESCRIPTION;
    let mut new_blocked = None;
    if let Some(e) = st.evals.get_mut(&eval.id) {
        e.queued_allocations = Some(queued.clone());
        if failures.is_empty() {
            e.status = "complete".into();
            e.failed_tg_allocs = None;
        } else {
            let metrics = failures
                .iter()
                .map(|(g, (n, dim))| {
                    (
                        g.clone(),
                        json!({"NodesEvaluated": ready, "NodesFiltered": 0, "NodesInPool": node_count,
                               "NodesAvailable": {"dc1": ready}, "ClassFiltered": null, "ConstraintFiltered": null,
                               "NodesExhausted": ready, "ClassExhausted": null,
                               "DimensionExhausted": if ready > 0 { json!({*dim: ready}) } else { Value::Null },
                               "QuotaExhausted": null, "ResourcesExhausted": null, "Scores": null,
                               "AllocationTime": 1000, "CoalescedFailures": n - 1, "ScoreMetaData": null}),
                    )
                })
                .collect();
            e.failed_tg_allocs = Some(metrics);
            if was_blocked {
                e.status = "blocked".into();
            } else {
                e.status = "complete".into();
                let mut b = Eval::pending(
                    &e.namespace,
                    &e.job_id,
                    &e.job_type,
                    e.priority,
                    &e.triggered_by,
                );
                b.status = "blocked".into();
                b.status_description = BLOCKED_DESCRIPTION.into();
                b.previous_eval = e.id.clone();
                b.job_modify_index = e.job_modify_index;
                e.blocked_eval = b.id.clone();
                new_blocked = Some(b);
            }
        }
    }
    tx.eval(&eval.id);
    if let Some(b) = new_blocked {
        // One blocked evaluation per job: older ones are canceled.
        let older: Vec<String> = st
            .evals
            .values()
            .filter(|o| o.status == "blocked" && o.job_id == b.job_id && o.namespace == b.namespace)
            .map(|o| o.id.clone())
            .collect();
        for id in older {
            if let Some(o) = st.evals.get_mut(&id) {
                o.status = "canceled".into();
            }
            tx.eval(&id);
        }
        tx.eval(&b.id);
        st.evals.insert(b.id.clone(), b);
    }
    if let Some(rec) = st.jobs.get_mut(&key) {
        rec.queued = queued;
    }
    st.commit(tx);
    (actions, !stops.is_empty())
}

/// `StatusDescription` of blocked evaluations.
pub(crate) const BLOCKED_DESCRIPTION: &str = "created to place remaining allocations";
