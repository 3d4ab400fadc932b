//! An execution's session leader: the process between a runner's init and the command.
//!
//! The leader starts a session on the execution's terminal, joins the execution's cgroup, starts
//! the command in a foreground process group of its own and waits for it. It stays the session
//! leader and only waits because a session leader's exit hangs up the terminal's foreground
//! process group: the command's background processes must survive the command's exit. Before
//! exiting, the leader makes its own group the foreground one again, so only the leader is hung
//! up.
//!
//! A leader is set up in two steps: [`prepare`] (everything that does not depend on the command)
//! and [`launch`] (credentials, the command's start and the wait). For `Request::Exec` the init
//! keeps one leader prepared ahead of time, a [`standby`] that waits for its [`Launch`], so an
//! execution's fork, cgroup move and terminal set-up are off its critical path.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{Gid, Uid};
use serde::{Deserialize, Serialize};

use super::USER_ID;
use super::setup;
use crate::protocol::{MAX_REQUEST, read_msg};

/// What a leader reports on its status pipe when the process limit keeps it from forking the
/// command.
pub(super) const LEADER_NO_PROCESS: u8 = b'P';

/// What a leader reports on its status pipe, followed by the exit code byte, when its command
/// ended.
pub(super) const LEADER_EXITED: u8 = b'X';

/// The stack the command's process runs on until it executes (see `launch_command`).
const COMMAND_STACK: usize = 128 << 10;

/// The pause between attempts of a fork refused for the process limit.
pub(super) const FORK_RETRY_PAUSE: Duration = Duration::from_millis(25);

/// What an execution runs.
pub(super) enum Program {
    /// `bash -c` this command (`Request::Exec`).
    Shell(CString),
    /// This argv as given, `argv[0]` looked up in `PATH` (`Request::Spawn`).
    Argv(Vec<CString>),
}

/// The leader's side of an execution's standard descriptors.
pub(super) enum ChildStdio {
    /// The terminal's slave path; stderr on this pipe, or the terminal when `None`.
    Terminal {
        slave: CString,
        stderr: Option<OwnedFd>,
    },
    /// stdin, stdout and stderr pipe ends.
    Pipes([OwnedFd; 3]),
}

/// A standby leader's command, sent by the init when an execution takes it.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Launch {
    /// The `bash -c` command.
    pub command: String,
    /// The command's whole environment, `NAME=value` each (checked by the init).
    pub envp: Vec<String>,
    pub privileged: bool,
    /// How long a fork refused for the process limit is retried (see `Init::fork_deadline`).
    pub retry_ms: u64,
}

/// What a launched leader needs besides its command.
pub(super) struct Context<'a> {
    /// The user namespace the command enters.
    pub userns: BorrowedFd<'a>,
    /// `RLIMIT_NOFILE` and `RLIMIT_FSIZE` of the command.
    pub limits: (u64, u64),
    /// Where the leader reports [`LEADER_NO_PROCESS`].
    pub status: Option<OwnedFd>,
}

/// A prepared leader: in its session and cgroup, standard descriptors in place.
pub(super) struct Prepared {
    terminal: bool,
}

/// Exits a forked leader with a message on its stderr, without unwinding.
fn fail(code: i32, what: &str, e: &dyn std::fmt::Display) -> ! {
    let msg = format!("poseidon: {what}: {e}\n");
    // SAFETY: writing to fd 2 and exiting without unwinding in a forked child.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(code)
    }
}

/// Default dispositions and an empty mask, as a freshly exec'd program expects (the Rust
/// runtime ignores SIGPIPE; the init blocks SIGCHLD).
pub(super) fn reset_signals() {
    for sig in [Signal::SIGPIPE, Signal::SIGCHLD] {
        // SAFETY: installing the default disposition has no handler to race with.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
    }
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// Step one, in the leader freshly forked from the init: a new session, the execution's cgroup
/// (`procs` is its `cgroup.procs`), the terminal as controlling terminal, stdio in place.
pub(super) fn prepare(stdio: ChildStdio, procs: Option<OwnedFd>) -> Prepared {
    reset_signals();
    if let Err(e) = nix::unistd::setsid() {
        fail(127, "setsid", &e);
    }
    if let Some(procs) = &procs {
        let _ = nix::unistd::write(procs, b"0");
    }
    drop(procs);
    let terminal = matches!(stdio, ChildStdio::Terminal { .. });
    match stdio {
        ChildStdio::Terminal { slave, stderr } => {
            let slave = match nix::fcntl::open(slave.as_c_str(), OFlag::O_RDWR, Mode::empty()) {
                Ok(fd) => fd,
                Err(e) => fail(127, "open terminal", &e),
            };
            let _ = rustix::process::ioctl_tiocsctty(&slave);
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
                // SAFETY: as above. The pipes were created close-on-exec above 2, so none of
                // them is a standard descriptor that an earlier dup2 replaced.
                if unsafe { libc::dup2(fd.as_raw_fd(), target as i32) } < 0 {
                    // SAFETY: exiting a forked child without unwinding.
                    unsafe { libc::_exit(127) }
                }
            }
        }
    }
    Prepared { terminal }
}

/// A standby: prepares, then waits on `socket` for its [`Launch`] and launches it. A standby
/// the init drops (its socket closes) exits quietly.
pub(super) fn standby(
    stdio: ChildStdio,
    procs: Option<OwnedFd>,
    socket: UnixStream,
    context: Context<'_>,
) -> ! {
    let prepared = prepare(stdio, procs);
    let mut socket = socket;
    let launch: Launch = match read_msg(&mut socket, MAX_REQUEST) {
        Ok(launch) => launch,
        // SAFETY: exiting a forked child without unwinding.
        Err(_) => unsafe { libc::_exit(0) },
    };
    drop(socket);
    let Some(command) = setup::cstring(&launch.command) else {
        fail(127, "command", &"contains NUL")
    };
    let envp: Vec<CString> = launch
        .envp
        .iter()
        .filter_map(|e| setup::cstring(e))
        .collect();
    let deadline = Instant::now() + Duration::from_millis(launch.retry_ms);
    launch_command(
        prepared,
        Program::Shell(command),
        envp,
        launch.privileged,
        deadline,
        context,
    )
}

/// Step two: hands the terminal or pipes to the execution's user, starts the command (which
/// drops to `user` unless privileged) and waits for it as the session leader; exits with the
/// command's exit code (128 + signal when it was killed).
pub(super) fn launch_command(
    prepared: Prepared,
    program: Program,
    envp: Vec<CString>,
    privileged: bool,
    fork_deadline: Instant,
    context: Context<'_>,
) -> ! {
    let Prepared { terminal } = prepared;
    let (uid, gid) = if privileged {
        (0, 0)
    } else {
        (USER_ID, USER_ID)
    };
    // Owned by the execution's user: reopening them (`/dev/stdin`, `/proc/self/fd/N`) checks
    // the owner, and the init's own ids are out of the execution's reach.
    let owned: &[i32] = if terminal { &[0] } else { &[0, 1, 2] };
    for fd in owned {
        // SAFETY: the standard descriptors are open (set up by `prepare`) for this call.
        let fd = unsafe { BorrowedFd::borrow_raw(*fd) };
        let _ = nix::unistd::fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
    }
    // SAFETY: ignoring SIGTTOU has no handler to race with.
    let _ =
        unsafe { nix::sys::signal::signal(Signal::SIGTTOU, nix::sys::signal::SigHandler::SigIgn) };
    let mut command = Some(Command {
        userns: context.userns,
        program,
        envp,
        privileged,
        limits: context.limits,
    });
    // The command starts in a child that shares the leader's memory until it executes, on a
    // stack of its own (as `posix_spawn` does): no page table is copied, nothing is copied on
    // write, and its exec tears down no copy of the leader's image. The leader is suspended until
    // the child executes or exits (`CLONE_VFORK`), so the child may use the leader's heap as its
    // own; what it takes from it is never given back, which costs nothing in a leader. The child
    // may be killed anywhere, even in the middle of an allocation, so after `clone` the leader
    // allocates nothing and takes no lock (it only frees the closure): `lead` waits, reports and
    // exits. Harm from a half-done allocation stays with this execution's own leader.
    let stack = command_stack();
    // The leader cannot reap (the init does), but in the aftermath of a kill it may wait for
    // places in the process table to come free.
    let forked = loop {
        let start: nix::sched::CloneCb<'_> = Box::new(|| {
            let me = nix::unistd::getpid();
            let _ = nix::unistd::setpgid(me, me);
            if terminal {
                let _ = nix::unistd::tcsetpgrp(terminal_fd(), me);
            }
            reset_signals();
            // SAFETY: restoring the default disposition has no handler to race with.
            let _ = unsafe {
                nix::sys::signal::signal(Signal::SIGTTOU, nix::sys::signal::SigHandler::SigDfl)
            };
            match command.take() {
                Some(command) => exec_command(command),
                None => fail(127, "start", &"no command"),
            }
        });
        // SAFETY: this leader is single-threaded (forked from the single-threaded init) and
        // suspended while the child runs on `stack`, which outlives the child's use of it (the
        // exec or the exit ends that before `clone` returns here).
        let cloned = unsafe {
            nix::sched::clone(
                start,
                &mut *stack,
                nix::sched::CloneFlags::CLONE_VM | nix::sched::CloneFlags::CLONE_VFORK,
                Some(libc::SIGCHLD),
            )
        };
        match cloned {
            Err(Errno::EAGAIN) if Instant::now() < fork_deadline => {
                std::thread::sleep(FORK_RETRY_PAUSE);
            }
            other => break other,
        }
    };
    let main = match forked {
        Ok(child) => child,
        Err(e) => {
            if e == Errno::EAGAIN
                && let Some(status) = &context.status
            {
                let _ = nix::unistd::write(status, &[LEADER_NO_PROCESS]);
            }
            fail(127, "fork", &e)
        }
    };
    let _ = nix::unistd::setpgid(main, main);
    if terminal {
        let _ = nix::unistd::tcsetpgrp(terminal_fd(), main);
    }
    lead(prepared, main, context.status)
}

/// The terminal, on stdin, for `tcsetpgrp`: borrowed as a bare descriptor, because
/// `std::io::stdin()` allocates its buffer on first use (see `launch_command` on allocating).
fn terminal_fd() -> BorrowedFd<'static> {
    // SAFETY: fd 0 is open for the leader's whole life (set up by `prepare`, closed by `lead`
    // after its last `tcsetpgrp`).
    unsafe { BorrowedFd::borrow_raw(0) }
}

/// The stack the command's process starts on: fresh pages (only those it touches are ever
/// allocated) below a guard page, so an overflow faults instead of writing into the leader's
/// memory. Never unmapped: the leader exits after its command.
fn command_stack() -> &'static mut [u8] {
    const GUARD: usize = 4096;
    // SAFETY: a new private anonymous mapping, aliased by nothing; its lowest page becomes the
    // guard and the slice covers the rest, which stays mapped for the life of the process.
    unsafe {
        let base = libc::mmap(
            std::ptr::null_mut(),
            GUARD + COMMAND_STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        );
        if base == libc::MAP_FAILED {
            fail(127, "stack", &Errno::last());
        }
        if libc::mprotect(base, GUARD, libc::PROT_NONE) != 0 {
            fail(127, "stack guard", &Errno::last());
        }
        std::slice::from_raw_parts_mut(base.cast::<u8>().add(GUARD), COMMAND_STACK)
    }
}

/// The leader's wait for its command `main`: when it ends, the leader makes its own group the
/// terminal's foreground one again, lets go of the terminal, reports [`LEADER_EXITED`] and the
/// exit code (128 + signal when it was killed) on `status`, and exits with that code. The init
/// answers the execution's exit from the report, without waiting for the leader's own exit.
fn lead(prepared: Prepared, main: nix::unistd::Pid, status: Option<OwnedFd>) -> ! {
    let terminal = prepared.terminal;
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
        let _ = nix::unistd::tcsetpgrp(terminal_fd(), nix::unistd::getpgrp());
        // SAFETY: the terminal's last use; the server sees its end once no process holds it.
        unsafe {
            libc::close(0);
        }
    }
    if let Some(status) = &status {
        let _ = nix::unistd::write(status, &[LEADER_EXITED, code as u8]);
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
