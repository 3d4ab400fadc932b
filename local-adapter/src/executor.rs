//! [`LocalExecutor`]: `ExecutorApi` on this machine.
//!
//! Owns the runners of one data directory: creates them through the sandbox fork server, keeps
//! their records in the `storage` store, talks to their inits over their control sockets, and
//! pumps execution output through bounded channels. It never forks itself into a namespace and
//! never touches cgroups, sockets or records of another data directory.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use local_network::{HostNetwork, RunnerNetwork};
use runner_core::execution::{EVENT_BUFFER, STDIN_BUFFER};
use runner_core::{
    BackendError, BackendEvent, Creation, DestroyReason, EnvironmentId, EnvironmentSpec,
    ExecutionEvent, ExecutionFailure, ExecutionHandle, ExecutionRequest, ExecutorApi, FileContent,
    FileCopy, FileError, FileFailure, FileHeader, FileUpdate, ListFilesRequest, RecordedState,
    RunnerId, RunnerInfo, RunnerRecord, RunnerState,
};
use serde::{Deserialize, Serialize};
use storage::{StateStore, StoredRunner};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::cgroup::{self, CgroupDriver, Limits, NoCgroups, V1Driver, V2Driver};
use crate::config::{CgroupChoice, LocalConfig};
use crate::error::LocalError;
use crate::protocol::{
    CopyHeader, MAX_RESPONSE, Request, Response, read_msg, recv_with_fds, write_msg,
};
use crate::rootfs;
use crate::sandbox::{ID_RANGE, RootSpec, SandboxSpec};
use fork_server::ForkServer;

mod fork_server;
pub(crate) mod spawn;

const CREATE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the init may take to accept a connection and give its first answer to a request. A
/// working init answers in microseconds (it forks helpers for anything slow); one that does not
/// answer in time is broken, and its runner is replaced.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a runner's init may take to exit after SIGKILL before teardown goes on without it.
const INIT_EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long teardown waits for a dead init that is still another process's zombie to be handed
/// to this process (see [`InitState::ZombieOfAnother`]).
const ZOMBIE_HANDOVER: Duration = Duration::from_millis(500);
/// How long shutdown waits for teardowns still running in the background.
const SHUTDOWN_TEARDOWN_WAIT: Duration = Duration::from_secs(15);
/// After the main process exited, output still arriving is forwarded until the pipes are quiet
/// this long (background processes may keep them open)…
const DRAIN_QUIET: Duration = Duration::from_millis(30);
/// …but no longer than this after the exit.
const DRAIN_MAX: Duration = Duration::from_millis(300);
/// At most this many finished executions per runner keep their stderr pipe open for the
/// background processes they left (see [`keep_stderr_for_background`]); beyond that, a
/// background process writing to its stderr ends with `SIGPIPE`, as it would without a reader.
const LINGERING_STDERR_MAX: usize = 16;
/// How much a finished execution's background processes may write to its stderr before the
/// pipe is closed: the server's time spent discarding it is not the runner's to spend.
const LINGERING_STDERR_BYTES: usize = 1 << 20;
/// Longest path accepted in a file update (Linux's `PATH_MAX` is 4096; longer ones are refused
/// rather than carried to the runner).
const MAX_PATH_LEN: usize = 4096;

/// Registers an owned descriptor with the reactor.
#[allow(unsafe_code)]
fn async_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `AsyncFd` owns the `OwnedFd`, so the descriptor stays open and refers to the
    // same file description until the `AsyncFd` is dropped, and `as_raw_fd` never changes.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

/// What the adapter stores about a runner's sandbox (the record's opaque backend data).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Handle {
    pid: i32,
    start_time: u64,
    socket: PathBuf,
    /// The runner's network (address, host ports), when it has one.
    #[serde(default)]
    network: Option<RunnerNetwork>,
}

#[derive(Debug)]
struct Runner {
    id: RunnerId,
    environment: EnvironmentId,
    handle: Handle,
    /// Found alive at start-up (its idle record may be stale after a crash).
    recovered: bool,
    destroying: std::sync::atomic::AtomicBool,
    /// Set when the init died on its own: why.
    died: std::sync::OnceLock<DestroyReason>,
    /// Set once its full process table was reported (the runner is being replaced).
    process_limit: std::sync::atomic::AtomicBool,
    /// Finished executions whose stderr pipe is kept open for their background processes.
    lingering_stderr: std::sync::atomic::AtomicUsize,
}

impl Runner {
    fn new(id: RunnerId, environment: EnvironmentId, handle: Handle, recovered: bool) -> Self {
        Self {
            id,
            environment,
            handle,
            recovered,
            destroying: false.into(),
            died: std::sync::OnceLock::new(),
            process_limit: false.into(),
            lingering_stderr: 0.into(),
        }
    }
}

/// Reports once that `runner`'s process table is full: the manager destroys it with
/// [`DestroyReason::ProcessLimitReached`] and refills its pool.
fn report_process_limit(events: &mpsc::UnboundedSender<BackendEvent>, runner: &Runner) {
    if runner
        .process_limit
        .swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        return;
    }
    warn!(runner_id = %runner.id, environment_id = %runner.environment, "the runner's process table is full: nothing can be started in it; replacing it");
    let _ = events.send(BackendEvent::RunnerStopped {
        runner: runner.id.clone(),
        reason: DestroyReason::ProcessLimitReached,
    });
}

#[derive(Debug)]
struct Paths {
    run: PathBuf,
    staging: PathBuf,
    etc: PathBuf,
}

struct Inner {
    config: LocalConfig,
    paths: Paths,
    uid_base: u32,
    driver: Box<dyn CgroupDriver>,
    store: StateStore,
    clean_start: bool,
    runners: Mutex<HashMap<RunnerId, Arc<Runner>>>,
    logged_host_images: Mutex<HashSet<EnvironmentId>>,
    events_tx: mpsc::UnboundedSender<BackendEvent>,
    events_rx: Mutex<Option<mpsc::UnboundedReceiver<BackendEvent>>>,
    /// Runner networking, once started (it is optional: without it runners have loopback only).
    network: std::sync::OnceLock<HostNetwork>,
    /// Runners destroyed but not yet torn down (their teardown runs in the background).
    tearing_down: Mutex<HashSet<RunnerId>>,
    /// How many background teardowns are running, for shutdown to wait for them.
    teardowns: tokio::sync::watch::Sender<usize>,
    /// Why runner networking is not available, when it is not (for the client's 400).
    network_unavailable: std::sync::OnceLock<String>,
    /// Starts the runners' sandbox helpers.
    fork_server: Arc<ForkServer>,
}

/// The local sandbox backend. Cheap to clone; all clones share the same runners.
#[derive(Clone)]
pub struct LocalExecutor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LocalExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalExecutor")
            .field("data_dir", &self.inner.config.data_dir)
            .field("cgroups", &self.inner.driver.name())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn internal(e: impl std::fmt::Display) -> BackendError {
    BackendError::Internal(e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(f).await.map_err(internal)
}

/// The host uid owning `runner`'s user namespace: one per runner, from a range of its own
/// (`0x3000_0000..0x4000_0000`) below the sandboxes' id ranges (`0x4000_0000..0x5000_0000`).
fn namespace_owner(runner: &RunnerId) -> u32 {
    0x3000_0000 + (fnv(runner.as_str().as_bytes()) % 0x1000_0000) as u32
}

/// The start time (clock ticks since boot) of `pid`, to tell a runner's init from a reused pid.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The state letter (`R`, `S`, `Z`, …) of the runner's init in `/proc/<pid>/stat`; `None` when
/// it is gone or its pid belongs to another process now.
fn init_process_state(handle: &Handle) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", handle.pid)).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let started: u64 = fields.nth(18)?.parse().ok()?;
    (started == handle.start_time).then_some(state)
}

/// Whether the runner's init has exited: gone, replaced by another process, or a zombie.
fn has_exited(handle: &Handle) -> bool {
    init_process_state(handle).is_none_or(|state| state == 'Z')
}

fn is_alive(handle: &Handle) -> bool {
    start_time(handle.pid) == Some(handle.start_time)
}

/// Connects to a runner's init. The timeouts are set before connecting: a unix connect waits
/// (up to the send timeout) while the listener's backlog is full, as it is when the init stopped
/// accepting.
fn connect(socket: &Path) -> io::Result<UnixStream> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr, sockopt};
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let timeout = nix::sys::time::TimeVal::new(CONTROL_TIMEOUT.as_secs() as _, 0);
    socket::setsockopt(&fd, sockopt::SendTimeout, &timeout)?;
    socket::setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
    socket::connect(fd.as_raw_fd(), &UnixAddr::new(socket)?)?;
    Ok(UnixStream::from(fd))
}

/// A failure to talk to a runner's init.
#[derive(Debug, thiserror::Error)]
enum ControlError {
    /// The init did not accept the connection or did not answer within [`CONTROL_TIMEOUT`]:
    /// the runner's control plane is broken.
    #[error("the runner's control process did not answer in time ({0})")]
    Unresponsive(io::Error),
    /// The operation failed after the init took it.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl From<io::Error> for ControlError {
    fn from(e: io::Error) -> Self {
        ControlError::Backend(internal(e))
    }
}

/// Connects and sends `request`, as a control-plane step: any failure means a broken init.
fn send_request(socket: &Path, request: &Request) -> Result<UnixStream, ControlError> {
    let mut conn = connect(socket).map_err(ControlError::Unresponsive)?;
    write_msg(&mut conn, request).map_err(ControlError::Unresponsive)?;
    Ok(conn)
}

/// Waits (at most [`CONTROL_TIMEOUT`]) for the init to hand a file operation to its helper,
/// then gives the helper `stall` for each later read and write. `Some(ProcessLimit)` when the
/// init could not fork the helper: the answer to give instead of the helper's.
fn await_accepted(
    conn: &mut UnixStream,
    stall: Duration,
) -> Result<Option<Response>, ControlError> {
    match read_msg::<Response>(conn, MAX_RESPONSE).map_err(ControlError::Unresponsive)? {
        Response::Accepted => {}
        Response::ProcessLimit => return Ok(Some(Response::ProcessLimit)),
        Response::Error { message } => return Err(internal(message).into()),
        other => return Err(internal(format!("unexpected answer {other:?}")).into()),
    }
    conn.set_read_timeout(Some(stall))?;
    conn.set_write_timeout(Some(stall))?;
    Ok(None)
}

fn ping(socket: &Path) -> bool {
    connect(socket)
        .and_then(|mut c| {
            write_msg(&mut c, &Request::Ping)?;
            read_msg::<Response>(&mut c, MAX_RESPONSE)
        })
        .is_ok_and(|r| matches!(r, Response::Ok))
}

fn check_features(config: &LocalConfig) -> Result<(), LocalError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(LocalError::MissingFeature {
            feature: "root privileges",
            fix: "run the server as root (it creates namespaces, ID-mapped mounts and cgroups)"
                .into(),
        });
    }
    let max_userns = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if !Path::new("/proc/self/ns/user").exists() || max_userns == Some(0) {
        return Err(LocalError::MissingFeature {
            feature: "user namespaces",
            fix: "use a kernel with CONFIG_USER_NS and set sysctl user.max_user_namespaces > 0"
                .into(),
        });
    }
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems.contains("overlay") {
        return Err(LocalError::MissingFeature {
            feature: "overlayfs",
            fix: "load the overlay module (modprobe overlay)".into(),
        });
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    if (major, minor) < (5, 19) {
        return Err(LocalError::MissingFeature {
            feature: "ID-mapped mounts with overlayfs (Linux ≥ 5.19)",
            fix: format!("this kernel is {release}; upgrade the kernel"),
        });
    }
    if crate::sandbox::seccomp::programs().is_err() {
        return Err(LocalError::MissingFeature {
            feature: "seccomp filters for this architecture",
            fix: "run on x86_64 or aarch64 with CONFIG_SECCOMP_FILTER".into(),
        });
    }
    for (name, dir) in &config.images {
        if !dir.is_dir() {
            return Err(LocalError::DataDir {
                path: dir.clone(),
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("root filesystem of image {name:?} is not a directory"),
                ),
            });
        }
    }
    Ok(())
}

impl LocalExecutor {
    /// Opens the store under `config.data_dir`, checks the kernel, reattaches to the runners that
    /// survived the previous server and cleans up everything of this data directory that did not
    /// (processes, cgroups, sockets, records).
    ///
    /// The binary must call [`crate::sandbox_main_if_requested`] first in `main`.
    pub async fn start(config: LocalConfig) -> Result<LocalExecutor, LocalError> {
        let executor = tokio::task::spawn_blocking(move || Self::start_blocking(config))
            .await
            .map_err(|e| LocalError::Sandbox(e.to_string()))??;
        executor.start_network().await;
        Ok(executor)
    }

    /// Starts runner networking and reconnects the runners that survived with a network. A
    /// machine without it (no `ip`/`nft`, no privilege) keeps working with loopback-only runners.
    async fn start_network(&self) {
        let Some(config) = self.inner.config.network.clone() else {
            info!("runner networking disabled: runners have loopback only");
            let _ = self.inner.network_unavailable.set(
                "runner networking is disabled in the configuration (local.network.enabled: false)"
                    .into(),
            );
            return;
        };
        let survivors: Vec<Arc<Runner>> = lock(&self.inner.runners).values().cloned().collect();
        let keep: Vec<RunnerId> = survivors
            .iter()
            .filter(|r| r.handle.network.is_some())
            .map(|r| r.id.clone())
            .collect();
        let tag = local_network::instance_tag(&self.inner.config.data_dir);
        // With the default subnet, each data directory gets its own /16 in 10.128.0.0/10, so
        // several servers (or test binaries) on one machine do not compete for one bridge subnet.
        let derive = config.bridge_subnet == local_network::NetworkConfig::default().bridge_subnet;
        let hash = fnv(tag.as_bytes());
        let mut attempt = 0u64;
        let network = loop {
            let mut candidate = config.clone();
            if derive {
                let second = 128 + ((hash + attempt) % 64) as u8;
                if let Ok(subnet) =
                    local_network::Ipv4Net::new(std::net::Ipv4Addr::new(10, second, 0, 0), 16)
                {
                    candidate.bridge_subnet = subnet;
                }
            }
            match HostNetwork::start(candidate, &tag, &keep).await {
                Ok(network) => break network,
                Err(local_network::NetworkError::SubnetInUse { .. }) if derive && attempt < 16 => {
                    attempt += 1;
                }
                Err(e) => {
                    warn!(error = %e, "runner networking unavailable: environments with networkAccess or exposedPorts are refused");
                    let _ = self
                        .inner
                        .network_unavailable
                        .set(network_unavailable_reason(&e));
                    return;
                }
            }
        };
        let network = self.inner.network.get_or_init(|| network);
        for runner in survivors {
            let Some(previous) = runner.handle.network.clone() else {
                continue;
            };
            let netns = PathBuf::from(format!("/proc/{}/ns/net", runner.handle.pid));
            let ports: Vec<u16> = previous
                .mapped_ports
                .iter()
                .map(|m| m.exposed_port)
                .collect();
            match network
                .attach(
                    &runner.id,
                    &netns,
                    previous.address.is_some(),
                    &ports,
                    Some(&previous),
                )
                .await
            {
                Ok(now) if now == previous => {}
                Ok(now) => {
                    let mut handle = runner.handle.clone();
                    handle.network = Some(now);
                    let store = self.inner.store.clone();
                    let id = runner.id.clone();
                    let saved = blocking(move || update_network(&store, &id, &handle)).await;
                    if let Err(e) | Ok(Err(e)) = saved {
                        warn!(runner_id = %runner.id, error = %e, "cannot record the runner's new network; a restart may give it other host ports");
                    }
                }
                Err(e) => {
                    warn!(runner_id = %runner.id, error = %e, "cannot reconnect the runner's network");
                }
            }
        }
    }

    fn start_blocking(mut config: LocalConfig) -> Result<LocalExecutor, LocalError> {
        check_features(&config)?;
        // Runner inits are orphaned when their helper exits; as the subreaper, this process gets
        // them back and reaps them when it destroys them, instead of leaving zombies to a host
        // init that may reap lazily. After a restart they belong to the host's init again.
        if let Err(e) = rustix::process::set_child_subreaper(rustix::process::Pid::from_raw(
            std::process::id() as i32,
        )) {
            warn!(error = %e, "cannot become the child subreaper; destroyed runners are reaped by the host's init");
        }
        let dir_err = |path: &Path| {
            let path = path.to_owned();
            move |source| LocalError::DataDir { path, source }
        };
        std::fs::create_dir_all(&config.data_dir).map_err(dir_err(&config.data_dir))?;
        let data = std::fs::canonicalize(&config.data_dir).map_err(dir_err(&config.data_dir))?;
        let text = data.to_string_lossy();
        if text.len() > 80 {
            return Err(LocalError::DataDirTooLong(data));
        }
        if text.contains([',', ':']) {
            return Err(LocalError::DataDir {
                path: data.clone(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the path must not contain ',' or ':' (overlayfs options)",
                ),
            });
        }
        config.data_dir = data.clone();
        let hash = fnv(text.as_bytes());
        let instance = format!("poseidon-{:012x}", hash & 0xffff_ffff_ffff);
        let uid_base = 0x4000_0000 + (hash % 4096) as u32 * ID_RANGE;
        let paths = Paths {
            run: data.join("run"),
            staging: data.join("mnt"),
            etc: data.join(format!("etc-{uid_base}")),
        };
        for d in [&paths.run, &paths.staging] {
            std::fs::create_dir_all(d).map_err(dir_err(d))?;
            nix::unistd::chown(d.as_path(), Some(nix::unistd::Uid::from_raw(0)), None)
                .map_err(|e| dir_err(d)(e.into()))?;
            std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .map_err(dir_err(d))?;
        }
        // The store's lock makes this process the only user of the data directory from here on.
        let store = StateStore::open(&data.join("state.redb"))
            .map_err(|e| LocalError::Store(e.to_string()))?;
        // Half-built copies of a crashed start.
        if let Ok(rd) = std::fs::read_dir(&data) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("etc-") && name.contains(".tmp") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        rootfs::build_etc(Path::new("/etc"), &paths.etc, uid_base).map_err(dir_err(&paths.etc))?;
        let driver: Box<dyn CgroupDriver> = match &config.cgroup {
            None => cgroup::detect(Path::new("/sys/fs/cgroup"), &instance),
            Some(CgroupChoice::V1(root)) => Box::new(V1Driver::new(root, &instance)),
            Some(CgroupChoice::V2(base)) => Box::new(V2Driver::new(base.join(&instance))),
            Some(CgroupChoice::None) => Box::new(NoCgroups),
        };
        let clean_start = store.previous_shutdown_was_clean();
        if driver.name() == "none" {
            if !config.allow_unlimited {
                return Err(LocalError::MissingFeature {
                    feature: "cgroups",
                    fix:
                        "mount cgroup v1 (memory, pids, cpu, freezer) or cgroup v2 with the memory \
                          and pids controllers, or set `local.allowunlimited: true` to run runners \
                          without memory, process and CPU limits"
                            .into(),
                });
            }
            warn!(
                "no usable cgroups and local.allowunlimited is set: runners have NO memory, process \
                 or CPU limits (rlimits only)"
            );
        }
        info!(
            data_dir = %data.display(),
            cgroups = driver.name(),
            enforced = ?driver.enforced(),
            disk_limit_mb = config.disk_limit_mb,
            default_memory_mb = config.default_memory_mb,
            max_processes = config.max_processes,
            max_open_files = config.max_open_files,
            max_file_size_mb = config.max_file_size_mb,
            "local backend: user/mount/pid/net/ipc/uts/cgroup namespaces, ID-mapped read-only \
             system directories, size-limited tmpfs writable layer, seccomp, no_new_privs"
        );
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            config,
            paths,
            uid_base,
            driver,
            store,
            clean_start,
            runners: Mutex::new(HashMap::new()),
            logged_host_images: Mutex::new(HashSet::new()),
            events_tx,
            events_rx: Mutex::new(Some(events_rx)),
            network: std::sync::OnceLock::new(),
            tearing_down: Mutex::new(HashSet::new()),
            teardowns: tokio::sync::watch::Sender::new(0),
            network_unavailable: std::sync::OnceLock::new(),
            fork_server: Arc::default(),
        });
        inner.recover()?;
        Ok(LocalExecutor { inner })
    }

    /// Leaves every runner running (the next start reattaches to them), stops the sandbox fork
    /// server and closes the store cleanly, so the next start trusts its idle records.
    ///
    /// Teardowns of destroyed runners still running in the background are waited for first
    /// (bounded; one cut short is completed by the next start).
    pub async fn shutdown(&self) {
        if tokio::time::timeout(SHUTDOWN_TEARDOWN_WAIT, self.teardowns_finished())
            .await
            .is_err()
        {
            warn!(
                pending = *self.inner.teardowns.borrow(),
                "runner teardowns still running at shutdown; the next start completes them"
            );
        }
        if lock(&self.inner.runners).is_empty()
            && let Some(network) = self.inner.network.get()
        {
            network.teardown().await;
        }
        let inner = self.inner.clone();
        match tokio::task::spawn_blocking(move || {
            inner.fork_server.stop();
            if lock(&inner.runners).is_empty() {
                inner.driver.remove_instance_if_empty();
            }
            inner.store.close()
        })
        .await
        {
            Ok(Ok(())) => info!("local backend shut down; runners left in place"),
            Ok(Err(e)) => error!(error = %e, "closing the state store failed"),
            Err(e) => error!(error = %e, "closing the state store failed"),
        }
    }

    /// Resolves once no destroyed runner is being torn down in the background any more (its
    /// processes gone, its cgroups, socket, record and network removed).
    pub async fn teardowns_finished(&self) {
        let mut rx = self.inner.teardowns.subscribe();
        let _ = rx.wait_for(|running| *running == 0).await;
    }

    /// Reports every committed write of the backend's state store from now on to `observer`
    /// (e.g. a latency metric); `false` when an observer is already set.
    pub fn observe_store_writes(&self, observer: Arc<dyn storage::WriteObserver>) -> bool {
        self.inner.store.set_write_observer(observer)
    }

    /// The runner's network namespace (`/proc/<init pid>/ns/net`), owned by the host's root, for
    /// the networking layer to connect; `None` for an unknown runner.
    pub fn network_namespace(&self, id: &RunnerId) -> Option<PathBuf> {
        let runner = lock(&self.inner.runners).get(id).cloned()?;
        is_alive(&runner.handle)
            .then(|| PathBuf::from(format!("/proc/{}/ns/net", runner.handle.pid)))
    }

    /// The error for an environment that needs runner networking on a machine without it.
    fn networking_refused(&self) -> BackendError {
        let reason = self
            .inner
            .network_unavailable
            .get()
            .map_or("runner networking has not started", String::as_str);
        BackendError::InvalidRequest(format!(
            "networkAccess and exposedPorts need runner networking, which is not available on this machine: {reason}"
        ))
    }

    /// Gives a new runner the network its environment asks for.
    async fn connect_network(
        &self,
        id: &RunnerId,
        handle: &Handle,
        spec: &EnvironmentSpec,
    ) -> Result<RunnerNetwork, BackendError> {
        let Some(network) = self.inner.network.get() else {
            return Err(self.networking_refused());
        };
        let netns = PathBuf::from(format!("/proc/{}/ns/net", handle.pid));
        network
            .attach(id, &netns, spec.network_access, &spec.exposed_ports, None)
            .await
            .map_err(|e| BackendError::Internal(format!("connecting the runner's network: {e}")))
    }

    async fn disconnect_network(&self, id: &RunnerId) {
        if let Some(network) = self.inner.network.get() {
            network.detach(id).await;
        }
    }

    /// The outcome of a request to `runner`'s init. An init that did not answer is broken: the
    /// runner is torn down and reported stopped (so it is replaced), and the request fails.
    fn control<T>(
        &self,
        runner: &Arc<Runner>,
        outcome: Result<T, ControlError>,
    ) -> Result<T, BackendError> {
        match outcome {
            Ok(value) => Ok(value),
            Err(ControlError::Backend(e)) => Err(e),
            Err(e @ ControlError::Unresponsive(_)) => {
                self.inner.control_plane_failed(runner, &e);
                Err(BackendError::Internal(format!(
                    "{e}; the runner is broken and is being replaced"
                )))
            }
        }
    }

    /// A file operation found the runner's process table full (its init could not fork).
    fn file_op_process_limit(&self, runner: &Runner) -> FileError {
        report_process_limit(&self.inner.events_tx, runner);
        internal(DestroyReason::ProcessLimitReached).into()
    }

    fn runner(&self, id: &RunnerId) -> Result<Arc<Runner>, BackendError> {
        lock(&self.inner.runners)
            .get(id)
            .cloned()
            .ok_or_else(|| BackendError::RunnerNotFound(id.clone()))
    }
}

impl Inner {
    /// Reattaches to live runners of the store and removes everything else of this instance.
    fn recover(self: &Arc<Self>) -> Result<(), LocalError> {
        let records = self
            .store
            .runners()
            .map_err(|e| LocalError::Store(e.to_string()))?;
        let mut attached = HashSet::new();
        for record in records {
            let handle: Option<Handle> = serde_json::from_slice(&record.backend_data).ok();
            match handle {
                Some(h) if is_alive(&h) && ping(&h.socket) => {
                    info!(runner_id = %record.id, environment_id = %record.environment, "reattached to runner");
                    attached.insert(record.id.to_string());
                    let runner =
                        Arc::new(Runner::new(record.id.clone(), record.environment, h, true));
                    lock(&self.runners).insert(record.id.clone(), runner.clone());
                    self.watch(runner);
                }
                h => {
                    // Also a runner whose destruction a crash cut short: its socket is gone
                    // (removed when it was destroyed), so it no longer answers.
                    info!(runner_id = %record.id, environment_id = %record.environment, "runner did not survive; cleaning up");
                    if let Err(e) = self.teardown(&record.id, h.as_ref()) {
                        warn!(runner_id = %record.id, environment_id = %record.environment, error = %e, "cannot clean up the runner");
                        self.store
                            .remove_runner(&record.id)
                            .map_err(|e| LocalError::Store(e.to_string()))?;
                    }
                }
            }
        }
        // Cgroups without a live record: runners whose creation or destruction a crash cut
        // short. Destroying the cgroup also kills an init still running in it (with its whole
        // namespace), record or not.
        for leftover in self.driver.runners() {
            if !attached.contains(&leftover) {
                info!(runner_id = %leftover, "removing leftover cgroup");
                if let Err(e) = self.driver.destroy(&leftover) {
                    warn!(runner_id = %leftover, error = %e, "cannot remove leftover cgroup");
                }
            }
        }
        let live: HashSet<PathBuf> = lock(&self.runners)
            .values()
            .map(|r| r.handle.socket.clone())
            .collect();
        if let Ok(rd) = std::fs::read_dir(&self.paths.run) {
            for e in rd.flatten() {
                if !live.contains(&e.path()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    fn socket_path(&self, id: &RunnerId) -> PathBuf {
        self.paths
            .run
            .join(format!("{:016x}.sock", fnv(id.as_str().as_bytes())))
    }

    /// Watches the init's exit; a runner that dies on its own is reported and cleaned up.
    fn watch(self: &Arc<Self>, runner: Arc<Runner>) {
        let weak: Weak<Inner> = Arc::downgrade(self);
        // A runner whose init cannot be watched (or is already gone) is handled as dead at once:
        // an unwatched runner's death would never be reported and it could still be handed out.
        let watched = rustix::process::Pid::from_raw(runner.handle.pid)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
            .and_then(|pid| {
                rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK)
                    .map_err(io::Error::from)
            })
            .and_then(|pidfd| {
                if is_alive(&runner.handle) {
                    async_fd(pidfd)
                } else {
                    Err(io::Error::other("the init has already exited"))
                }
            });
        let fd = match watched {
            Ok(fd) => Some(fd),
            Err(error) => {
                warn!(runner_id = %runner.id, environment_id = %runner.environment, %error, "cannot watch the runner's init; treating the runner as stopped");
                None
            }
        };
        tokio::spawn(async move {
            if let Some(fd) = fd {
                let _ = fd.readable().await;
            }
            let Some(inner) = weak.upgrade() else {
                return;
            };
            if runner.destroying.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let id = runner.id.clone();
            let cleanup = inner.clone();
            let reason = blocking(move || {
                let reason = cleanup.why_init_died(&runner);
                let _ = runner.died.set(reason.clone());
                warn!(runner_id = %runner.id, environment_id = %runner.environment, reason = %reason, "runner stopped on its own");
                runner
                    .destroying
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                if let Err(e) = cleanup.teardown(&runner.id, Some(&runner.handle)) {
                    warn!(runner_id = %runner.id, error = %e, "cleaning up a stopped runner failed; the next start removes what is left");
                }
                reason
            })
            .await
            .unwrap_or_else(|e| DestroyReason::Stopped(e.to_string()));
            lock(&inner.runners).remove(&id);
            if let Some(network) = inner.network.get() {
                network.detach(&id).await;
            }
            let _ = inner
                .events_tx
                .send(BackendEvent::RunnerStopped { runner: id, reason });
        });
    }

    /// Tears down a runner whose init stopped answering and reports it stopped, so that
    /// runner-core replaces it and ends what still runs on it.
    fn control_plane_failed(self: &Arc<Self>, runner: &Arc<Runner>, error: &ControlError) {
        if runner
            .destroying
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        error!(runner_id = %runner.id, environment_id = %runner.environment, error = %error, "the runner's init stopped answering; destroying the runner");
        let id = runner.id.clone();
        lock(&self.runners).remove(&id);
        let (inner, runner) = (self.clone(), runner.clone());
        tokio::spawn(async move {
            let cleanup = inner.clone();
            let torn = tokio::task::spawn_blocking(move || {
                // An init that died (e.g. killed for memory) is why it did not answer.
                let reason = if has_exited(&runner.handle) {
                    cleanup.why_init_died(&runner)
                } else {
                    DestroyReason::Stopped("the runner's control process stopped answering".into())
                };
                (reason, cleanup.teardown(&runner.id, Some(&runner.handle)))
            })
            .await;
            let reason = match torn {
                Ok((reason, result)) => {
                    if let Err(e) = result {
                        warn!(runner_id = %id, error = %e, "tearing down the broken runner failed");
                    }
                    reason
                }
                Err(e) => {
                    warn!(runner_id = %id, error = %e, "tearing down the broken runner failed");
                    DestroyReason::Stopped("the runner's control process stopped answering".into())
                }
            };
            if let Some(network) = inner.network.get() {
                network.detach(&id).await;
            }
            let _ = inner
                .events_tx
                .send(BackendEvent::RunnerStopped { runner: id, reason });
        });
    }

    /// Why the runner's init, which has exited, died. Reaps it when it is our child: an init
    /// that exited by itself was not killed for memory, whatever else in the runner was
    /// (a single process killed for memory in a surviving runner counts in the same cgroup).
    /// Blocking.
    fn why_init_died(&self, runner: &Runner) -> DestroyReason {
        use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
        let pid = nix::unistd::Pid::from_raw(runner.handle.pid);
        let status = if start_time(runner.handle.pid) == Some(runner.handle.start_time) {
            waitpid(pid, Some(WaitPidFlag::WNOHANG)).ok()
        } else {
            None
        };
        let killed = match status {
            Some(WaitStatus::Exited(..)) => false,
            Some(WaitStatus::Signaled(_, signal, _)) => signal == nix::sys::signal::SIGKILL,
            // Not our child (e.g. after a restart): only the counters tell.
            _ => true,
        };
        let id = runner.id.as_str();
        if killed && self.driver.oom_killed(id) {
            DestroyReason::OomKilled
        } else if self.driver.process_limit_hit(id) {
            DestroyReason::ProcessLimitReached
        } else {
            DestroyReason::Stopped(format!("the runner's init process exited ({status:?})"))
        }
    }

    /// Kills the runner's init (and with it the whole pid namespace), waits for it, then removes
    /// its cgroups, socket and record. Blocking; may take a while (see [`Inner::await_init_exit`]).
    fn teardown(&self, id: &RunnerId, handle: Option<&Handle>) -> Result<(), BackendError> {
        if let Some(handle) = handle {
            signal_init(handle);
            let _ = std::fs::remove_file(&handle.socket);
            self.await_init_exit(id, handle);
        }
        let cg = self.driver.destroy(id.as_str());
        self.store.remove_runner(id).map_err(internal)?;
        cg.map_err(internal)
    }

    /// Waits (bounded) until the killed init is gone, reaping it when it is our child.
    ///
    /// An init dies only once every process of its pid namespace has, and a frozen process
    /// cannot die: when the init was killed while it had an execution's cgroup frozen (it
    /// freezes one to kill an execution's tree, e.g. after a time limit or a closed socket), that
    /// cgroup stays frozen and the init hangs in its exit. So the runner's cgroups are thawed
    /// first, and again while waiting (the init may have frozen one a moment after the first
    /// thaw, in the system call it was in when the signal came).
    fn await_init_exit(&self, id: &RunnerId, handle: &Handle) {
        const THAW_EVERY: Duration = Duration::from_millis(50);
        let started = Instant::now();
        let mut next_thaw = started;
        loop {
            let now = Instant::now();
            match init_state(handle) {
                InitState::Gone => return,
                InitState::ZombieOfAnother if now >= started + ZOMBIE_HANDOVER => return,
                InitState::Alive | InitState::ZombieOfAnother => {}
            }
            if now >= started + INIT_EXIT_TIMEOUT {
                warn!(runner_id = %id, pid = handle.pid, "the runner's init did not exit after SIGKILL");
                return;
            }
            if now >= next_thaw {
                self.driver.thaw(id.as_str());
                next_thaw = now + THAW_EVERY;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Tears `runner` down in the background (see [`LocalExecutor::teardowns_finished`]).
    fn spawn_teardown(self: &Arc<Self>, runner: Arc<Runner>) {
        lock(&self.tearing_down).insert(runner.id.clone());
        self.teardowns.send_modify(|running| *running += 1);
        let inner = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let (work, r) = (inner.clone(), runner.clone());
            let result = blocking(move || work.teardown(&r.id, Some(&r.handle)))
                .await
                .and_then(|r| r);
            if let Some(network) = inner.network.get() {
                network.detach(&runner.id).await;
            }
            let took_ms = started.elapsed().as_millis() as u64;
            match result {
                Ok(()) => {
                    debug!(runner_id = %runner.id, environment_id = %runner.environment, took_ms, "runner torn down");
                }
                Err(e) => {
                    warn!(runner_id = %runner.id, environment_id = %runner.environment, took_ms, error = %e, "tearing down the runner failed; the next start removes what is left");
                }
            }
            lock(&inner.tearing_down).remove(&runner.id);
            inner.teardowns.send_modify(|running| *running -= 1);
        });
    }

    fn limits(&self, spec: &EnvironmentSpec) -> Limits {
        let mb = if spec.memory_limit == 0 {
            self.config.default_memory_mb
        } else {
            spec.memory_limit
        };
        Limits {
            memory_bytes: u64::from(mb) << 20,
            // Two more places, for the init's standby leader and its file helper forked ahead,
            // which the runner's own code never sees as its processes.
            max_processes: self.config.max_processes.saturating_add(2),
            cpu_shares: Limits::cpu_shares_from_mhz(spec.cpu_limit),
        }
    }

    /// Sizes of a runner's writable layer and `/dev/shm` in MB. Their pages count against the
    /// runner's memory, so the layer gets at most half of it and `/dev/shm` a quarter: filling
    /// them ends in "No space left on device" inside a runner that survives, not in an OOM kill
    /// of the whole runner.
    fn tmpfs_sizes_mb(&self, memory_bytes: u64) -> (u32, u32) {
        let memory_mb = u32::try_from(memory_bytes >> 20).unwrap_or(u32::MAX);
        (
            self.config.disk_limit_mb.min(memory_mb / 2).max(1),
            self.config.shm_limit_mb.min(memory_mb / 4).max(1),
        )
    }

    fn root_spec(&self, spec: &EnvironmentSpec) -> RootSpec {
        match self.config.images.get(&spec.image) {
            Some(dir) => RootSpec::Image {
                dir: dir.clone(),
                passwd: rootfs::passwd(),
                group: rootfs::group(),
            },
            None => {
                if lock(&self.logged_host_images).insert(spec.id) {
                    info!(
                        environment_id = %spec.id,
                        image = %spec.image,
                        "no root filesystem configured for this image; runners use the host's allow-listed system directories"
                    );
                }
                RootSpec::Host {
                    allow: rootfs::HOST_ALLOW_LIST.iter().map(PathBuf::from).collect(),
                    etc: self.paths.etc.clone(),
                }
            }
        }
    }
}

/// Why runner networking could not start, in words an operator can act on.
fn network_unavailable_reason(error: &local_network::NetworkError) -> String {
    match error {
        local_network::NetworkError::ToolMissing { tool, package } => format!(
            "`{tool}` is not installed; install it with `apt-get install {package}` and restart the server"
        ),
        other => other.to_string(),
    }
}

/// Rewrites a runner's record after its network changed on reattachment.
fn update_network(store: &StateStore, id: &RunnerId, handle: &Handle) -> Result<(), BackendError> {
    let Some(mut record) = store.runner(id).map_err(internal)? else {
        return Ok(());
    };
    record.mapped_ports = handle
        .network
        .as_ref()
        .map(|n| n.mapped_ports.clone())
        .unwrap_or_default();
    record.backend_data = serde_json::to_vec(handle).map_err(internal)?;
    store.put_runner(&record).map_err(internal)
}

/// SIGKILL to a runner's init, only if the pid still is that init. Does not wait.
fn signal_init(handle: &Handle) {
    if is_alive(handle) {
        let pid = nix::unistd::Pid::from_raw(handle.pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

/// Where a killed runner's init is on its way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InitState {
    /// Still running.
    Alive,
    /// Dead and reaped (here, when it was our child), or its pid belongs to another process.
    Gone,
    /// Dead, but the zombie of another process. Right after its creation that is the sandbox
    /// helper, whose exit hands the init to us (we are the subreaper of the inits we start), so
    /// it is worth waiting a moment to reap it rather than leave a zombie until we exit (nothing
    /// here reaps a zombie handed over later). After a restart it is the host's init, which
    /// reaps it in its own time.
    ZombieOfAnother,
}

fn init_state(handle: &Handle) -> InitState {
    if start_time(handle.pid) != Some(handle.start_time) {
        return InitState::Gone;
    }
    let pid = nix::unistd::Pid::from_raw(handle.pid);
    match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
        Ok(nix::sys::wait::WaitStatus::StillAlive) => InitState::Alive,
        Ok(_) => InitState::Gone,
        Err(_) => match init_process_state(handle) {
            None => InitState::Gone,
            Some('Z') => InitState::ZombieOfAnother,
            Some(_) => InitState::Alive,
        },
    }
}

async fn spawn_sandbox(
    fork_server: &Arc<ForkServer>,
    spec: &SandboxSpec,
) -> Result<Handle, LocalError> {
    let launched = {
        let (fork_server, spec) = (fork_server.clone(), spec.clone());
        tokio::task::spawn_blocking(move || fork_server.launch(&spec))
            .await
            .map_err(|e| LocalError::Sandbox(e.to_string()))??
    };
    let reports = tokio::net::unix::pipe::Receiver::from_owned_fd(launched)
        .map_err(|e| LocalError::io("reading from the sandbox helper", e))?;
    let talk = async {
        let mut lines = BufReader::new(reports).lines();
        // The helper's "pid" and the init's "ready" may arrive in either order.
        let (mut pid, mut ready) = (None, false);
        while let Some(line) = lines
            .next_line()
            .await
            .map_err(|e| LocalError::io("reading from the sandbox helper", e))?
        {
            if let Some(p) = line.strip_prefix("pid ") {
                pid = p.trim().parse::<i32>().ok();
            } else if line == "ready" {
                ready = true;
            } else if let Some(message) = line.strip_prefix("error ") {
                return Err(LocalError::Sandbox(message.to_string()));
            }
            if let (Some(pid), true) = (pid, ready) {
                let start_time = start_time(pid)
                    .ok_or_else(|| LocalError::Sandbox("init vanished after start".into()))?;
                return Ok(Handle {
                    pid,
                    start_time,
                    socket: spec.socket.clone(),
                    network: None,
                });
            }
        }
        Err(LocalError::Sandbox(
            "the sandbox helper exited without starting the runner".into(),
        ))
    };
    tokio::time::timeout(CREATE_TIMEOUT, talk)
        .await
        .unwrap_or_else(|_| Err(LocalError::Sandbox("timed out starting the runner".into())))
}

#[async_trait]
impl ExecutorApi for LocalExecutor {
    async fn register_environment(&self, spec: &EnvironmentSpec) -> Result<(), BackendError> {
        if (spec.network_access || !spec.exposed_ports.is_empty())
            && self.inner.network.get().is_none()
        {
            return Err(self.networking_refused());
        }
        let store = self.inner.store.clone();
        let spec = spec.clone();
        blocking(move || store.put_environment(&spec))
            .await?
            .map_err(internal)
    }

    async fn delete_environment(&self, id: EnvironmentId) -> Result<(), BackendError> {
        let store = self.inner.store.clone();
        blocking(move || store.remove_environment(id))
            .await?
            .map_err(internal)
    }

    async fn load_environments(&self) -> Result<Vec<EnvironmentSpec>, BackendError> {
        let store = self.inner.store.clone();
        blocking(move || store.environments())
            .await?
            .map_err(internal)
    }

    async fn create_runner(&self, spec: &EnvironmentSpec) -> Result<Creation, BackendError> {
        let inner = &self.inner;
        let id = RunnerId::generate(spec.id);
        let started = Instant::now();
        let limits = inner.limits(spec);
        let (disk_limit_mb, shm_limit_mb) = inner.tmpfs_sizes_mb(limits.memory_bytes);
        let driver_inner = inner.clone();
        let cg_id = id.clone();
        let placement = blocking(move || {
            driver_inner
                .driver
                .create(cg_id.as_str(), &limits, driver_inner.uid_base)
        })
        .await?;
        let placement = match placement {
            Ok(p) => p,
            Err(e) => {
                let (inner, id2) = (inner.clone(), id.clone());
                let cleaned = blocking(move || inner.driver.destroy(id2.as_str())).await;
                if let Ok(Err(cleanup)) = cleaned {
                    warn!(runner_id = %id, error = %cleanup, "removing the cgroups of a failed creation failed");
                }
                return Err(internal(e));
            }
        };
        let sandbox = SandboxSpec {
            runner_id: id.to_string(),
            socket: inner.socket_path(&id),
            staging: inner.paths.staging.clone(),
            uid_base: inner.uid_base,
            ns_owner: namespace_owner(&id),
            root: inner.root_spec(spec),
            disk_limit_mb,
            shm_limit_mb,
            procs_files: placement.procs_files.clone(),
            exec_parent: placement.exec_parent.clone(),
            exec_kill: placement.exec_kill,
            max_open_files: inner.config.max_open_files,
            max_file_size: inner.config.max_file_size_mb << 20,
        };
        let mut handle = match spawn_sandbox(&inner.fork_server, &sandbox).await {
            Ok(h) => h,
            Err(e) => {
                error!(runner_id = %id, environment_id = %spec.id, error = %e, "cannot create runner");
                let (inner, id2, socket) = (inner.clone(), id.clone(), sandbox.socket.clone());
                let _ = blocking(move || {
                    let _ = std::fs::remove_file(socket);
                    inner.driver.destroy(id2.as_str())
                })
                .await;
                return Err(BackendError::Internal(e.to_string()));
            }
        };
        if spec.network_access || !spec.exposed_ports.is_empty() {
            match self.connect_network(&id, &handle, spec).await {
                Ok(network) => handle.network = Some(network),
                Err(e) => {
                    let (inner2, id2) = (inner.clone(), id.clone());
                    let torn = blocking(move || inner2.teardown(&id2, Some(&handle))).await;
                    if let Err(cleanup) | Ok(Err(cleanup)) = torn {
                        warn!(runner_id = %id, error = %cleanup, "tearing down a runner whose network failed failed");
                    }
                    return Err(e);
                }
            }
        }
        let mapped_ports = handle
            .network
            .as_ref()
            .map(|n| n.mapped_ports.clone())
            .unwrap_or_default();
        let record = StoredRunner {
            id: id.clone(),
            environment: spec.id,
            state: RunnerState::Idle,
            mapped_ports: mapped_ports.clone(),
            backend_data: serde_json::to_vec(&handle).map_err(internal)?,
        };
        let runner = Arc::new(Runner::new(id.clone(), spec.id, handle, false));
        let store = inner.store.clone();
        if let Err(e) = blocking(move || store.put_runner(&record)).await? {
            let (inner2, r) = (inner.clone(), runner.clone());
            let torn = blocking(move || inner2.teardown(&r.id, Some(&r.handle))).await;
            if let Err(cleanup) | Ok(Err(cleanup)) = torn {
                warn!(runner_id = %id, error = %cleanup, "tearing down a runner whose record could not be stored failed");
            }
            self.disconnect_network(&id).await;
            return Err(internal(e));
        }
        lock(&inner.runners).insert(id.clone(), runner.clone());
        inner.watch(runner);
        debug!(runner_id = %id, environment_id = %spec.id, startup_ms = started.elapsed().as_millis() as u64, "runner created");
        Ok(Creation::Ready(RunnerInfo {
            id,
            environment: spec.id,
            mapped_ports,
        }))
    }

    async fn destroy_runner(
        &self,
        runner: &RunnerId,
        reason: &DestroyReason,
    ) -> Result<(), BackendError> {
        let found = lock(&self.inner.runners).remove(runner);
        let Some(r) = found else {
            if lock(&self.inner.tearing_down).contains(runner) {
                return Ok(());
            }
            // Unknown here: remove whatever an earlier run may have left of it.
            let (inner, id) = (self.inner.clone(), runner.clone());
            return blocking(move || {
                let _ = inner.driver.destroy(id.as_str());
                inner.store.remove_runner(&id).map_err(internal)
            })
            .await?;
        };
        debug!(runner_id = %r.id, environment_id = %r.environment, reason = %reason, "destroying runner");
        // The runner is unusable from here on: out of the map, its init killed and its socket
        // gone, so neither this process nor a next start after a crash can reach it (a record
        // whose init does not answer is cleaned up at start). Waiting for the init to exit and
        // removing cgroups, record and network take longer: the caller does not wait for that.
        r.destroying
            .store(true, std::sync::atomic::Ordering::SeqCst);
        signal_init(&r.handle);
        let _ = std::fs::remove_file(&r.handle.socket);
        self.inner.spawn_teardown(r);
        Ok(())
    }

    async fn record_activity(
        &self,
        runner: &RunnerId,
        deadline: std::time::SystemTime,
    ) -> Result<(), BackendError> {
        let store = self.inner.store.clone();
        let id = runner.clone();
        blocking(move || store.refresh_deadline(&id, deadline))
            .await?
            .map_err(internal)
    }

    async fn mark_runner(
        &self,
        runner: &RunnerId,
        state: &RunnerState,
    ) -> Result<(), BackendError> {
        self.runner(runner)?;
        let store = self.inner.store.clone();
        let (id, state) = (runner.clone(), *state);
        blocking(move || store.set_runner_state(&id, &state))
            .await?
            .map_err(internal)
    }

    async fn load_runners(
        &self,
        environment: EnvironmentId,
    ) -> Result<Vec<RunnerRecord>, BackendError> {
        let runners: Vec<Arc<Runner>> = lock(&self.inner.runners)
            .values()
            .filter(|r| r.environment == environment)
            .cloned()
            .collect();
        let store = self.inner.store.clone();
        let clean = self.inner.clean_start;
        blocking(move || {
            let mut out = Vec::new();
            for r in runners {
                let Some(record) = store.runner(&r.id).map_err(internal)? else {
                    continue;
                };
                let state = match record.state {
                    RunnerState::Used(u) => RecordedState::Used(u),
                    RunnerState::Idle if r.recovered && !clean => RecordedState::Uncertain,
                    RunnerState::Idle => RecordedState::Idle,
                };
                out.push(RunnerRecord {
                    info: RunnerInfo {
                        id: r.id.clone(),
                        environment: r.environment,
                        mapped_ports: record.mapped_ports,
                    },
                    state,
                });
            }
            Ok(out)
        })
        .await?
    }

    async fn execute(
        &self,
        runner: &RunnerId,
        request: &ExecutionRequest,
        cancel: CancellationToken,
    ) -> Result<ExecutionHandle, BackendError> {
        let r = self.runner(runner)?;
        request
            .validate()
            .map_err(|e| BackendError::InvalidRequest(e.to_string()))?;
        let message = Request::Exec {
            command: request.command.clone(),
            privileged: request.privileged_execution,
            env: request
                .environment
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let socket = r.handle.socket.clone();
        // The init itself answers (it forks the command and sends its terminal at once).
        let started = blocking(
            move || -> Result<Option<(UnixStream, Vec<OwnedFd>)>, ControlError> {
                let conn = send_request(&socket, &message)?;
                let (response, fds): (Response, _) =
                    recv_with_fds(&conn, 2).map_err(ControlError::Unresponsive)?;
                conn.set_read_timeout(None)?;
                conn.set_write_timeout(None)?;
                match response {
                    Response::Started if fds.len() == 2 => Ok(Some((conn, fds))),
                    Response::ProcessLimit => Ok(None),
                    Response::Error { message } => Err(BackendError::Internal(message).into()),
                    other => Err(internal(format!("unexpected answer {other:?}")).into()),
                }
            },
        )
        .await?;
        let Some((conn, fds)) = self.control(&r, started)? else {
            // The init could not fork: the client learns why in the stream, and the runner,
            // useless now, is replaced.
            report_process_limit(&self.inner.events_tx, &r);
            let (events_tx, events_rx) = mpsc::channel(1);
            let (stdin_tx, _) = mpsc::channel(1);
            let _ =
                events_tx.try_send(ExecutionEvent::Error(ExecutionFailure::ProcessLimitReached));
            return Ok(ExecutionHandle {
                stdin: stdin_tx,
                events: events_rx,
            });
        };
        let mut fds = fds.into_iter();
        let (Some(master), Some(stderr)) = (fds.next(), fds.next()) else {
            return Err(internal("missing descriptors"));
        };
        for fd in [&master, &stderr] {
            rustix::fs::fcntl_setfl(fd, rustix::fs::OFlags::NONBLOCK).map_err(internal)?;
        }
        conn.set_nonblocking(true).map_err(internal)?;
        let conn = tokio::net::UnixStream::from_std(conn).map_err(internal)?;
        let master = async_fd(master).map_err(internal)?;
        let stderr = async_fd(stderr).map_err(internal)?;
        let (events_tx, events_rx) = mpsc::channel(EVENT_BUFFER);
        let (stdin_tx, stdin_rx) = mpsc::channel(STDIN_BUFFER);
        let pump = Pump {
            master,
            stderr,
            conn,
            stdin: stdin_rx,
            events: events_tx,
            cancel,
            runner: r.clone(),
            backend_events: self.inner.events_tx.clone(),
        };
        tokio::spawn(pump.run());
        Ok(ExecutionHandle {
            stdin: stdin_tx,
            events: events_rx,
        })
    }

    async fn update_files(&self, runner: &RunnerId, update: &FileUpdate) -> Result<(), FileError> {
        let r = self.runner(runner)?;
        for p in update
            .delete
            .iter()
            .chain(update.copy.iter().map(|c| &c.path))
        {
            if p.contains('\0') || p.is_empty() || p.len() > MAX_PATH_LEN {
                return Err(FileError::InvalidPath(p.clone()));
            }
        }
        let socket = r.handle.socket.clone();
        let update = update.clone();
        let stall = self.inner.config.stall_timeout;
        let responses = blocking(move || -> Result<Vec<Response>, ControlError> {
            let mut responses = Vec::new();
            for batch in update_batches(&update) {
                let request = Request::Update {
                    delete: batch.delete.iter().map(|d| (*d).clone()).collect(),
                    copies: batch
                        .copy
                        .iter()
                        .map(|c| CopyHeader {
                            path: c.path.clone(),
                            len: c.content.len() as u64,
                        })
                        .collect(),
                };
                let mut conn = send_request(&socket, &request)?;
                if let Some(refused) = await_accepted(&mut conn, stall)? {
                    responses.push(refused);
                    break;
                }
                // The helper writing the files ends early when the runner runs out of memory
                // (or is killed otherwise): say so instead of "failed to fill whole buffer".
                let helper_ended = |e: io::Error| -> ControlError {
                    BackendError::Internal(format!(
                        "the runner's file helper ended before the files were written ({e})"
                    ))
                    .into()
                };
                write_contents(&mut conn, &batch.copy).map_err(helper_ended)?;
                responses.push(read_msg(&mut conn, MAX_RESPONSE).map_err(helper_ended)?);
            }
            Ok(responses)
        })
        .await?;
        let responses = match self.control(&r, responses) {
            Err(BackendError::Internal(message))
                if message.starts_with("the runner's file helper ended") =>
            {
                let driver_says_oom = {
                    let inner = self.inner.clone();
                    let id = r.id.clone();
                    blocking(move || inner.driver.oom_killed(id.as_str()))
                        .await
                        .unwrap_or(false)
                };
                return Err(BackendError::Internal(if driver_says_oom {
                    "the runner ran out of memory while the files were written; the files that \
                     did not fit are missing"
                        .to_string()
                } else {
                    message
                })
                .into());
            }
            other => other?,
        };
        let mut failures = Vec::new();
        for response in responses {
            match response {
                Response::Updated { failures: f } => {
                    failures.extend(f.into_iter().map(|f| FileFailure {
                        path: f.path,
                        reason: f.reason,
                    }));
                }
                Response::ProcessLimit => return Err(self.file_op_process_limit(&r)),
                Response::Error { message } => return Err(internal(message).into()),
                other => return Err(internal(format!("unexpected answer {other:?}")).into()),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(FileError::Partial(failures))
        }
    }

    async fn list_files(
        &self,
        runner: &RunnerId,
        request: &ListFilesRequest,
    ) -> Result<Vec<FileHeader>, FileError> {
        let r = self.runner(runner)?;
        if request.path.contains('\0') {
            return Err(FileError::InvalidPath(request.path.clone()));
        }
        let socket = r.handle.socket.clone();
        let message = Request::List {
            path: request.path.clone(),
            recursive: request.recursive,
            privileged: request.privileged,
        };
        let stall = self.inner.config.stall_timeout;
        let response = blocking(move || -> Result<Response, ControlError> {
            let mut conn = send_request(&socket, &message)?;
            if let Some(refused) = await_accepted(&mut conn, stall)? {
                return Ok(refused);
            }
            Ok(read_msg(&mut conn, MAX_RESPONSE)?)
        })
        .await?;
        let response = self.control(&r, response)?;
        match response {
            Response::Listing { entries } => Ok(entries
                .into_iter()
                .map(|e| FileHeader {
                    name: e.name,
                    entry_type: e.entry_type,
                    link_target: e.link_target,
                    size: e.size,
                    modification_time: e.modification_time,
                    permissions: e.permissions,
                    owner: e.owner,
                    group: e.group,
                })
                .collect()),
            Response::NotFound => Err(FileError::NotFound),
            Response::ProcessLimit => Err(self.file_op_process_limit(&r)),
            Response::Error { message } => Err(internal(message).into()),
            other => Err(internal(format!("unexpected answer {other:?}")).into()),
        }
    }

    async fn read_file(
        &self,
        runner: &RunnerId,
        path: &str,
        privileged: bool,
    ) -> Result<FileContent, FileError> {
        let r = self.runner(runner)?;
        if path.contains('\0') || path.is_empty() {
            return Err(FileError::InvalidPath(path.to_string()));
        }
        let socket = r.handle.socket.clone();
        let message = Request::Read {
            path: path.to_string(),
            privileged,
        };
        let stall = self.inner.config.stall_timeout;
        let outcome = blocking(move || -> Result<(Response, UnixStream), ControlError> {
            let mut conn = send_request(&socket, &message)?;
            if let Some(refused) = await_accepted(&mut conn, stall)? {
                return Ok((refused, conn));
            }
            let response = read_msg(&mut conn, MAX_RESPONSE)?;
            conn.set_read_timeout(None)?;
            Ok((response, conn))
        })
        .await?;
        let (response, conn) = self.control(&r, outcome)?;
        let size = match response {
            Response::File { size } => size,
            Response::NotFound => return Err(FileError::NotFound),
            Response::ProcessLimit => return Err(self.file_op_process_limit(&r)),
            Response::Error { message } => return Err(internal(message).into()),
            other => return Err(internal(format!("unexpected answer {other:?}")).into()),
        };
        conn.set_nonblocking(true).map_err(internal)?;
        let conn = tokio::net::UnixStream::from_std(conn).map_err(internal)?;
        let body = stream::unfold((conn, size), move |(mut conn, left)| async move {
            if left == 0 {
                return None;
            }
            let mut buf = vec![0u8; left.min(64 * 1024) as usize];
            let read = tokio::time::timeout(stall, conn.read(&mut buf))
                .await
                .unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the runner stopped sending the file",
                    ))
                });
            match read {
                Ok(0) => Some((
                    Err(FileError::Backend(internal("the file ended early"))),
                    (conn, 0),
                )),
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(Bytes::from(buf)), (conn, left - n as u64)))
                }
                Err(e) => Some((Err(FileError::Backend(internal(e))), (conn, 0))),
            }
        });
        Ok(FileContent {
            size,
            body: body.boxed(),
        })
    }

    fn events(&self) -> BoxStream<'static, BackendEvent> {
        match lock(&self.inner.events_rx).take() {
            Some(mut rx) => stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed(),
            None => stream::pending().boxed(),
        }
    }
}

/// One request's share of a file update.
#[derive(Debug, Default)]
struct UpdateBatch<'a> {
    delete: Vec<&'a String>,
    copy: Vec<&'a FileCopy>,
}

/// Splits `update` into requests whose headers stay well within the init's request limit
/// (`protocol::MAX_REQUEST`), deletions first: together they do what `update` asks, in order.
fn update_batches(update: &FileUpdate) -> Vec<UpdateBatch<'_>> {
    const HEADER_BUDGET: usize = 256 << 10;
    const PER_ENTRY: usize = 48;
    let mut batches = vec![UpdateBatch::default()];
    let mut used = 0;
    let mut room = |len: usize, batches: &mut Vec<UpdateBatch<'_>>| {
        let cost = len + PER_ENTRY;
        let last = batches
            .last()
            .is_some_and(|b| !b.delete.is_empty() || !b.copy.is_empty());
        if used + cost > HEADER_BUDGET && last {
            batches.push(UpdateBatch::default());
            used = 0;
        }
        used += cost;
    };
    for d in &update.delete {
        room(d.len(), &mut batches);
        if let Some(b) = batches.last_mut() {
            b.delete.push(d);
        }
    }
    for c in &update.copy {
        room(c.path.len(), &mut batches);
        if let Some(b) = batches.last_mut() {
            b.copy.push(c);
        }
    }
    batches
}

/// Most file contents handed to one `writev`.
const CONTENTS_PER_WRITE: usize = 256;

/// Sends the contents of `copies` back to back, many files per system call (a gathered write,
/// nothing copied): per-file writes would cost a system call, and a wakeup of the helper, each.
fn write_contents(conn: &mut UnixStream, copies: &[&FileCopy]) -> io::Result<()> {
    for group in copies.chunks(CONTENTS_PER_WRITE) {
        let mut slices: Vec<io::IoSlice<'_>> = group
            .iter()
            .filter(|c| !c.content.is_empty())
            .map(|c| io::IoSlice::new(&c.content))
            .collect();
        let mut pending = &mut slices[..];
        while !pending.is_empty() {
            match io::Write::write_vectored(conn, pending) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => io::IoSlice::advance_slices(&mut pending, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Moves one execution's bytes: PTY master → `Stdout`, stderr pipe → `Stderr`, stdin channel →
/// PTY master, and the init's exit report → `Exit`. Every send awaits the bounded channel, so a
/// slow consumer stops the reads and the process blocks on its full terminal.
struct Pump {
    master: AsyncFd<OwnedFd>,
    stderr: AsyncFd<OwnedFd>,
    conn: tokio::net::UnixStream,
    stdin: mpsc::Receiver<Bytes>,
    events: mpsc::Sender<ExecutionEvent>,
    cancel: CancellationToken,
    runner: Arc<Runner>,
    backend_events: mpsc::UnboundedSender<BackendEvent>,
}

/// Keeps a finished execution's stderr pipe open while processes it left in the background
/// still hold it: they keep running until the runner is destroyed (design §2), and a write to a
/// pipe without a reader would kill them with `SIGPIPE`. What they write is discarded. The pipe
/// closes when its last writer is gone (at the latest with the runner's processes), when the
/// runner is being destroyed, or after [`LINGERING_STDERR_BYTES`], whichever comes first; at
/// most [`LINGERING_STDERR_MAX`] per runner stay open.
fn keep_stderr_for_background(stderr: AsyncFd<OwnedFd>, runner: &Arc<Runner>) {
    use std::sync::atomic::Ordering;
    if runner.lingering_stderr.fetch_add(1, Ordering::SeqCst) >= LINGERING_STDERR_MAX {
        runner.lingering_stderr.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    let runner = runner.clone();
    tokio::spawn(async move {
        let mut discard = vec![0u8; 16 << 10];
        let mut left = LINGERING_STDERR_BYTES;
        while left > 0 && !runner.destroying.load(Ordering::SeqCst) {
            match read_fd(&stderr, &mut discard).await {
                Ok(n) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
        runner.lingering_stderr.fetch_sub(1, Ordering::SeqCst);
    });
}

async fn read_fd(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard
            .try_io(|inner| rustix::io::read(inner.get_ref(), &mut *buf).map_err(io::Error::from))
        {
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

async fn write_fd(fd: &AsyncFd<OwnedFd>, buf: &[u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.writable().await?;
        match guard.try_io(|inner| rustix::io::write(inner.get_ref(), buf).map_err(io::Error::from))
        {
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

enum Step {
    Out(io::Result<usize>),
    Err(io::Result<usize>),
    Control(io::Result<usize>),
    Stdin(Option<Bytes>),
    Wrote(io::Result<usize>),
    Quiet,
    Cancelled,
}

impl Pump {
    async fn send(&self, event: ExecutionEvent) -> bool {
        tokio::select! {
            r = self.events.send(event) => r.is_ok(),
            () = self.cancel.cancelled() => false,
        }
    }

    async fn run(mut self) {
        let mut out_buf = vec![0u8; 16 * 1024];
        let mut err_buf = vec![0u8; 16 * 1024];
        let mut ctl_buf = [0u8; 256];
        let mut control = Vec::new();
        let (mut out_open, mut err_open, mut stdin_open) = (true, true, true);
        let mut pending: Option<Bytes> = None;
        let mut exit: Option<u8> = None;
        let mut exited_at = Instant::now();
        let mut quiet_until = tokio::time::Instant::now();
        loop {
            if exit.is_some() && !out_open && !err_open {
                break;
            }
            let step = tokio::select! {
                biased;
                () = self.cancel.cancelled() => Step::Cancelled,
                r = read_fd(&self.master, &mut out_buf), if out_open => Step::Out(r),
                r = read_fd(&self.stderr, &mut err_buf), if err_open => Step::Err(r),
                r = self.conn.read(&mut ctl_buf), if exit.is_none() => Step::Control(r),
                b = self.stdin.recv(), if stdin_open && pending.is_none() => Step::Stdin(b),
                r = write_fd(&self.master, pending.as_deref().unwrap_or_default()), if pending.is_some() => Step::Wrote(r),
                () = tokio::time::sleep_until(quiet_until), if exit.is_some() => Step::Quiet,
            };
            match step {
                Step::Cancelled => return,
                Step::Out(Ok(n)) if n > 0 => {
                    if !self
                        .send(ExecutionEvent::Stdout(Bytes::copy_from_slice(
                            &out_buf[..n],
                        )))
                        .await
                    {
                        return;
                    }
                }
                Step::Out(_) => out_open = false,
                Step::Err(Ok(n)) if n > 0 => {
                    if !self
                        .send(ExecutionEvent::Stderr(Bytes::copy_from_slice(
                            &err_buf[..n],
                        )))
                        .await
                    {
                        return;
                    }
                }
                Step::Err(_) => err_open = false,
                Step::Control(Ok(n)) if n > 0 => {
                    control.extend_from_slice(&ctl_buf[..n]);
                    if control.len() >= 4 {
                        let len =
                            u32::from_be_bytes([control[0], control[1], control[2], control[3]])
                                as usize;
                        if control.len() >= 4 + len {
                            match serde_json::from_slice::<Response>(&control[4..4 + len]) {
                                Ok(Response::Exit { code }) => {
                                    exit = Some(code);
                                    exited_at = Instant::now();
                                }
                                Ok(Response::ProcessLimit) => {
                                    // The command never ran: its session leader could not fork.
                                    report_process_limit(&self.backend_events, &self.runner);
                                    let _ = self
                                        .send(ExecutionEvent::Error(
                                            ExecutionFailure::ProcessLimitReached,
                                        ))
                                        .await;
                                    return;
                                }
                                _ => {
                                    self.fail().await;
                                    return;
                                }
                            }
                        }
                    }
                }
                Step::Control(_) => {
                    self.fail().await;
                    return;
                }
                Step::Stdin(Some(b)) => pending = (!b.is_empty()).then_some(b),
                Step::Stdin(None) => {
                    stdin_open = false;
                    // End of input on a terminal is its EOF character.
                    pending = Some(Bytes::from_static(&[4]));
                }
                Step::Wrote(Ok(n)) => {
                    pending = pending.and_then(|p| (n < p.len()).then(|| p.slice(n..)));
                }
                Step::Wrote(Err(_)) => pending = None,
                Step::Quiet => break,
            }
            if exit.is_some() {
                let now = tokio::time::Instant::now();
                let hard = now + DRAIN_MAX.saturating_sub(exited_at.elapsed());
                quiet_until = (now + DRAIN_QUIET).min(hard);
            }
        }
        if let Some(code) = exit {
            let _ = self.send(ExecutionEvent::Exit(code)).await;
            if err_open {
                keep_stderr_for_background(self.stderr, &self.runner);
            }
        }
    }

    /// The init went away without reporting an exit: the runner is gone. Why (killed for
    /// memory, its process table full, …) is known once the init's watcher saw it exit; the
    /// connection breaks a moment before that.
    async fn fail(&self) {
        let mut event = ExecutionEvent::Error(ExecutionFailure::Failed);
        for _ in 0..100 {
            if let Some(reason) = self.runner.died.get() {
                event = reason.execution_event();
                break;
            }
            if self
                .runner
                .destroying
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = self.send(event).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_is_named_with_how_to_install_it() {
        let reason = network_unavailable_reason(&local_network::NetworkError::ToolMissing {
            tool: "nft",
            package: "nftables",
        });
        assert!(reason.contains("`nft` is not installed"), "{reason}");
        assert!(reason.contains("apt-get install nftables"), "{reason}");
    }
}
