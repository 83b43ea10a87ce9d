//! The engine's settings, as the server parses them from its configuration.

use std::time::Duration;

use hybridstore_core::{Bucket, Granularity, Strategy};
use time::OffsetDateTime;

use crate::breaker::HealthSettings;

/// Limits and timings of the engine.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// The service-wide strategy from the configuration (an operator's switch,
    /// persisted in the stores, takes precedence).
    pub strategy: Strategy,
    /// Largest `data` object, in bytes of JSON.
    pub max_data_bytes: usize,
    /// Most bytes of record data one list page holds (one record always
    /// fits; a full page says where the next one starts).
    pub page_bytes: usize,
    /// How much of the cache stored idempotent responses may take.
    pub replay_bounds: hybridstore_core::ReplayBounds,
    /// How long a cache keeps the marker of a deleted record. It must outlive any
    /// read that started before the delete, so that read cannot fill the old copy.
    pub deleted_marker_ttl: Duration,
    /// How long PostgreSQL keeps deleted rows (the version sequence of a record
    /// continues across a re-create within this window).
    pub tombstone_retention: Duration,
    /// Suggested client back-off when no tier can serve.
    pub retry_after: Duration,
    pub health: HealthSettings,
    pub journal: JournalSettings,
    pub counters: CounterSettings,
    pub sync: SyncSettings,
    /// Which tiers this deployment has (SPEC section 1: either can be
    /// turned off).
    pub tiers: Tiers,
}

/// The tiers of a deployment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Tiers {
    /// A cache in front of a durable tier: every strategy.
    #[default]
    Both,
    /// The durable tier alone (`REDIS_ENABLED=false`): every collection
    /// and the counters are `postgres_only`, whatever is configured or was
    /// switched, and no strategy switch is taken. The cache tier the engine
    /// is given (in-process) holds only stored idempotent responses and
    /// carries control changes within the process; it is not reported.
    DurableOnly,
    /// The cache tier alone (`POSTGRES_ENABLED=false`): every collection
    /// and the counters are `redis_only`, whatever is configured, and no
    /// strategy switch is taken. The cache holds the truth: its copies are
    /// never cleaned up after a restart, its counter buckets are seeded at
    /// zero, never idle out and are never dropped, and nothing is journaled.
    /// The durable tier the engine is given answers that there is none; it
    /// is not reported.
    CacheOnly,
}

impl Tiers {
    /// Whether record copies, journals and counter buckets may use the cache.
    pub fn cache_serves(self) -> bool {
        self != Tiers::DurableOnly
    }

    /// Whether there is a durable tier to write, read, probe and replay to.
    pub fn durable_serves(self) -> bool {
        self != Tiers::CacheOnly
    }

    /// Whether writes and increments may wait in a journal for the durable
    /// tier (both tiers are there).
    pub fn journals(self) -> bool {
        self == Tiers::Both
    }

    /// What a single-tier deployment answers to work that needs two
    /// (strategy switches, sync, consistency checks).
    pub fn alone(self) -> Option<String> {
        let switch = match self {
            Tiers::Both => return None,
            Tiers::DurableOnly => "REDIS_ENABLED=false",
            Tiers::CacheOnly => "POSTGRES_ENABLED=false",
        };
        let forced = self.forced_strategy()?;
        Some(format!(
            "this deployment has one tier ({switch}): every collection is {forced}"
        ))
    }

    /// The one strategy a single-tier deployment follows.
    pub fn forced_strategy(self) -> Option<Strategy> {
        match self {
            Tiers::Both => None,
            Tiers::DurableOnly => Some(Strategy::PostgresOnly),
            Tiers::CacheOnly => Some(Strategy::RedisOnly),
        }
    }
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            strategy: Strategy::DualWrite,
            max_data_bytes: 1024 * 1024,
            page_bytes: 4 * 1024 * 1024,
            replay_bounds: hybridstore_core::ReplayBounds::default(),
            deleted_marker_ttl: Duration::from_secs(60),
            tombstone_retention: Duration::from_secs(3600),
            retry_after: Duration::from_secs(1),
            health: HealthSettings::default(),
            journal: JournalSettings::default(),
            counters: CounterSettings::default(),
            sync: SyncSettings::default(),
            tiers: Tiers::Both,
        }
    }
}

/// Scheduled sync between the tiers (`sync.*`: the relay's
/// `DATABASE_SYNC_ENABLED`, `DATABASE_SYNC_ON_STARTUP`,
/// `DATABASE_SYNC_INTERVAL`).
#[derive(Clone, Debug)]
pub struct SyncSettings {
    /// Whether anything is scheduled at all.
    pub enabled: bool,
    /// Warm the cache from the durable tier once the service has started.
    pub on_startup: bool,
    /// How often one instance runs a repairing consistency check.
    pub interval: Duration,
}

impl Default for SyncSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            on_startup: false,
            interval: Duration::from_secs(3600),
        }
    }
}

/// How the replay loop works.
#[derive(Clone, Debug)]
pub struct JournalSettings {
    /// Size of a replay batch: each poll reads up to a quarter of it from
    /// every journal stream, and one durable-tier transaction applies the
    /// newest change per record of what the poll read.
    pub batch_size: usize,
    /// Entries another instance took but did not acknowledge for this long are
    /// taken over (that instance probably died).
    pub claim_idle: Duration,
    /// Pause between polls while the journal is empty.
    pub idle_interval: Duration,
}

impl Default for JournalSettings {
    fn default() -> Self {
        Self {
            batch_size: 500,
            claim_idle: Duration::from_secs(30),
            idle_interval: Duration::from_millis(100),
        }
    }
}

/// How counters behave.
#[derive(Clone, Debug)]
pub struct CounterSettings {
    /// `cache_first` journals increments in the cache; any other strategy
    /// writes them to the durable tier directly.
    pub strategy: Strategy,
    /// How long a bucket is kept after it ends, per granularity (`total`
    /// forever).
    pub hour_retention: Duration,
    pub day_retention: Duration,
    pub month_retention: Duration,
    /// Most fields one increment may carry.
    pub max_fields: usize,
    /// Most buckets one read may span.
    pub max_buckets_per_read: usize,
    /// How far in the future an increment's `at` may be (clock skew).
    pub max_future: Duration,
}

impl Default for CounterSettings {
    fn default() -> Self {
        Self {
            strategy: Strategy::CacheFirst,
            hour_retention: Duration::from_secs(7 * 86_400),
            day_retention: Duration::from_secs(32 * 86_400),
            month_retention: Duration::from_secs(365 * 86_400),
            max_fields: 32,
            max_buckets_per_read: 1000,
            max_future: Duration::from_secs(300),
        }
    }
}

impl CounterSettings {
    pub(crate) fn retention(&self, granularity: Granularity) -> Option<Duration> {
        match granularity {
            Granularity::Total => None,
            Granularity::Hour => Some(self.hour_retention),
            Granularity::Day => Some(self.day_retention),
            Granularity::Month => Some(self.month_retention),
        }
    }

    /// The bucket of `granularity` holding `at`, with its expiry.
    pub(crate) fn bucket(&self, granularity: Granularity, at: OffsetDateTime) -> Bucket {
        let start = granularity.bucket_start(at);
        let expires_at = granularity
            .bucket_end(start)
            .zip(self.retention(granularity))
            .map(|(end, retention)| end + retention);
        Bucket {
            granularity,
            start,
            expires_at,
        }
    }
}
