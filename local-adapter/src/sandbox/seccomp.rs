//! The seccomp filter every process of a runner runs under (installed by the init, inherited by
//! all it spawns).
//!
//! It denies what could leak across sandboxes or escape one: new namespaces, the mount API,
//! keyrings, io_uring, userfaultfd, tracing other processes, kernel module and kexec calls, and
//! vsock sockets.
//! `clone3` is answered with `ENOSYS` so libcs fall back to `clone`, whose flags a classic BPF
//! filter can inspect.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

/// Why the filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SeccompError {
    #[error("unsupported architecture {0}")]
    Arch(&'static str),
    #[error("building the filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("installing the filter: {0}")]
    Install(#[from] seccompiler::Error),
}

const DENIED: &[i64] = &[
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_userfaultfd,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    libc::SYS_syslog,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_kcmp,
    libc::SYS_pidfd_getfd,
    libc::SYS_iopl,
    libc::SYS_ioperm,
];

const NAMESPACE_FLAGS: &[i32] = &[
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWTIME,
];

/// `AF_VSOCK` talks to the hypervisor and other VMs, which network namespaces do not isolate.
const DENIED_SOCKET_FAMILIES: &[i32] = &[libc::AF_VSOCK];

fn arch() -> Result<TargetArch, SeccompError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SeccompError::Arch(std::env::consts::ARCH))
}

/// A program answering every x32 system call (numbers with bit 30 set on x86-64) with
/// `ENOSYS`: the deny list names x86-64 numbers only, and on kernels with the x32 ABI the same
/// calls exist under those other numbers. The other programs check the architecture field, which
/// x32 shares with x86-64.
fn x32_guard() -> BpfProgram {
    const LD_NR: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS, offset 0 = seccomp_data.nr
    const JGE: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const RET: u16 = 0x06; // BPF_RET | BPF_K
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        op(LD_NR, 0, 0, 0),
        op(JGE, 0, 1, X32_SYSCALL_BIT),
        op(RET, 0, 0, RET_ERRNO | libc::ENOSYS as u32),
        op(RET, 0, 0, RET_ALLOW),
    ]
}

/// The programs: x32 numbers → ENOSYS, `clone3` → ENOSYS, and the deny list (with `clone` +
/// namespace flags) → EPERM. Everything else is allowed.
pub(crate) fn programs() -> Result<[BpfProgram; 3], SeccompError> {
    build(true)
}

/// The init's programs: [`programs`] but with `setns` allowed, which each of its children calls
/// once to enter the execution namespace before adding [`setns_program`].
pub(crate) fn init_programs() -> Result<[BpfProgram; 3], SeccompError> {
    build(false)
}

/// A program denying `setns` (EPERM), stacked by the init's children on the init's programs.
///
/// Built once per process and kept: the init builds it before it serves (see
/// `setup::harden`), so its forked children install it without compiling it again.
pub(crate) fn setns_program() -> Result<&'static BpfProgram, SeccompError> {
    static PROGRAM: std::sync::OnceLock<BpfProgram> = std::sync::OnceLock::new();
    if let Some(program) = PROGRAM.get() {
        return Ok(program);
    }
    let rules: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_setns, vec![])].into();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch()?,
    )?;
    let program: BpfProgram = filter.try_into()?;
    Ok(PROGRAM.get_or_init(|| program))
}

fn build(deny_setns: bool) -> Result<[BpfProgram; 3], SeccompError> {
    let arch = arch()?;
    let clone3: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_clone3, vec![])].into();
    let clone3 = SeccompFilter::new(
        clone3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> = DENIED
        .iter()
        .filter(|&&nr| deny_setns || nr != libc::SYS_setns)
        .map(|&nr| (nr, vec![]))
        .collect();
    let mut clone_rules = Vec::new();
    for &flag in NAMESPACE_FLAGS {
        let flag = u64::from(flag as u32);
        clone_rules.push(SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )?])?);
    }
    denied.insert(libc::SYS_clone, clone_rules);
    // Socket families that reach past the runner's network namespace.
    let mut socket_rules = Vec::new();
    for &family in DENIED_SOCKET_FAMILIES {
        socket_rules.push(SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            family as u64,
        )?])?);
    }
    denied.insert(libc::SYS_socket, socket_rules);
    let denied = SeccompFilter::new(
        denied,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )?;
    Ok([x32_guard(), clone3.try_into()?, denied.try_into()?])
}

/// Installs the programs on the calling thread (requires `no_new_privs`).
pub(crate) fn install(programs: &[BpfProgram; 3]) -> Result<(), SeccompError> {
    for p in programs {
        seccompiler::apply_filter(p)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_compiles_for_this_machine() {
        let [x32, a, b] = programs().unwrap();
        assert_eq!(x32.len(), 4);
        assert!(!a.is_empty());
        assert!(b.len() > DENIED.len());
    }

    /// Runs the x32 guard the way the kernel would, for the three opcodes it uses.
    fn verdict(program: &BpfProgram, nr: u32) -> u32 {
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let op = &program[pc];
            match op.code {
                0x20 => acc = nr,
                0x35 => {
                    pc += usize::from(if acc >= op.k { op.jt } else { op.jf });
                }
                0x06 => return op.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
            pc += 1;
        }
    }

    #[test]
    fn x32_numbers_get_enosys_and_native_ones_pass() {
        let guard = x32_guard();
        assert_eq!(verdict(&guard, libc::SYS_getpid as u32), 0x7fff_0000);
        assert_eq!(verdict(&guard, libc::SYS_unshare as u32), 0x7fff_0000);
        let x32_unshare = 0x4000_0000 | libc::SYS_unshare as u32;
        assert_eq!(
            verdict(&guard, x32_unshare),
            0x0005_0000 | libc::ENOSYS as u32
        );
    }
}
