//! Configuration: layered with figment, validated before anything starts.
//!
//! Layers, later ones win: the built-in defaults (`config/default.toml`, compiled
//! in), `config/default.toml` on disk, `config/<HYBRIDSTORE_ENV>.toml`, then the
//! environment: the variable names of the relay service this product replaces
//! (`POSTGRES_HOST`, `DATABASE_STRATEGY`, ...) and `HYBRIDSTORE_<SECTION>__<KEY>`
//! for everything else. Unknown keys are errors, so a typo cannot silently fall
//! back to a default. [`Config::validate`] checks what types cannot, and every
//! error names the key at fault.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use hybridstore_core::{CollectionName, CollectionSpec, IndexName, Strategy};
use serde::{Deserialize, Deserializer};

use crate::scope::Scope;

const BUILTIN_DEFAULTS: &str = include_str!("../../../config/default.toml");

/// Environment variables of the original relay service, and the key each sets.
pub const LEGACY_ENV: &[(&str, &str)] = &[
    ("HOST", "host"),
    ("PORT", "port"),
    ("ADMIN_TOKEN", "admin_token"),
    ("DATABASE_STRATEGY", "strategy"),
    ("DATABASE_URL", "postgres.url"),
    ("POSTGRES_ENABLED", "postgres.enabled"),
    ("POSTGRES_HOST", "postgres.host"),
    ("POSTGRES_PORT", "postgres.port"),
    ("POSTGRES_DATABASE", "postgres.database"),
    ("POSTGRES_USER", "postgres.user"),
    ("POSTGRES_PASSWORD", "postgres.password"),
    ("REDIS_URL", "redis.url"),
    ("REDIS_ENABLED", "redis.enabled"),
    ("REDIS_HOST", "redis.host"),
    ("REDIS_PORT", "redis.port"),
    ("REDIS_PASSWORD", "redis.password"),
    ("REDIS_DB", "redis.db"),
    ("CACHE_API_KEY_TTL", "collections.api_keys.cache_ttl_secs"),
    ("CACHE_SESSION_TTL", "collections.sessions.cache_ttl_secs"),
    ("CACHE_USAGE_STATS_TTL", "cache.usage_stats_ttl_secs"),
    ("DATABASE_SYNC_ENABLED", "sync.enabled"),
    ("DATABASE_SYNC_INTERVAL", "sync.interval_ms"),
    ("DATABASE_SYNC_ON_STARTUP", "sync.on_startup"),
    ("LOG_LEVEL", "log.level"),
    ("LOG_FORMAT", "log.format"),
    ("LOG_DIR", "log.dir"),
    ("LOG_RETENTION_DAYS", "log.retention_days"),
    ("DATA_DIR", "embedded.data_dir"),
    ("BACKUP_INTERVAL", "backup.interval"),
    ("BACKUP_DIR", "backup.dir"),
    ("BACKUP_KEEP", "backup.keep"),
];

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {key}: {problem}")]
    Invalid { key: String, problem: String },
}

/// The key a figment error is about, as an operator would write it: the config
/// path, plus the legacy environment variable that sets it, if any.
fn describe_key(path: &[String]) -> String {
    // `tokens[0].scopes`, as the operator would point at it.
    let mut key = String::new();
    for segment in path {
        if segment.bytes().all(|b| b.is_ascii_digit()) && !key.is_empty() {
            key.push_str(&format!("[{segment}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(segment);
        }
    }
    match LEGACY_ENV.iter().find(|(_, target)| *target == key) {
        Some((env, _)) => format!("{key} ({env})"),
        None if key.is_empty() => "configuration".into(),
        None => key,
    }
}

impl From<figment::Error> for ConfigError {
    fn from(err: figment::Error) -> Self {
        let mut keys = Vec::new();
        let mut problems = Vec::new();
        for err in err {
            keys.push(describe_key(&err.path));
            let source = err
                .metadata
                .as_ref()
                .map(|metadata| format!(" (from {})", metadata.name))
                .unwrap_or_default();
            problems.push(format!("{}{source}", err.kind));
        }
        invalid(keys.join(", "), problems.join("; "))
    }
}

fn cwd() -> std::path::PathBuf {
    std::env::current_dir().unwrap_or_default()
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// A secret string: never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        scalar_string(deserializer).map(Secret)
    }
}

/// Accepts any scalar as a string: an environment variable such as
/// `POSTGRES_PASSWORD=12345` arrives as a number.
fn scalar_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    Ok(match Scalar::deserialize(deserializer)? {
        Scalar::S(s) => s,
        Scalar::I(i) => i.to_string(),
        Scalar::U(u) => u.to_string(),
        Scalar::F(f) => f.to_string(),
        Scalar::B(b) => b.to_string(),
    })
}

fn opt_scalar_string<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    scalar_string(deserializer).map(Some)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(deserialize_with = "scalar_string")]
    pub host: String,
    pub port: u16,
    #[serde(default)]
    pub admin_token: Option<Secret>,
    pub strategy: Strategy,
    pub body_limit_bytes: usize,
    pub limits: LimitsConfig,
    pub idempotency: IdempotencyConfig,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    pub cache: CacheConfig,
    pub records: RecordsConfig,
    pub health: HealthConfig,
    pub journal: JournalConfig,
    pub counters: CountersConfig,
    pub sync: SyncConfig,
    pub log: LogConfig,
    pub embedded: EmbeddedConfig,
    pub backup: BackupConfig,
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    #[serde(default)]
    pub collections: BTreeMap<String, CollectionConfig>,
}

/// What stored Idempotency-Key responses may take of the cache.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    pub caller_max_responses: u64,
    pub caller_max_bytes: u64,
    pub max_responses: u64,
    pub max_bytes: u64,
}

/// Work the service takes on at once (see `http::admission`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_requests: usize,
    pub request_bytes: usize,
    #[serde(rename = "queue_wait_ms", with = "millis")]
    pub queue_wait: Duration,
    pub page_bytes: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    pub enabled: bool,
    #[serde(default)]
    pub url: Option<Secret>,
    #[serde(default, deserialize_with = "opt_scalar_string")]
    pub host: Option<String>,
    pub port: u16,
    #[serde(deserialize_with = "scalar_string")]
    pub database: String,
    #[serde(deserialize_with = "scalar_string")]
    pub user: String,
    #[serde(default)]
    pub password: Option<Secret>,
    pub pool_size: u32,
    #[serde(rename = "acquire_timeout_ms", with = "millis")]
    pub acquire_timeout: Duration,
    #[serde(rename = "statement_timeout_ms", with = "millis")]
    pub statement_timeout: Duration,
    #[serde(rename = "call_timeout_ms", with = "millis")]
    pub call_timeout: Duration,
}

impl PostgresConfig {
    /// Whether a server was named at all (`url` or `host`).
    pub fn is_configured(&self) -> bool {
        self.url.is_some() || self.host.is_some()
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub enabled: bool,
    #[serde(default)]
    pub url: Option<Secret>,
    #[serde(default, deserialize_with = "opt_scalar_string")]
    pub host: Option<String>,
    pub port: u16,
    pub db: u32,
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(deserialize_with = "scalar_string")]
    pub key_prefix: String,
    #[serde(rename = "connect_timeout_ms", with = "millis")]
    pub connect_timeout: Duration,
    #[serde(rename = "response_timeout_ms", with = "millis")]
    pub response_timeout: Duration,
    #[serde(rename = "call_timeout_ms", with = "millis")]
    pub call_timeout: Duration,
}

impl RedisConfig {
    pub fn is_configured(&self) -> bool {
        self.url.is_some() || self.host.is_some()
    }

    /// The connection URL: `url` as given, or built from host, port, db and
    /// password (percent-encoded).
    pub fn connection_url(&self) -> Option<String> {
        if let Some(url) = &self.url {
            return Some(url.expose().to_owned());
        }
        let host = self.host.as_ref()?;
        let auth = match &self.password {
            Some(password) => format!(":{}@", percent_encode(password.expose())),
            None => String::new(),
        };
        Some(format!("redis://{auth}{host}:{}/{}", self.port, self.db))
    }
}

fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    #[serde(rename = "default_ttl_secs", with = "seconds")]
    pub default_ttl: Duration,
    #[serde(rename = "usage_stats_ttl_secs", with = "seconds")]
    pub usage_stats_ttl: Duration,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordsConfig {
    #[serde(rename = "deleted_marker_ttl_secs", with = "seconds")]
    pub deleted_marker_ttl: Duration,
    #[serde(rename = "tombstone_retention_secs", with = "seconds")]
    pub tombstone_retention: Duration,
    #[serde(rename = "purge_interval_ms", with = "millis")]
    pub purge_interval: Duration,
}

/// Circuit breakers and probes of the tiers.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    pub failure_threshold: u32,
    #[serde(rename = "probe_interval_ms", with = "millis")]
    pub probe_interval: Duration,
}

/// Replay of the write-behind and outage journals.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    pub batch_size: usize,
    #[serde(rename = "claim_idle_ms", with = "millis")]
    pub claim_idle: Duration,
}

/// Usage counters.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountersConfig {
    /// `None`: `cache_first` in production (Redis journals increments),
    /// `dual_write` in embedded mode (the in-process journal would not
    /// survive a crash).
    #[serde(default)]
    pub strategy: Option<Strategy>,
    #[serde(rename = "hour_retention_secs", with = "seconds")]
    pub hour_retention: Duration,
    #[serde(rename = "day_retention_secs", with = "seconds")]
    pub day_retention: Duration,
    #[serde(rename = "month_retention_secs", with = "seconds")]
    pub month_retention: Duration,
    pub max_fields: usize,
}

/// Background synchronisation between the tiers (used by the operator surface).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    pub enabled: bool,
    #[serde(rename = "interval_ms", with = "millis")]
    pub interval: Duration,
    pub on_startup: bool,
}

/// Where the tiers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Redis and PostgreSQL.
    Production,
    /// An in-process cache and a SQLite file: nothing else to run.
    Embedded,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Production => "production",
            Mode::Embedded => "embedded",
        }
    }
}

/// Embedded mode: where the data lives and how much the cache holds.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// Holds `hybridstore.db` (and, when no ADMIN_TOKEN is set, `admin-token`).
    pub data_dir: std::path::PathBuf,
    /// Record copies and markers the in-process cache keeps at most.
    pub cache_max_records: usize,
    /// Bytes of record data the in-process cache keeps at most.
    pub cache_max_bytes: usize,
}

impl EmbeddedConfig {
    pub fn database_path(&self) -> std::path::PathBuf {
        self.data_dir.join("hybridstore.db")
    }

    pub fn admin_token_path(&self) -> std::path::PathBuf {
        self.data_dir.join("admin-token")
    }
}

/// Scheduled backups made by the server itself.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    /// How often (`90m`, `6h`, `1d`, or seconds); `0`: never.
    #[serde(deserialize_with = "interval")]
    pub interval: Duration,
    pub dir: std::path::PathBuf,
    /// Backups kept in `dir` (older ones are removed after each new one).
    pub keep: usize,
}

/// A duration given in milliseconds: the key says so (`*_ms`), the code
/// gets a [`Duration`].
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_millis)
    }
}

/// A duration given in seconds (`*_secs`).
mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_secs)
    }
}

/// An optional duration given in seconds.
mod opt_seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        Option::<u64>::deserialize(deserializer).map(|secs| secs.map(Duration::from_secs))
    }
}

/// A duration as seconds (`3600`) or with a unit: `s`, `m`, `h`, `d`.
fn interval<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = scalar_string(deserializer)?;
    parse_interval(&text)
        .map(Duration::from_secs)
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{text:?} is not an interval: use seconds or a number with s, m, h or d (\"6h\")"
            ))
        })
}

fn parse_interval(text: &str) -> Option<u64> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let factor = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(factor)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    /// Also write logs to daily files `hybridstore.<date>.log` here.
    #[serde(default)]
    pub dir: Option<std::path::PathBuf>,
    /// How many daily files to keep in `dir`.
    pub retention_days: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub name: String,
    pub token: Secret,
    pub scopes: Vec<Scope>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectionConfig {
    #[serde(default, rename = "cache_ttl_secs", with = "opt_seconds")]
    pub cache_ttl: Option<Duration>,
    #[serde(default, rename = "record_ttl_secs", with = "opt_seconds")]
    pub record_ttl: Option<Duration>,
    #[serde(default)]
    pub unique_indexes: Vec<String>,
    #[serde(default)]
    pub schema: Option<serde_json::Value>,
    #[serde(default)]
    pub strategy: Option<Strategy>,
    #[serde(default)]
    pub private: bool,
}

impl Config {
    /// The built-in defaults only: what tests and tools start from.
    pub fn builtin_figment() -> Figment {
        Figment::from(Toml::string(BUILTIN_DEFAULTS))
    }

    /// The files named by the environment, which must exist: the layer
    /// `config/<HYBRIDSTORE_ENV>.toml` and the tokens file `TOKENS_FILE`. A
    /// misspelt name would otherwise start the service silently without
    /// what the file holds (its tokens, say).
    fn named_files() -> Result<(Option<String>, Option<String>), ConfigError> {
        let layer = std::env::var("HYBRIDSTORE_ENV")
            .ok()
            .filter(|env| !env.is_empty())
            .map(|env| format!("config/{env}.toml"));
        let tokens = std::env::var("TOKENS_FILE").ok().filter(|f| !f.is_empty());
        for (variable, file) in [("HYBRIDSTORE_ENV", &layer), ("TOKENS_FILE", &tokens)] {
            if let Some(file) = file
                && !std::path::Path::new(file).is_file()
            {
                return Err(invalid(
                    variable,
                    format!("names {file}, which does not exist (from {:?})", cwd()),
                ));
            }
        }
        Ok((layer, tokens))
    }

    /// Every layer: defaults, config files, the tokens file, environment.
    pub fn figment() -> Figment {
        let (layer, tokens) = Self::named_files().unwrap_or_default();
        let mut figment = Self::builtin_figment().merge(Toml::file("config/default.toml"));
        if let Some(layer) = layer {
            figment = figment.merge(Toml::file(layer));
        }
        // Its tokens add to those of the config files.
        if let Some(tokens) = tokens {
            figment = figment.admerge(Toml::file(tokens));
        }
        figment
            .merge(Env::raw().filter_map(|key| {
                LEGACY_ENV
                    .iter()
                    .find(|(name, _)| key == *name)
                    .map(|(_, path)| (*path).into())
            }))
            .merge(
                Env::prefixed("HYBRIDSTORE_")
                    .ignore(&["ENV", "URL"])
                    .split("__"),
            )
    }

    /// Loads every layer and validates the result.
    pub fn load() -> Result<Config, ConfigError> {
        Self::named_files()?;
        Self::from_figment(Self::figment())
    }

    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract()?;
        config.validate()?;
        Ok(config)
    }

    /// Embedded when no server is named at all.
    pub fn mode(&self) -> Mode {
        if self.postgres.is_configured() || (self.redis.enabled && self.redis.is_configured()) {
            Mode::Production
        } else {
            Mode::Embedded
        }
    }

    /// Redis alone (`POSTGRES_ENABLED=false`): it holds the truth.
    pub fn cache_only(&self) -> bool {
        !self.postgres.enabled
    }

    /// The strategy of counters, filled in for the mode.
    pub fn counters_strategy(&self) -> Strategy {
        if self.cache_only() {
            return Strategy::RedisOnly;
        }
        self.counters.strategy.unwrap_or(match self.mode() {
            Mode::Production => Strategy::CacheFirst,
            Mode::Embedded => Strategy::DualWrite,
        })
    }

    /// Checks what the types cannot. Every error names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.admin_token {
            // Embedded mode makes one and keeps it in the data directory.
            None if self.mode() == Mode::Embedded => {}
            None => {
                return Err(invalid(
                    "admin_token (ADMIN_TOKEN)",
                    "required: set a random secret of at least 16 characters",
                ));
            }
            // The .env.example placeholder would be a known admin token.
            Some(token) if token.expose().starts_with("change-me") => {
                return Err(invalid(
                    "admin_token (ADMIN_TOKEN)",
                    "is the placeholder of .env.example: set a random secret (hybridstore token new prints one)",
                ));
            }
            Some(token) if token.expose().len() < 16 => {
                return Err(invalid(
                    "admin_token (ADMIN_TOKEN)",
                    "must be at least 16 characters",
                ));
            }
            Some(_) => {}
        }
        if self.body_limit_bytes < 1024 {
            return Err(invalid("body_limit_bytes", "must be at least 1024"));
        }
        if self.limits.max_requests == 0 {
            return Err(invalid("limits.max_requests", "must be at least 1"));
        }
        if self.limits.request_bytes < self.body_limit_bytes {
            return Err(invalid(
                "limits.request_bytes",
                "must be at least body_limit_bytes (one largest request must fit)",
            ));
        }
        if self.counters.strategy == Some(Strategy::RedisOnly) {
            return Err(invalid(
                "counters.strategy",
                "counters need the durable tier: use cache_first or a durable-first strategy",
            ));
        }
        if !(1..=256).contains(&self.counters.max_fields) {
            return Err(invalid("counters.max_fields", "must be between 1 and 256"));
        }
        if self.log.retention_days == 0 {
            return Err(invalid(
                "log.retention_days (LOG_RETENTION_DAYS)",
                "must be at least 1",
            ));
        }
        if self.cache_only() && (!self.redis.enabled || !self.redis.is_configured()) {
            return Err(invalid(
                "postgres.enabled (POSTGRES_ENABLED)",
                "false needs Redis, which then holds the data: set REDIS_URL or REDIS_HOST \
                 (and leave REDIS_ENABLED on)",
            ));
        }
        if self.mode() == Mode::Embedded {
            if self.embedded.cache_max_records < 100 {
                return Err(invalid(
                    "embedded.cache_max_records",
                    "must be at least 100",
                ));
            }
            if self.embedded.data_dir.as_os_str().is_empty() {
                return Err(invalid("embedded.data_dir (DATA_DIR)", "must not be empty"));
            }
        }
        if !self.backup.interval.is_zero() && self.backup.keep == 0 {
            return Err(invalid("backup.keep (BACKUP_KEEP)", "must be at least 1"));
        }
        if self.mode() == Mode::Production && !self.cache_only() && !self.postgres.is_configured() {
            return Err(invalid(
                "postgres.url (DATABASE_URL)",
                "required: set DATABASE_URL or POSTGRES_HOST",
            ));
        }
        if self.mode() == Mode::Production && self.redis.enabled && !self.redis.is_configured() {
            return Err(invalid(
                "redis.url (REDIS_URL)",
                "required: set REDIS_URL or REDIS_HOST",
            ));
        }
        if let Some(url) = &self.postgres.url {
            let url = url.expose();
            let scheme_ok = url.starts_with("postgres://") || url.starts_with("postgresql://");
            if !scheme_ok
                || url
                    .parse::<hybridstore_postgres::PgConnectOptions>()
                    .is_err()
            {
                return Err(invalid(
                    "postgres.url (DATABASE_URL)",
                    "not a valid postgres:// URL",
                ));
            }
        }
        if let Some(url) = self.redis.connection_url()
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            return Err(invalid(
                "redis.url (REDIS_URL)",
                "must start with redis:// or rediss://",
            ));
        }
        if self.postgres.pool_size == 0 {
            return Err(invalid("postgres.pool_size", "must be at least 1"));
        }
        if self.redis.key_prefix.is_empty() || self.redis.key_prefix.contains(['{', '}']) {
            return Err(invalid(
                "redis.key_prefix",
                "must be non-empty and contain no braces",
            ));
        }
        for (key, value) in [
            ("records.purge_interval_ms", self.records.purge_interval),
            ("health.probe_interval_ms", self.health.probe_interval),
            ("postgres.call_timeout_ms", self.postgres.call_timeout),
            ("redis.call_timeout_ms", self.redis.call_timeout),
            ("journal.claim_idle_ms", self.journal.claim_idle),
            ("sync.interval_ms", self.sync.interval),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.health.failure_threshold == 0 {
            return Err(invalid("health.failure_threshold", "must be at least 1"));
        }
        if self.journal.batch_size == 0 {
            return Err(invalid("journal.batch_size", "must be at least 1"));
        }
        if self.collections.is_empty() {
            return Err(invalid("collections", "declare at least one collection"));
        }
        self.validate_tokens()?;
        // Collection names, indexes, strategies and schemas.
        let specs = self.collection_specs()?;
        hybridstore_engine::Catalog::new(specs).map_err(|err| {
            invalid(
                format!("collections.{}.{}", err.collection, err.key),
                err.problem,
            )
        })?;
        Ok(())
    }

    fn validate_tokens(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for (i, token) in self.tokens.iter().enumerate() {
            let key = |field: &str| format!("tokens[{i}].{field}");
            if token.name.trim().is_empty() {
                return Err(invalid(key("name"), "must not be empty"));
            }
            if token.token.expose().len() < 16 {
                return Err(invalid(key("token"), "must be at least 16 characters"));
            }
            if Some(&token.token) == self.admin_token.as_ref() || !seen.insert(token.token.expose())
            {
                return Err(invalid(key("token"), "must differ from every other token"));
            }
            for scope in &token.scopes {
                // A scope on a collection nobody declared is a typo
                // (`write:apikeys`): it would grant nothing, silently.
                if let Some(collection) = scope.collection()
                    && !self.collections.contains_key(collection.as_str())
                {
                    return Err(invalid(
                        key("scopes"),
                        format!(
                            "token {:?}: scope \"{scope}\" names no declared collection (declared: {})",
                            token.name,
                            self.collections
                                .keys()
                                .cloned()
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The declared collections, with defaults applied.
    pub fn collection_specs(&self) -> Result<Vec<CollectionSpec>, ConfigError> {
        self.collections
            .iter()
            .map(|(name, c)| {
                let key = |field: &str| format!("collections.{name}{field}");
                let name =
                    CollectionName::parse(name).map_err(|err| invalid(key(""), err.to_string()))?;
                let unique_indexes = c
                    .unique_indexes
                    .iter()
                    .map(|index| IndexName::parse(index))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|err| invalid(key(".unique_indexes"), err.to_string()))?;
                if c.record_ttl.is_some_and(|ttl| ttl.is_zero()) {
                    return Err(invalid(key(".record_ttl_secs"), "must be at least 1"));
                }
                Ok(CollectionSpec {
                    name,
                    cache_ttl: c.cache_ttl.unwrap_or(self.cache.default_ttl),
                    record_ttl: c.record_ttl,
                    unique_indexes,
                    schema: c.schema.clone(),
                    strategy: c.strategy,
                    private: c.private,
                })
            })
            .collect()
    }
}

#[cfg(test)]
// `Jail::expect_with` takes closures returning figment's own (large) error.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load_in(jail: &mut Jail) -> Result<Config, ConfigError> {
        let _ = jail;
        Config::load()
    }

    #[test]
    fn legacy_variables_set_their_keys() {
        Jail::expect_with(|jail| {
            jail.set_env("ADMIN_TOKEN", "0123456789abcdef0123");
            jail.set_env("POSTGRES_HOST", "db.internal");
            jail.set_env("POSTGRES_PASSWORD", "12345");
            jail.set_env("REDIS_HOST", "cache.internal");
            jail.set_env("REDIS_PASSWORD", "p@ss:word");
            jail.set_env("REDIS_DB", "3");
            jail.set_env("DATABASE_STRATEGY", "database_first");
            jail.set_env("CACHE_API_KEY_TTL", "120");
            jail.set_env("DATABASE_SYNC_INTERVAL", "5000");
            jail.set_env("PORT", "9000");
            let config = load_in(jail).expect("valid");
            assert_eq!(config.port, 9000);
            assert_eq!(config.strategy, Strategy::DatabaseFirst);
            assert_eq!(config.postgres.host.as_deref(), Some("db.internal"));
            assert_eq!(
                config.postgres.password.as_ref().map(Secret::expose),
                Some("12345")
            );
            assert_eq!(
                config.redis.connection_url().as_deref(),
                Some("redis://:p%40ss%3Aword@cache.internal:6379/3")
            );
            assert_eq!(config.sync.interval, Duration::from_millis(5000));
            let api_keys = config.collections.get("api_keys").expect("declared");
            assert_eq!(api_keys.cache_ttl, Some(Duration::from_secs(120)));
            assert_eq!(api_keys.unique_indexes, vec!["key_hash".to_owned()]);
            Ok(())
        });
    }

    #[test]
    fn files_and_prefixed_variables_layer_in_order() {
        Jail::expect_with(|jail| {
            jail.create_dir("config")?;
            jail.create_file(
                "config/default.toml",
                "port = 7000\n[redis]\nkey_prefix = \"file\"\n[collections.extra]\nunique_indexes = [\"code\"]\n",
            )?;
            jail.create_file("config/staging.toml", "port = 7001\n")?;
            jail.set_env("HYBRIDSTORE_ENV", "staging");
            jail.set_env("HYBRIDSTORE_REDIS__KEY_PREFIX", "env");
            jail.set_env("ADMIN_TOKEN", "0123456789abcdef0123");
            jail.set_env("DATABASE_URL", "postgres://u:p@localhost/db");
            jail.set_env("REDIS_URL", "redis://localhost:6379");
            let config = load_in(jail).expect("valid");
            assert_eq!(config.port, 7001, "env profile file wins over default file");
            assert_eq!(
                config.redis.key_prefix, "env",
                "environment wins over files"
            );
            assert!(config.collections.contains_key("extra"));
            assert!(
                config.collections.contains_key("api_keys"),
                "built-in collections stay"
            );
            Ok(())
        });
    }

    fn error_of(vars: &[(&str, &str)]) -> String {
        let mut message = String::new();
        Jail::expect_with(|jail| {
            jail.set_env("ADMIN_TOKEN", "0123456789abcdef0123");
            jail.set_env("DATABASE_URL", "postgres://u:p@localhost/db");
            jail.set_env("REDIS_URL", "redis://localhost:6379");
            for (key, value) in vars {
                jail.set_env(key, value);
            }
            message = match load_in(jail) {
                Ok(_) => panic!("accepted: {vars:?}"),
                Err(err) => err.to_string(),
            };
            Ok(())
        });
        message
    }

    #[test]
    fn errors_name_the_key() {
        assert!(error_of(&[("PORT", "eighty")]).contains("PORT"));
        assert!(error_of(&[("DATABASE_STRATEGY", "fastest")]).contains("DATABASE_STRATEGY"));
        assert!(error_of(&[("ADMIN_TOKEN", "short")]).contains("ADMIN_TOKEN"));
        let placeholder = error_of(&[("ADMIN_TOKEN", "change-me-to-a-long-random-admin-token")]);
        assert!(placeholder.contains("placeholder"), "{placeholder}");
        assert!(error_of(&[("HYBRIDSTORE_REDIS__KEY_PREFX", "x")]).contains("key_prefx"));
        assert!(error_of(&[("DATABASE_URL", "mysql://x")]).contains("DATABASE_URL"));
        let schema = error_of(&[(
            "HYBRIDSTORE_COLLECTIONS__USERS__SCHEMA",
            "{type=\"nonsense\"}",
        )]);
        assert!(schema.contains("collections.users.schema"), "{schema}");
        let name = error_of(&[("HYBRIDSTORE_COLLECTIONS__BAD-NAME__CACHE_TTL_SECS", "5")]);
        assert!(name.contains("collections.bad-name"), "{name}");
        let scope = error_of(&[(
            "HYBRIDSTORE_TOKENS",
            "[{name=\"a\", token=\"abcdefghijklmnopq\", scopes=[\"root\"]}]",
        )]);
        assert!(scope.contains("tokens[0].scopes"), "{scope}");
        let typo = error_of(&[(
            "HYBRIDSTORE_TOKENS",
            "[{name=\"relay\", token=\"abcdefghijklmnopq\", scopes=[\"write:apikeys\"]}]",
        )]);
        assert!(
            typo.contains("tokens[0].scopes") && typo.contains("relay") && typo.contains("apikeys"),
            "{typo}"
        );
        let layer = error_of(&[("HYBRIDSTORE_ENV", "prodd")]);
        assert!(
            layer.contains("HYBRIDSTORE_ENV") && layer.contains("config/prodd.toml"),
            "{layer}"
        );
        let tokens = error_of(&[("TOKENS_FILE", "no-such-tokens.toml")]);
        assert!(tokens.contains("TOKENS_FILE"), "{tokens}");
    }

    #[test]
    fn a_tokens_file_adds_its_tokens_to_the_config_files() {
        Jail::expect_with(|jail| {
            jail.create_dir("config")?;
            jail.create_file(
                "config/default.toml",
                "[[tokens]]\nname = \"reader\"\ntoken = \"reader-0123456789abc\"\nscopes = [\"read:*\"]\n",
            )?;
            jail.create_file(
                "tokens.toml",
                "[[tokens]]\nname = \"relay\"\ntoken = \"relay-0123456789abcd\"\nscopes = [\"read:api_keys\", \"write:api_keys\", \"counters\"]\n",
            )?;
            jail.set_env("TOKENS_FILE", "tokens.toml");
            let config = load_in(jail).expect("valid");
            let names: Vec<&str> = config.tokens.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(names, ["reader", "relay"]);
            // The compose deployment's file, as shipped: no tokens yet.
            jail.create_file("shipped.toml", include_str!("../../../deploy/tokens.toml"))?;
            jail.set_env("TOKENS_FILE", "shipped.toml");
            let config = load_in(jail).expect("the shipped tokens file loads");
            assert_eq!(config.tokens.len(), 1, "the config file's reader only");
            Ok(())
        });
    }

    #[test]
    fn no_servers_named_is_embedded_mode_and_one_alone_is_explained() {
        Jail::expect_with(|jail| {
            let config = load_in(jail).expect("embedded needs nothing");
            assert_eq!(config.mode(), Mode::Embedded);
            assert_eq!(config.counters_strategy(), Strategy::DualWrite);
            assert!(config.admin_token.is_none(), "made at start");
            jail.set_env("ADMIN_TOKEN", "0123456789abcdef0123");
            jail.set_env("REDIS_URL", "redis://localhost:6379");
            let message = load_in(jail).expect_err("invalid").to_string();
            assert!(message.contains("DATABASE_URL"), "{message}");
            Ok(())
        });
    }

    #[test]
    fn either_tier_can_be_turned_off() {
        Jail::expect_with(|jail| {
            jail.set_env("ADMIN_TOKEN", "0123456789abcdef0123");
            jail.set_env("DATABASE_URL", "postgres://localhost/db");
            jail.set_env("REDIS_ENABLED", "false");
            let config = load_in(jail).expect("PostgreSQL alone");
            assert_eq!(config.mode(), Mode::Production);
            assert!(!config.redis.enabled && !config.cache_only());
            jail.set_env("REDIS_ENABLED", "true");
            let message = load_in(jail).expect_err("no Redis named").to_string();
            assert!(message.contains("REDIS_URL"), "{message}");
            // Redis alone: needs Redis (and then takes the shipped
            // collections, unique indexes and all).
            jail.set_env("POSTGRES_ENABLED", "false");
            let message = load_in(jail).expect_err("no Redis named").to_string();
            assert!(
                message.contains("POSTGRES_ENABLED") && message.contains("REDIS_URL"),
                "{message}"
            );
            jail.set_env("REDIS_URL", "redis://localhost:6379");
            let config = load_in(jail).expect("Redis alone");
            assert_eq!(config.mode(), Mode::Production);
            assert!(config.cache_only());
            assert_eq!(config.counters_strategy(), Strategy::RedisOnly);
            jail.set_env("REDIS_ENABLED", "false");
            let message = load_in(jail).expect_err("no tier at all").to_string();
            assert!(message.contains("POSTGRES_ENABLED"), "{message}");
            Ok(())
        });
    }

    #[test]
    fn backup_intervals_take_units() {
        assert_eq!(parse_interval("90"), Some(90));
        assert_eq!(parse_interval("90m"), Some(5400));
        assert_eq!(parse_interval("6h"), Some(21_600));
        assert_eq!(parse_interval("1d"), Some(86_400));
        assert_eq!(parse_interval("0"), Some(0));
        assert_eq!(parse_interval("6 hours"), None);
        assert!(error_of(&[("BACKUP_INTERVAL", "soon")]).contains("BACKUP_INTERVAL"));
    }

    #[test]
    fn secrets_do_not_show_in_debug() {
        let secret = Secret::new("hunter2hunter2hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
