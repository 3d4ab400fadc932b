//! Nomad's job canonicalisation on register (nomad.md §2.4) and spec-change detection (§1.1).
//!
//! Jobs stay `serde_json::Value`s so fields the emulator does not know survive a round trip.
//! Go decodes keys case-insensitively: keys matching a known field name in another case are
//! renamed to Nomad's spelling (user maps such as `Meta`, `Env` and driver `Config` are left
//! alone). `null`s mean "unset" and are dropped before the defaults are applied.

use serde_json::{Map, Value, json};

/// Job fields the server owns; ignored when a client sends them.
const SERVER_FIELDS: &[&str] = &[
    "Status",
    "StatusDescription",
    "Version",
    "CreateIndex",
    "ModifyIndex",
    "JobModifyIndex",
    "SubmitTime",
    "Stable",
];

/// Field names in Nomad's spelling, used to fix the case of keys.
const KNOWN_FIELDS: &[&str] = &[
    "ID",
    "Name",
    "Namespace",
    "Region",
    "Type",
    "Priority",
    "AllAtOnce",
    "Datacenters",
    "NodePool",
    "Constraints",
    "Affinities",
    "TaskGroups",
    "Update",
    "Multiregion",
    "Spreads",
    "Periodic",
    "ParameterizedJob",
    "Reschedule",
    "Migrate",
    "Meta",
    "Stop",
    "ParentID",
    "Count",
    "Tasks",
    "RestartPolicy",
    "ReschedulePolicy",
    "EphemeralDisk",
    "Networks",
    "Driver",
    "User",
    "Config",
    "Env",
    "Resources",
    "LogConfig",
    "KillTimeout",
    "KillSignal",
    "CPU",
    "Cores",
    "MemoryMB",
    "MemoryMaxMB",
    "DiskMB",
    "Attempts",
    "Interval",
    "Delay",
    "Mode",
    "DelayFunction",
    "MaxDelay",
    "Unlimited",
    "Sticky",
    "SizeMB",
    "MaxFiles",
    "MaxFileSizeMB",
    "Disabled",
    "DynamicPorts",
    "ReservedPorts",
    "Label",
    "Value",
    "To",
    "HostNetwork",
    "Attribute",
    "Weight",
    "LTarget",
    "RTarget",
    "Operand",
    "Services",
    "RenderTemplates",
    "Leader",
    "Lifecycle",
    "Templates",
    "Artifacts",
    "Job",
    "EnforceIndex",
    "JobModifyIndex",
    "PolicyOverride",
    "PreserveCounts",
    "Submission",
    "EvalPriority",
    "Status",
    "Version",
    "CreateIndex",
    "ModifyIndex",
    "SubmitTime",
    "Stable",
];

/// Keys whose values are user maps: their keys keep their case.
const USER_MAPS: &[&str] = &["Meta", "Env", "Config", "Submission"];

/// Renames keys to Nomad's spelling, recursively, except inside user maps.
pub(crate) fn normalize_keys(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, val) in m {
                let key = KNOWN_FIELDS
                    .iter()
                    .find(|f| f.eq_ignore_ascii_case(&k))
                    .map_or(k, |f| (*f).to_owned());
                let val = if USER_MAPS.contains(&key.as_str()) {
                    val
                } else {
                    normalize_keys(val)
                };
                out.insert(key, val);
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.into_iter().map(normalize_keys).collect()),
        other => other,
    }
}

/// Drops `null` members recursively (Go treats them as unset).
fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

/// Why a job cannot be registered; the text is Nomad's answer (status 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct InvalidJob(pub String);

fn set_default(m: &mut Map<String, Value>, k: &str, v: Value) {
    if !m.contains_key(k) {
        m.insert(k.to_owned(), v);
    }
}

fn merge_defaults(m: &mut Map<String, Value>, k: &str, defaults: &Value) {
    let entry = m.entry(k.to_owned()).or_insert_with(|| json!({}));
    if let (Value::Object(target), Value::Object(d)) = (entry, defaults) {
        for (dk, dv) in d {
            target.entry(dk.clone()).or_insert_with(|| dv.clone());
        }
    }
}

const HOUR: i64 = 3_600_000_000_000;
const SEC: i64 = 1_000_000_000;

/// Canonicalises a job body for `namespace`: validation, defaults, server fields removed.
pub(crate) fn canonicalize(job: Value, namespace: &str) -> Result<Value, InvalidJob> {
    let job = strip_nulls(normalize_keys(job));
    let Value::Object(mut m) = job else {
        return Err(InvalidJob("Job must be specified".into()));
    };
    for f in SERVER_FIELDS {
        m.remove(*f);
    }
    m.remove("Stop");
    let id = match m.get("ID") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(InvalidJob("Job ID hasn't been provided".into())),
    };
    set_default(&mut m, "Region", json!("global"));
    m.insert("Namespace".into(), json!(namespace));
    set_default(&mut m, "Priority", json!(50));
    set_default(&mut m, "Type", json!("service"));
    set_default(&mut m, "Name", json!(id));
    set_default(&mut m, "ParentID", json!(""));
    set_default(&mut m, "AllAtOnce", json!(false));
    set_default(&mut m, "NodePool", json!("default"));
    set_default(&mut m, "Datacenters", json!(["*"]));
    let batch = m.get("Type").and_then(Value::as_str) == Some("batch");
    let (restart, reschedule) = if batch {
        (
            json!({"Attempts": 3, "Interval": 24 * HOUR, "Delay": 15 * SEC, "Mode": "fail", "RenderTemplates": false}),
            json!({"Attempts": 1, "Interval": 24 * HOUR, "Delay": 5 * SEC, "DelayFunction": "constant", "MaxDelay": 0, "Unlimited": false}),
        )
    } else {
        (
            json!({"Attempts": 2, "Interval": 1800 * SEC, "Delay": 15 * SEC, "Mode": "fail", "RenderTemplates": false}),
            json!({"Attempts": 0, "Interval": 0, "Delay": 30 * SEC, "DelayFunction": "exponential", "MaxDelay": HOUR, "Unlimited": true}),
        )
    };
    let groups = match m.get_mut("TaskGroups") {
        Some(Value::Array(g)) => g,
        _ => {
            return Err(InvalidJob(
                "1 error occurred:\n\t* Missing job task groups\n\n".into(),
            ));
        }
    };
    if groups.is_empty() {
        return Err(InvalidJob(
            "1 error occurred:\n\t* Missing job task groups\n\n".into(),
        ));
    }
    let mut group_names = Vec::new();
    for g in groups.iter_mut() {
        let Value::Object(gm) = g else {
            return Err(InvalidJob("Task group must be an object".into()));
        };
        let gname = gm
            .get("Name")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| InvalidJob("1 error occurred:\n\t* Missing task group name\n\n".into()))?
            .to_owned();
        if group_names.contains(&gname) {
            return Err(InvalidJob(format!(
                "1 error occurred:\n\t* Job task group {} redefines '{gname}'\n\n",
                group_names.len() + 1
            )));
        }
        group_names.push(gname.clone());
        set_default(gm, "Count", json!(1));
        merge_defaults(
            gm,
            "EphemeralDisk",
            &json!({"Sticky": false, "Migrate": false, "SizeMB": 300}),
        );
        merge_defaults(gm, "RestartPolicy", &restart);
        merge_defaults(gm, "ReschedulePolicy", &reschedule);
        let group_restart = gm.get("RestartPolicy").cloned().unwrap_or(Value::Null);
        let tasks = match gm.get_mut("Tasks") {
            Some(Value::Array(t)) if !t.is_empty() => t,
            _ => {
                return Err(InvalidJob(format!(
                    "1 error occurred:\n\t* Task group {gname} validation failed: 1 error occurred:\n\t* Missing tasks for task group\n\n"
                )));
            }
        };
        let mut task_names = Vec::new();
        for t in tasks.iter_mut() {
            let Value::Object(tm) = t else {
                return Err(InvalidJob("Task must be an object".into()));
            };
            let tname = tm
                .get("Name")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    InvalidJob(format!(
                        "Task group {gname} validation failed: Missing task name"
                    ))
                })?
                .to_owned();
            if task_names.contains(&tname) {
                return Err(InvalidJob(format!(
                    "Task group {gname} validation failed: Task {} redefines '{tname}'",
                    task_names.len() + 1
                )));
            }
            if tm
                .get("Driver")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(InvalidJob(format!(
                    "Task group {gname} validation failed: Task {tname} validation failed: Missing task driver"
                )));
            }
            task_names.push(tname);
            merge_defaults(
                tm,
                "Resources",
                &json!({"CPU": 100, "Cores": 0, "MemoryMB": 300}),
            );
            merge_defaults(
                tm,
                "LogConfig",
                &json!({"MaxFiles": 10, "MaxFileSizeMB": 10, "Disabled": false}),
            );
            merge_defaults(tm, "RestartPolicy", &group_restart);
            set_default(tm, "KillTimeout", json!(5 * SEC));
        }
    }
    Ok(Value::Object(m))
}

/// Whether two canonical specs differ (any field, including a group's `Meta`).
pub(crate) fn spec_changed(old: &Value, new: &Value) -> bool {
    old != new
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_job_gets_nomads_defaults() {
        let j = json!({"id": "a", "Type": "batch", "TaskGroups": [{"Name": "g", "Tasks": [{"Name": "t", "Driver": "docker", "Config": {"image": "x"}}]}], "Meta": {"used": "false"}, "Status": "running", "Constraints": null});
        let c = canonicalize(j, "default").unwrap();
        assert_eq!(c["ID"], "a");
        assert_eq!(c["Name"], "a");
        assert_eq!(c["Priority"], 50);
        assert_eq!(c["TaskGroups"][0]["Count"], 1);
        assert_eq!(c["TaskGroups"][0]["RestartPolicy"]["Attempts"], 3);
        assert_eq!(
            c["TaskGroups"][0]["ReschedulePolicy"]["DelayFunction"],
            "constant"
        );
        assert_eq!(c["TaskGroups"][0]["Tasks"][0]["Resources"]["MemoryMB"], 300);
        assert_eq!(c["TaskGroups"][0]["Tasks"][0]["Config"]["image"], "x");
        assert!(c.get("Status").is_none());
        assert!(c.get("Constraints").is_none());
    }

    #[test]
    fn round_trip_of_a_read_job_is_no_change() {
        let j = json!({"ID": "a", "TaskGroups": [{"Name": "g", "Count": 0, "Tasks": [{"Name": "t", "Driver": "exec"}]}]});
        let c = canonicalize(j, "default").unwrap();
        let mut read = c.clone();
        read["Status"] = json!("dead");
        read["Version"] = json!(3);
        read["Affinities"] = Value::Null;
        let again = canonicalize(read, "default").unwrap();
        assert!(!spec_changed(&c, &again));
        assert_eq!(c["TaskGroups"][0]["Count"], 0);
    }

    #[test]
    fn invalid_jobs_are_refused() {
        assert!(canonicalize(json!({"Name": "x"}), "default").is_err());
        assert!(
            canonicalize(
                json!({"ID": "x", "TaskGroups": [{"Name": "g", "Tasks": []}]}),
                "default"
            )
            .is_err()
        );
        assert!(
            canonicalize(
                json!({"ID": "x", "TaskGroups": [{"Name": "g", "Tasks": [{"Name": "t"}]}]}),
                "default"
            )
            .is_err()
        );
    }
}
