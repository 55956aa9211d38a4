//! The system-call filters every worker runs under, in both isolation modes.
//!
//! Two programs, stacked: the first answers `clone3` with ENOSYS, so that glibc falls back to
//! `clone` (whose flags a filter can read) for threads; the second refuses, with EPERM, every
//! socket that is not a Unix socket (so no network at all, loopback included), creating
//! processes (`fork`, `vfork`, `clone` without `CLONE_THREAD`: no shells, no fork bombs, no pip),
//! and the calls that reach outside the sandbox (ptrace, mounts, namespaces, BPF, keyrings...).

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
];

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

    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED.iter().map(|&nr| (nr, vec![])).collect();
    let not_unix = || -> Result<Vec<SeccompRule>, Error> {
        Ok(vec![rule(vec![condition(0, SeccompCmpOp::Ne, libc::AF_UNIX as u64)?])?])
    };
    rules.insert(libc::SYS_socket, not_unix()?);
    rules.insert(libc::SYS_socketpair, not_unix()?);
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
