//! `GET /admin/database/status`: strategy, collections, tiers, journals.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{LatencySummary, OperationCounts, ReplayStats, TierHealth};
use hybridstore_core::Strategy;
use time::OffsetDateTime;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Overall {
    /// Both tiers serve.
    Healthy,
    /// One tier is out; the other serves what it can.
    Degraded,
    /// Neither tier serves.
    Down,
}

impl Overall {
    pub fn as_str(self) -> &'static str {
        match self {
            Overall::Healthy => "healthy",
            Overall::Degraded => "degraded",
            Overall::Down => "down",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HealthReport {
    pub status: Overall,
    pub tiers: BTreeMap<String, TierHealth>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JournalBacklog {
    pub write_behind: u64,
    pub outage: u64,
    /// Counter increments not yet in the durable tier.
    pub counters: u64,
    /// Journaled writes the durable tier refused, set aside for an operator.
    pub dead_letters: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StrategyStatus {
    /// From the configuration file / environment.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub configured: Strategy,
    /// In force for collections without a strategy of their own.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub service: Strategy,
    /// Set when an operator switched it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switched: Option<Switched>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Switched {
    pub revision: u64,
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub at: OffsetDateTime,
    pub by: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CollectionStatus {
    pub name: String,
    /// The strategy it follows (its own, or the service's).
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub strategy: Strategy,
    /// Whether it declares its own strategy (the service's switch skips it).
    pub own_strategy: bool,
    /// What serves it now: the strategy's name when its plan is in force,
    /// `degraded` when health narrowed it, `unavailable` when nothing can.
    pub effective: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanView>,
    /// Why `effective` differs from `strategy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Why it does not follow the service-wide strategy although it
    /// declares none of its own (held back on `dual_write`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatusReport {
    pub instance_id: String,
    /// The service's version (`CARGO_PKG_VERSION`).
    pub version: String,
    pub uptime_secs: u64,
    pub status: Overall,
    pub strategy: StrategyStatus,
    pub collections: Vec<CollectionStatus>,
    pub tiers: BTreeMap<String, TierHealth>,
    /// `None` when the cache cannot be asked.
    pub journal_backlog: Option<JournalBacklog>,
    pub replay: ReplayStats,
    /// What this instance would refuse to read from the durable tier while
    /// the cache is unreachable.
    pub unreplayed: UnreplayedKeys,
    pub cache_generation: u64,
}

/// Keys this instance journaled (or took to replay) whose version it has not
/// seen reach the durable tier.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UnreplayedKeys {
    pub keys: usize,
    /// Any key may be held: the process started, or remembered too many
    /// keys, since the journals were last seen empty.
    pub unknown: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TierMetrics {
    /// Calls made to serve requests, and how many failed.
    pub calls: u64,
    pub failures: u64,
    /// Calls of the service's own background work (the probes' checks,
    /// replay polling, control sync, jobs); a probe's ping is not a call.
    #[serde(default)]
    pub background_calls: u64,
    pub degradations: u64,
    pub latency: LatencySummary,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MetricsReport {
    pub operations: BTreeMap<String, OperationCounts>,
    pub requests: u64,
    /// Share of operations that failed inside (no tier, internal error).
    pub error_rate: f64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Share of cache-reading lookups the cache answered.
    pub cache_hit_rate: f64,
    pub tiers: BTreeMap<String, TierMetrics>,
    /// Times a tier went from healthy to unavailable.
    pub degradations: u64,
    pub replay: ReplayStats,
}

/// Where a write goes, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum WritePath {
    /// Commit in the durable tier, then store the new version in the cache.
    DurableThenCache,
    /// Commit in the durable tier only.
    DurableOnly,
    /// The cache takes the write and journals it atomically; the journal is
    /// replayed into the durable tier in the background.
    CacheJournaled,
    /// The cache takes the write as the only tier.
    CacheOnly,
}

impl WritePath {
    /// Whether the cache takes the write itself (and so holds the newest
    /// version, ahead of or instead of the durable tier).
    pub fn through_cache(self) -> bool {
        matches!(self, WritePath::CacheJournaled | WritePath::CacheOnly)
    }
}

/// Where a read is served from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReadPath {
    /// The cache; on a miss the durable tier, and the copy read there is filled
    /// into the cache (version-checked).
    CacheThenDurable,
    /// The durable tier only.
    DurableOnly,
    /// The cache only; a miss cannot be answered. Used while the durable tier
    /// is down, for collections whose cache copies are kept current.
    CacheOnly,
    /// The cache is the only tier: a miss means no such record.
    CacheAuthoritative,
}

/// The plan a collection follows now: where writes go and reads come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlanView {
    pub write: WritePath,
    pub read: ReadPath,
}
