//! Sync directions and the consistency check's report.

use std::collections::BTreeMap;

use hybridstore_core::Strategy;
use serde::{Deserialize, Serialize};

/// Which way a sync copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SyncDirection {
    RedisToPostgres,
    PostgresToRedis,
}

impl SyncDirection {
    pub fn kind(self) -> &'static str {
        match self {
            SyncDirection::RedisToPostgres => "sync_redis_to_postgres",
            SyncDirection::PostgresToRedis => "sync_postgres_to_redis",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DriftClass {
    MissingInPostgres,
    RedisAhead,
    RedisStale,
    ContentMismatch,
    MissingInRedis,
}

impl DriftClass {
    /// The class as the report's JSON names it.
    pub fn as_str(self) -> &'static str {
        match self {
            DriftClass::MissingInPostgres => "missing_in_postgres",
            DriftClass::RedisAhead => "redis_ahead",
            DriftClass::RedisStale => "redis_stale",
            DriftClass::ContentMismatch => "content_mismatch",
            DriftClass::MissingInRedis => "missing_in_redis",
        }
    }

    /// Whether the class only says the cache is cold.
    pub fn informational(self) -> bool {
        self == DriftClass::MissingInRedis
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClassReport {
    pub count: u64,
    pub repaired: u64,
    pub sample_ids: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CollectionReport {
    pub collection: String,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub strategy: Strategy,
    pub scanned_postgres: u64,
    pub scanned_redis: u64,
    pub differences: BTreeMap<DriftClass, ClassReport>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConsistencyReport {
    /// No difference but cold-cache ones (after repair, if repairing).
    pub consistent: bool,
    pub repair: bool,
    /// The backends compared (`postgres` or `sqlite`; `redis` or
    /// `memory`): the `*_postgres` and `*_redis` names of the classes and
    /// counts stand for the durable tier and the cache.
    pub durable_backend: String,
    pub cache_backend: String,
    pub collections: Vec<CollectionReport>,
}
