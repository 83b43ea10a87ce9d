//! `spawn_app()`: the real service on port 0, over its own database and key
//! prefix, with handles to inspect both tiers directly. `.embedded()` runs it
//! in embedded mode instead (SQLite in a temporary directory, in-process
//! cache); the tier-neutral helpers (`durable_row`, `cached_entry`, ...) look
//! into whichever tiers the app runs on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use hybridstore_core::{
    ApplyMode, CacheEntry, CacheStore, Change, CollectionName, DurableStore, JournalKind, RecordId,
    RecordKey, Tier,
};
use hybridstore_engine::Engine;
use hybridstore_redis::KeySpace;
use hybridstore_server::{Config, ServerBuilder};
use reqwest::Method;
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use tokio::sync::oneshot;

use crate::servers::{Postgres, Redis, create_database, shared};

/// The admin token of every test app.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// A client token with `read:*` only.
pub const READER_TOKEN: &str = "test-reader-token-0123456789";
/// A client token with `read:api_keys` and `write:api_keys`.
pub const API_KEYS_WRITER_TOKEN: &str = "test-api-keys-writer-0123456789";

/// Starts the service with default test settings on the shared servers.
pub async fn spawn_app() -> TestApp {
    TestApp::builder().spawn().await
}

/// Logs of the service under test, when `RUST_LOG` asks for them.
fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

type DurableLayer = Box<dyn FnOnce(Arc<dyn DurableStore>) -> Arc<dyn DurableStore> + Send>;

pub struct TestAppBuilder {
    overrides: Vec<(String, Value)>,
    durable_layer: Option<DurableLayer>,
    servers: Option<(Arc<Postgres>, Arc<Redis>)>,
    database: Option<String>,
    key_prefix: Option<String>,
    embedded: bool,
    /// Embedded mode: a data directory that outlives an earlier app.
    data_dir: Option<tempfile::TempDir>,
}

impl TestAppBuilder {
    /// Embedded mode: SQLite in a temporary directory and the in-process
    /// cache; no server is needed.
    pub fn embedded(mut self) -> Self {
        self.embedded = true;
        self
    }

    /// Sets a configuration key (dotted path, e.g. `collections.widgets.schema`).
    pub fn config(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.overrides.push((key.to_owned(), value.into()));
        self
    }

    /// Wraps the durable tier, e.g. to hold a call at a chosen moment.
    pub fn wrap_durable(
        mut self,
        layer: impl FnOnce(Arc<dyn DurableStore>) -> Arc<dyn DurableStore> + Send + 'static,
    ) -> Self {
        self.durable_layer = Some(Box::new(layer));
        self
    }

    /// Puts the durable tier behind a [`HookedDurable`], returned with the
    /// builder, to hold chosen calls.
    pub fn hooked(self) -> (Self, Arc<crate::HookedDurable>) {
        let hooked = Arc::new(crate::HookedDurable::new());
        let layer = hooked.clone();
        let builder = self.wrap_durable(move |real| {
            layer.attach(real);
            layer
        });
        (builder, hooked)
    }

    /// Runs against these servers instead of the shared ones (a test that
    /// kills a server starts its own).
    pub fn servers(mut self, postgres: Arc<Postgres>, redis: Arc<Redis>) -> Self {
        self.servers = Some((postgres, redis));
        self
    }

    /// Uses this database (made with [`create_database`]) instead of a new
    /// one: lets a test stop PostgreSQL before the service starts.
    pub fn database(mut self, name: String) -> Self {
        self.database = Some(name);
        self
    }

    /// Uses this Redis key prefix: two apps with the same database and
    /// prefix are two instances of one deployment.
    pub fn key_prefix(mut self, prefix: String) -> Self {
        self.key_prefix = Some(prefix);
        self
    }

    pub async fn spawn(self) -> TestApp {
        init_logging();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut figment = Config::builtin_figment()
            .merge(("admin_token", ADMIN_TOKEN))
            .merge(("port", 0))
            .merge(("records.purge_interval_ms", 200))
            .merge(("journal.claim_idle_ms", 1000))
            // Scheduled sync would add jobs and copies no test asked for;
            // the tests of scheduled sync turn it on.
            .merge(("sync.enabled", false))
            .merge((
                "tokens",
                serde_json::json!([
                    { "name": "reader", "token": READER_TOKEN, "scopes": ["read:*"] },
                    { "name": "api-keys-writer", "token": API_KEYS_WRITER_TOKEN,
                      "scopes": ["read:api_keys", "write:api_keys"] },
                ]),
            ));
        let reused = self.data_dir.is_some();
        let (production, data_dir) = if self.embedded {
            let dir = match self.data_dir {
                Some(dir) => dir,
                None => tempfile::tempdir().expect("a data directory"),
            };
            figment = figment.merge(("embedded.data_dir", dir.path()));
            (None, Some(dir))
        } else {
            let (postgres, redis) = match self.servers {
                Some(servers) => servers,
                None => {
                    let shared = tokio::task::spawn_blocking(shared)
                        .await
                        .expect("start servers");
                    (shared.postgres.clone(), shared.redis.clone())
                }
            };
            let database = match self.database {
                Some(name) => name,
                None => create_database(&postgres).await,
            };
            let key_prefix = self
                .key_prefix
                .unwrap_or_else(|| format!("t{}n{n}", std::process::id()));
            figment = figment
                .merge(("postgres.url", postgres.url(&database)))
                .merge(("postgres.pool_size", 8))
                // A dead server is noticed in well under a second.
                .merge(("postgres.acquire_timeout_ms", 300))
                .merge(("postgres.call_timeout_ms", 1000))
                .merge(("redis.url", redis.url()))
                .merge(("redis.key_prefix", &key_prefix));
            // Lazy: either server may be down while the test starts.
            let db = PgPoolOptions::new()
                .max_connections(4)
                .connect_lazy(&postgres.url(&database))
                .expect("test database URL");
            let redis_conn = redis::aio::ConnectionManager::new_lazy_with_config(
                redis::Client::open(redis.url()).expect("redis url"),
                redis::aio::ConnectionManagerConfig::new(),
            )
            .expect("redis connection manager");
            let production = Production {
                database: database.clone(),
                db,
                redis: redis_conn,
                keys: KeySpace::new(key_prefix),
                postgres_server: postgres,
                redis_server: redis,
            };
            (Some(production), None)
        };
        for (key, value) in self.overrides {
            figment = figment.merge((key, value));
        }
        let config = Config::from_figment(figment).expect("valid test configuration");

        let mut layer = self.durable_layer;
        // (A layer is used once: a start with one is not retried.)
        let may_retry = reused && layer.is_none();
        let mut attempts = 0;
        let server = loop {
            let mut builder = ServerBuilder::new(config.clone());
            if let Some(layer) = layer.take() {
                builder = builder.wrap_durable(layer);
            }
            match builder.bind().await {
                Ok(server) => break server,
                // The app before this one on the same data directory lets go
                // of its SQLite file once its last task is gone.
                Err(err) if may_retry && attempts < 50 => {
                    tracing::debug!(error = %err, "the data directory is still held");
                    attempts += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(err) => panic!("start the service: {err}"),
            }
        };
        let addr = server.local_addr();
        let engine = server.engine();
        let (shutdown, stop) = oneshot::channel::<()>();
        let running = tokio::spawn(server.run(async {
            let _ = stop.await;
        }));
        TestApp {
            addr,
            http: reqwest::Client::new(),
            engine,
            production,
            data_dir,
            running,
            _shutdown: shutdown,
        }
    }
}

/// One deployment of several instances: the same PostgreSQL database and
/// Redis key prefix on the shared servers.
pub struct Deployment {
    database: String,
    prefix: String,
}

impl Deployment {
    /// A new deployment; `name` keeps its keys apart from other tests'.
    pub async fn new(name: &str) -> Deployment {
        let servers = crate::blocking(shared).await;
        Deployment {
            database: create_database(&servers.postgres).await,
            prefix: format!("{name}{}", std::process::id()),
        }
    }

    /// A builder for one more instance of it.
    pub fn instance(&self) -> TestAppBuilder {
        TestApp::builder()
            .database(self.database.clone())
            .key_prefix(self.prefix.clone())
    }
}

/// Direct handles on the servers of a production-mode app.
pub struct Production {
    /// The name of the test's own PostgreSQL database.
    pub database: String,
    /// A pool on it.
    pub db: PgPool,
    /// The Redis server (keys of this app start with `keys.prefix()`);
    /// reconnects by itself after a restart.
    pub redis: redis::aio::ConnectionManager,
    pub keys: KeySpace,
    /// The servers behind this app (kept alive as long as it runs).
    pub postgres_server: Arc<Postgres>,
    pub redis_server: Arc<Redis>,
}

/// A running service and direct handles on its two tiers.
pub struct TestApp {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    engine: Arc<Engine>,
    production: Option<Production>,
    /// Embedded mode: the data directory (removed when the app goes).
    data_dir: Option<tempfile::TempDir>,
    /// The server's task (it ends once `_shutdown` is dropped).
    running: tokio::task::JoinHandle<std::io::Result<()>>,
    _shutdown: oneshot::Sender<()>,
}

/// What one tier holds for a record: its version and data.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredCopy {
    pub version: u64,
    pub data: Value,
}

/// The ids of the records in an answer holding `{"records": [...]}`.
pub fn record_ids(body: &Value) -> Vec<String> {
    body["records"]
        .as_array()
        .expect("a records array")
        .iter()
        .map(|record| record["id"].as_str().expect("an id").to_owned())
        .collect()
}

/// The version in a response's `ETag` header.
pub fn etag_version(response: &reqwest::Response) -> u64 {
    let etag = response.headers()["etag"].to_str().expect("ETag is text");
    etag.trim_matches('"').parse().expect("numeric ETag")
}

fn record_path(collection: &str, id: &str) -> String {
    format!("/v1/collections/{collection}/records/{id}")
}

fn record_key(collection: &str, id: &str) -> RecordKey {
    RecordKey::new(
        CollectionName::parse(collection).expect("collection name"),
        RecordId::parse(id).expect("record id"),
    )
}

impl TestApp {
    pub fn builder() -> TestAppBuilder {
        TestAppBuilder {
            overrides: Vec::new(),
            durable_layer: None,
            servers: None,
            database: None,
            key_prefix: None,
            embedded: false,
            data_dir: None,
        }
    }

    /// The next start of this deployment, with an empty cache: the same
    /// PostgreSQL database under a new Redis key prefix, or (embedded) the
    /// same data directory once this app has stopped and let go of it.
    /// Configuration is not carried over.
    pub async fn successor(self) -> TestAppBuilder {
        let mut builder = TestApp::builder();
        if let Some(production) = &self.production {
            return builder
                .servers(
                    production.postgres_server.clone(),
                    production.redis_server.clone(),
                )
                .database(production.database.clone());
        }
        let TestApp {
            engine,
            data_dir,
            running,
            _shutdown,
            ..
        } = self;
        drop(_shutdown);
        let _ = running.await;
        drop(engine);
        builder.embedded = true;
        builder.data_dir = data_dir;
        builder
    }

    /// The PostgreSQL and Redis handles (production mode only).
    pub fn pg(&self) -> &Production {
        self.production
            .as_ref()
            .expect("a production-mode app (this one is embedded)")
    }

    pub fn is_embedded(&self) -> bool {
        self.production.is_none()
    }

    /// The embedded app's data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        self.data_dir.as_ref().expect("an embedded app").path()
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Makes the tier fail every call as if unreachable, or ends that.
    pub fn simulate_outage(&self, tier: Tier, down: bool) {
        self.engine.simulate_outage(tier, down);
    }

    fn durable(&self) -> Arc<dyn DurableStore> {
        self.engine.raw_tiers().0
    }

    fn cache(&self) -> Arc<dyn CacheStore> {
        self.engine.raw_tiers().1
    }

    /// What the durable tier holds for a record, whatever it is (live or
    /// deleted; `None`: nothing, or expired).
    pub async fn durable_row(&self, collection: &str, id: &str) -> Option<(StoredCopy, bool)> {
        if !self.engine.settings().tiers.durable_serves() {
            return None; // A cache-only deployment: there is no durable tier.
        }
        let key = record_key(collection, id);
        let states = self
            .durable()
            .get_states(
                &key.collection,
                std::slice::from_ref(&key.id),
                time::OffsetDateTime::now_utc(),
            )
            .await
            .expect("read the durable tier");
        states.into_iter().next().map(|state| match state {
            Change::Put(record) => (
                StoredCopy {
                    version: record.version.get(),
                    data: Value::Object(record.data),
                },
                false,
            ),
            Change::Delete { version, .. } => (
                StoredCopy {
                    version: version.get(),
                    data: Value::Object(Default::default()),
                },
                true,
            ),
        })
    }

    /// The live record the durable tier holds.
    pub async fn durable_copy(&self, collection: &str, id: &str) -> Option<StoredCopy> {
        self.durable_row(collection, id)
            .await
            .and_then(|(copy, deleted)| (!deleted).then_some(copy))
    }

    /// Removes a record's row from the durable tier behind the service's
    /// back, as if it had never been written there: no tombstone is left.
    pub async fn remove_durable_row(&self, collection: &str, id: &str) {
        match (&self.production, &self.data_dir) {
            (Some(production), _) => {
                let removed = sqlx::query("DELETE FROM records WHERE collection = $1 AND id = $2")
                    .bind(collection)
                    .bind(id)
                    .execute(&production.db)
                    .await
                    .expect("remove the PostgreSQL row")
                    .rows_affected();
                assert_eq!(removed, 1, "{collection}/{id} had a row");
            }
            (None, Some(dir)) => {
                let path = dir.path().join("hybridstore.db");
                let (collection, id) = (collection.to_owned(), id.to_owned());
                let removed = crate::blocking(move || {
                    // A second connection, as an operator's `sqlite3` would be.
                    let conn = rusqlite::Connection::open(path).expect("open the SQLite file");
                    conn.busy_timeout(std::time::Duration::from_secs(10))
                        .expect("a busy timeout");
                    conn.execute(
                        "DELETE FROM records WHERE collection = ?1 AND id = ?2",
                        rusqlite::params![collection, id],
                    )
                    .expect("remove the SQLite row")
                })
                .await;
                assert_eq!(removed, 1, "the record had a row");
            }
            (None, None) => unreachable!("an app runs in one mode or the other"),
        }
    }

    /// Replaces a record's data in the durable tier behind the service's
    /// back (same version: only the data differs).
    pub async fn rewrite_durable(&self, collection: &str, id: &str, data: Value) {
        let key = record_key(collection, id);
        let now = time::OffsetDateTime::now_utc();
        let durable = self.durable();
        let states = durable
            .get_states(&key.collection, std::slice::from_ref(&key.id), now)
            .await
            .expect("read the durable tier");
        let Some(Change::Put(mut record)) = states.into_iter().next() else {
            panic!("{collection}/{id} is not live in the durable tier");
        };
        record.data = data.as_object().expect("an object").clone();
        durable
            .apply_changes(&[Change::Put(record)], ApplyMode::Force)
            .await
            .expect("rewrite the durable tier");
    }

    /// What the cache tier holds for a record: its version, and its data if
    /// not a deletion marker. `None`: nothing.
    pub async fn cached_entry(&self, collection: &str, id: &str) -> Option<(u64, Option<Value>)> {
        let entry = self
            .cache()
            .get(&record_key(collection, id))
            .await
            .expect("read the cache tier");
        match entry {
            CacheEntry::Miss => None,
            CacheEntry::Present(record) => {
                Some((record.version.get(), Some(Value::Object(record.data))))
            }
            CacheEntry::Deleted(version) => Some((version.get(), None)),
        }
    }

    /// The record copy the cache tier holds (not a deletion marker).
    pub async fn cached_copy(&self, collection: &str, id: &str) -> Option<StoredCopy> {
        match self.cached_entry(collection, id).await? {
            (version, Some(data)) => Some(StoredCopy { version, data }),
            (_, None) => None,
        }
    }

    /// How many entries (copies and markers) the cache holds for a collection.
    pub async fn cached_count(&self, collection: &str) -> usize {
        let collection = CollectionName::parse(collection).expect("collection name");
        let cache = self.cache();
        let (mut cursor, mut ids) = (0, std::collections::HashSet::new());
        loop {
            let (next, page) = cache
                .scan(&collection, cursor, 100)
                .await
                .expect("scan the cache tier");
            ids.extend(page.into_iter().map(|state| state.state.key().id));
            if next == 0 {
                return ids.len();
            }
            cursor = next;
        }
    }

    /// Entries waiting in the journals (write-behind and outage), in either mode.
    pub async fn journal_backlog(&self) -> u64 {
        let cache = self.cache();
        let mut total = 0;
        for kind in JournalKind::ALL {
            total += cache.journal_backlog(kind).await.expect("journal backlog");
        }
        total
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The body of `GET path` without a token (`/openapi.json`, `/docs`,
    /// `/metrics`, ...), as text.
    pub async fn open_text(&self, path: &str) -> String {
        let response = self.http.get(self.url(path)).send().await.expect("GET");
        response.text().await.expect("a text body")
    }

    /// The body of `GET path` without a token, as JSON.
    pub async fn open_json(&self, path: &str) -> Value {
        serde_json::from_str(&self.open_text(path).await).expect("a JSON body")
    }

    /// A request with `token` as bearer (`None`: no Authorization header).
    pub fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let request = self.http.request(method, self.url(path));
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// A request with the admin token.
    pub fn admin(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.request(method, path, Some(ADMIN_TOKEN))
    }

    /// PUT `data` as the admin.
    pub async fn put(&self, collection: &str, id: &str, data: Value) -> reqwest::Response {
        let request = self.admin(Method::PUT, &record_path(collection, id));
        request.json(&data).send().await.expect("PUT")
    }

    /// GET as the admin.
    pub async fn get(&self, collection: &str, id: &str) -> reqwest::Response {
        let request = self.admin(Method::GET, &record_path(collection, id));
        request.send().await.expect("GET")
    }

    /// DELETE as the admin.
    pub async fn delete(&self, collection: &str, id: &str) -> reqwest::Response {
        let request = self.admin(Method::DELETE, &record_path(collection, id));
        request.send().await.expect("DELETE")
    }

    /// Unique-index lookup as the admin.
    pub async fn lookup(&self, collection: &str, index: &str, value: &str) -> reqwest::Response {
        let path = format!("/v1/collections/{collection}/lookup/{index}/{value}");
        self.admin(Method::GET, &path).send().await.expect("lookup")
    }

    /// One page of `GET /v1/collections/{collection}/records?{query}` as the
    /// admin: the ids and the `next` cursor.
    /// Every line `GET /admin/database/export` answers, header and end
    /// line included.
    pub async fn export_lines(&self) -> Vec<Value> {
        let body = self
            .admin(Method::GET, "/admin/database/export")
            .send()
            .await
            .expect("the export answers")
            .text()
            .await
            .expect("the export's body");
        body.lines()
            .map(|line| serde_json::from_str(line).expect("an export line is JSON"))
            .collect()
    }

    pub async fn list_page(&self, collection: &str, query: &str) -> (Vec<String>, Value) {
        let path = format!("/v1/collections/{collection}/records?{query}");
        let (status, page) = self.admin_call(Method::GET, &path).await;
        assert_eq!(status, reqwest::StatusCode::OK, "{path}: {page}");
        (record_ids(&page), page["next"].clone())
    }

    /// An admin API call: the status and the JSON body.
    pub async fn admin_call(&self, method: Method, path: &str) -> (reqwest::StatusCode, Value) {
        let response = self.admin(method, path).send().await.expect("admin call");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Starts an admin job (`POST path`) and waits for it to finish; returns
    /// the finished job.
    pub async fn run_job(&self, path: &str) -> Value {
        let (status, job) = self.admin_call(Method::POST, path).await;
        assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{path}: {job}");
        let id = job["id"].as_str().expect("job id").to_owned();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let (status, job) = self
                .admin_call(Method::GET, &format!("/admin/database/jobs/{id}"))
                .await;
            assert_eq!(status, reqwest::StatusCode::OK, "{job}");
            if job["state"] != "running" {
                return job;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "job {id} still running"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Writes a record copy into Redis behind the service's back.
    pub async fn write_redis_copy(&self, collection: &str, id: &str, version: u64, data: Value) {
        let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000;
        self.redis_query::<()>(
            redis::cmd("HSET")
                .arg(self.pg().keys.record(&record_key(collection, id)))
                .arg("v")
                .arg(format!("{version:020}"))
                .arg("d")
                .arg(data.to_string())
                .arg("c")
                .arg(now as i64)
                .arg("u")
                .arg(now as i64),
        )
        .await;
    }

    /// Writes a record row into PostgreSQL behind the service's back
    /// (inserted or replaced, live).
    pub async fn write_postgres_row(&self, collection: &str, id: &str, version: u64, data: Value) {
        sqlx::query(
            "INSERT INTO records (collection, id, version, created_version, data, created_at, \
             updated_at) VALUES ($1, $2, $3, $3, $4, now(), now()) \
             ON CONFLICT (collection, id) DO UPDATE SET version = $3, data = $4, deleted = false",
        )
        .bind(collection)
        .bind(id)
        .bind(version as i64)
        .bind(sqlx::types::Json(data))
        .execute(&self.pg().db)
        .await
        .expect("write a row");
    }

    /// `POST /v1/counters/{scope}/increment` as the admin.
    pub async fn increment(&self, scope: &str, body: Value) -> reqwest::Response {
        let path = format!("/v1/counters/{scope}/increment");
        let request = self.admin(Method::POST, &path);
        request.json(&body).send().await.expect("increment")
    }

    /// PostgreSQL's values of one scope's bucket, as exact decimal text.
    pub async fn postgres_counters(
        &self,
        scope: &str,
        granularity: &str,
    ) -> std::collections::BTreeMap<String, String> {
        sqlx::query(
            "SELECT field, value::text AS value FROM counters \
             WHERE scope = $1 AND granularity = $2",
        )
        .bind(scope)
        .bind(granularity)
        .fetch_all(&self.pg().db)
        .await
        .expect("query counters")
        .iter()
        .map(|row| {
            let value: String = row.get("value");
            let exact = hybridstore_core::Amount::parse_stored(&value).expect("a decimal");
            (row.get("field"), exact.to_string())
        })
        .collect()
    }

    /// Redis's values of one scope's `total` bucket, as exact decimal text.
    pub async fn redis_totals(&self, scope: &str) -> std::collections::BTreeMap<String, String> {
        let scope = hybridstore_core::CounterScope::parse(scope).expect("scope");
        let bucket = hybridstore_core::Bucket {
            granularity: hybridstore_core::Granularity::Total,
            start: time::OffsetDateTime::UNIX_EPOCH,
            expires_at: None,
        };
        let fields: Vec<(String, String)> = self
            .redis_query(redis::cmd("HGETALL").arg(self.pg().keys.counter_bucket(&scope, &bucket)))
            .await;
        let mut parts: std::collections::BTreeMap<String, (i128, i64)> = Default::default();
        for (name, value) in fields {
            if let Some(field) = name.strip_prefix("u:") {
                parts.entry(field.into()).or_default().0 = value.parse().expect("units");
            } else if let Some(field) = name.strip_prefix("n:") {
                parts.entry(field.into()).or_default().1 = value.parse().expect("nanos");
            }
        }
        parts
            .into_iter()
            .map(|(field, (units, nanos))| {
                let amount = hybridstore_core::Amount::from_parts(units, nanos).expect("amount");
                (field, amount.to_string())
            })
            .collect()
    }

    /// `GET /v1/counters/{scope}?{query}` as the admin (must answer 200).
    pub async fn read_counters(&self, scope: &str, query: &str) -> Value {
        let path = format!("/v1/counters/{scope}?{query}");
        let response = self.admin(Method::GET, &path).send().await.expect("read");
        assert_eq!(response.status(), reqwest::StatusCode::OK, "{path}");
        response.json().await.expect("JSON")
    }

    /// Waits (up to 20 s) until the admin health shows `tier` (`durable` or
    /// `cache`) in `state`; returns whether it did. `open` also accepts
    /// `half_open`: a down tier is half-open while each probe tries it, which
    /// against a dead server is most of the time.
    pub async fn wait_for_tier(&self, tier: &str, state: &str) -> bool {
        crate::until(std::time::Duration::from_secs(20), || async {
            let (_, health) = self.admin_call(Method::GET, "/admin/database/health").await;
            let now = &health["tiers"][tier]["state"];
            now == state || (state == "open" && now == "half_open")
        })
        .await
    }

    /// Increments waiting in the counter journal.
    pub async fn counter_backlog(&self) -> u64 {
        let mut total = 0;
        for stream in self.pg().keys.counter_journals() {
            let length: u64 = self.redis_query(redis::cmd("XLEN").arg(stream)).await;
            total += length;
        }
        total
    }

    /// Removes a record's copy from the cache tier behind the service's back.
    pub async fn drop_cached_copy(&self, collection: &str, id: &str) {
        self.cache()
            .invalidate(&[record_key(collection, id)])
            .await
            .expect("drop a cached copy");
    }

    /// The row PostgreSQL holds (live or not): `None` when there is no row.
    pub async fn postgres_row(&self, collection: &str, id: &str) -> Option<(StoredCopy, bool)> {
        let row = sqlx::query(
            "SELECT version, data, deleted FROM records WHERE collection = $1 AND id = $2",
        )
        .bind(collection)
        .bind(id)
        .fetch_optional(&self.pg().db)
        .await
        .expect("query records")?;
        let version: i64 = row.get("version");
        let sqlx::types::Json(data): sqlx::types::Json<Value> = row.get("data");
        Some((
            StoredCopy {
                version: version as u64,
                data,
            },
            row.get("deleted"),
        ))
    }

    /// The live record PostgreSQL holds (not deleted).
    pub async fn postgres_copy(&self, collection: &str, id: &str) -> Option<StoredCopy> {
        self.postgres_row(collection, id)
            .await
            .and_then(|(copy, deleted)| (!deleted).then_some(copy))
    }

    /// The Redis hash of a record: its version, and its data if not a deletion
    /// marker. `None` when the key does not exist.
    pub async fn redis_entry(&self, collection: &str, id: &str) -> Option<(u64, Option<Value>)> {
        let key = self.pg().keys.record(&record_key(collection, id));
        let (version, data) = self
            .redis_query::<(Option<String>, Option<Vec<u8>>)>(
                redis::cmd("HMGET").arg(&key).arg("v").arg("d"),
            )
            .await;
        let version = version?.parse().expect("numeric version");
        let data = data.map(|bytes| serde_json::from_slice(&bytes).expect("cached data JSON"));
        Some((version, data))
    }

    /// Runs a command on the test's own Redis connection. After a server
    /// restart the first call reports the dead connection (and reconnects), so
    /// a connection error is retried a few times.
    async fn redis_query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> T {
        let mut attempts = 0;
        loop {
            match command.query_async(&mut self.pg().redis.clone()).await {
                Ok(value) => return value,
                Err(err) if attempts < 5 && (err.is_io_error() || err.is_connection_dropped()) => {
                    attempts += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(err) => panic!("redis {command:?}: {err}"),
            }
        }
    }

    /// The record copy Redis holds (not a deletion marker).
    pub async fn redis_copy(&self, collection: &str, id: &str) -> Option<StoredCopy> {
        match self.redis_entry(collection, id).await? {
            (version, Some(data)) => Some(StoredCopy { version, data }),
            (_, None) => None,
        }
    }

    /// Milliseconds the Redis key of a record has left (-2: no key, -1: no TTL).
    pub async fn redis_pttl(&self, collection: &str, id: &str) -> i64 {
        self.redis_query(redis::cmd("PTTL").arg(self.pg().keys.record(&record_key(collection, id))))
            .await
    }

    /// Every record copy and lookup hint this app holds in Redis (not its
    /// journal streams).
    pub async fn redis_keys(&self) -> Vec<String> {
        let keys: Vec<String> = self
            .redis_query(redis::cmd("KEYS").arg(format!("{}:*", self.pg().keys.prefix())))
            .await;
        keys.into_iter()
            .filter(|key| self.pg().keys.is_copy(key))
            .collect()
    }

    /// Number of rows in `records` for this app (live or not).
    pub async fn postgres_row_count(&self) -> i64 {
        sqlx::query("SELECT count(*) AS n FROM records")
            .fetch_one(&self.pg().db)
            .await
            .expect("count")
            .get("n")
    }
}
