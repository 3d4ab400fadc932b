//! The seam between the emulated Nomad client and the place allocations actually run.
//!
//! The control plane (jobs, scheduler, client simulation, events) decides *when* an allocation
//! starts, restarts or stops; an [`AllocationRuntime`] makes it real: a sandbox per allocation
//! and a process per exec session. The emulator's default runtime runs every allocation as a
//! sandbox of the local backend, so limits, users, paths and OOM behave as in a container.

use std::collections::BTreeMap;

use async_trait::async_trait;
use axum::extract::ws::WebSocket;
use futures::stream::BoxStream;

/// What an allocation's main task needs to run, taken from the job version it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskLaunch {
    /// The allocation's id.
    pub alloc_id: String,
    /// The job the allocation belongs to.
    pub job_id: String,
    /// The job's namespace.
    pub namespace: String,
    /// The task group's name.
    pub group: String,
    /// The task's name.
    pub task: String,
    /// The task driver's `Config.image`, if it has one.
    pub image: Option<String>,
    /// `Resources.CPU` in MHz.
    pub cpu_mhz: u32,
    /// `Resources.MemoryMB`, the reservation.
    pub memory_mb: u32,
    /// `Resources.MemoryMaxMB`, the hard limit when set and larger than the reservation.
    pub memory_max_mb: Option<u32>,
    /// Whether the task may reach the network (`network_mode` is not `"none"` and the group has
    /// a network).
    pub network: bool,
    /// The group's dynamic ports as placed.
    pub ports: Vec<PortLaunch>,
    /// Variables every exec session of the task sees: `NOMAD_*`, `NOMAD_META_*`, the task `Env`.
    pub env: BTreeMap<String, String>,
}

/// A dynamic port as the scheduler placed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortLaunch {
    /// The port's label.
    pub label: String,
    /// The host port on the node (`Value`).
    pub host_port: u16,
    /// The port inside the task (`To`).
    pub to: u16,
    /// The node address the host port is bound to (`HostIP`).
    pub host_ip: String,
}

/// How running exec sessions end when their allocation's task stops under them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// Each session gets the output drained, the close frames and an `exited` frame with this
    /// code (e.g. 128 after an OOM kill, as Poseidon observed).
    Exit(i32),
    /// Each session's connection is dropped without any further frame (a lost node, a dying
    /// container).
    Reset,
}

/// A fault the control API injected into one exec session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecFault {
    /// After the process exits, send a normal close frame with this code instead of `exited`.
    CloseBeforeExit(u16),
    /// Drop the connection (no close frame) after this many output frames.
    DropAfterFrames(usize),
}

/// A validated exec request: the allocation exists, is running and has the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSession {
    /// The allocation to run in.
    pub alloc_id: String,
    /// The task to run in.
    pub task: String,
    /// The command and its arguments; run as given, no shell of the emulator's own.
    pub argv: Vec<String>,
    /// Whether the process gets a terminal (stdout and stderr merged on it, echo, `\r\n`).
    pub tty: bool,
    /// A fault to inject into this session, if any.
    pub fault: Option<ExecFault>,
}

/// Something that happened to an allocation's task without the control plane causing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeEvent {
    /// The task's sandbox died (e.g. the kernel's OOM killer took its init).
    TaskDied {
        /// The allocation.
        alloc_id: String,
        /// The exit code Nomad would report.
        exit_code: i32,
        /// Whether the memory limit killed it.
        oom_killed: bool,
    },
}

/// Why an allocation's task could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RuntimeError(pub String);

/// Where allocations run. Every method may be called concurrently.
#[async_trait]
pub trait AllocationRuntime: Send + Sync + std::fmt::Debug + 'static {
    /// Creates the allocation's sandbox; exec sessions may run in it once this returns. Starting
    /// an allocation that already runs (e.g. one recovered after a restart) succeeds.
    async fn start(&self, launch: &TaskLaunch) -> Result<(), RuntimeError>;

    /// Ends every exec session of the allocation as `end` says; the sandbox and its files stay.
    async fn end_sessions(&self, alloc_id: &str, end: SessionEnd);

    /// Ends every exec session with [`SessionEnd::Reset`] and removes the sandbox; succeeds when
    /// there is none.
    async fn stop(&self, alloc_id: &str);

    /// Runs one exec session on an upgraded WebSocket with Nomad's frames until the process
    /// exits (then `exited`, or the session's fault) or the client goes away (then the process
    /// group is killed).
    async fn exec(&self, socket: WebSocket, session: ExecSession);

    /// Allocations whose sandboxes still exist (after an emulator restart on the same data
    /// directory).
    async fn surviving(&self) -> Vec<String>;

    /// Task deaths the runtime noticed on its own. Called once.
    fn events(&self) -> BoxStream<'static, RuntimeEvent>;
}
