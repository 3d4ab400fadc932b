//! A runner's init: pid 1 of the runner, serving its control socket.
//!
//! It spawns executions (passing the PTY master and the stderr pipe back to the server) and
//! forks one child per file operation, which runs with the request's credentials inside the
//! runner's root. It is single-threaded and event driven; every request is untrusted input:
//! sizes are bounded, reads time out, and nothing a request says can make it panic.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork};
use rustix::pty::{OpenptFlags, openpt, ptsname, unlockpt};

use super::setup::{self, StepError};
use super::{SandboxSpec, USER_ID};
use crate::cgroup::ExecKill;
use crate::protocol::{MAX_REQUEST, Request, Response, read_msg, send_with_fds, write_msg};

/// How long a request header may take to arrive; the init serves one header at a time.
/// The pause between attempts of a fork refused for the process limit.
const FORK_RETRY_PAUSE: Duration = Duration::from_millis(25);
/// How long after killing a tree a full process table is blamed on the killed processes.
const KILL_AFTERMATH: Duration = Duration::from_secs(6);
/// Longest one fork is retried, well within the server's control timeout (5 s).
const FORK_RETRY_LIMIT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// Builds the sandbox and serves requests; never returns.
pub(crate) fn run(spec: SandboxSpec, userns: OwnedFd, listener: UnixListener) -> ! {
    match setup_all(&spec, userns) {
        Ok((cgroup, exec_ns)) => {
            report("ready");
            let _ = setup::detach_stdio();
            serve(listener, cgroup, exec_ns, &spec)
        }
        Err(e) => {
            report(&format!("error {e}"));
            std::process::exit(1)
        }
    }
}

fn report(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{}", line.replace('\n', " "));
    let _ = out.flush();
}

fn setup_all(spec: &SandboxSpec, userns: OwnedFd) -> Result<(Option<OwnedFd>, OwnedFd), StepError> {
    setup::make_mounts_private()?;
    let cgroup = setup::open_exec_cgroup(spec)?;
    let root = setup::build_root(spec, &userns)?;
    setup::pivot_into(&root)?;
    setup::mount_proc()?;
    setup::configure_uts_and_loopback()?;
    setup::enter_user_namespace(userns)?;
    let exec_ns = setup::create_execution_namespace()?;
    setup::harden()?;
    Ok((cgroup, exec_ns))
}

struct Running {
    conn: Option<UnixStream>,
    cgroup: Option<String>,
    /// The session leader writes [`LEADER_NO_PROCESS`] here when it cannot fork the command.
    status: Option<OwnedFd>,
}

/// What an execution's session leader reports on its status pipe when the process limit keeps
/// it from forking the command.
const LEADER_NO_PROCESS: u8 = b'P';

/// Why an execution could not be started.
enum SpawnError {
    /// `fork` failed with `EAGAIN`: the runner's process table is full.
    ProcessLimit,
    Other(String),
}

impl From<String> for SpawnError {
    fn from(message: String) -> Self {
        Self::Other(message)
    }
}

impl From<&str> for SpawnError {
    fn from(message: &str) -> Self {
        Self::Other(message.to_string())
    }
}

/// What an execution runs.
enum Program {
    /// `bash -c` this command (`Request::Exec`).
    Shell(CString),
    /// This argv as given, `argv[0]` looked up in `PATH` (`Request::Spawn`).
    Argv(Vec<CString>),
}

/// How an execution's standard descriptors are connected.
#[derive(Clone, Copy)]
enum Stdio {
    /// A terminal for stdin and stdout, stderr on a pipe of its own (`Request::Exec`).
    SplitTerminal,
    /// A terminal for stdin, stdout and stderr.
    Terminal,
    /// Three pipes, no terminal at all.
    Pipes,
}

/// The child's side of [`Stdio`].
enum ChildStdio {
    /// The terminal's slave path; stderr on this pipe, or the terminal when `None`.
    Terminal {
        slave: CString,
        stderr: Option<OwnedFd>,
    },
    /// stdin, stdout and stderr pipe ends.
    Pipes([OwnedFd; 3]),
}

/// A started execution, before its descriptors went to the server.
struct Spawned {
    pid: i32,
    /// The server's ends, in the order `Request::Exec`/`Request::Spawn` document.
    fds: Vec<OwnedFd>,
    cgroup: Option<String>,
    status: Option<OwnedFd>,
}

/// Opens an execution's descriptors: the server's ends and the child's.
fn open_stdio(stdio: Stdio) -> Result<(Vec<OwnedFd>, ChildStdio), SpawnError> {
    let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"));
    match stdio {
        Stdio::SplitTerminal | Stdio::Terminal => {
            let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
                .map_err(|e| format!("openpt: {e}"))?;
            unlockpt(&master).map_err(|e| format!("unlockpt: {e}"))?;
            let slave = ptsname(&master, Vec::new()).map_err(|e| format!("ptsname: {e}"))?;
            let _ = rustix::termios::tcsetwinsize(
                &master,
                rustix::termios::Winsize {
                    ws_row: 24,
                    ws_col: 80,
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                },
            );
            if matches!(stdio, Stdio::SplitTerminal) {
                let (err_r, err_w) = pipe()?;
                Ok((
                    vec![master, err_r],
                    ChildStdio::Terminal {
                        slave,
                        stderr: Some(err_w),
                    },
                ))
            } else {
                Ok((
                    vec![master],
                    ChildStdio::Terminal {
                        slave,
                        stderr: None,
                    },
                ))
            }
        }
        Stdio::Pipes => {
            let (in_r, in_w) = pipe()?;
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            Ok((
                vec![in_w, out_r, err_r],
                ChildStdio::Pipes([in_r, out_w, err_w]),
            ))
        }
    }
}

/// Answers a request that cannot be started with an error.
fn refuse(mut conn: UnixStream, message: &str) {
    let _ = write_msg(
        &mut conn,
        &Response::Error {
            message: message.to_string(),
        },
    );
}

struct Init<'a> {
    spec: &'a SandboxSpec,
    cgroup: Option<OwnedFd>,
    /// The user namespace every execution and file operation enters (see `INIT_ID`).
    exec_ns: OwnedFd,
    execs: HashMap<i32, Running>,
    lingering: Vec<String>,
    counter: u64,
    /// When this init last killed an execution's tree: its processes hold places in the process
    /// table until they are gone and reaped.
    last_kill: std::cell::Cell<Option<std::time::Instant>>,
}

fn serve(
    listener: UnixListener,
    cgroup: Option<OwnedFd>,
    exec_ns: OwnedFd,
    spec: &SandboxSpec,
) -> ! {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    let _ = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None);
    let sfd = match SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC) {
        Ok(s) => s,
        Err(_) => std::process::exit(1),
    };
    let mut init = Init {
        spec,
        cgroup,
        exec_ns,
        execs: HashMap::new(),
        lingering: Vec::new(),
        counter: 0,
        last_kill: std::cell::Cell::new(None),
    };
    loop {
        let exec_pids: Vec<i32> = init
            .execs
            .iter()
            .filter(|(_, r)| r.conn.is_some())
            .map(|(p, _)| *p)
            .collect();
        let mut readable = Vec::new();
        {
            let mut fds = vec![
                PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
            ];
            for pid in &exec_pids {
                if let Some(conn) = init.execs.get(pid).and_then(|r| r.conn.as_ref()) {
                    fds.push(PollFd::new(conn.as_fd(), PollFlags::POLLIN));
                }
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(_) => std::process::exit(1),
            }
            for (i, fd) in fds.iter().enumerate() {
                if fd.revents().is_some_and(|r| !r.is_empty()) {
                    readable.push(i);
                }
            }
        }
        for i in readable {
            match i {
                0 => init.accept_all(&listener),
                1 => {
                    while let Ok(Some(_)) = sfd.read_signal() {}
                    init.reap();
                }
                n => {
                    if let Some(pid) = exec_pids.get(n - 2) {
                        init.check_cancel(*pid);
                    }
                }
            }
        }
    }
}

impl Init<'_> {
    fn accept_all(&mut self, listener: &UnixListener) {
        loop {
            match listener.accept() {
                Ok((conn, _)) => self.handle(conn),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => return,
            }
        }
    }

    fn handle(&mut self, mut conn: UnixStream) {
        if conn.set_nonblocking(false).is_err()
            || conn.set_read_timeout(Some(IO_TIMEOUT)).is_err()
            || conn.set_write_timeout(Some(IO_TIMEOUT)).is_err()
        {
            return;
        }
        let request: Request = match read_msg(&mut conn, MAX_REQUEST) {
            Ok(r) => r,
            Err(_) => return,
        };
        match request {
            Request::Ping => {
                let _ = write_msg(&mut conn, &Response::Ok);
            }
            Request::Exec {
                command,
                privileged,
                env,
            } => match setup::cstring(&command) {
                Some(program) => self.start_exec(
                    conn,
                    Program::Shell(program),
                    Stdio::SplitTerminal,
                    privileged,
                    &env,
                ),
                None => refuse(conn, "command contains NUL"),
            },
            Request::Spawn {
                argv,
                tty,
                privileged,
                env,
            } => {
                let argv: Option<Vec<CString>> = argv.iter().map(|a| setup::cstring(a)).collect();
                match argv {
                    Some(argv) if !argv.is_empty() => {
                        let stdio = if tty { Stdio::Terminal } else { Stdio::Pipes };
                        self.start_exec(conn, Program::Argv(argv), stdio, privileged, &env)
                    }
                    Some(_) => refuse(conn, "empty argv"),
                    None => refuse(conn, "an argument contains NUL"),
                }
            }
            other => self.fork_file_op(conn, other),
        }
    }

    fn fork_file_op(&mut self, mut conn: UnixStream, request: Request) {
        // The server waits only briefly for this: an init that does not answer is broken.
        if write_msg(&mut conn, &Response::Accepted).is_err() {
            return;
        }
        match self.fork_reaping() {
            Ok(ForkResult::Child) => {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
                let _ = conn.set_write_timeout(None);
                reset_signals();
                // File operations resolve client paths, which may run through symlinks user
                // code planted (e.g. to /proc/self/fd/N): this process must hold no descriptor
                // but its connection, or such a path could reach the host directory behind it
                // (the init keeps one on its host cgroup).
                close_all_but(&[conn.as_raw_fd(), self.exec_ns.as_raw_fd()]);
                super::fileops::serve(conn, request, self.exec_ns.as_fd())
            }
            Ok(ForkResult::Parent { .. }) => {}
            Err(Errno::EAGAIN) => {
                let mut conn = conn;
                let _ = write_msg(&mut conn, &Response::ProcessLimit);
            }
            Err(e) => {
                let mut conn = conn;
                let _ = write_msg(
                    &mut conn,
                    &Response::Error {
                        message: format!("fork: {e}"),
                    },
                );
            }
        }
    }

    fn start_exec(
        &mut self,
        mut conn: UnixStream,
        program: Program,
        stdio: Stdio,
        privileged: bool,
        env: &[(String, String)],
    ) {
        match self.spawn(program, stdio, privileged, env) {
            Ok(Spawned {
                pid,
                fds,
                cgroup,
                status,
            }) => {
                let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
                let sent = send_with_fds(&conn, &Response::Started, &borrowed);
                drop(fds);
                let conn = match sent.and_then(|()| conn.set_nonblocking(true)) {
                    Ok(()) => Some(conn),
                    Err(_) => {
                        self.kill_tree(pid, cgroup.as_deref());
                        None
                    }
                };
                self.execs.insert(
                    pid,
                    Running {
                        conn,
                        cgroup,
                        status,
                    },
                );
            }
            Err(SpawnError::ProcessLimit) => {
                let _ = write_msg(&mut conn, &Response::ProcessLimit);
            }
            Err(SpawnError::Other(message)) => {
                let _ = write_msg(&mut conn, &Response::Error { message });
            }
        }
    }

    fn spawn(
        &mut self,
        program: Program,
        stdio: Stdio,
        privileged: bool,
        env: &[(String, String)],
    ) -> Result<Spawned, SpawnError> {
        let mut envp = vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            format!("HOME={}", if privileged { "/root" } else { "/home/user" }),
            "LANG=C.UTF-8".to_string(),
            "TERM=xterm".to_string(),
            "CODEOCEAN=true".to_string(),
        ];
        for (k, v) in env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(format!("invalid environment variable {k:?}").into());
            }
            envp.retain(|e| !e.starts_with(&format!("{k}=")));
            envp.push(format!("{k}={v}"));
        }
        let envp: Vec<CString> = envp.iter().filter_map(|e| setup::cstring(e)).collect();

        let (server_fds, child_stdio) = open_stdio(stdio)?;
        let (status_r, status_w) = match nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK) {
            Ok((r, w)) => (Some(r), Some(w)),
            Err(_) => (None, None),
        };

        self.prune_cgroups();
        self.counter += 1;
        let cgroup = match (&self.cgroup, self.spec.exec_kill) {
            (Some(dir), ExecKill::Freezer | ExecKill::CgroupKill) => {
                let name = format!("e{}", self.counter);
                nix::sys::stat::mkdirat(dir, name.as_str(), Mode::from_bits_truncate(0o755))
                    .ok()
                    .map(|()| name)
            }
            _ => None,
        };
        let limits = (self.spec.max_open_files, self.spec.max_file_size);
        let fork_deadline = self.fork_deadline();
        match self.fork_reaping() {
            Ok(ForkResult::Child) => {
                drop(server_fds);
                drop(status_r);
                let procs = match (&self.cgroup, &cgroup) {
                    (Some(dir), Some(name)) => openat(
                        dir,
                        format!("{name}/cgroup.procs").as_str(),
                        OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                    .ok(),
                    _ => None,
                };
                exec_child(ExecChild {
                    userns: self.exec_ns.as_fd(),
                    program,
                    envp,
                    privileged,
                    stdio: child_stdio,
                    status: status_w,
                    procs,
                    limits,
                    fork_deadline,
                })
            }
            Ok(ForkResult::Parent { child }) => Ok(Spawned {
                pid: child.as_raw(),
                fds: server_fds,
                cgroup,
                status: status_r,
            }),
            Err(e) => {
                if let Some(name) = cgroup {
                    self.lingering.push(name);
                }
                if e == Errno::EAGAIN {
                    Err(SpawnError::ProcessLimit)
                } else {
                    Err(format!("fork: {e}").into())
                }
            }
        }
    }

    fn check_cancel(&mut self, pid: i32) {
        let Some(running) = self.execs.get_mut(&pid) else {
            return;
        };
        let Some(conn) = running.conn.as_mut() else {
            return;
        };
        let mut buf = [0u8; 64];
        let cancelled = match conn.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        };
        if cancelled {
            running.conn = None;
            let cgroup = running.cgroup.clone();
            self.kill_tree(pid, cgroup.as_deref());
        }
    }

    /// Kills every process of an execution: its cgroup when there is one, and its process group.
    fn kill_tree(&self, pid: i32, cgroup: Option<&str>) {
        self.last_kill.set(Some(std::time::Instant::now()));
        if let (Some(dir), Some(name)) = (&self.cgroup, cgroup) {
            match self.spec.exec_kill {
                ExecKill::Freezer => {
                    // A fork bomb may outrun one freeze: repeat freeze → kill everything listed
                    // → thaw until the cgroup is empty. Frozen processes cannot fork, so a round
                    // that reached FROZEN leaves nothing behind.
                    let state = format!("{name}/freezer.state");
                    let procs = format!("{name}/cgroup.procs");
                    for _ in 0..50 {
                        write_at(dir, &state, b"FROZEN");
                        for _ in 0..500 {
                            if read_at(dir, &state).trim() != "FREEZING" {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        let listed: Vec<i32> = read_at(dir, &procs)
                            .lines()
                            .filter_map(|p| p.trim().parse().ok())
                            .collect();
                        for p in &listed {
                            let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
                        }
                        write_at(dir, &state, b"THAWED");
                        if listed.is_empty() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                ExecKill::CgroupKill => write_at(dir, &format!("{name}/cgroup.kill"), b"1"),
                ExecKill::ProcessGroup => {}
            }
        }
        kill_session(pid);
    }

    /// `fork`, retried while the process table is full only because of processes this init
    /// has just killed (e.g. a cancelled fork bomb): they hold places until they are gone and
    /// reaped. A table full of live processes is reported at once (after one reap).
    /// Until when a fork refused for the process limit is retried: until the aftermath of the
    /// latest kill is over, but never longer than FORK_RETRY_LIMIT from now (the server gives up
    /// on an init after its control timeout). Now, when nothing was killed lately.
    fn fork_deadline(&self) -> std::time::Instant {
        let now = std::time::Instant::now();
        self.last_kill
            .get()
            .map(|t| t + KILL_AFTERMATH)
            .filter(|end| *end > now)
            .map_or(now, |end| end.min(now + FORK_RETRY_LIMIT))
    }

    fn fork_reaping(&mut self) -> nix::Result<ForkResult> {
        let deadline = self.fork_deadline();
        let mut first = true;
        while first || std::time::Instant::now() < deadline {
            first = false;
            // SAFETY: the init is single-threaded, so the child may run arbitrary code.
            match unsafe { fork() } {
                Err(Errno::EAGAIN) => {
                    self.reap();
                    std::thread::sleep(FORK_RETRY_PAUSE);
                }
                other => return other,
            }
        }
        // SAFETY: as above.
        unsafe { fork() }
    }

    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.finished(pid.as_raw(), code as u8),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.finished(pid.as_raw(), 128u8.wrapping_add(sig as u8))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    fn finished(&mut self, pid: i32, code: u8) {
        let Some(running) = self.execs.remove(&pid) else {
            return;
        };
        let mut report = [0u8; 1];
        let no_process = running.status.as_ref().is_some_and(|status| {
            matches!(nix::unistd::read(status, &mut report), Ok(1) if report[0] == LEADER_NO_PROCESS)
        });
        if let Some(mut conn) = running.conn {
            let _ = conn.set_nonblocking(false);
            let response = if no_process {
                Response::ProcessLimit
            } else {
                Response::Exit { code }
            };
            let _ = write_msg(&mut conn, &response);
        }
        if let Some(name) = running.cgroup {
            self.lingering.push(name);
        }
        self.prune_cgroups();
    }

    fn prune_cgroups(&mut self) {
        let Some(dir) = &self.cgroup else {
            return;
        };
        self.lingering.retain(|name| {
            nix::unistd::unlinkat(dir, name.as_str(), nix::unistd::UnlinkatFlags::RemoveDir)
                .is_err()
        });
    }
}

/// Ends a forked file helper at once: nothing of it is buffered or needs dropping, so the
/// runtime's cleanup at exit would only touch memory to no purpose.
pub(super) fn exit_helper() -> ! {
    // SAFETY: `_exit` ends the forked, single-threaded helper without running destructors.
    unsafe { libc::_exit(0) }
}

/// Closes every descriptor of this (single-threaded, forked) process above stderr except `keep`:
/// `close_range` over the gaps between the kept ones, or (a kernel without it) each descriptor
/// listed in `/proc/self/fd`.
fn close_all_but(keep: &[std::os::fd::RawFd]) {
    let mut from: std::os::fd::RawFd = 3;
    loop {
        let next_kept = keep.iter().copied().filter(|&fd| fd >= from).min();
        let last = next_kept.map_or(libc::c_uint::MAX, |fd| (fd as libc::c_uint).wrapping_sub(1));
        if next_kept != Some(from) {
            // SAFETY: closing descriptors of a freshly forked, single-threaded child; no object of
            // this process uses them afterwards.
            let closed = unsafe {
                libc::syscall(
                    libc::SYS_close_range,
                    from as libc::c_uint,
                    last,
                    0 as libc::c_uint,
                )
            };
            if closed != 0 {
                return close_listed_but(keep);
            }
        }
        match next_kept {
            Some(fd) => from = fd + 1,
            None => return,
        }
    }
}

/// [`close_all_but`] by listing `/proc/self/fd`.
fn close_listed_but(keep: &[std::os::fd::RawFd]) {
    let open: Vec<std::os::fd::RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => (3..1024).collect(),
    };
    for fd in open {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: closing descriptors of a freshly forked, single-threaded child; no object
            // of this process uses them afterwards (the directory listing above is finished).
            unsafe {
                libc::close(fd);
            }
        }
    }
}

/// Kills every process of the session `sid` (the execution's leader started it): the fallback
/// without cgroups, and a second sweep with them. Processes that called `setsid` themselves
/// escape it; only a cgroup catches those.
fn kill_session(sid: i32) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let stat = setup::read_small(&e.path().join("stat"));
        // Fields after the command: state, ppid, pgrp, session.
        let session = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(3))
            .and_then(|s| s.parse::<i32>().ok());
        if session == Some(sid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

fn write_at(dir: &OwnedFd, path: &str, value: &[u8]) {
    if let Ok(fd) = openat(dir, path, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty()) {
        let _ = nix::unistd::write(&fd, value);
    }
}

fn read_at(dir: &OwnedFd, path: &str) -> String {
    let mut out = String::new();
    if let Ok(fd) = openat(dir, path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()) {
        let _ = std::fs::File::from(fd)
            .take(1 << 20)
            .read_to_string(&mut out);
    }
    out
}

/// Default dispositions and an empty mask, as a freshly exec'd program expects (the Rust
/// runtime ignores SIGPIPE; the init blocks SIGCHLD).
fn reset_signals() {
    for sig in [Signal::SIGPIPE, Signal::SIGCHLD] {
        // SAFETY: installing the default disposition has no handler to race with.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
    }
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

struct ExecChild<'a> {
    userns: BorrowedFd<'a>,
    program: Program,
    envp: Vec<CString>,
    privileged: bool,
    stdio: ChildStdio,
    /// Where the leader reports that it could not fork the command (see `LEADER_NO_PROCESS`).
    status: Option<OwnedFd>,
    procs: Option<OwnedFd>,
    limits: (u64, u64),
    /// Until when a fork refused for the process limit is retried (the aftermath of a kill).
    fork_deadline: std::time::Instant,
}

/// The forked child of an execution: joins the execution's cgroup, takes the terminal (if it
/// has one), forks the command (which drops to `user` unless privileged) and waits for it as
/// the session leader.
fn exec_child(c: ExecChild<'_>) -> ! {
    reset_signals();
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
        let msg = format!("poseidon: {what}: {e}\n");
        // SAFETY: writing to fd 2 and exiting without unwinding in a forked child.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    };
    if let Err(e) = nix::unistd::setsid() {
        fail("setsid", &e);
    }
    if let Some(procs) = &c.procs {
        let _ = nix::unistd::write(procs, b"0");
    }
    drop(c.procs);
    let (uid, gid) = if c.privileged {
        (0, 0)
    } else {
        (USER_ID, USER_ID)
    };
    let terminal = matches!(c.stdio, ChildStdio::Terminal { .. });
    match c.stdio {
        ChildStdio::Terminal { slave, stderr } => {
            let slave = match nix::fcntl::open(slave.as_c_str(), OFlag::O_RDWR, Mode::empty()) {
                Ok(fd) => fd,
                Err(e) => fail("open terminal", &e),
            };
            let _ = rustix::process::ioctl_tiocsctty(&slave);
            let _ = nix::unistd::fchown(&slave, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
            let err = stderr
                .as_ref()
                .map_or(slave.as_raw_fd(), AsRawFd::as_raw_fd);
            // SAFETY: dup2 onto the standard descriptors of this (forked, single-threaded)
            // process.
            unsafe {
                if libc::dup2(slave.as_raw_fd(), 0) < 0
                    || libc::dup2(slave.as_raw_fd(), 1) < 0
                    || libc::dup2(err, 2) < 0
                {
                    libc::_exit(127);
                }
            }
        }
        ChildStdio::Pipes(pipes) => {
            for (target, fd) in pipes.iter().enumerate() {
                // Owned by the execution's user, as its terminal would be: reopening them
                // (`/dev/stdin`, `/proc/self/fd/N`) checks the pipe's owner, and the init's
                // own ids are out of the execution's reach.
                let _ = nix::unistd::fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
                // SAFETY: as above. The pipes were created close-on-exec above 2, so none of
                // them is a standard descriptor that an earlier dup2 replaced.
                if unsafe { libc::dup2(fd.as_raw_fd(), target as i32) } < 0 {
                    // SAFETY: exiting a forked child without unwinding.
                    unsafe { libc::_exit(127) }
                }
            }
        }
    }
    // This process stays the session leader and only waits: when a session leader exits, the
    // kernel hangs up the terminal's foreground process group, which would kill the command's
    // background processes. The command runs in its own foreground group; before exiting, the
    // leader makes its own group the foreground one, so only the leader is hung up.
    // SAFETY: ignoring SIGTTOU has no handler to race with.
    let _ =
        unsafe { nix::sys::signal::signal(Signal::SIGTTOU, nix::sys::signal::SigHandler::SigIgn) };
    // The leader cannot reap (the init does), but in the aftermath of a kill it may wait for
    // places in the process table to come free.
    let forked = loop {
        // SAFETY: this child is single-threaded (forked from the single-threaded init).
        match unsafe { fork() } {
            Err(Errno::EAGAIN) if std::time::Instant::now() < c.fork_deadline => {
                std::thread::sleep(FORK_RETRY_PAUSE);
            }
            other => break other,
        }
    };
    let main = match forked {
        Ok(ForkResult::Child) => {
            let me = nix::unistd::getpid();
            let _ = nix::unistd::setpgid(me, me);
            if terminal {
                let _ = nix::unistd::tcsetpgrp(std::io::stdin(), me);
            }
            reset_signals();
            // SAFETY: restoring the default disposition has no handler to race with.
            let _ = unsafe {
                nix::sys::signal::signal(Signal::SIGTTOU, nix::sys::signal::SigHandler::SigDfl)
            };
            exec_command(Command {
                userns: c.userns,
                program: c.program,
                envp: c.envp,
                privileged: c.privileged,
                limits: c.limits,
            })
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => {
            if e == Errno::EAGAIN
                && let Some(status) = &c.status
            {
                let _ = nix::unistd::write(status, &[LEADER_NO_PROCESS]);
            }
            fail("fork", &e)
        }
    };
    drop(c.status);
    let _ = nix::unistd::setpgid(main, main);
    if terminal {
        let _ = nix::unistd::tcsetpgrp(std::io::stdin(), main);
    }
    // SAFETY: closing our copies of the standard descriptors; with a terminal, stdin stays to
    // restore the foreground group.
    unsafe {
        if !terminal {
            libc::close(0);
        }
        libc::close(1);
        libc::close(2);
    }
    let code = loop {
        match waitpid(main, None) {
            Ok(WaitStatus::Exited(_, code)) => break code,
            Ok(WaitStatus::Signaled(_, sig, _)) => break 128 + sig as i32,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => break 255,
        }
    };
    if terminal {
        let _ = nix::unistd::tcsetpgrp(std::io::stdin(), nix::unistd::getpgrp());
    }
    // SAFETY: `_exit` ends the forked leader without running destructors.
    unsafe { libc::_exit(code) }
}

struct Command<'a> {
    userns: BorrowedFd<'a>,
    program: Program,
    envp: Vec<CString>,
    privileged: bool,
    limits: (u64, u64),
}

/// The command's own process: limits, credentials, working directory, then `bash -c` or the
/// argv.
fn exec_command(c: Command<'_>) -> ! {
    let fail = |code: i32, what: &str, e: &dyn std::fmt::Display| -> ! {
        let msg = format!("poseidon: {what}: {e}\n");
        // SAFETY: writing to fd 2 and exiting without unwinding in a forked child.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::_exit(code)
        }
    };
    use nix::sys::resource::{Resource, setrlimit};
    let _ = setrlimit(Resource::RLIMIT_NOFILE, c.limits.0, c.limits.0);
    let _ = setrlimit(Resource::RLIMIT_FSIZE, c.limits.1, c.limits.1);
    if let Err(e) = setup::enter_execution_namespace(c.userns, c.privileged) {
        fail(127, "credentials", &e);
    }
    if nix::unistd::chdir("/workspace").is_err() {
        let _ = nix::unistd::chdir("/");
    }
    match c.program {
        Program::Shell(command) => {
            let dash_c = c"-c";
            for shell in [c"/bin/bash", c"/bin/sh"] {
                let argv = [shell, dash_c, command.as_c_str()];
                let _ = nix::unistd::execve(shell, &argv, &c.envp);
            }
            fail(127, "exec /bin/bash", &Errno::last())
        }
        Program::Argv(argv) => {
            let name = argv[0].to_string_lossy().into_owned();
            let error = exec_in_path(&argv, &c.envp);
            // As a shell reports it: 127 for a program not found, 126 for one not executable.
            let code = if matches!(error, Errno::ENOENT | Errno::ENOTDIR) {
                127
            } else {
                126
            };
            fail(code, &format!("exec {name}"), &error)
        }
    }
}

/// Executes `argv`, looking `argv[0]` up in the `PATH` of `envp` unless it contains a `/`, as
/// `execvp` does (but with the execution's `PATH`, not the init's). Returns only on failure,
/// with the most telling error (`EACCES` over "not found").
fn exec_in_path(argv: &[CString], envp: &[CString]) -> Errno {
    let program = argv[0].as_bytes();
    if program.contains(&b'/') {
        let Err(error) = nix::unistd::execve(&argv[0], argv, envp);
        return error;
    }
    if program.is_empty() {
        return Errno::ENOENT;
    }
    let path = envp
        .iter()
        .find_map(|e| e.as_bytes().strip_prefix(b"PATH="))
        .unwrap_or(b"/usr/local/bin:/usr/bin:/bin");
    let mut error = Errno::ENOENT;
    for dir in path.split(|b| *b == b':') {
        let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
        let mut candidate = dir.to_vec();
        candidate.push(b'/');
        candidate.extend_from_slice(program);
        let Ok(candidate) = CString::new(candidate) else {
            continue;
        };
        let Err(failed) = nix::unistd::execve(&candidate, argv, envp);
        match failed {
            Errno::ENOENT | Errno::ENOTDIR => {}
            other => error = other,
        }
    }
    error
}
