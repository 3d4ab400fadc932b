//! The local backend's configuration: where it keeps its state, which images map to which root
//! filesystems, and the default limits of a runner.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Configuration of [`crate::LocalExecutor`].
///
/// Every limit is per runner. `0` for `memoryLimit` in an environment means
/// [`LocalConfig::default_memory_mb`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalConfig {
    /// Where records, control sockets and the generated `/etc` live (`local.datadir`). Two
    /// executors with different data directories never touch each other's runners.
    pub data_dir: PathBuf,
    /// Image name → root filesystem directory (e.g. made with `debootstrap`). An image without an
    /// entry runs on the host's allow-listed system directories.
    pub images: BTreeMap<String, PathBuf>,
    /// Memory limit in MB when an environment asks for `0`.
    pub default_memory_mb: u32,
    /// Most processes (and threads) a runner may have at once.
    pub max_processes: u32,
    /// Size of a runner's private writable layer in MB (its whole disk), at most half the
    /// runner's memory: the layer is a tmpfs whose pages count against it.
    pub disk_limit_mb: u32,
    /// Size of a runner's `/dev/shm` in MB, at most a quarter of the runner's memory.
    pub shm_limit_mb: u32,
    /// `RLIMIT_NOFILE` of executions.
    pub max_open_files: u64,
    /// `RLIMIT_FSIZE` of executions, in MB.
    pub max_file_size_mb: u64,
    /// Which cgroup driver to use; `None` detects one.
    pub cgroup: Option<CgroupChoice>,
    /// Runner networking (`networkAccess`, `exposedPorts`); `None` leaves every runner with
    /// loopback only and refuses environments that need more.
    pub network: Option<local_network::NetworkConfig>,
    /// Longest a file operation (or the start of an execution) may wait on the runner without
    /// progress before it fails. Code in a runner can stop the helper that serves a request;
    /// this bounds how long the request then hangs.
    pub stall_timeout: std::time::Duration,
    /// Whether to run runners without memory, process and CPU limits when no usable cgroups
    /// exist. Off by default: without cgroups the backend refuses to start, so limits are never
    /// silently missing.
    pub allow_unlimited: bool,
}

/// A cgroup driver chosen explicitly instead of by detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupChoice {
    /// cgroup v1 with memory, pids, cpu and freezer hierarchies under this root
    /// (usually `/sys/fs/cgroup`).
    V1(PathBuf),
    /// cgroup v2 with the runners' parent cgroup at this path.
    V2(PathBuf),
    /// No cgroups: only rlimits are enforced (logged loudly at start-up).
    None,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            images: BTreeMap::new(),
            default_memory_mb: 512,
            max_processes: 512,
            disk_limit_mb: 256,
            shm_limit_mb: 64,
            max_open_files: 1024,
            max_file_size_mb: 256,
            cgroup: None,
            network: Some(local_network::NetworkConfig::default()),
            stall_timeout: std::time::Duration::from_secs(60),
            allow_unlimited: false,
        }
    }
}
