//! Per-runner resource limits through cgroups, behind [`CgroupDriver`] with v1, v2 and "none"
//! implementations chosen by [`detect`].
//!
//! A driver only ever touches the cgroups below its instance directory (`poseidon-<hash of the
//! data directory>`), so executors with different data directories never see each other's
//! runners. Each runner's cgroup is delegated to the sandbox's root just enough for its init to
//! create one child cgroup per execution (to kill an execution's whole tree); the limit files
//! stay owned by the host's root.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Gid, Pid, Uid, chown};
use serde::{Deserialize, Serialize};

use crate::error::LocalError;

/// The limits of one runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Most processes at once.
    pub max_processes: u32,
    /// CPU weight as cgroup v1 shares (1024 = one default share).
    pub cpu_shares: u64,
}

impl Limits {
    /// Nomad's `cpuLimit` in MHz is a share, not a quota: 1000 MHz map to 1024 shares (the
    /// default weight of a process), proportionally, at least 2; `0` means the default 1024.
    pub fn cpu_shares_from_mhz(mhz: u32) -> u64 {
        if mhz == 0 {
            1024
        } else {
            (u64::from(mhz) * 1024 / 1000).max(2)
        }
    }

    /// The v2 `cpu.weight` (1..=10000, default 100) for the same share.
    pub fn cpu_weight(&self) -> u64 {
        (1 + (self.cpu_shares.saturating_sub(2)) * 9999 / 262_142).clamp(1, 10_000)
    }
}

/// How the init kills the process tree of one execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ExecKill {
    /// v1: a child cgroup in the freezer hierarchy, frozen, killed, thawed.
    Freezer,
    /// v2: a child cgroup killed with `cgroup.kill`.
    CgroupKill,
    /// No cgroups: the execution's process group.
    ProcessGroup,
}

/// Where a new runner's helper must place itself, and how executions are grouped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// `cgroup.procs` files the helper writes itself into before creating the sandbox.
    pub procs_files: Vec<PathBuf>,
    /// The directory under which the init creates one cgroup per execution.
    pub exec_parent: Option<PathBuf>,
    pub(crate) exec_kill: ExecKill,
}

/// One cgroup implementation. Every method is scoped to this executor's instance directory.
pub trait CgroupDriver: Send + Sync + fmt::Debug {
    /// `v1`, `v2` or `none`.
    fn name(&self) -> &'static str;

    /// The limits this driver enforces, for the start-up log.
    fn enforced(&self) -> &'static [&'static str];

    /// Creates the runner's cgroup with `limits`, delegating execution sub-cgroups to `owner`
    /// (the host uid of the sandbox's root).
    fn create(&self, runner: &str, limits: &Limits, owner: u32) -> Result<Placement, LocalError>;

    /// Kills every process left in the runner's cgroup and removes it; succeeds when it is gone.
    fn destroy(&self, runner: &str) -> Result<(), LocalError>;

    /// Thaws every cgroup of the runner that is frozen, without killing anything.
    ///
    /// A frozen process cannot die, and a pid namespace's init cannot finish exiting while any
    /// process of its namespace is left: an init killed while it had an execution frozen (to
    /// kill that execution's tree) hangs until this is called. Cheap and idempotent.
    fn thaw(&self, runner: &str);

    /// The runners that have a cgroup under this instance (to find leftovers).
    fn runners(&self) -> Vec<String>;

    /// Whether the kernel killed a process of the runner for memory.
    fn oom_killed(&self, runner: &str) -> bool;

    /// Whether a fork in the runner was ever refused for its process limit (`pids.events`).
    fn process_limit_hit(&self, runner: &str) -> bool;

    /// Removes the instance directory when no runner cgroup is left in it.
    fn remove_instance_if_empty(&self);
}

fn cg_err(path: &Path) -> impl FnOnce(io::Error) -> LocalError + '_ {
    move |source| LocalError::Cgroup {
        path: path.to_owned(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<(), LocalError> {
    fs::write(path, value).map_err(cg_err(path))
}

fn mkdir(path: &Path) -> Result<(), LocalError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(cg_err(path)(e)),
    }
}

fn give(path: &Path, owner: u32) -> Result<(), LocalError> {
    chown(path, Some(Uid::from_raw(owner)), Some(Gid::from_raw(owner)))
        .map_err(|e| cg_err(path)(e.into()))
}

/// Every directory below `dir` (itself included), deepest first.
fn tree_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(tree_deepest_first(&e.path()));
            }
        }
    }
    out.push(dir.to_owned());
    out
}

fn pids_in(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    for d in tree_deepest_first(dir) {
        if let Ok(text) = fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    }
    pids
}

/// Removes a cgroup tree, waiting up to `wait` for exiting processes to leave it.
fn remove_tree(dir: &Path, wait: Duration) -> Result<(), LocalError> {
    let deadline = Instant::now() + wait;
    for d in tree_deepest_first(dir) {
        loop {
            match fs::remove_dir(&d) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    for pid in pids_in(&d) {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) if !is_cgroupfs(&d) => {
                    // A fake hierarchy in tests holds regular files.
                    fs::remove_dir_all(&d).map_err(cg_err(&d))?;
                    let _ = e;
                    break;
                }
                Err(e) => return Err(cg_err(&d)(e)),
            }
        }
    }
    Ok(())
}

fn is_cgroupfs(path: &Path) -> bool {
    const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    nix::sys::statfs::statfs(path)
        .map(|s| {
            #[allow(clippy::unnecessary_cast)]
            let t = s.filesystem_type().0 as i64;
            t == CGROUP_SUPER_MAGIC || t == CGROUP2_SUPER_MAGIC
        })
        .unwrap_or(false)
}

fn list_dirs(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn counter(path: &Path, key: &str) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok())?
            })
        })
        .unwrap_or(0)
}

/// cgroup v1: memory, pids, cpu and freezer hierarchies mounted separately under one root.
#[derive(Debug, Clone)]
pub struct V1Driver {
    root: PathBuf,
    instance: String,
}

const V1_CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "freezer"];

impl V1Driver {
    /// A driver for the hierarchies under `root` (usually `/sys/fs/cgroup`), using the instance
    /// directory `instance` in each.
    pub fn new(root: impl Into<PathBuf>, instance: impl Into<String>) -> Self {
        Self {
            root: root.into(),
            instance: instance.into(),
        }
    }

    fn dir(&self, controller: &str, runner: &str) -> PathBuf {
        self.root.join(controller).join(&self.instance).join(runner)
    }

    fn freeze(dir: &Path, state: &str) {
        let _ = fs::write(dir.join("freezer.state"), state);
        if state == "FROZEN" {
            for _ in 0..100 {
                match fs::read_to_string(dir.join("freezer.state")) {
                    Ok(s) if s.trim() == "FREEZING" => std::thread::sleep(Duration::from_millis(2)),
                    _ => break,
                }
            }
        }
    }
}

impl CgroupDriver for V1Driver {
    fn name(&self) -> &'static str {
        "v1"
    }

    fn enforced(&self) -> &'static [&'static str] {
        &["memory", "pids", "cpu shares", "freezer (execution trees)"]
    }

    fn create(&self, runner: &str, limits: &Limits, owner: u32) -> Result<Placement, LocalError> {
        let mut procs_files = Vec::new();
        for c in V1_CONTROLLERS {
            let base = self.root.join(c).join(&self.instance);
            mkdir(&base)?;
            let dir = base.join(runner);
            mkdir(&dir)?;
            match c {
                "memory" => {
                    write(
                        &dir.join("memory.limit_in_bytes"),
                        &limits.memory_bytes.to_string(),
                    )?;
                    // Without swap accounting this file is absent; with it, no swapping around
                    // the limit.
                    let memsw = dir.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write(&memsw, &limits.memory_bytes.to_string())?;
                    }
                }
                "pids" => write(&dir.join("pids.max"), &limits.max_processes.to_string())?,
                "cpu" => write(&dir.join("cpu.shares"), &limits.cpu_shares.to_string())?,
                _ => give(&dir, owner)?,
            }
            procs_files.push(dir.join("cgroup.procs"));
        }
        Ok(Placement {
            procs_files,
            exec_parent: Some(self.dir("freezer", runner)),
            exec_kill: ExecKill::Freezer,
        })
    }

    fn destroy(&self, runner: &str) -> Result<(), LocalError> {
        let freezer = self.dir("freezer", runner);
        if freezer.exists() {
            Self::freeze(&freezer, "FROZEN");
            for pid in pids_in(&freezer) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            // An execution cgroup its init froze (to kill it) stays frozen on its own when the
            // init dies first; frozen tasks cannot die, so thaw the whole tree.
            for dir in tree_deepest_first(&freezer) {
                Self::freeze(&dir, "THAWED");
            }
        }
        for c in V1_CONTROLLERS {
            remove_tree(&self.dir(c, runner), Duration::from_secs(5))?;
        }
        Ok(())
    }

    fn thaw(&self, runner: &str) {
        let freezer = self.dir("freezer", runner);
        for dir in tree_deepest_first(&freezer) {
            let state = dir.join("freezer.state");
            match fs::read_to_string(&state) {
                Ok(s) if s.trim() != "THAWED" => {
                    let _ = fs::write(&state, "THAWED");
                }
                _ => {}
            }
        }
    }

    fn runners(&self) -> Vec<String> {
        let mut all: Vec<String> = V1_CONTROLLERS
            .iter()
            .flat_map(|c| list_dirs(&self.root.join(c).join(&self.instance)))
            .collect();
        all.sort();
        all.dedup();
        all
    }

    fn oom_killed(&self, runner: &str) -> bool {
        counter(
            &self.dir("memory", runner).join("memory.oom_control"),
            "oom_kill",
        ) > 0
    }

    fn process_limit_hit(&self, runner: &str) -> bool {
        counter(&self.dir("pids", runner).join("pids.events"), "max") > 0
    }

    fn remove_instance_if_empty(&self) {
        for c in V1_CONTROLLERS {
            let _ = fs::remove_dir(self.root.join(c).join(&self.instance));
        }
    }
}

/// cgroup v2: one unified hierarchy; `base` is this instance's parent cgroup.
#[derive(Debug, Clone)]
pub struct V2Driver {
    base: PathBuf,
}

impl V2Driver {
    /// A driver whose runners are cgroups directly below `base` (created if missing).
    pub fn new(base: impl Into<PathBuf>) -> Self {
        Self { base: base.into() }
    }
}

impl CgroupDriver for V2Driver {
    fn name(&self) -> &'static str {
        "v2"
    }

    fn enforced(&self) -> &'static [&'static str] {
        &[
            "memory",
            "pids",
            "cpu weight",
            "cgroup.kill (execution trees)",
        ]
    }

    fn create(&self, runner: &str, limits: &Limits, owner: u32) -> Result<Placement, LocalError> {
        fs::create_dir_all(&self.base).map_err(cg_err(&self.base))?;
        write(
            &self.base.join("cgroup.subtree_control"),
            "+memory +pids +cpu",
        )?;
        let dir = self.base.join(runner);
        mkdir(&dir)?;
        write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
        write(&dir.join("memory.swap.max"), "0")?;
        write(&dir.join("pids.max"), &limits.max_processes.to_string())?;
        write(&dir.join("cpu.weight"), &limits.cpu_weight().to_string())?;
        // Delegation: the init may create execution cgroups and move processes into them; the
        // runner's own limit files stay root's.
        give(&dir, owner)?;
        for f in ["cgroup.procs", "cgroup.threads"] {
            let p = dir.join(f);
            if !p.exists() {
                write(&p, "")?;
            }
            give(&p, owner)?;
        }
        Ok(Placement {
            procs_files: vec![dir.join("cgroup.procs")],
            exec_parent: Some(dir),
            exec_kill: ExecKill::CgroupKill,
        })
    }

    fn destroy(&self, runner: &str) -> Result<(), LocalError> {
        let dir = self.base.join(runner);
        if !dir.exists() {
            return Ok(());
        }
        if is_cgroupfs(&dir) {
            let _ = fs::write(dir.join("cgroup.kill"), "1");
        }
        remove_tree(&dir, Duration::from_secs(5))
    }

    /// Executions are killed with `cgroup.kill` here; nothing is ever frozen.
    fn thaw(&self, _: &str) {}

    fn runners(&self) -> Vec<String> {
        list_dirs(&self.base)
    }

    fn oom_killed(&self, runner: &str) -> bool {
        counter(&self.base.join(runner).join("memory.events"), "oom_kill") > 0
    }

    fn process_limit_hit(&self, runner: &str) -> bool {
        counter(&self.base.join(runner).join("pids.events"), "max") > 0
    }

    fn remove_instance_if_empty(&self) {
        if self.runners().is_empty() {
            let _ = remove_tree(&self.base, Duration::ZERO);
        }
    }
}

/// No cgroups: rlimits only; memory, process count and CPU are not limited per runner.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoCgroups;

impl CgroupDriver for NoCgroups {
    fn name(&self) -> &'static str {
        "none"
    }

    fn enforced(&self) -> &'static [&'static str] {
        &["rlimits only: NO memory, process or CPU limits per runner"]
    }

    fn create(&self, _: &str, _: &Limits, _: u32) -> Result<Placement, LocalError> {
        Ok(Placement {
            procs_files: Vec::new(),
            exec_parent: None,
            exec_kill: ExecKill::ProcessGroup,
        })
    }

    fn destroy(&self, _: &str) -> Result<(), LocalError> {
        Ok(())
    }

    fn thaw(&self, _: &str) {}

    fn runners(&self) -> Vec<String> {
        Vec::new()
    }

    fn oom_killed(&self, _: &str) -> bool {
        false
    }

    fn process_limit_hit(&self, _: &str) -> bool {
        false
    }

    fn remove_instance_if_empty(&self) {}
}

/// Picks the driver for this machine: v1 when the memory, pids, cpu and freezer hierarchies are
/// mounted under `root`, v2 when the unified hierarchy offers memory and pids, else none.
pub fn detect(root: &Path, instance: &str) -> Box<dyn CgroupDriver> {
    let v1 = V1_CONTROLLERS
        .iter()
        .all(|c| root.join(c).join("cgroup.procs").exists())
        && root.join("memory/memory.limit_in_bytes").exists();
    if v1 {
        return Box::new(V1Driver::new(root, instance));
    }
    let controllers = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
    if has("memory") && has("pids") {
        return Box::new(V2Driver::new(root.join(instance)));
    }
    Box::new(NoCgroups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_mhz_maps_to_shares_and_weight() {
        assert_eq!(Limits::cpu_shares_from_mhz(0), 1024);
        assert_eq!(Limits::cpu_shares_from_mhz(1000), 1024);
        assert_eq!(Limits::cpu_shares_from_mhz(20), 20);
        assert_eq!(Limits::cpu_shares_from_mhz(1), 2);
        let l = |s| Limits {
            memory_bytes: 0,
            max_processes: 0,
            cpu_shares: s,
        };
        assert_eq!(l(2).cpu_weight(), 1);
        assert_eq!(l(262_144).cpu_weight(), 10_000);
        assert!((30..=50).contains(&l(1024).cpu_weight()));
    }

    #[test]
    fn v2_driver_writes_limits_and_delegates_against_a_fake_cgroupfs() {
        let fake = tempfile::tempdir().unwrap();
        let base = fake.path().join("poseidon-test");
        let driver = V2Driver::new(&base);
        let limits = Limits {
            memory_bytes: 64 << 20,
            max_processes: 77,
            cpu_shares: 1024,
        };
        let owner = 4242;
        let placement = driver.create("1-abc", &limits, owner).unwrap();
        let dir = base.join("1-abc");
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("memory.max"), (64u64 << 20).to_string());
        assert_eq!(read("pids.max"), "77");
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(
            fs::read_to_string(base.join("cgroup.subtree_control")).unwrap(),
            "+memory +pids +cpu"
        );
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(&dir).unwrap().uid(), owner);
        assert_eq!(fs::metadata(dir.join("cgroup.procs")).unwrap().uid(), owner);
        assert_ne!(fs::metadata(dir.join("memory.max")).unwrap().uid(), owner);
        assert_eq!(placement.procs_files, vec![dir.join("cgroup.procs")]);
        assert_eq!(placement.exec_kill, ExecKill::CgroupKill);
        assert_eq!(driver.runners(), vec!["1-abc".to_string()]);
        fs::write(dir.join("memory.events"), "oom 1\noom_kill 2\n").unwrap();
        assert!(driver.oom_killed("1-abc"));
        driver.destroy("1-abc").unwrap();
        assert!(!dir.exists());
        assert!(driver.runners().is_empty());
        driver.destroy("1-abc").unwrap();
        driver.remove_instance_if_empty();
        assert!(!base.exists());
    }

    #[test]
    fn detection_falls_back_to_none_without_controllers() {
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(detect(empty.path(), "x").name(), "none");
        fs::write(empty.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        assert_eq!(detect(empty.path(), "x").name(), "v2");
    }
}
