//! Poseidon's job layout (nomad.md §2): the template job `template-<envId>` of an environment,
//! runner jobs `<envId>-<uuid>` cloned from it, and the count-0 `config` group whose meta holds
//! `prewarmingPoolSize` (templates) and `used`/`timeout` (runners).
//!
//! Jobs are `serde_json::Value`s in Nomad's JSON shape: what Nomad returns is changed in place
//! and sent back, so fields this code does not know survive a read-modify-write.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use runner_core::{EnvironmentId, EnvironmentSpec, MappedPort, RunnerId, RunnerState, UsedState};
use serde_json::{Value, json};

/// The task group that runs the runner's container.
pub const MAIN_GROUP: &str = "default-group";
/// The task commands run in.
pub const MAIN_TASK: &str = "default-task";
/// The count-0 group holding the meta flags (changing a running group's meta would restart it).
pub const CONFIG_GROUP: &str = "config";
/// Template job id prefix.
pub const TEMPLATE_PREFIX: &str = "template-";
/// Meta key: whether a runner is claimed (`"true"`/`"false"`).
pub const META_USED: &str = "used";
/// Meta key: a claimed runner's inactivity timeout in seconds.
pub const META_TIMEOUT: &str = "timeout";
/// Meta key (ours): a claimed runner's expiry, unix seconds, when it has one.
pub const META_DEADLINE: &str = "deadline";
/// Meta key: the environment's pool size (templates only).
pub const META_POOL_SIZE: &str = "prewarmingPoolSize";
/// Memory reserved for a runner (MB), as Poseidon's template; `memoryLimit` is the hard limit.
const MEMORY_RESERVATION_MB: u32 = 50;
/// CPU share when the environment asks for none (Poseidon's template value).
const DEFAULT_CPU_MHZ: u32 = 40;

/// The template job id of an environment.
pub fn template_id(environment: EnvironmentId) -> String {
    format!("{TEMPLATE_PREFIX}{environment}")
}

/// The environment of a template job id (`template-<int>`, exactly two parts).
pub fn environment_of_template(job_id: &str) -> Option<EnvironmentId> {
    job_id.strip_prefix(TEMPLATE_PREFIX)?.parse().ok()
}

/// The environment of a runner job id (`<int>-<rest>`).
pub fn environment_of_runner(job_id: &str) -> Option<EnvironmentId> {
    let (env, rest) = job_id.split_once('-')?;
    if rest.is_empty() {
        return None;
    }
    env.parse().ok()
}

/// How jobs are shaped for this installation.
#[derive(Debug, Clone)]
pub struct JobShape {
    /// The group network of environments with network access (its ports are added).
    pub network: crate::config::NetworkConfig,
    /// Never set `force_pull`.
    pub disable_force_pull: bool,
    /// The datacenters jobs may run in.
    pub datacenters: Vec<String>,
}

impl Default for JobShape {
    fn default() -> Self {
        Self {
            network: crate::config::NetworkConfig::default(),
            disable_force_pull: false,
            datacenters: vec!["dc1".into()],
        }
    }
}

impl JobShape {
    /// The template job of `spec` (nomad.md §2.2), with `force_pull` unless disabled.
    pub fn template(&self, spec: &EnvironmentSpec) -> Value {
        let id = template_id(spec.id);
        let mut job = self.job(&id, spec, !self.disable_force_pull);
        set_meta(
            &mut job,
            META_POOL_SIZE,
            Some(spec.prewarming_pool_size.to_string()),
        );
        job
    }

    /// A runner job of `spec` with id `runner` (nomad.md §2.3): the template's shape, meta
    /// exactly `{"used": "false"}`.
    pub fn runner(&self, spec: &EnvironmentSpec, runner: &RunnerId, force_pull: bool) -> Value {
        self.job(
            runner.as_str(),
            spec,
            force_pull && !self.disable_force_pull,
        )
    }

    fn job(&self, id: &str, spec: &EnvironmentSpec, force_pull: bool) -> Value {
        let cpu = if spec.cpu_limit == 0 {
            DEFAULT_CPU_MHZ
        } else {
            spec.cpu_limit
        };
        let mut resources = json!({"CPU": cpu, "MemoryMB": MEMORY_RESERVATION_MB});
        if spec.memory_limit > 0 {
            resources["MemoryMB"] = json!(MEMORY_RESERVATION_MB.min(spec.memory_limit));
            resources["MemoryMaxMB"] = json!(spec.memory_limit);
        }
        let (network_mode, networks) = if spec.network_access {
            let ports: Vec<Value> = spec
                .exposed_ports
                .iter()
                .map(|p| json!({"Label": p.to_string(), "To": p}))
                .collect();
            let mut network = self.network.to_nomad();
            network["DynamicPorts"] = json!(ports);
            ("", json!([network]))
        } else {
            ("none", json!([]))
        };
        json!({
            "ID": id,
            "Name": id,
            "Type": "batch",
            "Datacenters": self.datacenters,
            "TaskGroups": [
                {
                    "Name": MAIN_GROUP,
                    "Count": 1,
                    "EphemeralDisk": {"Migrate": false, "SizeMB": 10, "Sticky": false},
                    "Spreads": [{"Attribute": "${node.unique.name}", "Weight": 100}],
                    "RestartPolicy": {"Attempts": 3, "Delay": 15_000_000_000_i64,
                                      "Interval": 3_600_000_000_000_i64, "Mode": "fail"},
                    "ReschedulePolicy": {"Unlimited": false, "Attempts": 3,
                                         "Interval": 21_600_000_000_000_i64, "Delay": 60_000_000_000_i64,
                                         "MaxDelay": 240_000_000_000_i64, "DelayFunction": "exponential"},
                    "Networks": networks,
                    "Tasks": [{
                        "Name": MAIN_TASK,
                        "Driver": "docker",
                        "KillTimeout": 0,
                        "KillSignal": "SIGKILL",
                        "Config": {
                            "image": spec.image,
                            "command": "sleep",
                            "args": ["infinity"],
                            "network_mode": network_mode,
                            "force_pull": force_pull,
                        },
                        "LogConfig": {"MaxFiles": 1, "MaxFileSizeMB": 1},
                        "Resources": resources,
                    }],
                },
                {
                    "Name": CONFIG_GROUP,
                    "Count": 0,
                    "Tasks": [{
                        "Name": CONFIG_GROUP,
                        "Driver": "exec",
                        "Config": {"command": "true"},
                        "LogConfig": {"MaxFiles": 1, "MaxFileSizeMB": 1},
                        "Resources": {"CPU": 1, "MemoryMB": 10},
                    }],
                    "Meta": {META_USED: "false"},
                }
            ],
        })
    }
}

fn group<'a>(job: &'a Value, name: &str) -> Option<&'a Value> {
    job["TaskGroups"]
        .as_array()?
        .iter()
        .find(|g| g["Name"].as_str() == Some(name))
}

fn group_mut<'a>(job: &'a mut Value, name: &str) -> Option<&'a mut Value> {
    job.get_mut("TaskGroups")?
        .as_array_mut()?
        .iter_mut()
        .find(|g| g["Name"].as_str() == Some(name))
}

fn main_task(job: &Value) -> Option<&Value> {
    group(job, MAIN_GROUP)?["Tasks"]
        .as_array()?
        .iter()
        .find(|t| t["Name"].as_str() == Some(MAIN_TASK))
}

/// A `config` meta value.
pub fn meta(job: &Value, key: &str) -> Option<String> {
    group(job, CONFIG_GROUP)?["Meta"][key]
        .as_str()
        .map(str::to_string)
}

/// Sets (or with `None` removes) a `config` meta value; creates the group's meta if needed.
/// Returns false when the job has no `config` group.
pub fn set_meta(job: &mut Value, key: &str, value: Option<String>) -> bool {
    let Some(g) = group_mut(job, CONFIG_GROUP) else {
        return false;
    };
    if !g["Meta"].is_object() {
        g["Meta"] = json!({});
    }
    let Some(m) = g["Meta"].as_object_mut() else {
        return false;
    };
    match value {
        Some(v) => {
            m.insert(key.to_string(), Value::String(v));
        }
        None => {
            m.remove(key);
        }
    }
    true
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Writes `state` into the runner job's meta: `used`, `timeout` (kept on un-claim, as Poseidon)
/// and our `deadline`.
pub fn set_runner_state(job: &mut Value, state: &RunnerState) -> bool {
    match state {
        RunnerState::Idle => {
            set_meta(job, META_DEADLINE, None) && set_meta(job, META_USED, Some("false".into()))
        }
        RunnerState::Used(used) => {
            set_meta(job, META_USED, Some("true".into()))
                && set_meta(
                    job,
                    META_TIMEOUT,
                    Some(used.inactivity_timeout.as_secs().to_string()),
                )
                && set_meta(
                    job,
                    META_DEADLINE,
                    used.deadline.map(|d| unix_seconds(d).to_string()),
                )
        }
    }
}

/// The state a runner job's meta records: `None` for idle, the used state otherwise. A
/// `timeout` that does not parse counts as 60 s (Poseidon's fallback).
pub fn runner_state(job: &Value) -> Option<UsedState> {
    if meta(job, META_USED).as_deref() != Some("true") {
        return None;
    }
    let timeout = meta(job, META_TIMEOUT)
        .and_then(|t| t.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(60), Duration::from_secs);
    let deadline = meta(job, META_DEADLINE)
        .and_then(|d| d.trim().parse::<u64>().ok())
        .map(|s| UNIX_EPOCH + Duration::from_secs(s));
    Some(UsedState {
        inactivity_timeout: timeout,
        deadline,
    })
}

/// The environment a template job describes (nomad.md §2.2 read back), if it is one.
pub fn spec_of_template(job: &Value) -> Option<EnvironmentSpec> {
    let id = environment_of_template(job["ID"].as_str()?)?;
    let task = main_task(job)?;
    let image = task["Config"]["image"].as_str()?.to_string();
    let number = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    let cpu_limit = number(&task["Resources"]["CPU"]).unwrap_or(0);
    let memory_limit = number(&task["Resources"]["MemoryMaxMB"]).unwrap_or(0);
    let network_access = task["Config"]["network_mode"].as_str() != Some("none");
    let exposed_ports = group(job, MAIN_GROUP)
        .and_then(|g| g["Networks"].as_array())
        .and_then(|n| n.first())
        .and_then(|n| n["DynamicPorts"].as_array())
        .map(|ports| {
            ports
                .iter()
                .filter_map(|p| p["To"].as_u64().and_then(|t| u16::try_from(t).ok()))
                .collect()
        })
        .unwrap_or_default();
    let prewarming_pool_size = meta(job, META_POOL_SIZE)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    Some(EnvironmentSpec {
        id,
        image,
        prewarming_pool_size,
        cpu_limit,
        memory_limit,
        network_access,
        exposed_ports,
    })
}

/// The mapped ports of an allocation (`AllocatedResources.Shared.Ports`).
pub fn mapped_ports(alloc: &Value) -> Vec<MappedPort> {
    alloc["AllocatedResources"]["Shared"]["Ports"]
        .as_array()
        .map(|ports| {
            ports
                .iter()
                .filter_map(|p| {
                    let to = u16::try_from(p["To"].as_u64()?).ok()?;
                    let value = p["Value"].as_u64()?;
                    let ip = p["HostIP"].as_str().unwrap_or("127.0.0.1");
                    Some(MappedPort {
                        exposed_port: to,
                        host_address: format!("{ip}:{value}"),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(network: bool) -> EnvironmentSpec {
        EnvironmentSpec {
            id: EnvironmentId::new(10).unwrap(),
            image: "openhpi/docker_exec_phusion".into(),
            prewarming_pool_size: 3,
            cpu_limit: 20,
            memory_limit: 256,
            network_access: network,
            exposed_ports: if network { vec![8080, 443] } else { vec![] },
        }
    }

    #[test]
    fn template_job_has_poseidons_shape() {
        let job = JobShape::default().template(&spec(false));
        assert_eq!(job["ID"], "template-10");
        assert_eq!(job["Name"], "template-10");
        assert_eq!(job["Type"], "batch");
        let main = &job["TaskGroups"][0];
        assert_eq!(main["Name"], "default-group");
        assert_eq!(main["Count"], 1);
        assert_eq!(main["Networks"], json!([]));
        assert_eq!(main["RestartPolicy"]["Delay"], 15_000_000_000_i64);
        let task = &main["Tasks"][0];
        assert_eq!(task["Name"], "default-task");
        assert_eq!(task["Driver"], "docker");
        assert_eq!(
            task["Config"],
            json!({"image": "openhpi/docker_exec_phusion", "command": "sleep", "args": ["infinity"],
                   "network_mode": "none", "force_pull": true})
        );
        assert_eq!(
            task["Resources"],
            json!({"CPU": 20, "MemoryMB": 50, "MemoryMaxMB": 256})
        );
        let config = &job["TaskGroups"][1];
        assert_eq!(config["Name"], "config");
        assert_eq!(config["Count"], 0);
        assert_eq!(config["Tasks"][0]["Driver"], "exec");
        assert_eq!(
            config["Meta"],
            json!({"used": "false", "prewarmingPoolSize": "3"})
        );
    }

    #[test]
    fn network_access_gives_dynamic_ports_in_the_configured_mode() {
        let shape = JobShape {
            network: crate::config::NetworkConfig {
                mode: "cni/x".into(),
                ..crate::config::NetworkConfig::default()
            },
            ..JobShape::default()
        };
        let job = shape.template(&spec(true));
        assert_eq!(
            job["TaskGroups"][0]["Networks"],
            json!([{"Mode": "cni/x", "DynamicPorts": [{"Label": "8080", "To": 8080}, {"Label": "443", "To": 443}]}])
        );
        assert_eq!(
            job["TaskGroups"][0]["Tasks"][0]["Config"]["network_mode"],
            ""
        );
    }

    #[test]
    fn runner_job_is_the_template_with_its_own_id_and_only_used_meta() {
        let shape = JobShape::default();
        let id = RunnerId::new("10-6f04b525");
        let job = shape.runner(&spec(false), &id, false);
        assert_eq!(job["ID"], "10-6f04b525");
        assert_eq!(job["TaskGroups"][1]["Meta"], json!({"used": "false"}));
        assert_eq!(
            job["TaskGroups"][0]["Tasks"][0]["Config"]["force_pull"],
            false
        );
        assert_eq!(
            shape.runner(&spec(false), &id, true)["TaskGroups"][0]["Tasks"][0]["Config"]["force_pull"],
            true
        );
        let no_pull = JobShape {
            disable_force_pull: true,
            ..JobShape::default()
        };
        assert_eq!(
            no_pull.template(&spec(false))["TaskGroups"][0]["Tasks"][0]["Config"]["force_pull"],
            false
        );
    }

    #[test]
    fn template_reads_back_as_its_spec() {
        for network in [false, true] {
            let s = spec(network);
            assert_eq!(spec_of_template(&JobShape::default().template(&s)), Some(s));
        }
        assert_eq!(environment_of_template("template-x"), None);
        assert_eq!(environment_of_runner("10-abc").map(|e| e.get()), Some(10));
        assert_eq!(environment_of_runner("template-10"), None);
        assert_eq!(environment_of_runner("10-"), None);
    }

    #[test]
    fn marks_round_trip_and_keep_unknown_fields() {
        let mut job = JobShape::default().runner(&spec(false), &RunnerId::new("10-a"), false);
        job["VersionTag"] = json!({"Name": "keep me"});
        job["TaskGroups"][1]["Meta"]["operator"] = json!("note");
        assert_eq!(runner_state(&job), None);
        let deadline = UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        let used = UsedState {
            inactivity_timeout: Duration::from_secs(90),
            deadline: Some(deadline),
        };
        assert!(set_runner_state(&mut job, &RunnerState::Used(used)));
        assert_eq!(runner_state(&job), Some(used));
        assert_eq!(meta(&job, "timeout").as_deref(), Some("90"));
        assert!(set_runner_state(&mut job, &RunnerState::Idle));
        assert_eq!(runner_state(&job), None);
        // Poseidon keeps the timeout on un-claim.
        assert_eq!(meta(&job, "timeout").as_deref(), Some("90"));
        assert_eq!(job["VersionTag"]["Name"], "keep me");
        assert_eq!(job["TaskGroups"][1]["Meta"]["operator"], "note");
        set_meta(&mut job, "used", Some("true".into()));
        set_meta(&mut job, "timeout", Some("bogus".into()));
        assert_eq!(
            runner_state(&job).map(|u| u.inactivity_timeout),
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn allocation_ports_become_mapped_ports() {
        let alloc = json!({"AllocatedResources": {"Shared": {"Ports": [
            {"Label": "8080", "Value": 23116, "To": 8080, "HostIP": "10.0.0.1"}]}}});
        assert_eq!(
            mapped_ports(&alloc),
            vec![MappedPort {
                exposed_port: 8080,
                host_address: "10.0.0.1:23116".into()
            }]
        );
        assert!(mapped_ports(&json!({"AllocatedResources": null})).is_empty());
    }
}
