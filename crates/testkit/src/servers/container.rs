//! The container way: a server in a Docker container, with the same life a
//! local process has in the tests (stop, kill -9, restart from its own data,
//! pause and resume).
//!
//! The lifecycle is written against [`ContainerEngine`], the few calls it
//! makes of a container engine: the real one goes through the
//! `testcontainers` crate (feature `containers`, `docker.rs`), and the unit
//! tests below drive it with a fake, so the lifecycle is checked on machines
//! without Docker too.

use std::sync::{Arc, Mutex};

use super::Lifecycle;
use std::time::{Duration, Instant};

/// How long a container may take to answer after a start.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A container to run: an image, one port published on a fixed host port
/// (so a restart comes back where the tests' URLs point), its environment
/// and command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerSpec {
    pub image: &'static str,
    pub tag: &'static str,
    pub container_port: u16,
    pub host_port: u16,
    pub env: Vec<(String, String)>,
    pub cmd: Vec<String>,
}

/// The calls the lifecycle makes of a container engine. Errors are the
/// engine's words, for the panic that ends the test.
pub trait ContainerEngine: Send + Sync {
    /// Creates and starts a container; its id.
    fn run(&self, spec: &ContainerSpec) -> Result<String, String>;
    /// Orderly stop (the image's stop signal, then a grace period).
    fn stop(&self, id: &str) -> Result<(), String>;
    /// Stops at once, without a shutdown (`kill -9`).
    fn kill(&self, id: &str) -> Result<(), String>;
    /// Starts a stopped container again, with the data it had.
    fn start(&self, id: &str) -> Result<(), String>;
    /// Freezes every process of the container.
    fn pause(&self, id: &str) -> Result<(), String>;
    fn unpause(&self, id: &str) -> Result<(), String>;
    /// Runs a command inside the running container.
    fn exec(&self, id: &str, command: &[&str]) -> Result<(), String>;
    /// Removes the container and its data (the test is over).
    fn remove(&self, id: &str);
}

/// Where a container stands, as the lifecycle has left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Running,
    Paused,
    Stopped,
}

/// Whether the server in the container answers on this host port.
pub type Ready = Box<dyn Fn(u16) -> bool + Send + Sync>;

/// One server in one container.
pub struct ContainerServer {
    engine: Arc<dyn ContainerEngine>,
    id: String,
    port: u16,
    state: Mutex<State>,
    ready: Ready,
    /// What it is, for messages (`postgres:15`).
    name: String,
    /// How long a start may take before the server answers.
    ready_within: Duration,
}

impl ContainerServer {
    /// Runs the container and waits until the server answers.
    pub fn start(engine: Arc<dyn ContainerEngine>, spec: &ContainerSpec, ready: Ready) -> Self {
        Self::start_within(engine, spec, ready, READY_TIMEOUT)
    }

    fn start_within(
        engine: Arc<dyn ContainerEngine>,
        spec: &ContainerSpec,
        ready: Ready,
        ready_within: Duration,
    ) -> Self {
        let name = format!("{}:{}", spec.image, spec.tag);
        let id = engine
            .run(spec)
            .unwrap_or_else(|err| panic!("cannot run a {name} container: {err}"));
        let server = Self {
            engine,
            id,
            port: spec.host_port,
            state: Mutex::new(State::Running),
            ready,
            name,
            ready_within,
        };
        server.wait_ready();
        server
    }

    pub fn state(&self) -> State {
        *self.state.lock().expect("state lock")
    }

    fn set(&self, state: State) {
        *self.state.lock().expect("state lock") = state;
    }

    fn check(&self, what: &str, result: Result<(), String>) {
        if let Err(err) = result {
            panic!("cannot {what} the {} container: {err}", self.name);
        }
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + self.ready_within;
        while !(self.ready)(self.port) {
            assert!(
                Instant::now() < deadline,
                "the {} container did not answer within {:?}",
                self.name,
                self.ready_within
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A paused container is let go first: like a process, it acts on a
    /// stop only once it runs.
    fn running_or_stopped(&self) -> State {
        if self.state() == State::Paused {
            self.resume();
        }
        self.state()
    }

    /// Runs `command` in the container (it must be running).
    pub fn exec(&self, command: &[&str]) {
        assert_eq!(
            self.running_or_stopped(),
            State::Running,
            "exec in a stopped {} container",
            self.name
        );
        self.check("exec in", self.engine.exec(&self.id, command));
    }
}

impl Lifecycle for ContainerServer {
    /// Starts a stopped container again with its own data, and waits until
    /// the server answers.
    fn launch(&self) {
        if self.state() == State::Stopped {
            self.check("start", self.engine.start(&self.id));
            self.set(State::Running);
        }
        self.wait_ready();
    }

    fn port(&self) -> u16 {
        self.port
    }

    /// `kill -9`: no shutdown.
    fn kill(&self) {
        if self.running_or_stopped() == State::Running {
            self.check("kill", self.engine.kill(&self.id));
            self.set(State::Stopped);
        }
    }

    /// Orderly shutdown.
    fn stop(&self) {
        if self.running_or_stopped() == State::Running {
            self.check("stop", self.engine.stop(&self.id));
            self.set(State::Stopped);
        }
    }

    /// Freezes the server: connections stay open, nothing answers.
    fn pause(&self) {
        if self.state() == State::Running {
            self.check("pause", self.engine.pause(&self.id));
            self.set(State::Paused);
        }
    }

    fn resume(&self) {
        if self.state() == State::Paused {
            self.check("unpause", self.engine.unpause(&self.id));
            self.set(State::Running);
        }
    }
}

impl Drop for ContainerServer {
    fn drop(&mut self) {
        self.engine.remove(&self.id);
    }
}

/// PostgreSQL 15 as the tests run it: trust authentication, no fsync (a
/// killed container loses nothing the host has), synchronous commit on.
pub fn postgres_spec(host_port: u16) -> ContainerSpec {
    ContainerSpec {
        image: "postgres",
        tag: "15",
        container_port: 5432,
        host_port,
        env: vec![("POSTGRES_HOST_AUTH_METHOD".into(), "trust".into())],
        cmd: [
            "postgres",
            "-c",
            "fsync=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=300",
        ]
        .map(String::from)
        .to_vec(),
    }
}

/// The marker that makes the next start of a Redis container load its last
/// snapshot alone (see `Redis::restart_from_snapshot`).
pub const FROM_SNAPSHOT: &str = "/data/.from-snapshot";

/// Redis 7 as the tests run it: no automatic snapshots, append-only or not.
/// A start that finds [`FROM_SNAPSHOT`] drops the append-only files first
/// and loads the snapshot alone, as after a disk loss.
pub fn redis_spec(host_port: u16, append_only: bool) -> ContainerSpec {
    let aof = if append_only {
        "--appendonly yes --appendfsync everysec"
    } else {
        "--appendonly no"
    };
    let serve = "redis-server --port 6379 --protected-mode no --dir /data --save ''";
    let script = format!(
        "if [ -f {FROM_SNAPSHOT} ]; then rm -rf /data/appendonlydir /data/appendonly.aof \
         {FROM_SNAPSHOT}; exec {serve} --appendonly no; else exec {serve} {aof}; fi"
    );
    ContainerSpec {
        image: "redis",
        tag: "7",
        container_port: 6379,
        host_port,
        env: Vec::new(),
        cmd: vec!["sh".into(), "-c".into(), script],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Records every call; containers are states in a list.
    #[derive(Default)]
    struct FakeEngine {
        calls: Mutex<Vec<String>>,
        /// The server answers only while the container runs.
        running: AtomicBool,
    }

    impl FakeEngine {
        fn calls(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }

        fn record(&self, call: String) -> Result<(), String> {
            self.calls.lock().unwrap().push(call);
            Ok(())
        }
    }

    impl ContainerEngine for FakeEngine {
        fn run(&self, spec: &ContainerSpec) -> Result<String, String> {
            self.running.store(true, Ordering::SeqCst);
            self.record(format!(
                "run {}:{} on {}",
                spec.image, spec.tag, spec.host_port
            ))?;
            Ok("c1".into())
        }
        fn stop(&self, id: &str) -> Result<(), String> {
            self.running.store(false, Ordering::SeqCst);
            self.record(format!("stop {id}"))
        }
        fn kill(&self, id: &str) -> Result<(), String> {
            self.running.store(false, Ordering::SeqCst);
            self.record(format!("kill {id}"))
        }
        fn start(&self, id: &str) -> Result<(), String> {
            self.running.store(true, Ordering::SeqCst);
            self.record(format!("start {id}"))
        }
        fn pause(&self, id: &str) -> Result<(), String> {
            self.record(format!("pause {id}"))
        }
        fn unpause(&self, id: &str) -> Result<(), String> {
            self.record(format!("unpause {id}"))
        }
        fn exec(&self, id: &str, command: &[&str]) -> Result<(), String> {
            self.record(format!("exec {id} {}", command.join(" ")))
        }
        fn remove(&self, id: &str) {
            let _ = self.record(format!("remove {id}"));
        }
    }

    fn server(engine: &Arc<FakeEngine>) -> ContainerServer {
        let answers = engine.clone();
        let ready: Ready = Box::new(move |_| answers.running.load(Ordering::SeqCst));
        let engine: Arc<dyn ContainerEngine> = engine.clone();
        ContainerServer::start(engine, &redis_spec(6390, true), ready)
    }

    #[test]
    fn a_container_lives_the_life_of_a_server_process() {
        let engine = Arc::new(FakeEngine::default());
        let server = server(&engine);
        assert_eq!(engine.calls(), ["run redis:7 on 6390"]);
        assert_eq!(server.port(), 6390);

        server.restart();
        assert_eq!(engine.calls(), ["stop c1", "start c1"], "its own data");
        assert_eq!(server.state(), State::Running);

        server.kill();
        server.kill();
        assert_eq!(engine.calls(), ["kill c1"], "a dead server is killed once");
        server.launch();
        assert_eq!(engine.calls(), ["start c1"]);

        server.pause();
        server.pause();
        assert_eq!(engine.calls(), ["pause c1"]);
        assert_eq!(server.state(), State::Paused);
        server.resume();
        assert_eq!(engine.calls(), ["unpause c1"]);

        drop(server);
        assert_eq!(engine.calls(), ["remove c1"]);
    }

    #[test]
    fn a_paused_container_is_let_go_before_it_is_stopped_or_used() {
        let engine = Arc::new(FakeEngine::default());
        let server = server(&engine);
        engine.calls();
        server.pause();
        server.stop();
        assert_eq!(engine.calls(), ["pause c1", "unpause c1", "stop c1"]);
        server.launch();
        server.pause();
        server.exec(&["touch", FROM_SNAPSHOT]);
        assert_eq!(
            engine.calls(),
            [
                "start c1",
                "pause c1",
                "unpause c1",
                "exec c1 touch /data/.from-snapshot"
            ]
        );
    }

    #[test]
    #[should_panic(expected = "did not answer")]
    fn a_container_that_never_answers_fails_the_start() {
        let engine: Arc<dyn ContainerEngine> = Arc::new(FakeEngine::default());
        let never: Ready = Box::new(|_| false);
        let within = Duration::from_millis(300);
        ContainerServer::start_within(engine, &postgres_spec(6391), never, within);
    }

    #[test]
    fn the_specs_publish_the_server_port_on_the_host_port_asked_for() {
        let pg = postgres_spec(5999);
        assert_eq!((pg.container_port, pg.host_port), (5432, 5999));
        assert!(
            pg.env
                .contains(&("POSTGRES_HOST_AUTH_METHOD".into(), "trust".into()))
        );
        let redis = redis_spec(6999, false);
        assert_eq!((redis.container_port, redis.host_port), (6379, 6999));
        assert!(redis.cmd[2].contains("--appendonly no"));
        assert!(redis.cmd[2].contains(FROM_SNAPSHOT));
    }
}
