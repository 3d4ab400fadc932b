//! The cluster state and its write rule (nomad.md §5.3): every visible change is one commit, one
//! raft index, one event batch, collapsed per object and ordered by last write.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::events::{Broker, Event, EventBatch};
use crate::model::{Alloc, Eval, JobRecord, Node, now_ns};
use crate::shapes;

/// The raft index each table last changed at (`X-Nomad-Index` of reads).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(crate) struct Tables {
    pub jobs: u64,
    pub evals: u64,
    pub allocs: u64,
    pub nodes: u64,
}

/// A table, for blocking queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Table {
    Jobs,
    Evals,
    Allocs,
    Nodes,
}

impl Tables {
    pub fn get(&self, t: Table) -> u64 {
        match t {
            Table::Jobs => self.jobs,
            Table::Evals => self.evals,
            Table::Allocs => self.allocs,
            Table::Nodes => self.nodes,
        }
    }
}

/// What `data_dir` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Persisted {
    pub index: u64,
    pub tables: Tables,
    pub nodes: Vec<Node>,
    pub jobs: Vec<JobRecord>,
    pub evals: Vec<Eval>,
    pub allocs: Vec<Alloc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Obj {
    Job(String, String),
    Eval(String),
    Alloc(String),
    Node(String),
}

/// The objects one write touched, in write order, and the raft message type.
#[derive(Debug)]
pub(crate) struct Txn {
    kind: &'static str,
    touched: Vec<Obj>,
    deleted_jobs: HashMap<(String, String), Value>,
}

impl Txn {
    /// A write of raft message type `kind` (the events' `Type`).
    pub fn new(kind: &'static str) -> Self {
        Self {
            kind,
            touched: Vec::new(),
            deleted_jobs: HashMap::new(),
        }
    }
    /// The job `(ns, id)` was written.
    pub fn job(&mut self, ns: &str, id: &str) {
        self.touched.push(Obj::Job(ns.to_owned(), id.to_owned()));
    }
    /// The job was deleted; `last` is its last JSON.
    pub fn job_deleted(&mut self, ns: &str, id: &str, last: Value) {
        self.deleted_jobs
            .insert((ns.to_owned(), id.to_owned()), last);
        self.job(ns, id);
    }
    /// The evaluation was written.
    pub fn eval(&mut self, id: &str) {
        self.touched.push(Obj::Eval(id.to_owned()));
    }
    /// The allocation was written.
    pub fn alloc(&mut self, id: &str) {
        self.touched.push(Obj::Alloc(id.to_owned()));
    }
    /// The node was written.
    pub fn node(&mut self, id: &str) {
        self.touched.push(Obj::Node(id.to_owned()));
    }
}

/// The whole cluster.
#[derive(Debug)]
pub(crate) struct State {
    pub index: u64,
    pub tables: Tables,
    pub namespaces: BTreeSet<String>,
    pub nodes: BTreeMap<String, Node>,
    pub jobs: BTreeMap<(String, String), JobRecord>,
    pub evals: BTreeMap<String, Eval>,
    pub allocs: BTreeMap<String, Alloc>,
    pub broker: Broker,
    /// Raised to the raft index after every commit (blocking queries, `wait_for`, persistence).
    pub index_tx: watch::Sender<u64>,
    /// The emulator's `host:port` (`HTTPAddr` of nodes).
    pub http_addr: String,
}

/// §2.5: a job's status from its allocations and evaluations.
fn job_status(state: &State, rec: &JobRecord) -> String {
    let allocs = || {
        state
            .allocs
            .values()
            .filter(|a| a.namespace == rec.namespace && a.job_id == rec.id)
    };
    if allocs().any(|a| !a.is_terminal()) {
        return "running".into();
    }
    let mut evals = state
        .evals
        .values()
        .filter(|e| e.namespace == rec.namespace && e.job_id == rec.id)
        .peekable();
    let any_eval = evals.peek().is_some();
    if evals.any(|e| !e.is_terminal()) {
        return "pending".into();
    }
    if any_eval || rec.stop {
        "dead".into()
    } else {
        "pending".into()
    }
}

impl State {
    /// A fresh state at index 1 (cluster bootstrap).
    pub fn new(namespaces: BTreeSet<String>, broker: Broker, http_addr: String) -> Self {
        let (index_tx, _) = watch::channel(1);
        Self {
            index: 1,
            tables: Tables::default(),
            namespaces,
            nodes: BTreeMap::new(),
            jobs: BTreeMap::new(),
            evals: BTreeMap::new(),
            allocs: BTreeMap::new(),
            broker,
            index_tx,
            http_addr,
        }
    }

    /// Replaces the tables with a persisted snapshot.
    pub fn restore(&mut self, p: Persisted) {
        self.index = p.index;
        self.tables = p.tables;
        self.nodes = p.nodes.into_iter().map(|n| (n.id.clone(), n)).collect();
        self.jobs = p
            .jobs
            .into_iter()
            .map(|j| ((j.namespace.clone(), j.id.clone()), j))
            .collect();
        self.evals = p.evals.into_iter().map(|e| (e.id.clone(), e)).collect();
        self.allocs = p.allocs.into_iter().map(|a| (a.id.clone(), a)).collect();
        self.index_tx.send_replace(self.index);
    }

    /// A snapshot for `data_dir`.
    pub fn persisted(&self) -> Persisted {
        Persisted {
            index: self.index,
            tables: self.tables,
            nodes: self.nodes.values().cloned().collect(),
            jobs: self.jobs.values().cloned().collect(),
            evals: self.evals.values().cloned().collect(),
            allocs: self.allocs.values().cloned().collect(),
        }
    }

    /// The allocations of job `(ns, id)`.
    pub fn job_allocs(&self, ns: &str, id: &str) -> Vec<&Alloc> {
        self.allocs
            .values()
            .filter(|a| a.namespace == ns && a.job_id == id)
            .collect()
    }

    /// Applies a write: one new raft index, `ModifyIndex`/`ModifyTime` of every touched object,
    /// job statuses recomputed, one event batch. Returns the index (`None`: nothing touched).
    pub fn commit(&mut self, tx: Txn) -> Option<u64> {
        if tx.touched.is_empty() {
            return None;
        }
        self.index += 1;
        let index = self.index;
        let now = now_ns();
        // Collapse per object, ordered by the last write.
        let mut seen = std::collections::HashSet::new();
        let mut order: Vec<Obj> = Vec::new();
        for o in tx.touched.iter().rev() {
            if seen.insert(o.clone()) {
                order.push(o.clone());
            }
        }
        order.reverse();
        let mut affected_jobs: BTreeSet<(String, String)> = BTreeSet::new();
        for o in &order {
            match o {
                Obj::Job(ns, id) => {
                    self.tables.jobs = index;
                    if let Some(j) = self.jobs.get_mut(&(ns.clone(), id.clone())) {
                        j.modify_index = index;
                        if j.create_index == 0 {
                            j.create_index = index;
                            j.job_modify_index = index;
                        }
                        affected_jobs.insert((ns.clone(), id.clone()));
                    }
                }
                Obj::Eval(id) => {
                    self.tables.evals = index;
                    if let Some(e) = self.evals.get_mut(id) {
                        e.modify_index = index;
                        e.modify_time = now;
                        if e.create_index == 0 {
                            e.create_index = index;
                            e.snapshot_index = index;
                        }
                        affected_jobs.insert((e.namespace.clone(), e.job_id.clone()));
                    }
                }
                Obj::Alloc(id) => {
                    self.tables.allocs = index;
                    if let Some(a) = self.allocs.get_mut(id) {
                        a.modify_index = index;
                        a.modify_time = now;
                        if a.create_index == 0 {
                            a.create_index = index;
                            a.alloc_modify_index = index;
                            a.create_time = now;
                        }
                        affected_jobs.insert((a.namespace.clone(), a.job_id.clone()));
                    }
                }
                Obj::Node(id) => {
                    self.tables.nodes = index;
                    if let Some(n) = self.nodes.get_mut(id) {
                        n.modify_index = index;
                        if n.create_index == 0 {
                            n.create_index = index;
                        }
                    }
                }
            }
        }
        for key in affected_jobs {
            let Some(rec) = self.jobs.get(&key) else {
                continue;
            };
            let status = job_status(self, rec);
            if status != rec.status {
                if let Some(rec) = self.jobs.get_mut(&key) {
                    rec.status = status;
                    rec.modify_index = index;
                }
                self.tables.jobs = index;
                let o = Obj::Job(key.0.clone(), key.1.clone());
                if !order.contains(&o) {
                    order.push(o);
                }
            }
        }
        let events = order
            .iter()
            .filter_map(|o| self.event_of(o, tx.kind, index, &tx.deleted_jobs))
            .collect();
        self.broker.publish(EventBatch { index, events });
        self.index_tx.send_replace(index);
        Some(index)
    }

    fn event_of(
        &self,
        o: &Obj,
        kind: &str,
        index: u64,
        deleted: &HashMap<(String, String), Value>,
    ) -> Option<Event> {
        let ev = |topic: &str, key: &str, ns: &str, fk: Option<Vec<String>>, payload| Event {
            topic: topic.into(),
            event_type: kind.into(),
            key: key.into(),
            namespace: ns.into(),
            filter_keys: fk,
            index,
            payload,
        };
        match o {
            Obj::Job(ns, id) => {
                if let Some(last) = deleted.get(&(ns.clone(), id.clone())) {
                    return Some(ev(
                        "Job",
                        id,
                        ns,
                        None,
                        json!({"Job": last, "Deleted": true}),
                    ));
                }
                let rec = self.jobs.get(&(ns.clone(), id.clone()))?;
                Some(ev("Job", id, ns, None, json!({"Job": shapes::job(rec)})))
            }
            Obj::Eval(id) => {
                let e = self.evals.get(id)?;
                Some(ev(
                    "Evaluation",
                    id,
                    &e.namespace,
                    Some(vec![e.job_id.clone(), String::new()]),
                    json!({"Evaluation": shapes::eval(e)}),
                ))
            }
            Obj::Alloc(id) => {
                let a = self.allocs.get(id)?;
                Some(ev(
                    "Allocation",
                    id,
                    &a.namespace,
                    Some(vec![a.job_id.clone(), String::new()]),
                    json!({"Allocation": shapes::alloc(a, false)}),
                ))
            }
            Obj::Node(id) => {
                let n = self.nodes.get(id)?;
                Some(ev(
                    "Node",
                    id,
                    "",
                    None,
                    json!({"Node": shapes::node(n, &self.http_addr)}),
                ))
            }
        }
    }
}
