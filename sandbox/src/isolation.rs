//! How a worker is confined, chosen at start-up by probing what works on this machine:
//! bubblewrap when it runs, otherwise Landlock applied by kiln itself before `exec`. Both add
//! the seccomp filters of [`crate::seccomp`] and the resource limits of [`Limits`].
//!
//! In either mode the worker sees its scratch folder as its working directory (writable; the
//! only writable place) with the task's data files read-only under `data/`, and nothing of the
//! machine but the system libraries and the Python environment: no home, no `/etc` beyond the
//! loader cache, no network (loopback included), no other processes. It never holds a
//! capability: in both modes it is `nobody` in a user namespace of its own (kiln's uid, root
//! included, maps to it; where user namespaces are refused it keeps kiln's uid), and under
//! Landlock every capability is dropped for good ([`Privileges`]); as root, Landlock's signal
//! scoping (ABI 6) is required.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, RestrictionStatus, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, path_beneath_rules,
};
use seccompiler::BpfProgram;

use crate::python_env::PythonEnv;
use crate::{Error, Limits};

/// The isolation mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// bubblewrap: private mount, PID, network, IPC and UTS namespaces.
    Bubblewrap,
    /// Landlock file-system and TCP rules, signal and abstract-socket scoping.
    Landlock,
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Isolation::Bubblewrap => "bubblewrap",
            Isolation::Landlock => "landlock",
        })
    }
}

/// Folders of the host a worker may read (and run code from), besides the Python environment.
const SYSTEM_DIRS: &[&str] = &["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin"];
/// Files of `/etc` the loader, time zones and `mimetypes` (which pandas uses for Excel) read.
const SYSTEM_FILES: &[&str] = &["/etc/ld.so.cache", "/etc/localtime", "/etc/mime.types"];
/// Where the scratch folder appears inside bubblewrap.
const BWRAP_WORK: &str = "/work";
/// File descriptors the worker reads requests from and writes replies to.
pub(crate) const REQUEST_FD: RawFd = 3;
pub(crate) const REPLY_FD: RawFd = 4;
/// Where the seccomp programs are handed to bubblewrap.
const SECCOMP_FD: RawFd = 5;

/// What one worker process is given.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// The trajectory's scratch folder on the host (created if missing).
    pub scratch: PathBuf,
    /// Data files, shown read-only as `data/<name>` in the working directory.
    pub data: Vec<DataFile>,
    /// The SQLite database behind `get_db_info()` and `execute_sql()`, if any.
    pub database: Option<PathBuf>,
    /// Resource limits.
    pub limits: Limits,
}

/// A data file and the name it has inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFile {
    /// File name under `data/` (no slashes).
    pub name: String,
    /// The file on the host.
    pub path: PathBuf,
}

/// What every worker of a run shares: the Python environment, the isolation mode and the
/// compiled seccomp filters.
#[derive(Debug)]
pub struct Sandbox {
    env: PythonEnv,
    mode: Isolation,
    filters: Vec<BpfProgram>,
    /// Where `bwrap` is (found on `PATH`, which its own cleared environment lacks).
    bwrap: PathBuf,
    /// Whether the worker gets a user namespace of its own, where kiln's user (root included)
    /// is `nobody`; without one (a kernel or container that refuses them) it keeps kiln's uid.
    /// It holds no capability either way.
    user_namespace: bool,
}

impl Sandbox {
    /// A sandbox in `mode`, or in the first mode that works here when `None`.
    pub fn new(env: PythonEnv, mode: Option<Isolation>) -> Result<Self, Error> {
        let filters = crate::seccomp::programs()?;
        let bwrap = std::env::var_os("PATH")
            .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("bwrap")).find(|p| p.is_file()))
            .unwrap_or_else(|| PathBuf::from("bwrap"));
        let mode_or_first = mode.unwrap_or(Isolation::Bubblewrap);
        let mut sandbox = Sandbox { env, mode: mode_or_first, filters, bwrap, user_namespace: true };
        if mode.is_some() {
            sandbox.try_mode()?;
            return Ok(sandbox);
        }
        let mut failures = Vec::new();
        for candidate in [Isolation::Bubblewrap, Isolation::Landlock] {
            sandbox.mode = candidate;
            match sandbox.try_mode() {
                Ok(()) => {
                    tracing::info!("sandbox isolation: {candidate}");
                    return Ok(sandbox);
                }
                Err(e) => failures.push(format!("{candidate}: {e}")),
            }
        }
        Err(Error::Spawn(format!(
            "no isolation works on this machine ({}); install bubblewrap (`apt-get install bubblewrap`) or use a kernel with Landlock ABI 4 or later",
            failures.join("; ")
        )))
    }

    /// The isolation in use.
    pub fn mode(&self) -> Isolation {
        self.mode
    }

    /// The Python environment workers run.
    pub fn env(&self) -> &PythonEnv {
        &self.env
    }

    /// Whether workers run as `nobody` in a user namespace of their own.
    pub fn user_namespace(&self) -> bool {
        self.user_namespace
    }

    /// Runs a trivial program in this mode to see whether it works: with a user namespace, else
    /// without.
    fn try_mode(&mut self) -> Result<(), Error> {
        self.user_namespace = true;
        let first = self.try_once();
        if first.is_err() {
            self.user_namespace = false;
            if self.try_once().is_ok() {
                tracing::warn!(
                    "{}: no user namespace can be made here: workers keep kiln's uid, without capabilities",
                    self.mode
                );
                return Ok(());
            }
            self.user_namespace = true;
        }
        first
    }

    fn try_once(&self) -> Result<(), Error> {
        let scratch = std::env::temp_dir().join(format!("kiln-probe-{}", std::process::id()));
        let spec = WorkerSpec { scratch: scratch.clone(), data: vec![], database: None, limits: Limits::default() };
        let (request, _keep) = pipe()?;
        let (_keep2, reply) = pipe()?;
        let (mut cmd, _fds) = self.command(&spec, &["-c", "pass"], &request, &reply)?;
        let status = cmd.status();
        let _ = std::fs::remove_dir_all(&scratch);
        match status {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(Error::Spawn(format!("a test program failed ({s})"))),
            Err(e) => Err(Error::Spawn(e.to_string())),
        }
    }

    /// The command that starts `python <args>` confined for `spec`, with `request` and `reply`
    /// (the worker's ends of the protocol pipes) as its fds 3 and 4.
    pub(crate) fn command(
        &self,
        spec: &WorkerSpec,
        args: &[&str],
        request: &OwnedFd,
        reply: &OwnedFd,
    ) -> Result<(std::process::Command, Vec<OwnedFd>), Error> {
        std::fs::create_dir_all(&spec.scratch).map_err(|e| Error::io(&spec.scratch, e))?;
        let rlimits = Rlimits::of(&spec.limits);
        let mut fds = vec![(request.as_raw_fd(), REQUEST_FD), (reply.as_raw_fd(), REPLY_FD)];
        let (mut cmd, landlock, keep) = match self.mode {
            Isolation::Bubblewrap => {
                let mut keep = Vec::new();
                let mut cmd = std::process::Command::new(&self.bwrap);
                // bubblewrap's own process is the sandbox's PID 1, whose environment the
                // worker can read: it gets none of kiln's (API keys stay outside).
                cmd.env_clear().args(self.bwrap_args(spec));
                for (i, program) in self.filters.iter().enumerate() {
                    let fd = memfd_with(&crate::seccomp::to_bytes(program))?;
                    let target = SECCOMP_FD + i as RawFd;
                    fds.push((fd.as_raw_fd(), target));
                    cmd.arg("--add-seccomp-fd").arg(target.to_string());
                    keep.push(fd);
                }
                cmd.arg("--").arg(&self.env.python);
                (cmd, None, keep)
            }
            Isolation::Landlock => {
                // `data/` is a link to a folder beside the scratch folder (so outside its
                // write rule) holding links to the data files: readable, not removable.
                let shown = data_folder(&spec.scratch);
                let _ = std::fs::remove_dir_all(&shown);
                std::fs::create_dir_all(&shown).map_err(|e| Error::io(&shown, e))?;
                for file in &spec.data {
                    std::os::unix::fs::symlink(&file.path, shown.join(&file.name))
                        .map_err(|e| Error::io(&file.path, e))?;
                }
                let link = spec.scratch.join("data");
                let _ = std::fs::remove_file(&link).or_else(|_| std::fs::remove_dir_all(&link));
                std::os::unix::fs::symlink(&shown, &link).map_err(|e| Error::io(&link, e))?;
                let mut cmd = std::process::Command::new(&self.env.python);
                cmd.current_dir(&spec.scratch).env_clear().envs(worker_env(&spec.scratch));
                (cmd, Some(Mutex::new(Some(self.landlock_ruleset(spec)?))), Vec::new())
            }
        };
        cmd.args(["-s", "-B"]).args(args);
        cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null());
        // Under bubblewrap these are done by bubblewrap, to the worker only.
        let (filters, privileges) = match self.mode {
            Isolation::Landlock => (self.filters.clone(), Some(Privileges::new(self.user_namespace)?)),
            Isolation::Bubblewrap => (Vec::new(), None),
        };
        // SAFETY: the closure runs between fork and exec; it only makes system calls (dup2,
        // setsid, setrlimit, prctl, unshare, open/write/close, capset, landlock, seccomp) on
        // values prepared before the fork.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(privileges) = &privileges {
                    privileges.drop_all()?;
                }
                // After the credentials changed, which clears it.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if let Some(ruleset) = &landlock {
                    let ruleset = ruleset.lock().ok().and_then(|mut r| r.take());
                    let ruleset =
                        ruleset.ok_or_else(|| std::io::Error::other("the Landlock ruleset was used twice"))?;
                    let status: RestrictionStatus = ruleset.restrict_self().map_err(std::io::Error::other)?;
                    if status.ruleset == RulesetStatus::NotEnforced {
                        return Err(std::io::Error::other("Landlock is not enforced by this kernel"));
                    }
                }
                for program in &filters {
                    seccompiler::apply_filter(program).map_err(std::io::Error::other)?;
                }
                // After Landlock has used (and closed) its ruleset descriptor, which may have
                // one of the low numbers the worker's pipes go to.
                for &(from, to) in &fds {
                    if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Late, so that nothing above runs under the worker's address-space limit.
                rlimits.apply()
            });
        }
        // The memfds must stay open until the child has started.
        Ok((cmd, keep))
    }

    fn bwrap_args(&self, spec: &WorkerSpec) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut arg = |parts: &[&dyn AsRef<std::ffi::OsStr>]| a.extend(parts.iter().map(|p| p.as_ref().to_os_string()));
        // A user namespace of its own, where the worker is `nobody` without capabilities (kiln's
        // user, root included, maps to it) and cannot make another one.
        arg(&[&"--unshare-all", &"--die-with-parent", &"--new-session", &"--cap-drop", &"ALL"]);
        if self.user_namespace {
            arg(&[&"--unshare-user", &"--uid", &"65534", &"--gid", &"65534", &"--disable-userns"]);
        }
        for dir in SYSTEM_DIRS.iter().chain(SYSTEM_FILES) {
            arg(&[&"--ro-bind-try", dir, dir]);
        }
        arg(&[&"--proc", &"/proc", &"--dev", &"/dev"]);
        for dir in [&self.env.base_prefix, &self.env.dir] {
            arg(&[&"--ro-bind", dir, dir]);
        }
        arg(&[&"--bind", &spec.scratch, &BWRAP_WORK]);
        for file in &spec.data {
            let inside = Path::new(BWRAP_WORK).join("data").join(&file.name);
            arg(&[&"--ro-bind", &file.path, &inside]);
        }
        arg(&[&"--chdir", &BWRAP_WORK, &"--clearenv"]);
        for (k, v) in worker_env(Path::new(BWRAP_WORK)) {
            arg(&[&"--setenv", &k, &v]);
        }
        a
    }

    fn landlock_ruleset(&self, spec: &WorkerSpec) -> Result<landlock::RulesetCreated, Error> {
        // File and TCP rules need ABI 4; signal and abstract-socket scoping (ABI 6) are used
        // where the kernel has them (bubblewrap's PID namespace is the fallback's equivalent).
        let abi = ABI::V4;
        let err = |e: landlock::RulesetError| Error::Spawn(format!("landlock: {e}"));
        // A root worker keeps root's uid (without capabilities): only signal scoping keeps it
        // from signalling the host's other root processes, so as root scoping is required.
        // SAFETY: geteuid has no preconditions.
        let scoping = match unsafe { libc::geteuid() } {
            0 => CompatLevel::HardRequirement,
            _ => CompatLevel::BestEffort,
        };
        let mut readable: Vec<PathBuf> = SYSTEM_DIRS.iter().chain(SYSTEM_FILES).map(PathBuf::from).collect();
        readable.extend([self.env.base_prefix.clone(), self.env.dir.clone()]);
        readable.extend(spec.data.iter().map(|f| f.path.clone()));
        readable.push(data_folder(&spec.scratch));
        let readable: Vec<PathBuf> = readable.into_iter().filter(|p| p.exists()).collect();
        Ruleset::default()
            .set_compatibility(CompatLevel::HardRequirement)
            .handle_access(AccessFs::from_all(abi))
            .and_then(|r| r.handle_access(AccessNet::from_all(abi)))
            // Device ioctls (ABI 5) where the kernel has them.
            .and_then(|r| r.set_compatibility(CompatLevel::BestEffort).handle_access(AccessFs::from_all(ABI::V5)))
            .and_then(|r| r.set_compatibility(scoping).scope(Scope::from_all(ABI::V6)))
            .and_then(|r| r.set_compatibility(CompatLevel::BestEffort).create())
            .and_then(|r| r.add_rules(path_beneath_rules(&readable, AccessFs::from_read(abi))))
            .and_then(|r| r.add_rules(path_beneath_rules(["/dev/null", "/dev/urandom"], AccessFs::from_all(ABI::V5))))
            .and_then(|r| r.add_rules(path_beneath_rules([&spec.scratch], AccessFs::from_all(abi))))
            .map_err(err)
    }
}

/// The folder that holds the links to the data files in Landlock mode: beside the scratch
/// folder, so outside its write rule.
fn data_folder(scratch: &Path) -> PathBuf {
    let mut name = scratch.file_name().unwrap_or_default().to_os_string();
    name.push(".data");
    scratch.with_file_name(name)
}

/// The worker's environment variables: nothing of kiln's (no API keys), a fixed hash seed and
/// single-threaded numeric libraries.
fn worker_env(work: &Path) -> Vec<(OsString, OsString)> {
    let work = work.as_os_str().to_os_string();
    [
        ("HOME", work.clone()),
        ("TMPDIR", work),
        ("PATH", "/usr/bin:/bin".into()),
        ("LANG", "C.UTF-8".into()),
        ("PYTHONHASHSEED", "0".into()),
        ("PYTHONIOENCODING", "utf-8".into()),
        ("OPENBLAS_NUM_THREADS", "1".into()),
        ("OMP_NUM_THREADS", "1".into()),
        ("MKL_NUM_THREADS", "1".into()),
        ("MPLBACKEND", "Agg".into()),
    ]
    .into_iter()
    .map(|(k, v)| (OsString::from(k), v))
    .collect()
}

/// Resource limits, computed before the fork and applied in the child.
#[derive(Debug, Clone, Copy)]
struct Rlimits {
    address_space: u64,
    file_size: u64,
    open_files: u64,
}

impl Rlimits {
    fn of(limits: &Limits) -> Self {
        Rlimits {
            address_space: limits.memory_mb << 20,
            file_size: limits.file_size_mb << 20,
            open_files: limits.open_files,
        }
    }

    fn apply(&self) -> std::io::Result<()> {
        for (resource, value) in [
            (libc::RLIMIT_AS, self.address_space),
            (libc::RLIMIT_FSIZE, self.file_size),
            (libc::RLIMIT_NOFILE, self.open_files),
            (libc::RLIMIT_CORE, 0),
            // No raised priority or real-time scheduling, whatever capabilities remain.
            (libc::RLIMIT_NICE, 0),
            (libc::RLIMIT_RTPRIO, 0),
        ] {
            let limit = libc::rlimit { rlim_cur: value, rlim_max: value };
            // SAFETY: setrlimit with a valid pointer.
            if unsafe { libc::setrlimit(resource, &limit) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// What a Landlock worker gives up before it executes Python, prepared before the fork: a user
/// namespace of its own where kiln's uid and gid are `nobody` (as bubblewrap does), then every
/// capability for good. Without the namespace, a root kiln's worker would keep root's
/// capabilities (chmod and chown of host files, mknod, raised priority...).
struct Privileges {
    /// `(file, contents)` to write after entering the namespace: setgroups, uid_map, gid_map.
    maps: Option<[(std::ffi::CString, Vec<u8>); 3]>,
}

impl Privileges {
    fn new(user_namespace: bool) -> Result<Self, Error> {
        if !user_namespace {
            return Ok(Privileges { maps: None });
        }
        let path = |p: &str| std::ffi::CString::new(p).map_err(|e| Error::Spawn(e.to_string()));
        // SAFETY: geteuid and getegid have no preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Ok(Privileges {
            maps: Some([
                (path("/proc/self/setgroups")?, b"deny".to_vec()),
                (path("/proc/self/uid_map")?, format!("65534 {uid} 1").into_bytes()),
                (path("/proc/self/gid_map")?, format!("65534 {gid} 1").into_bytes()),
            ]),
        })
    }

    /// Enters the namespace (if any), empties the bounding and ambient sets, locks the secure
    /// bits so that executing a program as root gives nothing back (with `no_new_privs`, set by
    /// Landlock), and clears the effective, permitted and inheritable sets. Runs between fork
    /// and exec: system calls only.
    fn drop_all(&self) -> std::io::Result<()> {
        // SECBIT_NOROOT, SECBIT_NO_SETUID_FIXUP, SECBIT_NO_CAP_AMBIENT_RAISE, each with its lock,
        // and SECBIT_KEEP_CAPS_LOCKED (KEEP_CAPS itself off).
        const SECURE_BITS: libc::c_ulong = 0b1110_1111;
        const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
        #[repr(C)]
        struct Header {
            version: u32,
            pid: libc::c_int,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let fail = || Err(std::io::Error::last_os_error());
        // SAFETY: unshare, open, write, close, prctl and capset with valid arguments and
        // pointers to live values prepared before the fork.
        unsafe {
            // In a namespace of its own the process holds every capability there (so the calls
            // below must succeed); outside one, only a root kiln's worker has any to drop.
            let must = self.maps.is_some() || libc::geteuid() == 0;
            if let Some(maps) = &self.maps {
                if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                    return fail();
                }
                for (file, contents) in maps {
                    let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return fail();
                    }
                    let written = libc::write(fd, contents.as_ptr().cast(), contents.len());
                    libc::close(fd);
                    if written != contents.len() as isize {
                        return fail();
                    }
                }
            }
            // Changing the secure bits and the bounding set needs CAP_SETPCAP, which a process
            // without capabilities (a non-root kiln without a namespace) has no use for.
            if libc::prctl(libc::PR_SET_SECUREBITS, SECURE_BITS) != 0 && must {
                return fail();
            }
            for cap in 0..64 {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong) != 0 {
                    match std::io::Error::last_os_error().raw_os_error() {
                        Some(libc::EINVAL) => break, // past the last capability of this kernel
                        _ if must => return fail(),
                        _ => break,
                    }
                }
            }
            libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0);
            let header = Header { version: CAPABILITY_VERSION_3, pid: 0 };
            let none = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
            if libc::syscall(libc::SYS_capset, &header as *const Header, none.as_ptr()) != 0 {
                return fail();
            }
        }
        Ok(())
    }
}

/// A pipe as (read end, write end), both close-on-exec and numbered above the fds the child
/// gets, so that `dup2` into 3, 4, 5... never overwrites one of them.
pub(crate) fn pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::Spawn(format!("pipe: {}", std::io::Error::last_os_error())));
    }
    Ok((high_fd(fds[0])?, high_fd(fds[1])?))
}

/// `fd` moved to a number of at least 16 (close-on-exec), owned.
fn high_fd(fd: RawFd) -> Result<OwnedFd, Error> {
    use std::os::fd::FromRawFd;
    // SAFETY: duplicating and closing descriptors this function was given.
    unsafe {
        let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 16);
        libc::close(fd);
        if high < 0 {
            return Err(Error::Spawn(format!("fcntl: {}", std::io::Error::last_os_error())));
        }
        Ok(OwnedFd::from_raw_fd(high))
    }
}

/// An anonymous file holding `bytes`, positioned at its start.
fn memfd_with(bytes: &[u8]) -> Result<OwnedFd, Error> {
    use std::io::{Seek, Write};
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a valid name; the descriptor is owned from here on.
    let fd = unsafe { libc::memfd_create(c"kiln-seccomp".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Spawn(format!("memfd_create: {}", std::io::Error::last_os_error())));
    }
    let owned = high_fd(fd)?;
    // SAFETY: `owned` is a valid descriptor; the File is turned back into it below.
    let mut file = unsafe { std::fs::File::from_raw_fd(owned.as_raw_fd()) };
    let result = file.write_all(bytes).and_then(|_| file.rewind());
    std::mem::forget(file);
    result.map_err(|e| Error::Spawn(format!("seccomp program: {e}")))?;
    Ok(owned)
}
