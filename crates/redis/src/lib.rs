//! The Redis cache tier.
//!
//! Redis holds copies of records, each tagged with its version. All writes into a
//! record key go through one Lua script that refuses anything not newer than what
//! is there, so fills from slow readers, write-throughs from concurrent writers
//! and deletion markers can arrive in any order and the newest always wins.
//! Connections go through a `ConnectionManager`: one multiplexed connection that
//! reconnects by itself, with per-call timeouts so a hung Redis cannot hang
//! requests.

mod keys;

use std::time::Duration;

use async_trait::async_trait;
use hybridstore_core::{
    CacheEntry, CacheStore, CollectionName, IndexName, Record, RecordId, RecordKey, StoreError,
    StoreResult, Tier, Version,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script, ServerErrorKind};

pub use keys::{KeySpace, SHARDS};

/// How to reach Redis.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    pub url: String,
    pub key_prefix: String,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
}

#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    keys: KeySpace,
    store_if_newer: Script,
}

/// Sorts a driver error into "Redis is unavailable" or an internal error.
fn classify(err: RedisError) -> StoreError {
    let unavailable = err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || matches!(
            err.kind(),
            redis::ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
            )
        );
    if unavailable {
        StoreError::unavailable(Tier::Cache, err)
    } else {
        StoreError::internal(Tier::Cache, err)
    }
}

fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The reply of `HMGET key v d`.
type RawEntry = (Option<String>, Option<Vec<u8>>);

fn decode_entry(raw: RawEntry) -> StoreResult<CacheEntry> {
    let (version, data) = raw;
    let Some(version) = version else {
        return Ok(CacheEntry::Miss);
    };
    let corrupt = |what: String| StoreError::internal(Tier::Cache, what);
    match data {
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(CacheEntry::Present)
            .map_err(|err| corrupt(format!("undecodable cached record: {err}"))),
        None => version
            .parse::<Version>()
            .map(CacheEntry::Deleted)
            .map_err(|err| corrupt(format!("bad cached version {version:?}: {err}"))),
    }
}

impl RedisStore {
    /// Sets up the connection without waiting for it: the service may start
    /// while Redis is down and use it once it is up.
    pub fn new_lazy(options: &RedisOptions) -> StoreResult<Self> {
        let client = redis::Client::open(options.url.as_str())
            .map_err(|err| StoreError::internal(Tier::Cache, err))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.response_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(classify)?;
        Ok(Self {
            conn,
            keys: KeySpace::new(options.key_prefix.clone()),
            store_if_newer: Script::new(include_str!("lua/store_if_newer.lua")),
        })
    }

    pub fn keys(&self) -> &KeySpace {
        &self.keys
    }

    async fn store_version(
        &self,
        key: &RecordKey,
        version: Version,
        payload: &[u8],
        ttl: Duration,
    ) -> StoreResult<bool> {
        let stored: i64 = self
            .store_if_newer
            .key(self.keys.record(key))
            .arg(version.to_padded())
            .arg(payload)
            .arg(ttl_millis(ttl))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        Ok(stored == 1)
    }
}

#[async_trait]
impl CacheStore for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> StoreResult<()> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(classify)
    }

    async fn server_id(&self) -> StoreResult<Option<String>> {
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        Ok(info
            .lines()
            .find_map(|line| line.strip_prefix("run_id:"))
            .map(|id| id.trim().to_owned()))
    }

    async fn invalidate(&self, keys: &[RecordKey]) -> StoreResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        // One UNLINK per key: keys of different shards may live on different
        // cluster nodes.
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("UNLINK").arg(self.keys.record(key)).ignore();
        }
        pipe.query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(classify)
    }

    async fn invalidate_all(&self) -> StoreResult<u64> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}:*", self.keys.prefix());
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(classify)?;
            let copies: Vec<&String> = keys.iter().filter(|key| self.keys.is_copy(key)).collect();
            if !copies.is_empty() {
                let mut pipe = redis::pipe();
                for key in &copies {
                    pipe.cmd("UNLINK").arg(key.as_str()).ignore();
                }
                pipe.query_async::<()>(&mut conn).await.map_err(classify)?;
                removed += copies.len() as u64;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %key.collection, id = %key.id))]
    async fn get(&self, key: &RecordKey) -> StoreResult<CacheEntry> {
        let raw: RawEntry = redis::cmd("HMGET")
            .arg(self.keys.record(key))
            .arg("v")
            .arg("d")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        decode_entry(raw)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(count = keys.len()))]
    async fn get_many(&self, keys: &[RecordKey]) -> StoreResult<Vec<CacheEntry>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("HMGET")
                .arg(self.keys.record(key))
                .arg("v")
                .arg("d");
        }
        let raw: Vec<RawEntry> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        raw.into_iter().map(decode_entry).collect()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %record.collection, id = %record.id, version = %record.version))]
    async fn store(&self, record: &Record, ttl: Duration) -> StoreResult<bool> {
        let payload =
            serde_json::to_vec(record).map_err(|err| StoreError::internal(Tier::Cache, err))?;
        self.store_version(&record.key(), record.version, &payload, ttl)
            .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %key.collection, id = %key.id, %version))]
    async fn store_deleted(
        &self,
        key: &RecordKey,
        version: Version,
        ttl: Duration,
    ) -> StoreResult<bool> {
        self.store_version(key, version, b"", ttl).await
    }

    async fn lookup_hint(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
    ) -> StoreResult<Option<RecordId>> {
        let id: Option<String> = redis::cmd("GET")
            .arg(self.keys.lookup_hint(collection, index, value))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        // A hint that is not a valid id is ignored, as any stale hint would be.
        Ok(id.and_then(|id| RecordId::parse(&id).ok()))
    }

    async fn store_lookup_hint(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
        id: &RecordId,
        ttl: Duration,
    ) -> StoreResult<()> {
        redis::cmd("SET")
            .arg(self.keys.lookup_hint(collection, index, value))
            .arg(id.as_str())
            .arg("PX")
            .arg(ttl_millis(ttl))
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(classify)
    }
}
