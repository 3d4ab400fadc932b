//! The steps that turn a fresh helper process into a runner's init, one function per step
//! (youki style). Steps before [`enter_user_namespace`] run as the host's root inside the new
//! mount, pid, net, ipc, uts and cgroup namespaces, which therefore stay owned by the host's
//! user namespace: the sandbox's root can never mount, unmount or reconfigure them.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt, symlink};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Gid, Uid, chown, fork, pipe, setgroups, setresgid, setresuid};
use rustix::mount::{MoveMountFlags, OpenTreeFlags, move_mount, open_tree};

use super::{ID_RANGE, INIT_ID, RootSpec, SandboxSpec, USER_ID};

/// A step that failed, named so the server's error says where.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {message}")]
pub(crate) struct StepError {
    step: &'static str,
    message: String,
}

fn step<E: std::fmt::Display>(step: &'static str) -> impl FnOnce(E) -> StepError {
    move |e| StepError {
        step,
        message: e.to_string(),
    }
}

type Result<T> = std::result::Result<T, StepError>;

/// Helper: writes itself into the runner's cgroups so everything it forks inherits them.
pub(crate) fn join_cgroups(spec: &SandboxSpec) -> Result<()> {
    for f in &spec.procs_files {
        fs::write(f, "0").map_err(|e| StepError {
            step: "join cgroups",
            message: format!("{}: {e}", f.display()),
        })?;
    }
    Ok(())
}

/// Helper: new mount, pid, net, ipc, uts and cgroup namespaces (the pid namespace applies to the
/// init forked next).
pub(crate) fn unshare_namespaces() -> Result<()> {
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .map_err(step(
        "unshare namespaces (user namespaces and mount/pid/net namespaces)",
    ))
}

/// Helper: forks the init (pid 1 of the new pid namespace), reports its host pid on stdout and
/// returns; the init never returns from here.
pub(crate) fn fork_init(spec: SandboxSpec, userns: OwnedFd, listener: UnixListener) -> Result<()> {
    std::io::stdout().flush().map_err(step("flush"))?;
    // SAFETY: the helper is single-threaded (it runs before `main` or first in `main`, with no
    // other threads started), so the child may run arbitrary code after fork.
    match unsafe { fork() }.map_err(step("fork the init"))? {
        ForkResult::Parent { child } => {
            let mut out = std::io::stdout();
            writeln!(out, "pid {child}").map_err(step("report pid"))?;
            out.flush().map_err(step("report pid"))?;
            Ok(())
        }
        ForkResult::Child => super::init::run(spec, userns, listener),
    }
}

/// Init: no mount event may propagate back to the host.
pub(crate) fn make_mounts_private() -> Result<()> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("make mounts private"))
}

/// Helper: binds the control socket at its host path, only for root, before the runner's
/// network namespace exists (a unix socket is listed in its namespace's `/proc/net/unix`).
pub(crate) fn bind_control_socket(path: &Path) -> Result<UnixListener> {
    let _ = fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(step("bind control socket"))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(step("chmod control socket"))?;
    listener
        .set_nonblocking(true)
        .map_err(step("control socket"))?;
    Ok(listener)
}

/// Init: a directory fd on the runner's execution cgroup parent, if any.
pub(crate) fn open_exec_cgroup(spec: &SandboxSpec) -> Result<Option<OwnedFd>> {
    let Some(dir) = &spec.exec_parent else {
        return Ok(None);
    };
    let fd = rustix::fs::open(
        dir,
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(step("open execution cgroup"))?;
    Ok(Some(fd))
}

/// Helper: creates the runner's user namespace (through a short-lived child, so the init itself
/// can still build mounts as the host's root) and returns an fd on it.
///
/// The namespace is created by a holder process running as the unprivileged host uid `owner`,
/// which the kernel records as the namespace's owner: per-user kernel limits of the processes
/// inside (inotify instances and watches, message queues, pending signals, …) are charged
/// upwards to `owner`, not to host root, so a runner exhausting them hurts neither the host's
/// root services nor runners with another owner.
pub(crate) fn create_user_namespace(uid_base: u32, owner: u32) -> Result<OwnedFd> {
    let (ready_r, ready_w) = pipe().map_err(step("user namespace pipe"))?;
    let (hold_r, hold_w) = pipe().map_err(step("user namespace pipe"))?;
    // SAFETY: the init is single-threaded; the child only makes raw system calls and exits.
    match unsafe { fork() }.map_err(step("fork user namespace holder"))? {
        ForkResult::Child => {
            drop(ready_r);
            drop(hold_w);
            let (u, g) = (Uid::from_raw(owner), Gid::from_raw(owner));
            let ok = nix::unistd::setgroups(&[]).is_ok()
                && nix::unistd::setresgid(g, g, g).is_ok()
                && nix::unistd::setresuid(u, u, u).is_ok()
                && unshare(CloneFlags::CLONE_NEWUSER).is_ok();
            let _ = nix::unistd::write(&ready_w, if ok { b"1" } else { b"0" });
            let mut buf = [0u8; 1];
            let _ = nix::unistd::read(&hold_r, &mut buf);
            // SAFETY: `_exit` ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop(ready_w);
            drop(hold_r);
            let mut buf = [0u8; 1];
            let n = nix::unistd::read(&ready_r, &mut buf).map_err(step("user namespace"))?;
            let result = (|| {
                if n != 1 || buf[0] != b'1' {
                    return Err(StepError {
                        step: "create user namespace",
                        message: "unshare(CLONE_NEWUSER) failed: enable user namespaces \
                                  (sysctl user.max_user_namespaces > 0)"
                            .into(),
                    });
                }
                // The sandbox's ids, plus one for the init alone (see `INIT_ID`).
                let map = format!("0 {uid_base} {ID_RANGE}\n{INIT_ID} {owner} 1\n");
                fs::write(format!("/proc/{child}/uid_map"), &map).map_err(step("write uid_map"))?;
                fs::write(format!("/proc/{child}/gid_map"), &map).map_err(step("write gid_map"))?;
                let fd = fs::File::open(format!("/proc/{child}/ns/user"))
                    .map_err(step("open user namespace"))?;
                Ok(OwnedFd::from(fd))
            })();
            drop(hold_w);
            let _ = waitpid(child, None);
            result
        }
    }
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

fn mount_setattr(fd: &OwnedFd, recursive: bool, attr: &MountAttr) -> std::io::Result<()> {
    let empty = c"";
    let flags = libc::AT_EMPTY_PATH | if recursive { libc::AT_RECURSIVE } else { 0 };
    // SAFETY: `fd` is a valid open_tree fd, the path is a valid empty C string, and `attr`
    // points to a properly laid-out `struct mount_attr` whose size we pass.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            empty.as_ptr(),
            flags,
            attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A read-only, nosuid, nodev bind of `src` at `dst` whose files belong, inside the runner, to
/// the ids they have on the host shifted into the user namespace (host root → sandbox root).
pub(crate) fn idmapped_bind(src: &Path, dst: &Path, userns: &OwnedFd) -> Result<()> {
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: libc::MS_PRIVATE,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let tree = |recursive: bool| -> std::io::Result<OwnedFd> {
        let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
        if recursive {
            flags |= OpenTreeFlags::AT_RECURSIVE;
        }
        let fd = open_tree(rustix::fs::CWD, src, flags)?;
        mount_setattr(&fd, recursive, &attr)?;
        Ok(fd)
    };
    let fd = tree(true).or_else(|_| tree(false)).map_err(|e| StepError {
        step: "ID-mapped mount (kernel ≥ 5.12 and a filesystem supporting idmapped mounts)",
        message: format!("{}: {e}", src.display()),
    })?;
    move_mount(
        fd.as_fd(),
        "",
        rustix::fs::CWD,
        dst,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| StepError {
        step: "attach ID-mapped mount",
        message: format!("{}: {e}", dst.display()),
    })
}

fn mkdir_owned(path: &Path, mode: u32, owner: u32) -> Result<()> {
    if !path.exists() {
        fs::DirBuilder::new()
            .mode(mode)
            .create(path)
            .map_err(|e| StepError {
                step: "create directory",
                message: format!("{}: {e}", path.display()),
            })?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(step("chmod"))?;
    chown(path, Some(Uid::from_raw(owner)), Some(Gid::from_raw(owner))).map_err(step("chown"))
}

fn mount_fs(src: &str, dst: &Path, fstype: &str, flags: MsFlags, data: &str) -> Result<()> {
    mount(Some(src), dst, Some(fstype), flags, Some(data)).map_err(|e| StepError {
        step: "mount",
        message: format!("{fstype} at {}: {e}", dst.display()),
    })
}

/// Options of an overlay whose layers are directories in the writable layer `layer`. They are
/// named relative to it (the working directory becomes `layer`): the kernel shows the options as
/// given in the runner's `/proc/self/mountinfo`, and absolute ones would reveal host paths.
fn overlay_options(layer: &Path, lower: &str, upper: &str, work: &str) -> Result<String> {
    nix::unistd::chdir(layer).map_err(step("enter the writable layer"))?;
    Ok(format!("lowerdir={lower},upperdir={upper},workdir={work}"))
}

/// Options of a read-only overlay whose only content is `lower`, a directory in the writable
/// layer `layer` (named relatively, see `overlay_options`). Without an upper layer overlayfs
/// wants two lower ones: the second is an empty directory.
fn read_only_overlay_options(layer: &Path, lower: &str) -> Result<String> {
    mkdir_owned(&layer.join("empty"), 0o755, 0)?;
    nix::unistd::chdir(layer).map_err(step("enter the writable layer"))?;
    Ok(format!("lowerdir={lower}:empty"))
}

/// Init: builds the root filesystem under `spec.staging` and returns the new root's path.
///
/// The staging mount point holds one size-limited tmpfs: the runner's whole writable layer
/// (`root/` for the host allow-list, overlay `upper/` for an image, plus `/etc`'s overlay upper).
pub(crate) fn build_root(spec: &SandboxSpec, userns: &OwnedFd) -> Result<PathBuf> {
    let base = spec.uid_base;
    let user = base + USER_ID;
    let layer = &spec.staging;
    mount_fs(
        "none",
        layer,
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        &format!("size={}m,mode=0700", spec.disk_limit_mb.max(1)),
    )
    .map_err(|e| StepError {
        step: "writable layer (tmpfs)",
        message: e.to_string(),
    })?;
    let root = layer.join("root");
    match &spec.root {
        RootSpec::Host { allow, etc } => {
            mkdir_owned(&root, 0o755, base)?;
            mount(
                Some(&root),
                &root,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(step("bind root"))?;
            for dir in allow {
                let Ok(meta) = fs::symlink_metadata(dir) else {
                    continue;
                };
                let Ok(rel) = dir.strip_prefix("/") else {
                    continue;
                };
                let target = root.join(rel);
                if meta.file_type().is_symlink() {
                    let link = fs::read_link(dir).map_err(step("read host symlink"))?;
                    symlink(&link, &target).map_err(step("copy host symlink"))?;
                } else if meta.is_dir() {
                    // The ID-mapped bind stays outside the runner's root, under a read-only
                    // overlay: a bind in the root would show the host's block device (name and
                    // number) and filesystem options in the runner's mountinfo.
                    let name = format!("host-{}", rel.to_string_lossy().replace('/', "-"));
                    let lower = layer.join(&name);
                    mkdir_owned(&lower, 0o700, 0)?;
                    idmapped_bind(dir, &lower, userns)?;
                    mkdir_owned(&target, 0o755, base)?;
                    mount_fs(
                        "overlay",
                        &target,
                        "overlay",
                        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                        &read_only_overlay_options(layer, &name)?,
                    )?;
                }
            }
            let lower = layer.join("etc-lower");
            let upper = layer.join("etc-upper");
            let work = layer.join("etc-work");
            mkdir_owned(&lower, 0o700, 0)?;
            mkdir_owned(&upper, 0o755, base)?;
            mkdir_owned(&work, 0o700, 0)?;
            // Brought into the layer so the overlay names it relatively (see `overlay_options`).
            mount(
                Some(etc),
                &lower,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(step("bind the generated /etc"))?;
            let etc_dir = root.join("etc");
            mkdir_owned(&etc_dir, 0o755, base)?;
            mount_fs(
                "overlay",
                &etc_dir,
                "overlay",
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                &overlay_options(layer, "etc-lower", "etc-upper", "etc-work")?,
            )?;
        }
        RootSpec::Image { dir, passwd, group } => {
            let lower = layer.join("lower");
            let upper = layer.join("upper");
            let work = layer.join("work");
            mkdir_owned(&lower, 0o700, 0)?;
            mkdir_owned(&upper, 0o755, base)?;
            mkdir_owned(&work, 0o700, 0)?;
            mkdir_owned(&root, 0o755, base)?;
            idmapped_bind(dir, &lower, userns)?;
            mount_fs(
                "overlay",
                &root,
                "overlay",
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                &overlay_options(layer, "lower", "upper", "work")?,
            )?;
            mkdir_owned(&root.join("etc"), 0o755, base)?;
            for (name, text) in [("passwd", passwd), ("group", group)] {
                let p = root.join("etc").join(name);
                let _ = fs::remove_file(&p);
                fs::write(&p, text).map_err(step("write passwd/group"))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o644))
                    .map_err(step("chmod"))?;
                chown(&p, Some(Uid::from_raw(base)), Some(Gid::from_raw(base)))
                    .map_err(step("chown"))?;
            }
        }
    }
    for (dir, mode, owner) in [
        ("tmp", 0o1777, base),
        ("var", 0o755, base),
        ("var/tmp", 0o1777, base),
        ("run", 0o755, base),
        ("home", 0o755, base),
        ("home/user", 0o755, user),
        ("root", 0o700, base),
        ("workspace", 0o755, user),
        ("proc", 0o555, base),
        ("dev", 0o755, base),
    ] {
        let p = root.join(dir);
        if fs::symlink_metadata(&p)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false)
        {
            continue;
        }
        mkdir_owned(&p, mode, owner)?;
    }
    build_dev(spec, &root.join("dev"))?;
    Ok(root)
}

/// Init: a minimal `/dev`: the harmless character devices, a private devpts instance, and a
/// size-limited `/dev/shm`. Devices are made rather than bound from the host's `/dev`, and the
/// tmpfs mounts are given to the sandbox's root by `chown` rather than by `uid=`/`gid=`
/// options: the runner's mountinfo shows both (the host's devtmpfs with its size, host ids).
fn build_dev(spec: &SandboxSpec, dev: &Path) -> Result<()> {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    let base = spec.uid_base;
    mount_fs(
        "none",
        dev,
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "size=1m,mode=0755",
    )?;
    chown(dev, Some(Uid::from_raw(base)), Some(Gid::from_raw(base))).map_err(step("chown /dev"))?;
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let target = dev.join(name);
        mknod(
            &target,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .map_err(|e| StepError {
            step: "create device node",
            message: format!("{}: {e}", target.display()),
        })?;
        // mknod applies the umask.
        fs::set_permissions(&target, fs::Permissions::from_mode(0o666)).map_err(step("chmod"))?;
        chown(
            &target,
            Some(Uid::from_raw(base)),
            Some(Gid::from_raw(base)),
        )
        .map_err(step("chown device node"))?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        symlink(target, dev.join(name)).map_err(step("dev symlink"))?;
    }
    let pts = dev.join("pts");
    mkdir_owned(&pts, 0o755, base)?;
    mount_fs(
        "devpts",
        &pts,
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    let shm = dev.join("shm");
    mkdir_owned(&shm, 0o1777, base)?;
    mount_fs(
        "none",
        &shm,
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        &format!("size={}m,mode=1777", spec.shm_limit_mb.max(1)),
    )?;
    chown(&shm, Some(Uid::from_raw(base)), Some(Gid::from_raw(base)))
        .map_err(step("chown /dev/shm"))
}

/// Init: makes `new_root` the root and detaches the host's tree entirely.
pub(crate) fn pivot_into(new_root: &Path) -> Result<()> {
    nix::unistd::chdir(new_root).map_err(step("chdir new root"))?;
    nix::unistd::pivot_root(".", ".").map_err(step("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detach host root"))?;
    nix::unistd::chdir("/").map_err(step("chdir /"))
}

/// Init: a fresh `/proc` for the runner's pid namespace.
pub(crate) fn mount_proc() -> Result<()> {
    mount_fs(
        "proc",
        Path::new("/proc"),
        "proc",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        "",
    )
}

/// Init: hostname `runner` and the loopback interface up (the only network a runner has).
pub(crate) fn configure_uts_and_loopback() -> Result<()> {
    nix::unistd::sethostname("runner").map_err(step("sethostname"))?;
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(step("loopback socket"))?;
    // SAFETY: `ifreq` is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the `ifreq` we own; the union member
    // `ifru_flags` is the one these requests use.
    let ok = unsafe {
        libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) == 0 && {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) == 0
        }
    };
    if ok {
        Ok(())
    } else {
        Err(step("bring up loopback")(std::io::Error::last_os_error()))
    }
}

/// Init: enters the runner's user namespace as [`INIT_ID`], keeping every capability in it.
///
/// The init is the only process with that id; executions and file operations run in the child
/// namespace made by [`create_execution_namespace`], where it is not mapped.
pub(crate) fn enter_user_namespace(userns: OwnedFd) -> Result<()> {
    use rustix::thread::{CapabilitySets, capabilities, set_capabilities, set_keep_capabilities};
    setns(&userns, CloneFlags::CLONE_NEWUSER).map_err(step("enter user namespace"))?;
    setgroups(&[]).map_err(step("setgroups"))?;
    set_keep_capabilities(true).map_err(step("keep capabilities"))?;
    let id = (Uid::from_raw(INIT_ID), Gid::from_raw(INIT_ID));
    setresgid(id.1, id.1, id.1).map_err(step("setresgid"))?;
    setresuid(id.0, id.0, id.0).map_err(step("setresuid"))?;
    // Leaving uid 0 cleared the effective set; the permitted one was kept.
    let caps = capabilities(None).map_err(step("read capabilities"))?;
    set_capabilities(
        None,
        CapabilitySets {
            effective: caps.permitted,
            permitted: caps.permitted,
            inheritable: caps.inheritable,
        },
    )
    .map_err(step("raise capabilities"))
}

/// Init: creates the user namespace executions and file operations run in: a child of the
/// runner's namespace, owned by the init, mapping the sandbox's ids `0..ID_RANGE` one to one
/// (so files keep their owners) and not the init's.
pub(crate) fn create_execution_namespace() -> Result<OwnedFd> {
    let (ready_r, ready_w) = pipe().map_err(step("execution namespace pipe"))?;
    let (hold_r, hold_w) = pipe().map_err(step("execution namespace pipe"))?;
    // SAFETY: the init is single-threaded; the child only makes raw system calls and exits.
    match unsafe { fork() }.map_err(step("fork execution namespace holder"))? {
        ForkResult::Child => {
            drop(ready_r);
            drop(hold_w);
            // Dumpable, so that its /proc files (uid_map) belong to the init's id, not to the
            // host's root.
            let ok =
                rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::Dumpable)
                    .is_ok()
                    && unshare(CloneFlags::CLONE_NEWUSER).is_ok();
            let _ = nix::unistd::write(&ready_w, if ok { b"1" } else { b"0" });
            let mut buf = [0u8; 1];
            let _ = nix::unistd::read(&hold_r, &mut buf);
            // SAFETY: `_exit` ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop(ready_w);
            drop(hold_r);
            let mut buf = [0u8; 1];
            let n = nix::unistd::read(&ready_r, &mut buf).map_err(step("execution namespace"))?;
            let result = (|| {
                if n != 1 || buf[0] != b'1' {
                    return Err(StepError {
                        step: "create execution namespace",
                        message: "unshare(CLONE_NEWUSER) failed".into(),
                    });
                }
                let map = format!("0 0 {ID_RANGE}\n");
                fs::write(format!("/proc/{child}/uid_map"), &map)
                    .map_err(step("write execution uid_map"))?;
                fs::write(format!("/proc/{child}/gid_map"), &map)
                    .map_err(step("write execution gid_map"))?;
                let fd = fs::File::open(format!("/proc/{child}/ns/user"))
                    .map_err(step("open execution namespace"))?;
                Ok(OwnedFd::from(fd))
            })();
            drop(hold_w);
            let _ = waitpid(child, None);
            result
        }
    }
}

/// A child of the init (execution or file operation): enters the execution namespace as root,
/// then as `user` unless `privileged`, not dumpable, and under the filter that also denies
/// `setns`. Leaving root for `user` clears every capability.
pub(crate) fn enter_execution_namespace(
    userns: std::os::fd::BorrowedFd<'_>,
    privileged: bool,
) -> std::result::Result<(), String> {
    fn fail(what: &'static str) -> impl Fn(nix::Error) -> String {
        move |e| format!("{what}: {e}")
    }
    setns(userns, CloneFlags::CLONE_NEWUSER).map_err(fail("enter execution namespace"))?;
    let ids = if privileged {
        &[0][..]
    } else {
        &[0, USER_ID][..]
    };
    for &id in ids {
        setgroups(&[]).map_err(fail("setgroups"))?;
        setresgid(Gid::from_raw(id), Gid::from_raw(id), Gid::from_raw(id))
            .map_err(fail("setresgid"))?;
        setresuid(Uid::from_raw(id), Uid::from_raw(id), Uid::from_raw(id))
            .map_err(fail("setresuid"))?;
    }
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| format!("set non-dumpable: {e}"))?;
    // The init may run without transparent huge pages (the server's allocator leaves them off
    // there, see `spawn_sandbox`): what runs in the runner gets the host's policy, as any
    // process would.
    let _ = rustix::thread::disable_transparent_huge_pages(false);
    let program = super::seccomp::setns_program().map_err(|e| e.to_string())?;
    seccompiler::apply_filter(program).map_err(|e| format!("seccomp: {e}"))
}

/// Init: not dumpable (nobody in the runner can read its memory or `/proc/1/*`),
/// `no_new_privs`, and the seccomp filter for itself and everything it spawns.
pub(crate) fn harden() -> Result<()> {
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(step("set non-dumpable"))?;
    rustix::thread::set_no_new_privs(true).map_err(step("no_new_privs"))?;
    // Without the `setns` rule, which its children still need once (they add it themselves).
    let programs = super::seccomp::init_programs().map_err(step("seccomp filter"))?;
    // Built now, once, rather than in every child (`enter_execution_namespace`).
    super::seccomp::setns_program().map_err(step("seccomp filter"))?;
    super::seccomp::install(&programs).map_err(step("seccomp (kernel with CONFIG_SECCOMP_FILTER)"))
}

/// Init: `/dev/null` on stdin/stdout/stderr so the server's pipes close.
pub(crate) fn detach_stdio() -> Result<()> {
    let null = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(step("open /dev/null"))?;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors, which this process owns.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(step("redirect stdio")(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Reads a CString for exec from untrusted text (no NUL).
pub(crate) fn cstring(s: &str) -> Option<CString> {
    CString::new(s).ok()
}

/// Reads all of a small file.
pub(crate) fn read_small(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(f) = fs::File::open(path) {
        let _ = f.take(1 << 20).read_to_string(&mut s);
    }
    s
}
