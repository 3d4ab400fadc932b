//! The emulator's configuration: where it listens, how fast time runs, what its cluster looks like.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

/// A node of the emulated cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// The node's name (`NodeName` of its allocations).
    pub name: String,
    /// Schedulable CPU in MHz.
    pub cpu_mhz: u64,
    /// Schedulable memory in MB (reservations, `MemoryMB`, count against it).
    pub memory_mb: u64,
}

impl NodeSpec {
    /// A node with the default, practically unlimited capacity (100000 MHz, 100000 MB).
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            cpu_mhz: 100_000,
            memory_mb: 100_000,
        }
    }
}

/// Everything that shapes one emulator instance. `Default` is a realistic agent in dev mode;
/// [`EmulatorConfig::for_tests`] makes everything fast.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// The address to listen on (127.0.0.1 by default).
    pub address: IpAddr,
    /// The port to listen on; 0 picks a free one.
    pub port: u16,
    /// When set, every request must carry it in `X-Nomad-Token` (else `403 Permission denied`).
    pub token: Option<String>,
    /// Factor applied to every policy delay of a job (restart and reschedule delays and
    /// intervals); 1.0 is real time.
    pub time_scale: f64,
    /// When set, the cluster state is persisted here and reloaded by the next instance.
    pub data_dir: Option<PathBuf>,
    /// The time from placement to `running`; half of it passes before the first client update.
    pub alloc_start_delay: Duration,
    /// The time the scheduler waits before it processes an evaluation.
    pub eval_delay: Duration,
    /// How often the event stream sends a `{}` heartbeat (Nomad: 30 s).
    pub heartbeat_interval: Duration,
    /// How many raft indexes the event buffer holds (Nomad: 100).
    pub event_buffer_size: usize,
    /// How many batches one event-stream subscriber may lag behind before it is dropped.
    pub subscriber_buffer: usize,
    /// The exit code exec sessions see when their allocation is OOM-killed (Poseidon saw 128).
    pub oom_exec_exit_code: i32,
    /// When set, terminal allocations of purged jobs are forgotten after this time.
    pub gc_delay: Option<Duration>,
    /// The cluster's nodes at start (ignored when state is reloaded from `data_dir`).
    pub nodes: Vec<NodeSpec>,
    /// The host ports dynamic ports are taken from.
    pub port_range: Range<u16>,
    /// Whether blocking queries add Nomad's random jitter of up to `wait/16`.
    pub blocking_jitter: bool,
    /// The namespaces that exist.
    pub namespaces: BTreeSet<String>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            token: None,
            time_scale: 1.0,
            data_dir: None,
            alloc_start_delay: Duration::from_millis(50),
            eval_delay: Duration::from_millis(10),
            heartbeat_interval: Duration::from_secs(30),
            event_buffer_size: 100,
            subscriber_buffer: 1024,
            oom_exec_exit_code: 128,
            gc_delay: None,
            nodes: vec![NodeSpec::named("emu-node-1")],
            port_range: 20000..32000,
            blocking_jitter: true,
            namespaces: BTreeSet::from(["default".to_owned()]),
        }
    }
}

impl EmulatorConfig {
    /// Small delays for tests: start 50 ms, evaluations 5 ms, heartbeats 200 ms, policy delays
    /// at 1/100, no blocking-query jitter.
    pub fn for_tests() -> Self {
        Self {
            time_scale: 0.01,
            alloc_start_delay: Duration::from_millis(50),
            eval_delay: Duration::from_millis(5),
            heartbeat_interval: Duration::from_millis(200),
            blocking_jitter: false,
            ..Self::default()
        }
    }

    /// `d` scaled by `time_scale` (negative or NaN scales count as 0).
    pub fn scaled(&self, d: Duration) -> Duration {
        let scale = if self.time_scale.is_finite() && self.time_scale > 0.0 {
            self.time_scale
        } else {
            0.0
        };
        Duration::from_secs_f64(d.as_secs_f64() * scale)
    }
}
