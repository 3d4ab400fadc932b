//! Every JSON answer and event payload against Nomad's OpenAPI component schemas
//! (reference/nomad-openapi.yaml), with `null` allowed wherever Go may send it, plus the fields
//! Poseidon reads being present and filled.

mod common;

use std::path::PathBuf;

use common::*;
use serde_json::{Map, Value, json};

fn openapi() -> Value {
    // Nomad's own OpenAPI document (hashicorp/nomad-openapi, MPL-2.0), kept unchanged in the
    // repository so the check runs on any clone.
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nomad-openapi.yaml");
    let y: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    serde_json::to_value(y).unwrap()
}

/// Inlines `$ref`s and makes every schema nullable (Go marshals nil pointers, slices and maps as
/// `null`).
fn nullable(schema: &Value, components: &Map<String, Value>, depth: usize) -> Value {
    if depth > 12 {
        return json!({});
    }
    match schema {
        Value::Object(m) => {
            if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                let name = r.rsplit('/').next().unwrap();
                let target = &components[name];
                return json!({"anyOf": [nullable(target, components, depth + 1), {"type": "null"}]});
            }
            let mut out = Map::new();
            for (k, v) in m {
                let v = match k.as_str() {
                    "properties" => Value::Object(
                        v.as_object()
                            .unwrap()
                            .iter()
                            .map(|(p, s)| (p.clone(), nullable(s, components, depth + 1)))
                            .collect(),
                    ),
                    "items" | "additionalProperties" if v.is_object() => {
                        nullable(v, components, depth + 1)
                    }
                    "type" => json!([v.clone(), "null"]),
                    "format" => continue,
                    _ => v.clone(),
                };
                out.insert(k.clone(), v);
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

struct Schemas {
    components: Map<String, Value>,
}

impl Schemas {
    fn new() -> Self {
        let api = openapi();
        Self {
            components: api["components"]["schemas"].as_object().unwrap().clone(),
        }
    }
    fn check(&self, name: &str, v: &Value) {
        let schema = nullable(&self.components[name], &self.components, 0);
        let validator = jsonschema::validator_for(&schema).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(v)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{name} does not conform: {errors:#?}\n{v:#}"
        );
    }
    fn check_list(&self, name: &str, v: &Value) {
        let items = v
            .as_array()
            .unwrap_or_else(|| panic!("{name} list is not an array: {v}"));
        assert!(!items.is_empty(), "{name} list is empty");
        for i in items {
            self.check(name, i);
        }
    }
}

fn filled(v: &Value, pointer: &str) {
    let x = v
        .pointer(pointer)
        .unwrap_or_else(|| panic!("{pointer} missing in {v:#}"));
    assert!(!x.is_null(), "{pointer} is null in {v:#}");
}

#[tokio::test]
async fn every_answer_conforms_to_nomads_schemas() {
    let s = Schemas::new();
    let emu = start_emulator(FakeRuntime::new()).await;
    let http = Http::new(&emu);
    let c = emu.control();
    let reg = http
        .put("/v1/jobs", json!({"Job": runner_job("c-1")}))
        .await;
    s.check("JobRegisterResponse", &reg.json());
    let alloc = wait_alloc_status(&c, "c-1", "running").await;
    let alloc_id = alloc["ID"].as_str().unwrap().to_owned();
    c.oom_kill(&alloc_id);
    c.wait_for(WAIT, |c| {
        c.allocs("c-1")[0]["ClientStatus"] == "running"
            && c.allocs("c-1")[0]["TaskStates"]["default-task"]["Restarts"] == 1
    })
    .await
    .unwrap();

    let job = http.get("/v1/job/c-1").await.json();
    s.check("Job", &job);
    for p in [
        "/ID",
        "/Status",
        "/TaskGroups/0/Name",
        "/TaskGroups/1/Meta/used",
        "/TaskGroups/0/Tasks/0/Resources/CPU",
        "/TaskGroups/0/Tasks/0/Resources/MemoryMaxMB",
        "/TaskGroups/0/Tasks/0/Config/image",
        "/TaskGroups/0/Networks/0/DynamicPorts/0/To",
        "/Version",
        "/JobModifyIndex",
    ] {
        filled(&job, p);
    }
    s.check_list("JobListStub", &http.get("/v1/jobs").await.json());
    let stubs = http.get("/v1/job/c-1/allocations").await.json();
    s.check_list("AllocationListStub", &stubs);
    s.check_list(
        "AllocationListStub",
        &http.get("/v1/allocations?resources=true").await.json(),
    );
    for p in [
        "/ID",
        "/JobID",
        "/ClientStatus",
        "/DesiredStatus",
        "/CreateTime",
        "/ModifyTime",
        "/NodeName",
        "/CreateIndex",
    ] {
        filled(&stubs[0], p);
    }
    let full = http.get(&format!("/v1/allocation/{alloc_id}")).await.json();
    s.check("Allocation", &full);
    for p in [
        "/ID",
        "/NodeID",
        "/TaskGroup",
        "/Job/ID",
        "/AllocatedResources/Shared/Ports/0/Value",
        "/AllocatedResources/Shared/Ports/0/To",
        "/AllocatedResources/Shared/Ports/0/HostIP",
        "/PreviousAllocation",
        "/NextAllocation",
        "/TaskStates/default-task/Events/0/Type",
        "/TaskStates/default-task/StartedAt",
    ] {
        filled(&full, p);
    }
    let evals = http.get("/v1/job/c-1/evaluations").await.json();
    s.check_list("Evaluation", &evals);
    s.check(
        "Evaluation",
        &http
            .get(&format!(
                "/v1/evaluation/{}",
                reg.json()["EvalID"].as_str().unwrap()
            ))
            .await
            .json(),
    );
    let nodes = http.get("/v1/nodes").await.json();
    s.check_list("NodeListStub", &nodes);
    let node = http
        .get(&format!("/v1/node/{}", nodes[0]["ID"].as_str().unwrap()))
        .await
        .json();
    s.check("Node", &node);
    filled(&node, "/HTTPAddr");
    s.check_list("Namespace", &http.get("/v1/namespaces").await.json());

    // A placement failure's evaluation.
    let n = nodes[0]["ID"].as_str().unwrap().to_owned();
    c.set_capacity(&n, 0, 0);
    let r = http.register(runner_job("c-2")).await;
    let eid = r["EvalID"].as_str().unwrap().to_owned();
    c.wait_for(WAIT, |c| {
        c.evals("c-2")
            .iter()
            .any(|e| e["ID"] == eid.as_str() && e["Status"] == "complete")
    })
    .await
    .unwrap();
    let failed = http.get(&format!("/v1/evaluation/{eid}")).await.json();
    s.check("Evaluation", &failed);
    filled(&failed, "/FailedTGAllocs/default-group/NodesEvaluated");

    let dereg = http.delete("/v1/job/c-1?purge=true").await.json();
    s.check("JobDeregisterResponse", &dereg);
    wait_alloc_status(&c, "c-1", "complete").await;

    // Event payloads.
    let mut kinds = std::collections::BTreeSet::new();
    for b in c.events() {
        for e in &b.events {
            let (name, obj) = match e.topic.as_str() {
                "Allocation" => ("Allocation", &e.payload["Allocation"]),
                "Evaluation" => ("Evaluation", &e.payload["Evaluation"]),
                "Job" => ("Job", &e.payload["Job"]),
                "Node" => ("Node", &e.payload["Node"]),
                other => panic!("unexpected topic {other}"),
            };
            s.check(name, obj);
            kinds.insert(e.topic.clone());
        }
    }
    assert_eq!(kinds.len(), 4, "{kinds:?}");
    emu.shutdown().await;
}

#[test]
fn the_schema_check_can_fail() {
    let s = Schemas::new();
    let bad = json!({"ID": 5, "ClientStatus": ["x"]});
    let schema = nullable(&s.components["Allocation"], &s.components, 0);
    let v = jsonschema::validator_for(&schema).unwrap();
    assert!(!v.is_valid(&bad));
    assert!(v.is_valid(&json!({"ID": "x", "Job": null, "TaskStates": null})));
}
