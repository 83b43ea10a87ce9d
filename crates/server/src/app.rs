//! Wiring: configuration in, a bound server out.

use std::future::Future;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hybridstore_core::{CacheStore, DurableStore, StoreError};
use hybridstore_engine::{
    Catalog, CounterSettings, Engine, EngineSettings, HealthSettings, JournalSettings,
    NoDurableTier, SyncSettings, Tiers as EngineTiers, in_background,
};
use hybridstore_memory::MemoryCache;
use hybridstore_postgres::{PgConnectOptions, PostgresOptions, PostgresStore};
use hybridstore_redis::{RedisOptions, RedisStore};
use hybridstore_sqlite::{SqliteOptions, SqliteStore};
use tokio::net::TcpListener;

use crate::auth::Authenticator;
use crate::config::{BackupConfig, Config, ConfigError, Mode, Secret};
use crate::http::{self, AppState};
use crate::metrics::ServerMetrics;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot prepare the PostgreSQL schema: {0}")]
    Migrate(#[source] StoreError),
    #[error("cannot set up the Redis connection: {0}")]
    Redis(#[source] StoreError),
    #[error("cannot open the embedded database: {0}")]
    Embedded(#[source] StoreError),
    #[error("cannot keep the admin token in {path}: {source}")]
    AdminToken {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

type DurableLayer = Box<dyn FnOnce(Arc<dyn DurableStore>) -> Arc<dyn DurableStore> + Send>;

/// Builds a [`Server`] from a validated [`Config`].
pub struct ServerBuilder {
    config: Config,
    durable_layer: Option<DurableLayer>,
}

fn postgres_options(config: &Config) -> Result<PostgresOptions, ConfigError> {
    let pg = &config.postgres;
    let connect = match (&pg.url, &pg.host) {
        (Some(url), _) => {
            PgConnectOptions::from_str(url.expose()).map_err(|err| ConfigError::Invalid {
                key: "postgres.url (DATABASE_URL)".into(),
                problem: err.to_string(),
            })?
        }
        (None, host) => {
            let mut options = PgConnectOptions::new()
                .host(host.as_deref().unwrap_or("localhost"))
                .port(pg.port)
                .database(&pg.database)
                .username(&pg.user);
            if let Some(password) = &pg.password {
                options = options.password(password.expose());
            }
            options
        }
    };
    Ok(PostgresOptions {
        connect: connect.application_name("hybridstore"),
        pool_size: pg.pool_size,
        acquire_timeout: pg.acquire_timeout,
        statement_timeout: pg.statement_timeout,
    })
}

fn redis_options(config: &Config) -> RedisOptions {
    RedisOptions {
        url: config.redis.connection_url().unwrap_or_default(),
        key_prefix: config.redis.key_prefix.clone(),
        connect_timeout: config.redis.connect_timeout,
        response_timeout: config.redis.response_timeout,
        counter_idle: config.cache.usage_stats_ttl,
        counters_held: config.cache_only(),
    }
}

type Tiers = (Arc<dyn DurableStore>, Arc<dyn CacheStore>);

/// PostgreSQL and Redis, both connected lazily: either may be down at start.
async fn production_tiers(config: &Config) -> Result<Tiers, StartError> {
    if config.cache_only() {
        let redis = RedisStore::new_lazy(&redis_options(config)).map_err(StartError::Redis)?;
        tracing::info!(
            mode = "production",
            durable = "off",
            cache = "redis",
            "hybridstore mode: Redis alone (POSTGRES_ENABLED=false); every collection is redis_only and Redis holds the data"
        );
        // Redis may be down at start: asked once it answers, without
        // holding the start back.
        let asked = redis.clone();
        tokio::spawn(async move {
            loop {
                match asked.durability_risks().await {
                    Ok(risks) => {
                        for risk in risks {
                            tracing::warn!(
                                risk,
                                "Redis holds this deployment's data, and its configuration can lose it"
                            );
                        }
                        return;
                    }
                    Err(err) if err.is_unavailable() => {
                        tokio::time::sleep(Duration::from_secs(5)).await
                    }
                    Err(err) => {
                        return tracing::debug!(error = %err, "Redis does not say how it keeps data");
                    }
                }
            }
        });
        return Ok((Arc::new(NoDurableTier), Arc::new(redis)));
    }
    let postgres = PostgresStore::new_lazy(postgres_options(config)?);
    match postgres.migrate().await {
        Ok(()) => {}
        // Down at start: serve degraded; the first successful probe
        // applies the migrations.
        Err(err) if err.is_unavailable() => {
            tracing::warn!(error = %err, "PostgreSQL unavailable at start; starting degraded")
        }
        Err(err) => return Err(StartError::Migrate(err)),
    }
    if !config.redis.enabled {
        tracing::info!(
            mode = "production",
            durable = "postgres",
            cache = "off",
            "hybridstore mode: PostgreSQL alone (REDIS_ENABLED=false); every collection is postgres_only"
        );
        return Ok((Arc::new(postgres), Arc::new(side_cache(config))));
    }
    let redis = RedisStore::new_lazy(&redis_options(config)).map_err(StartError::Redis)?;
    tracing::info!(
        mode = "production",
        durable = "postgres",
        cache = "redis",
        "hybridstore mode: PostgreSQL holds the data, Redis the hot copies"
    );
    Ok((Arc::new(postgres), Arc::new(redis)))
}

/// The cache tier of a deployment without one (`REDIS_ENABLED=false`): an
/// in-process one that holds no record copies, journals or counter buckets
/// (every plan is `postgres_only`), only this process's stored idempotent
/// responses (a retry through another instance runs again; counter
/// increments stay exactly-once by their id in the durable tier).
fn side_cache(config: &Config) -> MemoryCache {
    MemoryCache::new(
        config.embedded.cache_max_records,
        config.embedded.cache_max_bytes,
    )
}

/// The SQLite file and the in-process cache.
fn embedded_tiers(config: &Config) -> Result<Tiers, StartError> {
    let path = config.embedded.database_path();
    let sqlite =
        SqliteStore::open(&SqliteOptions { path: path.clone() }).map_err(StartError::Embedded)?;
    let shown = std::path::absolute(&path).unwrap_or(path);
    tracing::info!(
        mode = "embedded",
        data = %shown.display(),
        cache_max_records = config.embedded.cache_max_records,
        "hybridstore mode: embedded; data in SQLite (WAL, synchronous=FULL), cache in process"
    );
    let cache = MemoryCache::new(
        config.embedded.cache_max_records,
        config.embedded.cache_max_bytes,
    )
    .with_counter_idle(config.cache.usage_stats_ttl);
    Ok((Arc::new(sqlite), Arc::new(cache)))
}

/// The admin token of an embedded server started without one: read from
/// the data directory, or made (random, 0600) on the first start.
fn embedded_admin_token(config: &Config) -> Result<Secret, StartError> {
    let path = config.embedded.admin_token_path();
    let failed = |source| StartError::AdminToken {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(token) if token.trim().len() >= 16 => return Ok(Secret::new(token.trim())),
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(failed(err)),
    }
    let token = hybridstore_core::new_token();
    std::fs::create_dir_all(&config.embedded.data_dir).map_err(failed)?;
    write_private(&path, &token).map_err(failed)?;
    tracing::info!(path = %path.display(), "made an admin token (no ADMIN_TOKEN set)");
    Ok(Secret::new(token))
}

/// Writes `content` to a file only its owner can read.
fn write_private(path: &std::path::Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::File::options();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(content.as_bytes())?;
    file.sync_all()
}

impl ServerBuilder {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            durable_layer: None,
        }
    }

    /// Wraps the durable tier (tests use this to observe or delay tier calls).
    pub fn wrap_durable(
        mut self,
        layer: impl FnOnce(Arc<dyn DurableStore>) -> Arc<dyn DurableStore> + Send + 'static,
    ) -> Self {
        self.durable_layer = Some(Box::new(layer));
        self
    }

    /// Connects the tiers, applies migrations and binds the listener.
    pub async fn bind(self) -> Result<Server, StartError> {
        let mut config = self.config;
        config.validate()?;
        let (mut durable, cache) = match config.mode() {
            Mode::Production => production_tiers(&config).await?,
            Mode::Embedded => {
                if config.admin_token.is_none() {
                    config.admin_token = Some(embedded_admin_token(&config)?);
                }
                embedded_tiers(&config)?
            }
        };
        if let Some(layer) = self.durable_layer {
            durable = layer(durable);
        }
        let catalog =
            Catalog::new(config.collection_specs()?).map_err(|err| ConfigError::Invalid {
                key: format!("collections.{}.{}", err.collection, err.key),
                problem: err.problem,
            })?;
        let settings = EngineSettings {
            strategy: config.strategy,
            max_data_bytes: config.body_limit_bytes,
            page_bytes: config.limits.page_bytes,
            replay_bounds: hybridstore_core::ReplayBounds {
                caller_responses: config.idempotency.caller_max_responses,
                caller_bytes: config.idempotency.caller_max_bytes,
                total_responses: config.idempotency.max_responses,
                total_bytes: config.idempotency.max_bytes,
            },
            deleted_marker_ttl: config.records.deleted_marker_ttl,
            tombstone_retention: config.records.tombstone_retention,
            health: HealthSettings {
                failure_threshold: config.health.failure_threshold,
                probe_interval: config.health.probe_interval,
                durable_call_timeout: config.postgres.call_timeout,
                cache_call_timeout: config.redis.call_timeout,
            },
            counters: CounterSettings {
                strategy: config.counters_strategy(),
                hour_retention: config.counters.hour_retention,
                day_retention: config.counters.day_retention,
                month_retention: config.counters.month_retention,
                max_fields: config.counters.max_fields,
                ..CounterSettings::default()
            },
            journal: JournalSettings {
                batch_size: config.journal.batch_size,
                claim_idle: config.journal.claim_idle,
                ..JournalSettings::default()
            },
            sync: SyncSettings {
                enabled: config.sync.enabled,
                on_startup: config.sync.on_startup,
                interval: config.sync.interval,
            },
            tiers: if config.cache_only() {
                EngineTiers::CacheOnly
            } else if config.redis.enabled {
                EngineTiers::Both
            } else {
                EngineTiers::DurableOnly
            },
            ..EngineSettings::default()
        };
        let engine = Arc::new(Engine::new(durable, cache, catalog, settings));
        engine.check_tiers_at_start().await;
        engine.load_control_state().await;
        for tier in engine.health() {
            tracing::info!(
                tier = tier.tier,
                backend = tier.backend,
                state = tier.state.as_str(),
                "tier at start"
            );
        }
        let metrics: Arc<ServerMetrics> = Arc::default();
        let state = AppState {
            engine: engine.clone(),
            auth: Arc::new(Authenticator::from_config(&config)),
            metrics: metrics.clone(),
            admission: http::admission::Admission::new(http::admission::Limits {
                max_requests: config.limits.max_requests,
                request_bytes: config.limits.request_bytes,
                queue_wait: config.limits.queue_wait,
                body_limit: config.body_limit_bytes,
            }),
        };

        let addr = format!("{}:{}", config.host, config.port);
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        Ok(Server {
            listener,
            router: http::router(state, config.body_limit_bytes),
            engine,
            purge_interval: config.records.purge_interval,
            backup: config.backup.clone(),
            metrics,
        })
    }
}

/// A bound, ready server.
pub struct Server {
    listener: TcpListener,
    router: Router,
    engine: Arc<Engine>,
    purge_interval: Duration,
    backup: BackupConfig,
    metrics: Arc<ServerMetrics>,
}

impl Server {
    /// The engine behind the API (tests look into its tiers).
    pub fn engine(&self) -> Arc<Engine> {
        self.engine.clone()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` completes, then finishes in-flight requests.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        tracing::info!(addr = %self.local_addr(), "hybridstore listening");
        let backups = tokio::spawn(in_background(scheduled_backups(
            self.engine.clone(),
            self.backup,
            self.metrics,
        )));
        let background = [
            backups,
            tokio::spawn(self.engine.clone().run_health_probes()),
            tokio::spawn(self.engine.clone().run_journal_replay()),
            tokio::spawn(self.engine.clone().run_held_publisher()),
            tokio::spawn(self.engine.clone().run_control_sync()),
            tokio::spawn(self.engine.clone().run_counter_replay()),
            tokio::spawn(self.engine.clone().run_scheduled_sync()),
            tokio::spawn(in_background(purge_expired_records(
                self.engine,
                self.purge_interval,
            ))),
        ];
        let served = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await;
        for task in background {
            task.abort();
        }
        served
    }
}

/// Removes expired records and old tombstones from the durable tier, forever.
async fn purge_expired_records(engine: Arc<Engine>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match engine.purge_expired().await {
            Ok(0) => {}
            Ok(purged) => tracing::debug!(purged, "purged expired records"),
            Err(err) => tracing::warn!(error = %err, "purging expired records failed"),
        }
    }
}

/// Makes a backup every `interval` (when set), keeping the newest `keep`.
async fn scheduled_backups(engine: Arc<Engine>, config: BackupConfig, metrics: Arc<ServerMetrics>) {
    if config.interval.is_zero() {
        return;
    }
    let every = config.interval;
    metrics.backups.scheduled(every);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(dir = %config.dir.display(), every = ?every, keep = config.keep, "scheduled backups");
    loop {
        ticks.tick().await;
        match backup_once(&engine, &config).await {
            Ok(path) => {
                metrics.backups.made();
                tracing::info!(manifest = %path.display(), "backup made")
            }
            Err(err) => {
                metrics.backups.failed();
                tracing::error!(error = %err, dir = %config.dir.display(), "scheduled backup failed")
            }
        }
    }
}

/// One backup: the engine's export pages into a [`BackupWriter`] (file work
/// on the blocking pool), then retention.
async fn backup_once(
    engine: &Arc<Engine>,
    config: &BackupConfig,
) -> Result<std::path::PathBuf, String> {
    use futures_util::StreamExt;
    use hybridstore_transfer::BackupWriter;
    async fn blocking<T: Send + 'static>(
        work: impl FnOnce() -> Result<T, hybridstore_transfer::TransferError> + Send + 'static,
    ) -> Result<T, String> {
        match tokio::task::spawn_blocking(work).await {
            Ok(result) => result.map_err(|err| err.to_string()),
            Err(err) => Err(err.to_string()),
        }
    }
    let dir = config.dir.clone();
    let mut writer = blocking(move || BackupWriter::create(&dir)).await?;
    let mut pages = std::pin::pin!(engine.clone().export());
    while let Some(page) = pages.next().await {
        let lines = page.map_err(|err| err.to_string())?;
        writer = blocking(move || {
            for line in &lines {
                writer.write(line)?;
            }
            Ok(writer)
        })
        .await?;
    }
    let (dir, keep) = (config.dir.clone(), config.keep);
    blocking(move || {
        let (path, _) = writer.finish()?;
        hybridstore_transfer::prune(&dir, keep.max(1))?;
        Ok(path)
    })
    .await
}
