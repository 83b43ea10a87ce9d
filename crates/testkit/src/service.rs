//! The service as a process of its own (the `hybridstore` binary), for the
//! faults an in-process app cannot take: `kill -9`, and a start from scratch
//! while a tier is down.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::process::{free_port, signal_and_wait, spawn_owned};

pub struct ServiceProcess {
    bin: PathBuf,
    env: Vec<(String, String)>,
    port: u16,
    /// Working directory (no config file in it) and the log.
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
}

impl ServiceProcess {
    /// Starts `bin` with a cleared environment plus `env` (and `HOST`,
    /// `PORT`), and waits until it answers `/health`.
    pub fn start(bin: impl Into<PathBuf>, env: Vec<(String, String)>) -> Self {
        let service = Self {
            bin: bin.into(),
            env,
            port: free_port(),
            dir: tempfile::tempdir().expect("a directory for the service"),
            child: Mutex::new(None),
        };
        service.launch();
        service
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// What the service logged so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("service.log")).unwrap_or_default()
    }

    /// The process's resident memory now and at its peak (`VmRSS`,
    /// `VmHWM` of /proc), in bytes; `None` when it is not running.
    pub fn memory(&self) -> Option<(u64, u64)> {
        let pid = self.child.lock().expect("child lock").as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        };
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// `kill -9`: no shutdown of any kind.
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().expect("child lock").take() {
            signal_and_wait(&mut child, libc::SIGKILL);
        }
    }

    /// Starts the process (again, on the same port) and waits for `/health`.
    pub fn launch(&self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("service.log"))
            .expect("open the service log");
        let mut command = Command::new(&self.bin);
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOST", "127.0.0.1")
            .env("PORT", self.port.to_string())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.dir.path())
            .stdout(Stdio::from(log.try_clone().expect("log handle")))
            .stderr(Stdio::from(log));
        let child = spawn_owned(command).expect("start the service");
        *self.child.lock().expect("child lock") = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.healthy() {
            assert!(
                Instant::now() < deadline,
                "the service did not start; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET /health` answers 200 (the process is up and listening).
    fn healthy(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let request = "GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n";
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut answer = [0u8; 12];
        stream.read_exact(&mut answer).is_ok() && answer.ends_with(b"200")
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
