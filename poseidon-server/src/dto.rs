//! The API's wire types, named as in Poseidon's spec. Responses are serialised from these types
//! and the OpenAPI document is generated from them, so the two cannot drift apart.

use std::collections::BTreeMap;

use runner_core::{
    EnvironmentSpec, EnvironmentStatistics, FileHeader as CoreFileHeader, MappedPort,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An execution environment: a template for runners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionEnvironment {
    /// The id of the execution environment.
    #[schema(example = 6, minimum = 0)]
    pub id: u64,
    /// The image runners are made from.
    #[schema(example = "openhpi/co_execenv_python:latest")]
    pub image: String,
    /// Number of runners with this configuration to prewarm.
    #[schema(example = 50, minimum = 0)]
    pub prewarming_pool_size: u32,
    /// CPU limit for one runner in MHz (a share, not a quota).
    #[schema(example = 100, minimum = 0)]
    pub cpu_limit: u32,
    /// Memory limit for one runner in MB (0 = backend default).
    #[schema(example = 256, minimum = 0)]
    pub memory_limit: u32,
    /// Whether the runner may access the network.
    pub network_access: bool,
    /// Ports inside the runner to expose to the outside.
    #[schema(example = json!([80, 443]))]
    pub exposed_ports: Vec<u16>,
}

impl From<EnvironmentSpec> for ExecutionEnvironment {
    fn from(spec: EnvironmentSpec) -> Self {
        Self {
            id: spec.id.get(),
            image: spec.image,
            prewarming_pool_size: spec.prewarming_pool_size,
            cpu_limit: spec.cpu_limit,
            memory_limit: spec.memory_limit,
            network_access: spec.network_access,
            exposed_ports: spec.exposed_ports,
        }
    }
}

/// `GET /execution-environments`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionEnvironmentList {
    /// All execution environments.
    pub execution_environments: Vec<ExecutionEnvironment>,
}

/// The statistics of one environment.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentStatisticsEntry {
    /// The id of the execution environment.
    pub id: u64,
    /// Number of runners with this configuration to prewarm.
    pub prewarming_pool_size: u32,
    /// Number of runners currently prewarmed.
    pub idle_runners: u32,
    /// Number of runners currently in use.
    pub used_runners: u32,
    /// Why no runner of this environment can be created until it is changed (its pool has
    /// stopped refilling); absent while runners can be created. Not in Poseidon's spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_error: Option<String>,
    /// Runners on their way to the pool: creations under way and runners the backend has not
    /// reported ready yet. An addition to Poseidon's fields, left out while zero so a healthy
    /// environment looks exactly as Poseidon shows it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pending_runners: u32,
    /// Present (`true`) while the latest runner creations fail; the pool keeps retrying with
    /// backoff.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub failing: bool,
    /// The latest creation error while failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl From<EnvironmentStatistics> for EnvironmentStatisticsEntry {
    fn from(s: EnvironmentStatistics) -> Self {
        Self {
            id: s.id.get(),
            prewarming_pool_size: s.prewarming_pool_size,
            idle_runners: s.idle_runners,
            used_runners: s.used_runners,
            creation_error: None,
            pending_runners: s.pending_runners,
            failing: s.failing,
            last_error: s.last_error,
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// `GET /statistics/execution-environments`: keyed by the environment id as a string.
pub type EnvironmentStatisticsMap = BTreeMap<String, EnvironmentStatisticsEntry>;

/// `POST /runners` request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProvideRunnerRequest {
    /// Seconds without activity after which the runner is destroyed; 0 means never.
    #[serde(default)]
    #[schema(example = 60, minimum = 0, maximum = 4294967295u64)]
    pub inactivity_timeout: u64,
    /// The execution environment of the runner.
    #[schema(example = 6, minimum = 0)]
    pub execution_environment_id: u64,
}

/// Where an exposed port of a runner is reachable.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MappedPortDto {
    /// The port inside the runner.
    #[schema(example = 80)]
    pub exposed_port: u16,
    /// The address to contact to reach it.
    #[schema(example = "10.224.6.18:23832")]
    pub host_address: String,
}

impl From<MappedPort> for MappedPortDto {
    fn from(p: MappedPort) -> Self {
        Self {
            exposed_port: p.exposed_port,
            host_address: p.host_address,
        }
    }
}

/// `POST /runners` response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunnerResponse {
    /// The id of the provided runner.
    pub runner_id: String,
    /// Addresses of the mapped ports of the environment (`[]` when none).
    pub mapped_ports: Vec<MappedPortDto>,
}

/// `POST /runners/{runnerId}/execute` request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionRequestDto {
    /// The shell command line (run by `bash -c`); single quotes are allowed.
    #[schema(example = "python exercise.py")]
    pub command: String,
    /// Run as the sandbox's root user.
    #[serde(default)]
    pub privileged_execution: bool,
    /// Extra environment variables, passed exactly as given.
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// Seconds until the execution is killed; 0 means no limit.
    #[serde(default)]
    #[schema(example = 5, minimum = 0, maximum = 4294967295u64)]
    pub time_limit: u64,
}

/// `POST /runners/{runnerId}/execute` response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionResponse {
    /// The WebSocket URL to connect to, to start the execution.
    pub websocket_url: String,
}

/// One file to write.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileCopyDto {
    /// Where the file goes; absolute or relative to the working directory. A trailing `/`
    /// creates a directory.
    pub path: String,
    /// The content, base64 encoded; empty when absent.
    #[serde(default)]
    pub content: Option<String>,
}

/// `PATCH /runners/{runnerId}/files` request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct FileUpdateRequest {
    /// Paths to delete recursively (before copying).
    #[serde(default)]
    pub delete: Vec<String>,
    /// Files to write.
    #[serde(default)]
    pub copy: Vec<FileCopyDto>,
}

/// One entry of a file listing.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileHeader {
    /// The path of the file, prefixed with the listed directory.
    #[schema(example = "./logs/last.log")]
    pub name: String,
    /// The type of the entry, one character as in `ls -l`.
    #[schema(example = "-")]
    pub entry_type: String,
    /// A symbolic link's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
    /// The size in bytes.
    pub size: u64,
    /// The Unix time of the last modification.
    pub modification_time: i64,
    /// Permissions as `ls -l` shows them.
    #[schema(example = "rwxr--r--")]
    pub permissions: String,
    /// The owner's name.
    pub owner: String,
    /// The group's name.
    pub group: String,
}

impl From<CoreFileHeader> for FileHeader {
    fn from(h: CoreFileHeader) -> Self {
        Self {
            name: h.name,
            entry_type: h.entry_type.to_string(),
            link_target: h.link_target,
            size: h.size,
            modification_time: h.modification_time,
            permissions: h.permissions,
            owner: h.owner,
            group: h.group,
        }
    }
}

/// `GET /runners/{runnerId}/files` response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileListing {
    /// The files.
    pub files: Vec<FileHeader>,
}
