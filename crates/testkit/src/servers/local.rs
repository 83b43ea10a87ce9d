//! The local way: PostgreSQL and Redis server processes started from the
//! binaries installed here, which tests can stop, kill and restart.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use std::time::{Duration, Instant};

use super::{Lifecycle, RedisPersistence};
use crate::process::{free_port, signal_and_wait, spawn_owned};

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Where this process keeps its server directories. Directories of test runs
/// whose process is gone are removed the first time this is called.
fn work_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::temp_dir().join("hybridstore-testkit");
        fs::create_dir_all(&base).expect("create the testkit directory");
        if let Ok(entries) = fs::read_dir(&base) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let pid = name
                    .rsplit('-')
                    .nth(1)
                    .and_then(|pid| pid.parse::<u32>().ok());
                if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        base
    })
}

fn new_server_dir(kind: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = work_dir().join(format!("{kind}-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create a server directory");
    dir
}

fn log_file(path: &Path) -> Stdio {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

fn wait_until(what: &str, log: &Path, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + START_TIMEOUT;
    while !ready() {
        if Instant::now() > deadline {
            let log = fs::read_to_string(log).unwrap_or_default();
            panic!("{what} did not become ready in {START_TIMEOUT:?}; its log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What every server process has: a directory, a port and the running child.
/// Dropping it kills the process and removes the directory.
struct ServerProcess {
    dir: PathBuf,
    port: u16,
    child: Mutex<Option<Child>>,
}

impl ServerProcess {
    fn new(kind: &str) -> Self {
        Self {
            dir: new_server_dir(kind),
            port: free_port(),
            child: Mutex::new(None),
        }
    }

    fn spawn(&self, command: Command) {
        let child = spawn_owned(command).expect("start a server process");
        *self.child.lock().expect("child lock") = Some(child);
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(mut child) = self.child.lock().expect("child lock").take() {
            // A paused server acts on SIGTERM/SIGINT only once continued.
            for pid in process_tree(child.id()) {
                // SAFETY: kill(2) on processes of the server we started.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGCONT);
                }
            }
            signal_and_wait(&mut child, signal);
        }
    }

    /// Sends `signal` to the server and every process it started, leaving
    /// them running. (PostgreSQL's backends call setsid(), so the process
    /// group alone does not reach them: the tree is found through /proc.)
    fn signal_tree(&self, signal: libc::c_int) {
        if let Some(child) = self.child.lock().expect("child lock").as_ref() {
            // A process forked while the tree was being read (a connection
            // the server was opening) would miss a single sweep: a stop is
            // swept a few times, the root first so it forks no more.
            let sweeps = if signal == libc::SIGSTOP { 3 } else { 1 };
            for sweep in 0..sweeps {
                if sweep > 0 {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                for pid in process_tree(child.id()) {
                    // SAFETY: kill(2) on processes of the server we started.
                    unsafe {
                        libc::kill(pid as libc::pid_t, signal);
                    }
                }
            }
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `root` and all its descendants, from the parent ids in /proc.
fn process_tree(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces, so split
            // after its closing parenthesis.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|ppid| ppid.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    tree
}

/// The directory of the PostgreSQL server binaries (`initdb`, `postgres`),
/// if they are installed here.
pub(super) fn postgres_bin_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("HYBRIDSTORE_TEST_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let from_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("initdb"))
            .find(|candidate| candidate.exists())
            .and_then(|initdb| fs::canonicalize(initdb).ok())
            .and_then(|initdb| initdb.parent().map(Path::to_path_buf))
    });
    if from_path.is_some() {
        return from_path;
    }
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().filter(|dir| dir.join("initdb").exists())
}

/// Whether `redis-server` is on the PATH.
pub(super) fn redis_server_installed() -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| dir.join("redis-server").exists())
    })
}

/// The uid/gid to run PostgreSQL as: it refuses to run as root.
fn postgres_user() -> Option<(u32, u32)> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam returns a pointer into static storage or null; we copy
    // the two fields out immediately.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !entry.is_null(),
        "running as root needs a 'postgres' user to run PostgreSQL as"
    );
    // SAFETY: non-null pointer from getpwnam.
    unsafe { Some(((*entry).pw_uid, (*entry).pw_gid)) }
}

/// A PostgreSQL server process of our own.
pub struct LocalPostgres {
    process: ServerProcess,
    bin: PathBuf,
    run_as: Option<(u32, u32)>,
}

impl LocalPostgres {
    /// `initdb` into a fresh directory and start on a free port. Tuned for tests:
    /// no fsync (a killed *process* loses nothing the OS has), but synchronous
    /// commit stays on, so an acknowledged commit survives `kill -9`.
    pub fn start() -> LocalPostgres {
        let process = ServerProcess::new("pg");
        let dir = &process.dir;
        let bin = postgres_bin_dir().expect(
            "PostgreSQL server binaries not found (install postgresql or set HYBRIDSTORE_TEST_PG_BIN)",
        );
        let run_as = postgres_user();
        let data = dir.join("data");
        fs::create_dir_all(&data).expect("create the data directory");
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("chown");
            std::os::unix::fs::chown(&data, Some(uid), Some(gid)).expect("chown");
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdout(log_file(&dir.join("initdb.log")))
            .stderr(log_file(&dir.join("initdb.log")));
        if let Some((uid, gid)) = run_as {
            std::os::unix::process::CommandExt::uid(&mut initdb, uid);
            std::os::unix::process::CommandExt::gid(&mut initdb, gid);
        }
        let status = initdb.status().expect("run initdb");
        assert!(
            status.success(),
            "initdb failed: {}",
            fs::read_to_string(dir.join("initdb.log")).unwrap_or_default()
        );
        let server = LocalPostgres {
            process,
            bin,
            run_as,
        };
        server.launch();
        server
    }
}

impl Lifecycle for LocalPostgres {
    fn port(&self) -> u16 {
        self.process.port
    }

    /// `kill -9` of every process of the server, as when its host or
    /// container dies: no shutdown, no checkpoint (recovery runs at the next
    /// start). Killing the postmaster alone would leave its backends to
    /// commit the statements already on their connections for a moment.
    fn kill(&self) {
        self.process.signal_tree(libc::SIGKILL);
    }

    /// Fast shutdown (SIGINT): open transactions are rolled back.
    fn stop(&self) {
        self.process.signal(libc::SIGINT);
    }

    /// Freezes every process of the server (SIGSTOP): connections stay open
    /// but nothing answers, like a hung host.
    fn pause(&self) {
        self.process.signal_tree(libc::SIGSTOP);
    }

    /// Lets a paused server go on (SIGCONT).
    fn resume(&self) {
        self.process.signal_tree(libc::SIGCONT);
    }

    fn launch(&self) {
        let log = self.process.dir.join("postgres.log");
        let mut command = Command::new(self.bin.join("postgres"));
        command
            .arg("-D")
            .arg(self.process.dir.join("data"))
            .args(["-p", &self.port().to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "unix_socket_directories="])
            .args(["-c", "fsync=off"])
            .args(["-c", "full_page_writes=off"])
            .args(["-c", "max_connections=300"])
            .stdout(Stdio::null())
            .stderr(log_file(&log));
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::process::CommandExt::uid(&mut command, uid);
            std::os::unix::process::CommandExt::gid(&mut command, gid);
        }
        self.process.spawn(command);
        let ready = self.bin.join("pg_isready");
        let port = self.port().to_string();
        wait_until("postgres", &log, || {
            Command::new(&ready)
                .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-q"])
                .status()
                .is_ok_and(|status| status.success())
        });
    }
}

/// A Redis server process of our own.
pub struct LocalRedis {
    process: ServerProcess,
    persistence: RedisPersistence,
}

impl LocalRedis {
    pub fn start(persistence: RedisPersistence) -> LocalRedis {
        let server = LocalRedis {
            process: ServerProcess::new("redis"),
            persistence,
        };
        server.launch();
        server
    }

    fn launch_with(&self, persistence: RedisPersistence) {
        let log = self.process.dir.join("redis.log");
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port().to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.process.dir)
            .args(["--save", ""])
            .stdout(log_file(&log))
            .stderr(log_file(&log));
        match persistence {
            RedisPersistence::None | RedisPersistence::Snapshot => {
                command.args(["--appendonly", "no"])
            }
            RedisPersistence::AppendOnly => {
                command.args(["--appendonly", "yes", "--appendfsync", "everysec"])
            }
        };
        self.process.spawn(command);
        let port = self.port();
        wait_until("redis", &log, || redis_answers_ping(port));
    }

    /// `kill -9`, then a start from the last `SAVE` alone, as after
    /// a disk loss or a restore: the append-only file is removed, so every
    /// write acknowledged after the snapshot is gone. Append-only
    /// persistence is switched on again once the snapshot is loaded.
    pub fn restart_from_snapshot(&self) {
        self.kill();
        let _ = fs::remove_dir_all(self.process.dir.join("appendonlydir"));
        let _ = fs::remove_file(self.process.dir.join("appendonly.aof"));
        self.launch_with(RedisPersistence::Snapshot);
        if self.persistence == RedisPersistence::AppendOnly {
            let answer = redis_command(self.port(), b"CONFIG SET appendonly yes\r\n");
            assert!(answer.starts_with("+OK"), "CONFIG SET answered {answer:?}");
        }
    }
}

impl Lifecycle for LocalRedis {
    fn port(&self) -> u16 {
        self.process.port
    }

    /// `kill -9`.
    fn kill(&self) {
        self.process.signal(libc::SIGKILL);
    }

    /// Orderly shutdown (SIGTERM; with persistence, data is flushed).
    fn stop(&self) {
        self.process.signal(libc::SIGTERM);
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    fn pause(&self) {
        self.process.signal_tree(libc::SIGSTOP);
    }

    /// Lets a paused server go on (SIGCONT).
    fn resume(&self) {
        self.process.signal_tree(libc::SIGCONT);
    }

    fn launch(&self) {
        self.launch_with(self.persistence);
    }
}

/// One command over a raw socket; the first line of the answer.
pub(super) fn redis_command(port: u16, command: &[u8]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    stream.write_all(command).expect("send a command");
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read_exact(&mut byte).is_ok() && byte[0] != b'\n' {
        answer.push(byte[0]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// PING over a raw socket: ready once the answer is `+PONG` (not `-LOADING`).
pub(super) fn redis_answers_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut answer = [0u8; 7];
    stream.read_exact(&mut answer).is_ok() && &answer == b"+PONG\r\n"
}
