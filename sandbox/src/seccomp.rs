//! The system-call filters every worker runs under, in both isolation modes.
//!
//! Two programs, stacked: the first answers `clone3` with ENOSYS, so that glibc falls back to
//! `clone` (whose flags a filter can read) for threads; the second refuses, with EPERM, every
//! socket (so no network at all, loopback included, and no Unix socket of the host), creating
//! processes (`fork`, `vfork`, `clone` without `CLONE_THREAD`: no shells, no fork bombs, no pip),
//! changing file metadata (modes, owners, times, extended attributes, device nodes), and the
//! calls that reach outside the sandbox (ptrace, pidfd_getfd, mounts, namespaces, BPF,
//! keyrings...).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

use crate::Error;

/// System calls refused outright.
const DENIED: &[i64] = &[
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_kexec_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_pidfd_send_signal,
    // Reaching into other processes' descriptors and memory (a cell took an eventfd from
    // bubblewrap's PID 1 with pidfd_getfd).
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_getfd,
    libc::SYS_process_madvise,
    libc::SYS_kcmp,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    // No sockets of any family: no network, and no host Unix socket (docker, dbus, an agent)
    // reachable by path. The worker talks to kiln over inherited pipes.
    libc::SYS_socket,
    libc::SYS_socketpair,
    // File metadata: modes, owners, times, extended attributes and device nodes are never the
    // cell's to change (under Landlock a root worker could otherwise chmod host files).
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchmodat2,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_fremovexattr,
    SYS_SETXATTRAT,
    SYS_REMOVEXATTRAT,
    SYS_FILE_SETATTR,
    libc::SYS_mknodat,
];

/// Calls of the older x86-64 table that later tables dropped.
#[cfg(target_arch = "x86_64")]
const DENIED_LEGACY: &[i64] = &[
    libc::SYS_chmod,
    libc::SYS_chown,
    libc::SYS_lchown,
    libc::SYS_utime,
    libc::SYS_utimes,
    libc::SYS_futimesat,
    libc::SYS_mknod,
];
#[cfg(not(target_arch = "x86_64"))]
const DENIED_LEGACY: &[i64] = &[];

/// Calls newer than the libc crate's tables (Linux 6.13 and 6.17), numbered alike on every
/// architecture.
const SYS_SETXATTRAT: i64 = 463;
const SYS_REMOVEXATTRAT: i64 = 466;
const SYS_FILE_SETATTR: i64 = 469;

fn arch() -> Result<seccompiler::TargetArch, Error> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|_| Error::Spawn(format!("seccomp: unsupported architecture {}", std::env::consts::ARCH)))
}

fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>, errno: i32) -> Result<BpfProgram, Error> {
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(errno as u32), arch()?)
        .map_err(|e| Error::Spawn(format!("seccomp filter: {e}")))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| Error::Spawn(format!("seccomp filter: {e}")))
}

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, Error> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(|e| Error::Spawn(format!("seccomp: {e}")))
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, Error> {
    SeccompRule::new(conditions).map_err(|e| Error::Spawn(format!("seccomp: {e}")))
}

/// The two filter programs, in the order they must be installed.
pub fn programs() -> Result<Vec<BpfProgram>, Error> {
    let clone3 = compile(BTreeMap::from([(libc::SYS_clone3, vec![])]), libc::ENOSYS)?;

    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().chain(DENIED_LEGACY).map(|&nr| (nr, vec![])).collect();
    let new_process = rule(vec![condition(0, SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64), 0)?])?;
    rules.insert(libc::SYS_clone, vec![new_process]);
    let denied = compile(rules, libc::EPERM)?;
    Ok(vec![clone3, denied])
}

/// A program as the bytes of its `sock_filter` array (what `bwrap --add-seccomp-fd` reads).
pub fn to_bytes(program: &BpfProgram) -> Vec<u8> {
    let mut out = Vec::with_capacity(program.len() * 8);
    for f in program {
        out.extend_from_slice(&f.code.to_ne_bytes());
        out.push(f.jt);
        out.push(f.jf);
        out.extend_from_slice(&f.k.to_ne_bytes());
    }
    out
}
