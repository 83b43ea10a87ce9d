//! Collections and strategies.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{CollectionName, IndexName};

/// Which tier acknowledges a write and which one serves a read (SPEC section 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    DualWrite,
    CacheFirst,
    DatabaseFirst,
    RedisOnly,
    PostgresOnly,
}

impl Strategy {
    pub const ALL: [Strategy; 5] = [
        Strategy::DualWrite,
        Strategy::CacheFirst,
        Strategy::DatabaseFirst,
        Strategy::RedisOnly,
        Strategy::PostgresOnly,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::DualWrite => "dual_write",
            Strategy::CacheFirst => "cache_first",
            Strategy::DatabaseFirst => "database_first",
            Strategy::RedisOnly => "redis_only",
            Strategy::PostgresOnly => "postgres_only",
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A declared collection and its policies, as configured.
#[derive(Clone, Debug, Serialize)]
pub struct CollectionSpec {
    pub name: CollectionName,
    /// How long the cache tier keeps a record after it was written or filled.
    #[serde(rename = "cache_ttl_secs", serialize_with = "secs")]
    pub cache_ttl: Duration,
    /// Default lifetime of a record (`?ttl=` overrides it per write).
    #[serde(rename = "record_ttl_secs", serialize_with = "opt_secs")]
    pub record_ttl: Option<Duration>,
    pub unique_indexes: Vec<IndexName>,
    /// JSON Schema every record's data must satisfy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema: Option<serde_json::Value>,
    /// Overrides the global strategy for this collection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// Only scopes that name this collection reach it: `read:*` and
    /// `write:*` do not (the users of an MCP hub hold password hashes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub private: bool,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

fn opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs()),
        None => s.serialize_none(),
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;

    /// Accepts the config spelling (`dual_write`) and the URL spelling
    /// (`dual-write`) of the admin API.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let normalized = text.trim().replace('-', "_").to_ascii_lowercase();
        Strategy::ALL
            .into_iter()
            .find(|s| s.as_str() == normalized)
            .ok_or_else(|| {
                let names: Vec<&str> = Strategy::ALL.iter().map(|s| s.as_str()).collect();
                format!(
                    "unknown strategy {text:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}
