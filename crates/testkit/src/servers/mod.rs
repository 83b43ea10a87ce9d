//! PostgreSQL and Redis servers that tests can stop, kill and restart.
//!
//! Each runs the way this machine offers (`choice.rs`): a local process
//! (`local.rs`, the default and CI's), or a container (`container.rs`, when
//! the server binaries are missing and a Docker engine answers, or when
//! `HYBRIDSTORE_TEST_SERVERS=containers`). Tests see one API either way.

mod choice;
mod container;
#[cfg(feature = "containers")]
mod docker;
mod local;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::Connection;

pub use choice::{SERVERS_VARIABLE, Source};
use container::{ContainerEngine, ContainerServer, FROM_SNAPSHOT};
use local::{LocalPostgres, LocalRedis, redis_answers_ping, redis_command};

use crate::process::free_port;

/// The way this test binary gets its servers, chosen once; a machine that
/// offers none ends the run here, saying why and what would do.
pub fn source() -> Source {
    static SOURCE: OnceLock<Result<Source, String>> = OnceLock::new();
    let chosen = SOURCE.get_or_init(|| {
        let wanted = std::env::var(SERVERS_VARIABLE).ok();
        choice::choose(wanted.as_deref(), &choice::facts())
    });
    match chosen {
        Ok(source) => *source,
        Err(why) => panic!("{why}"),
    }
}

/// The container engine of this test binary (feature `containers`).
fn engine() -> Arc<dyn ContainerEngine> {
    #[cfg(feature = "containers")]
    {
        static ENGINE: OnceLock<Arc<dyn ContainerEngine>> = OnceLock::new();
        ENGINE
            .get_or_init(|| Arc::new(docker::Testcontainers::default()))
            .clone()
    }
    #[cfg(not(feature = "containers"))]
    unreachable!("containers are chosen only with the `containers` feature")
}

/// What every server of the testkit does, whichever way it runs.
pub trait Lifecycle {
    fn port(&self) -> u16;
    /// `kill -9`: no shutdown.
    fn kill(&self);
    /// Orderly shutdown.
    fn stop(&self);
    /// Freezes it: connections stay open, nothing answers.
    fn pause(&self);
    fn resume(&self);
    /// Starts a stopped server again on the same port with its own data,
    /// and waits until it answers.
    fn launch(&self);
    /// Stop, then start with the same data.
    fn restart(&self) {
        self.stop();
        self.launch();
    }
}

/// One kind of server: its local way, and what else it keeps.
pub trait Kind {
    type Local: Lifecycle;
}

/// PostgreSQL (see [`Postgres`]).
pub struct PostgresKind;

impl Kind for PostgresKind {
    type Local = LocalPostgres;
}

/// Redis, and whether it keeps its data (see [`Redis`]).
pub struct RedisKind {
    persistence: RedisPersistence,
}

impl Kind for RedisKind {
    type Local = LocalRedis;
}

/// How one server runs.
enum Backing<L> {
    Local(L),
    Container(ContainerServer),
}

/// A server of our own, run the way this machine offers.
pub struct Server<K: Kind> {
    backing: Backing<K::Local>,
    kind: K,
}

/// A PostgreSQL server of our own.
pub type Postgres = Server<PostgresKind>;

/// A Redis server of our own.
pub type Redis = Server<RedisKind>;

impl<K: Kind> Server<K> {
    fn life(&self) -> &dyn Lifecycle {
        match &self.backing {
            Backing::Local(server) => server,
            Backing::Container(server) => server,
        }
    }

    pub fn port(&self) -> u16 {
        self.life().port()
    }

    /// `kill -9` of every process of the server, as when its host or
    /// container dies: no shutdown (PostgreSQL: no checkpoint, recovery runs
    /// at the next start; killing the postmaster alone would leave its
    /// backends to commit the statements already on their connections for a
    /// moment, so they go too).
    pub fn kill(&self) {
        self.life().kill()
    }

    /// Orderly shutdown (PostgreSQL: fast, open transactions roll back;
    /// Redis: with persistence, data is flushed).
    pub fn stop(&self) {
        self.life().stop()
    }

    /// Freezes every process of the server: connections stay open but
    /// nothing answers, like a hung host.
    pub fn pause(&self) {
        self.life().pause()
    }

    /// Lets a paused server go on.
    pub fn resume(&self) {
        self.life().resume()
    }

    /// Starts again on the same port with its own data (Redis: whatever
    /// its persistence kept).
    pub fn restart(&self) {
        self.life().restart()
    }
}

impl Postgres {
    /// A fresh server on a free port. Tuned for tests: no fsync (a killed
    /// server loses nothing the OS has), but synchronous commit stays on,
    /// so an acknowledged commit survives `kill -9`.
    pub fn start() -> Postgres {
        let backing = match source() {
            Source::Local => Backing::Local(LocalPostgres::start()),
            Source::Containers => Backing::Container(ContainerServer::start(
                engine(),
                &container::postgres_spec(free_port()),
                Box::new(postgres_answers),
            )),
        };
        Server {
            backing,
            kind: PostgresKind,
        }
    }

    /// A URL for `database` on this server.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port())
    }
}

/// Whether PostgreSQL takes a connection as `postgres` (trust): a startup
/// message answered with an authentication request, not an error such as
/// "the database system is starting up". The standard library alone, so a
/// machine without the PostgreSQL binaries can ask too.
fn postgres_answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut body = 196_608i32.to_be_bytes().to_vec(); // protocol 3.0
    for part in ["user", "postgres", "database", "postgres"] {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut message = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    message.extend_from_slice(&body);
    let mut kind = [0u8; 1];
    let answered = stream.write_all(&message).is_ok()
        && stream.read_exact(&mut kind).is_ok()
        && kind[0] == b'R';
    let _ = stream.write_all(&[b'X', 0, 0, 0, 4]); // Terminate
    answered
}

/// Whether a Redis server keeps its data across restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisPersistence {
    /// Nothing on disk: a restart comes back empty.
    None,
    /// Append-only file, fsync every second (what the compose file deploys).
    AppendOnly,
    /// Only what an explicit `SAVE` wrote: a restart reloads that snapshot,
    /// older than what the server had acknowledged since.
    Snapshot,
}

impl Redis {
    pub fn start(persistence: RedisPersistence) -> Redis {
        let backing = match source() {
            Source::Local => Backing::Local(LocalRedis::start(persistence)),
            Source::Containers => Backing::Container(ContainerServer::start(
                engine(),
                &container::redis_spec(free_port(), persistence == RedisPersistence::AppendOnly),
                Box::new(redis_answers_ping),
            )),
        };
        Server {
            backing,
            kind: RedisKind { persistence },
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port())
    }

    /// `SAVE`: writes a snapshot (`dump.rdb`) of everything held now.
    pub fn save(&self) {
        let answer = redis_command(self.port(), b"SAVE\r\n");
        assert!(answer.starts_with("+OK"), "SAVE answered {answer:?}");
    }

    /// `kill -9`, then a start from the last [`Redis::save`] alone, as after
    /// a disk loss or a restore: the append-only file is removed, so every
    /// write acknowledged after the snapshot is gone. Append-only
    /// persistence is switched on again once the snapshot is loaded.
    pub fn restart_from_snapshot(&self) {
        match &self.backing {
            Backing::Local(server) => server.restart_from_snapshot(),
            Backing::Container(server) => {
                // The container's command drops the append-only files on
                // the start that finds this marker.
                server.exec(&["touch", FROM_SNAPSHOT]);
                server.kill();
                server.launch();
                if self.kind.persistence == RedisPersistence::AppendOnly {
                    let answer = redis_command(self.port(), b"CONFIG SET appendonly yes\r\n");
                    assert!(answer.starts_with("+OK"), "CONFIG SET answered {answer:?}");
                }
            }
        }
    }
}

/// The servers every test of one binary shares (tests isolate themselves by
/// database and key prefix). Tests that kill servers start their own instead.
pub struct SharedServers {
    pub postgres: Arc<Postgres>,
    pub redis: Arc<Redis>,
}

pub fn shared() -> &'static SharedServers {
    static SHARED: OnceLock<SharedServers> = OnceLock::new();
    SHARED.get_or_init(|| {
        let (postgres, redis) = std::thread::scope(|scope| {
            let redis = scope.spawn(|| Redis::start(RedisPersistence::None));
            (Postgres::start(), redis.join().expect("start redis"))
        });
        SharedServers {
            postgres: Arc::new(postgres),
            redis: Arc::new(redis),
        }
    })
}

/// Creates a fresh, empty database on `postgres` and returns its name.
pub async fn create_database(postgres: &Postgres) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut admin = sqlx::PgConnection::connect(&postgres.url("postgres"))
        .await
        .expect("connect to postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin)
        .await
        .expect("create a test database");
    let _ = admin.close().await;
    name
}
