//! Hostile code: each cell must be contained, end in a clean observation, and leave the
//! engine able to go on (the same worker with its variables, or a fresh one that says state
//! was lost). Every case runs under each isolation mode that works on this machine.

mod support;

use kiln_sandbox::{Cell, CellStatus, Isolation};
use support::{CSV, Task, exists, sandboxes};

/// What must hold after the hostile cell.
#[derive(Clone, Copy, PartialEq, Debug)]
enum After {
    /// The worker survived with its variables.
    Kept,
    /// The worker was replaced; the observation says state was lost.
    Lost,
}

/// Runs `code` after setting a variable, checks the cell with `check`, then checks that the
/// next cell runs (with or without the variable, as `after` says).
async fn hostile(code: &str, after: After, check: impl Fn(&Cell, &Task, Isolation)) {
    for sandbox in sandboxes() {
        let mode = sandbox.mode();
        let mut task = Task::start(sandbox, None).await;
        assert_eq!(task.run("secret_answer = 41").await.status, CellStatus::Ok);
        let cell = task.run(code).await;
        let (observation, _) = cell.observation(1024, 1024);
        assert!(!observation.trim().is_empty(), "{mode}: empty observation for {code:?}");
        assert!(observation.chars().count() < 2200, "{mode}: observation not cut: {} chars", observation.len());
        check(&cell, &task, mode);
        assert_eq!(cell.state_lost(), after == After::Lost, "{mode}: {code:?} gave {cell:?}");
        if after == After::Lost {
            assert!(observation.contains("restarted"), "{mode}: {observation}");
        }
        let next = task.run("print(secret_answer + 1)").await;
        match after {
            After::Kept => assert_eq!(next.output.trim(), "42", "{mode}: state after {code:?}: {next:?}"),
            After::Lost => {
                assert!(next.error.as_deref().unwrap_or("").starts_with("NameError"), "{mode}: {next:?}");
                assert_eq!(task.run("print(40 + 2)").await.output.trim(), "42", "{mode}: fresh worker");
                assert!(task.worker.starts() >= 2);
            }
        }
    }
}

fn error_of(cell: &Cell) -> &str {
    cell.error.as_deref().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread")]
async fn fork_bomb_is_refused() {
    hostile("import os\nwhile True:\n    os.fork()", After::Kept, |c, _, m| {
        assert!(error_of(c).starts_with("PermissionError"), "{m}: {c:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn os_fork_is_refused() {
    hostile("import os\npid = os.fork()\nprint('forked', pid)", After::Kept, |c, _, m| {
        assert!(!c.output.contains("forked"), "{m}: {c:?}");
        assert!(error_of(c).starts_with("PermissionError"), "{m}: {c:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_hog_gets_memory_error() {
    hostile("hog = bytearray(4 * 1024**3)", After::Kept, |c, _, m| {
        assert_eq!(error_of(c), "MemoryError", "{m}: {c:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn growing_arrays_hit_the_memory_limit() {
    hostile(
        "chunks = []\nwhile True:\n    chunks.append(np.empty(200 * 1024**2, dtype=np.uint8))",
        After::Kept,
        |c, _, m| {
            assert!(error_of(c).contains("Unable to allocate"), "{m}: {c:?}");
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn infinite_loop_is_interrupted_and_state_kept() {
    hostile("while True:\n    pass", After::Kept, |c, _, m| {
        assert_eq!(c.status, CellStatus::Timeout, "{m}: {c:?}");
        assert!(error_of(c).starts_with("TimeoutError"), "{m}: {c:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn signal_proof_busy_loop_is_killed() {
    let code = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass";
    hostile(code, After::Lost, |c, _, m| {
        assert_eq!(c.status, CellStatus::Killed, "{m}: {c:?}");
        assert!(c.elapsed_ms < 8000.0, "{m}: the hard timeout took {} ms", c.elapsed_ms);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_that_swallows_the_interruption_is_killed() {
    let code = "while True:\n    try:\n        while True:\n            pass\n    except BaseException:\n        pass";
    hostile(code, After::Lost, |c, _, m| assert_eq!(c.status, CellStatus::Killed, "{m}: {c:?}")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_output_is_cut_in_the_worker() {
    hostile("print('x' * 50_000_000)", After::Kept, |c, _, m| {
        assert_eq!(c.status, CellStatus::Ok, "{m}");
        assert_eq!(c.output_chars, 50_000_001);
        assert!(c.output.len() < 40_000, "{m}: the worker kept {} chars", c.output.len());
        assert!(c.observation(1024, 1024).1, "marked as truncated");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn many_lines_keep_head_and_tail() {
    hostile("for i in range(300_000):\n    print(i)", After::Kept, |c, _, m| {
        let (obs, cut) = c.observation(1024, 1024);
        assert!(cut, "{m}");
        assert!(obs.starts_with("0\n1\n2\n"), "{m}: {}", &obs[..20]);
        assert!(obs.trim_end().ends_with("299999"), "{m}");
        assert!(obs.contains("characters omitted"), "{m}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn etc_shadow_is_unreadable() {
    hostile("print(open('/etc/shadow').read())", After::Kept, |c, _, m| {
        let e = error_of(c);
        assert!(e.starts_with("FileNotFoundError") || e.starts_with("PermissionError"), "{m}: {c:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn home_folder_is_unreadable() {
    let home = std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME is set"));
    let secret_dir = tempfile::Builder::new().prefix(".kiln-test-secret").tempdir_in(&home).unwrap();
    let secret = secret_dir.path().join("token.txt");
    std::fs::write(&secret, "hunter2-secret").unwrap();
    let code = format!(
        "import os\ntry:\n    print(os.listdir({home:?}))\nexcept OSError as e:\n    print('listing refused:', type(e).__name__)\nprint(open({secret:?}).read())"
    );
    hostile(&code, After::Kept, |c, _, m| {
        assert!(!c.output.contains("hunter2") && !c.output.contains(".kiln-test-secret"), "{m}: {c:?}");
        let e = error_of(c);
        assert!(e.starts_with("FileNotFoundError") || e.starts_with("PermissionError"), "{m}: {c:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn writing_outside_scratch_fails() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("escaped.txt");
    let code = format!(
        "for p in [{target:?}, '/tmp/kiln-escaped.txt', '/usr/kiln-escaped.txt']:\n    try:\n        open(p, 'w').write('x')\n        print('wrote', p)\n    except OSError as e:\n        print('refused', type(e).__name__)"
    );
    hostile(&code, After::Kept, |c, _, m| {
        assert!(!c.output.contains("wrote"), "{m}: {c:?}");
        assert_eq!(c.output.matches("refused").count(), 3, "{m}: {c:?}");
        assert!(!exists(&target) && !exists(std::path::Path::new("/usr/kiln-escaped.txt")), "{m}");
    })
    .await;
    // Writing inside the scratch folder works and is visible to kiln.
    for sandbox in sandboxes() {
        let mut task = Task::start(sandbox, None).await;
        assert_eq!(task.run("open('note.txt', 'w').write('kept')").await.status, CellStatus::Ok);
        assert_eq!(std::fs::read_to_string(task.scratch().join("note.txt")).unwrap(), "kept");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn loopback_listener_is_unreachable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let code =
        format!("import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')");
    hostile(&code, After::Kept, |c, _, m| {
        assert!(!c.output.contains("connected"), "{m}: {c:?}");
        assert!(error_of(c).starts_with("PermissionError"), "{m}: {c:?}");
    })
    .await;
    assert!(listener.accept().is_err(), "nothing reached the listener");
}

#[tokio::test(flavor = "multi_thread")]
async fn inet_sockets_cannot_be_created() {
    let code = "import socket\nfor fam in (socket.AF_INET, socket.AF_INET6):\n    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):\n        try:\n            socket.socket(fam, kind)\n            print('created')\n        except PermissionError:\n            print('refused')";
    hostile(code, After::Kept, |c, _, m| {
        assert_eq!(c.output.matches("refused").count(), 4, "{m}: {c:?}");
        assert!(!c.output.contains("created"), "{m}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shell_cannot_be_spawned() {
    let code =
        "import subprocess\nr = subprocess.run(['sh', '-c', 'echo pwned'], capture_output=True)\nprint(r.stdout)";
    hostile(code, After::Kept, |c, _, m| {
        assert!(!c.output.contains("pwned"), "{m}: {c:?}");
        assert!(error_of(c).starts_with("PermissionError"), "{m}: {c:?}");
    })
    .await;
    hostile("import os\nprint('status', os.system('echo pwned > pwned.txt'))", After::Kept, |c, t, m| {
        assert!(c.output.contains("status"), "{m}: {c:?}");
        assert!(!exists(&t.scratch().join("pwned.txt")), "{m}: a shell ran");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn parent_cannot_be_killed() {
    let code = "import os, signal\nprint('parent', os.getppid())\nfor pid in (os.getppid(), 1):\n    try:\n        os.kill(pid, signal.SIGKILL)\n        print('sent', pid)\n    except OSError as e:\n        print('refused', type(e).__name__)";
    hostile(code, After::Kept, |c, _, m| {
        // Under bubblewrap the worker sees only its own PID namespace (its parent is the
        // namespace's init, which ignores the signal); under Landlock, signals are scoped.
        if m == Isolation::Landlock {
            assert_eq!(c.output.matches("refused").count(), 2, "{m}: {c:?}");
        } else {
            let parent = format!("parent {}\n", std::process::id());
            assert!(c.output.starts_with("parent ") && !c.output.starts_with(&parent), "{m}: sees the engine: {c:?}");
            assert_eq!(c.output.lines().count(), 3, "{m}: {c:?}");
        }
    })
    .await;
    // This test process (the engine) is still here, and so is the sandbox.
    assert!(!sandboxes().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn closing_the_protocol_pipes_restarts_the_worker() {
    hostile("import os\nos.close(3)\nos.close(4)", After::Lost, |c, _, m| {
        assert_eq!(c.status, CellStatus::Crashed, "{m}: {c:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_on_the_protocol_pipe_restarts_the_worker() {
    hostile("import os\nos.write(4, b'not json at all\\n')\nimport time\ntime.sleep(0.5)", After::Lost, |c, _, m| {
        assert_eq!(c.status, CellStatus::Crashed, "{m}: {c:?}");
        assert!(error_of(c).contains("protocol"), "{m}: {c:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn data_files_cannot_be_deleted_or_changed() {
    let code = "import os\nfor act in (lambda: os.remove('data/sales.csv'), lambda: open('data/sales.csv', 'w').write('')):\n    try:\n        act()\n    except OSError as e:\n        print('refused', type(e).__name__)\nprint(open('data/sales.csv').read() if os.path.exists('data/sales.csv') else 'gone from view')";
    hostile(code, After::Kept, |c, t, m| {
        assert!(c.output.contains("refused"), "{m}: {c:?}");
        assert_eq!(std::fs::read_to_string(t.data_file()).unwrap(), CSV, "{m}: the data file changed");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ctypes_segfault_restarts_the_worker() {
    hostile("import ctypes\nctypes.string_at(0)", After::Lost, |c, _, m| {
        assert_eq!(c.status, CellStatus::Crashed, "{m}: {c:?}");
        assert!(error_of(c).contains("killed by signal 11 (SIGSEGV"), "{m}: {c:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ctypes_raw_syscalls_are_filtered_too() {
    let code =
        "import ctypes\nlibc = ctypes.CDLL(None)\nprint('socket', libc.socket(2, 1, 0))\nprint('fork', libc.fork())";
    hostile(code, After::Kept, |c, _, m| {
        assert!(c.output.contains("socket -1") && c.output.contains("fork -1"), "{m}: {c:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pip_install_fails() {
    let code = "import subprocess, sys\nsubprocess.run([sys.executable, '-m', 'pip', 'install', 'tqdm'])";
    hostile(code, After::Kept, |c, _, m| assert!(error_of(c).starts_with("PermissionError"), "{m}: {c:?}")).await;
    let in_process = "from pip._internal.cli.main import main\ntry:\n    main(['install', '--retries', '0', '--timeout', '1', '--no-cache-dir', 'tqdm'])\nexcept BaseException as e:\n    print('pip failed:', type(e).__name__)\nimport tqdm";
    hostile(in_process, After::Kept, |c, _, m| {
        assert!(error_of(c).starts_with("ModuleNotFoundError"), "{m}: {c:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exiting_the_interpreter() {
    hostile("import sys\nsys.exit(3)", After::Kept, |c, _, m| {
        assert_eq!(error_of(c), "SystemExit: 3", "{m}: {c:?}");
    })
    .await;
    hostile("import os\nos._exit(3)", After::Lost, |c, _, m| {
        assert_eq!(c.status, CellStatus::Crashed, "{m}");
        assert!(error_of(c).contains("exited with status 3"), "{m}: {c:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn file_size_and_open_file_limits_hold() {
    hostile("open('big.bin', 'wb').write(b'0' * (100 << 20))", After::Kept, |c, t, m| {
        assert!(error_of(c).starts_with("OSError"), "{m}: {c:?}");
        let size = std::fs::metadata(t.scratch().join("big.bin")).map(|md| md.len()).unwrap_or(0);
        assert!(size <= 64 << 20, "{m}: wrote {size} bytes");
    })
    .await;
    hostile("files = [open(f'f{i}.txt', 'w') for i in range(5000)]", After::Kept, |c, _, m| {
        assert!(error_of(c).contains("Too many open files"), "{m}: {c:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn other_processes_environment_is_invisible() {
    let code = "import os\nfor pid in (os.getppid(), 1):\n    try:\n        print(open(f'/proc/{pid}/environ').read())\n    except OSError as e:\n        print('refused', type(e).__name__)\nprint(sorted(os.environ))";
    hostile(code, After::Kept, |c, _, m| {
        assert!(!c.output.contains("CARGO"), "{m}: the engine's environment leaked: {c:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_environment_is_read_only() {
    let code = "import sys, os\nfor p in (sys.executable, os.path.join(sys.prefix, 'pyvenv.cfg')):\n    try:\n        open(p, 'a').write('#')\n        print('changed', p)\n    except OSError as e:\n        print('refused', type(e).__name__)";
    hostile(code, After::Kept, |c, _, m| {
        assert_eq!(c.output.matches("refused").count(), 2, "{m}: {c:?}");
    })
    .await;
}

// Issue 12: the ways out that hostile cells found through the real agent path.

/// `renameat2` on this architecture (for the swap race).
#[cfg(target_arch = "x86_64")]
const SYS_RENAMEAT2: u32 = 316;
#[cfg(target_arch = "aarch64")]
const SYS_RENAMEAT2: u32 = 276;

#[tokio::test(flavor = "multi_thread")]
async fn swapping_a_folder_for_a_link_never_lets_execute_sql_write_outside() {
    let db_dir = tempfile::tempdir().unwrap();
    let db = db_dir.path().join("t.sqlite");
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("CREATE TABLE t(x INTEGER); INSERT INTO t VALUES (1);")
        .unwrap();
    for sandbox in sandboxes() {
        let mode = sandbox.mode();
        let outside = tempfile::tempdir().unwrap();
        let mut task = Task::start(sandbox, Some(db.clone())).await;
        // A thread swaps `sub/` and a link to the outside folder (RENAME_EXCHANGE) as fast as it
        // can, while the cell asks kiln to write `sub/x.csv`, for about one second.
        let code = format!(
            r#"import ctypes, os, threading, time
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs('sub', exist_ok=True)
os.symlink({outside:?}, 'swap')
stop = []
def swap():
    while not stop:
        libc.syscall({SYS_RENAMEAT2}, -100, b'sub', -100, b'swap', 2)
t = threading.Thread(target=swap)
t.start()
tries = refused = 0
end = time.time() + 1.2
while time.time() < end:
    tries += 1
    try:
        execute_sql(sql='SELECT x FROM t', output_path='sub/x.csv')
    except Exception:
        refused += 1
stop.append(1)
t.join()
print('tries', tries, 'refused', refused)"#,
            outside = outside.path().display().to_string()
        );
        let cell = task.run(&code).await;
        assert_eq!(cell.status, CellStatus::Ok, "{mode}: {cell:?}");
        let tries: u32 = cell.output.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
        assert!(tries >= 50, "{mode}: the race was tried only {tries} times: {cell:?}");
        let escaped: Vec<_> = std::fs::read_dir(outside.path()).unwrap().collect();
        assert!(escaped.is_empty(), "{mode}: kiln wrote outside the scratch folder: {escaped:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn file_metadata_of_host_and_scratch_files_cannot_change() {
    let code = r#"import os, stat
open('mine.txt', 'w').write('x')
for path in ('data/sales.csv', 'data', '.', 'mine.txt'):
    for name, act in (
        ('chmod', lambda: os.chmod(path, 0o777)),
        ('chown', lambda: os.chown(path, 1000, 1000)),
        ('utime', lambda: os.utime(path, (0, 0))),
        ('setxattr', lambda: os.setxattr(path, 'user.kiln', b'x')),
    ):
        try:
            act()
            print('changed', name, path)
        except OSError as e:
            print('refused', name, path, type(e).__name__)
for name, act in (
    ('block device', lambda: os.mknod('disk', 0o600 | stat.S_IFBLK, os.makedev(8, 0))),
    ('fifo', lambda: os.mkfifo('pipe')),
):
    try:
        act()
        print('made', name)
    except OSError as e:
        print('refused', name, type(e).__name__)"#;
    hostile(code, After::Kept, |c, t, m| {
        assert!(!c.output.contains("changed") && !c.output.contains("made"), "{m}: {c:?}");
        assert_eq!(c.output.matches("refused").count(), 18, "{m}: {c:?}");
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(t.data_file()).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o644, "{m}: the data file's mode changed");
        assert!(meta.mtime() > 0, "{m}: the data file's time changed");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn host_unix_sockets_are_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let code = format!(
        "import socket\ns = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\ns.connect({:?})\ns.sendall(b'hello from sandbox')\nprint('connected')",
        path.display().to_string()
    );
    hostile(&code, After::Kept, |c, _, m| {
        assert!(!c.output.contains("connected"), "{m}: {c:?}");
        assert!(error_of(c).starts_with("PermissionError"), "{m}: {c:?}");
    })
    .await;
    let pair = "import socket\ntry:\n    socket.socketpair()\n    print('made')\nexcept OSError as e:\n    print('refused', type(e).__name__)";
    hostile(pair, After::Kept, |c, _, m| assert!(c.output.contains("refused"), "{m}: {c:?}")).await;
    assert!(listener.accept().is_err(), "nothing reached the host socket");
}

#[tokio::test(flavor = "multi_thread")]
async fn priority_and_scheduling_cannot_be_raised() {
    let code = r#"import os
for name, act in (
    ('nice', lambda: os.nice(-20)),
    ('setpriority', lambda: os.setpriority(os.PRIO_PROCESS, 0, -20)),
    ('fifo', lambda: os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))),
    ('rr', lambda: os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(10))),
):
    try:
        act()
        print('raised', name)
    except OSError as e:
        print('refused', name, type(e).__name__)
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
header, sets = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
libc.capget(header, sets)
print('capabilities', list(sets), 'bounding', sum(libc.prctl(23, cap) == 1 for cap in range(64)))"#;
    hostile(code, After::Kept, |c, _, m| {
        assert!(!c.output.contains("raised"), "{m}: {c:?}");
        assert_eq!(c.output.matches("refused").count(), 4, "{m}: {c:?}");
        assert!(
            c.output.contains("capabilities [0, 0, 0, 0, 0, 0] bounding 0"),
            "{m}: the worker holds capabilities: {c:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn other_processes_descriptors_cannot_be_taken() {
    // pidfd_open(1) then pidfd_getfd(pidfd, 3): under bubblewrap, PID 1 is bubblewrap itself.
    let code = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\npidfd = libc.syscall(434, 1, 0)\nprint('pidfd', pidfd)\nprint('fd', libc.syscall(438, pidfd, 3, 0) if pidfd >= 0 else -1)";
    hostile(code, After::Kept, |c, _, m| {
        assert!(c.output.contains("pidfd -1") && c.output.contains("fd -1"), "{m}: {c:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scratch_quota_stops_the_cell_and_empties_the_folder() {
    // 16 MiB files (under the per-file limit) until well past the 128 MiB quota.
    let bytes = "for i in range(40):\n    open(f'big{i}.bin', 'wb').write(b'1' * (16 << 20))\nprint('wrote it all')";
    let many = "for i in range(5000):\n    open(f'f{i}.txt', 'w').close()\nprint('wrote it all')";
    for code in [bytes, many] {
        hostile(code, After::Lost, |c, t, m| {
            assert_eq!(c.status, CellStatus::Killed, "{m}: {c:?}");
            assert!(error_of(c).contains("quota"), "{m}: {c:?}");
            let left: Vec<_> = std::fs::read_dir(t.scratch())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|name| name != "data")
                .collect();
            assert!(left.is_empty(), "{m}: the scratch folder was not emptied: {left:?} after {c:?}");
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_reply_never_becomes_another_cells_observation() {
    // A reply with a made-up id: the protocol is broken, the worker replaced.
    let forged = r#"import os, json, time
os.write(4, (json.dumps({'op': 'done', 'id': 'forged', 'status': 'ok', 'output': 'FORGED', 'output_chars': 6, 'error': None}) + '\n').encode())
time.sleep(0.3)"#;
    hostile(forged, After::Lost, |c, _, m| {
        assert_eq!(c.status, CellStatus::Crashed, "{m}: {c:?}");
        assert!(!c.output.contains("FORGED"), "{m}: {c:?}");
    })
    .await;
    // A reply with the right id, read from the runner's frame: it can only speak for the cell
    // that wrote it; the real reply that follows is not taken for the next cell's.
    let with_id = r#"import os, json, sys, time
request = sys._getframe(2).f_locals['request']
os.write(4, (json.dumps({'op': 'done', 'id': request['id'], 'status': 'ok', 'output': 'FORGED', 'output_chars': 6, 'error': None}) + '\n').encode())
time.sleep(0.3)
print('real output')"#;
    for sandbox in sandboxes() {
        let mode = sandbox.mode();
        let mut task = Task::start(sandbox, None).await;
        task.run(with_id).await;
        let next = task.run("print('second')").await;
        assert!(!next.output.contains("real output") && !next.output.contains("FORGED"), "{mode}: shifted: {next:?}");
        let third = task.run("print('third')").await;
        assert_eq!(third.output.trim(), "third", "{mode}: {third:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replacing_the_runner_does_not_fake_later_observations() {
    let code = r#"import sys
runner = sys.modules['__main__']
fake = lambda *a, **k: {'op': 'done', 'status': 'ok', 'output': 'FAKE', 'output_chars': 4, 'error': None}
runner._run = fake
runner._send = lambda *a, **k: None
runner._receive = lambda *a, **k: {'id': 'x', 'code': '', 'timeout': 1, 'cap': 10}
runner._OUT = open('fake_out.txt', 'w')
print('replaced')"#;
    // hostile() then checks the next cell prints 42 from the variable set before.
    hostile(code, After::Kept, |c, _, m| assert_eq!(c.output.trim(), "replaced", "{m}: {c:?}")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_is_nobody_in_a_user_namespace_of_its_own() {
    for sandbox in sandboxes() {
        let (mode, namespaced) = (sandbox.mode(), sandbox.user_namespace());
        let mut task = Task::start(sandbox, None).await;
        let cell = task.run("import os\nprint(os.getuid(), os.getgid(), os.geteuid())").await;
        if namespaced {
            assert_eq!(cell.output.trim(), "65534 65534 65534", "{mode}: {cell:?}");
        } else {
            eprintln!("{mode}: no user namespace on this machine; the worker runs as {}", cell.output.trim());
        }
        // Its files are still the task's: kiln reads and removes them.
        assert_eq!(task.run("open('mine.txt', 'w').write('x')").await.status, CellStatus::Ok, "{mode}");
        assert_eq!(std::fs::read_to_string(task.scratch().join("mine.txt")).unwrap(), "x", "{mode}");
    }
}
