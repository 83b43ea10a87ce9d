//! The Redis cache tier.
//!
//! Redis holds copies of records, each tagged with its version. All writes into
//! a record key go through Lua scripts that compare versions, so fills from slow
//! readers, write-throughs from concurrent writers and deletion markers can
//! arrive in any order and the newest always wins. For write-behind, Redis also
//! holds the journal: one stream per shard, appended in the same script that
//! updates the copy (see `lua/`). Connections go through a `ConnectionManager`:
//! one multiplexed connection that reconnects by itself.

mod keys;

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use hybridstore_core::{
    Amount, Backend, Bucket, BucketValues, CacheCounters, CacheEntry, CacheIncrementOutcome,
    CacheJournal, CacheRecords, CacheRecovery, CacheStates, CacheWrite, CacheWriteOutcome,
    CachedState, Change, CollectionName, ControlChannel, ControlState, CopyOutcome,
    CounterIncrement, CounterJournalEntry, CounterScope, CounterValue, FieldName, IdempotencyClaim,
    IdempotencyLedger, IndexEntry, IndexName, JournalAck, JournalEntry, JournalKind,
    JournalPosition, JsonObject, ListPage, ListQuery, MAX_DEAD_LETTERS, Micros, PageBuilder,
    Precondition, Record, RecordId, RecordKey, ReplayBounds, SeedTicket, StoreError, StoreResult,
    Tier, Version, WriteChange, json_size,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{RedisError, Script, ServerErrorKind};
use time::OffsetDateTime;

pub use keys::{KeySpace, SHARDS};

/// The consumer group that replays journals into the durable tier.
const REPLAY_GROUP: &str = "replay";

/// How to reach Redis.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    pub url: String,
    pub key_prefix: String,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// How long a counter bucket stays without use (see
    /// `Bucket::cache_expiry`).
    pub counter_idle: Duration,
    /// Redis holds the counters' truth (a cache-only deployment): a bucket
    /// lives as long as its retention, not `counter_idle`, and increments
    /// are not journaled, since no durable tier will take them.
    pub counters_held: bool,
}

#[derive(Clone)]
pub struct RedisStore {
    /// For the pub/sub connection (the manager's connection cannot subscribe).
    client: redis::Client,
    connect_timeout: Duration,
    conn: ConnectionManager,
    /// The probe's own connection: a ping must not queue behind the
    /// commands of a busy moment on the shared one, or a busy server would
    /// look like a hung one.
    probe_conn: ConnectionManager,
    keys: KeySpace,
    scripts: Scripts,
    counter_idle: Duration,
    counters_held: bool,
}

#[derive(Clone)]
struct Scripts {
    store_if_newer: Script,
    accept_write: Script,
    claim: Script,
    ack: Script,
    unlink_older: Script,
    /// Raises a number kept at a key, never lowers it.
    raise: Script,
    unlink_unless_pinned: Script,
    copy_in: Script,
    counter_increment: Script,
    counter_seed: Script,
    counter_restore: Script,
    idempotency_claim: Script,
    idempotency_store: Script,
}

/// Sorts a driver error into "Redis is unavailable" or an internal error.
fn classify(err: RedisError) -> StoreError {
    if err.is_timeout() {
        // Sent, and no answer in time: a busy server, or a hung one (the
        // probe tells which).
        return StoreError::busy(Tier::Cache, err, true);
    }
    let unavailable = err.is_io_error()
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

/// The replay groups are gone (a Redis that restarted empty): also when the
/// error comes from inside a pipeline, which reports its failures together.
fn is_nogroup(err: &RedisError) -> bool {
    err.code() == Some("NOGROUP") || err.to_string().contains("NOGROUP")
}

fn corrupt(what: String) -> StoreError {
    StoreError::internal(Tier::Cache, what)
}

fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn parse_version(text: &str) -> StoreResult<Version> {
    text.parse()
        .map_err(|err| corrupt(format!("bad cached version {text:?}: {err}")))
}

fn parse_data(bytes: &[u8]) -> StoreResult<JsonObject> {
    serde_json::from_slice(bytes).map_err(|err| corrupt(format!("undecodable cached data: {err}")))
}

const RECORD_FIELDS: [&str; 5] = ["v", "d", "c", "u", "x"];

/// The fields a scan takes: `RECORD_FIELDS`, the pin and the authoritative mark.
const SCAN_FIELDS: [&str; 7] = ["v", "d", "c", "u", "x", "p", "a"];

/// The fields of a record hash, in `SCAN_FIELDS` order.
type RawScanned = (
    Option<String>,
    Option<Vec<u8>>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<String>,
);

/// The fields of a record hash, in `RECORD_FIELDS` order.
type RawEntry = (
    Option<String>,
    Option<Vec<u8>>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

fn decode_entry(key: &RecordKey, raw: RawEntry) -> StoreResult<CacheEntry> {
    let (version, data, created, updated, expires) = raw;
    let Some(version) = version else {
        return Ok(CacheEntry::Miss);
    };
    let version = parse_version(&version)?;
    let Some(data) = data else {
        return Ok(CacheEntry::Deleted(version));
    };
    let missing = |field: &str| corrupt(format!("cached record without {field}"));
    Ok(CacheEntry::Present(Record {
        collection: key.collection.clone(),
        id: key.id.clone(),
        version,
        data: parse_data(&data)?,
        created_at: Micros::new(created.ok_or_else(|| missing("created_at"))?).time(Tier::Cache)?,
        updated_at: Micros::new(updated.ok_or_else(|| missing("updated_at"))?).time(Tier::Cache)?,
        expires_at: expires
            .map(|at| Micros::new(at).time(Tier::Cache))
            .transpose()?,
    }))
}

/// The arguments the copy scripts take after the version: data JSON,
/// created, updated, expires; for a deletion marker (`None`) empty data and
/// `deleted_at` as the update time.
fn copy_args(
    invocation: &mut redis::ScriptInvocation<'_>,
    record: Option<&Record>,
    deleted_at: OffsetDateTime,
) -> StoreResult<()> {
    match record {
        Some(record) => {
            let data = serde_json::to_vec(&record.data)
                .map_err(|err| StoreError::internal(Tier::Cache, err))?;
            let expires = record
                .expires_at
                .map(|at| Micros::of(at).get())
                .map(|x| x.to_string());
            invocation
                .arg(data)
                .arg(Micros::of(record.created_at).get())
                .arg(Micros::of(record.updated_at).get())
                .arg(expires.unwrap_or_default());
        }
        None => {
            invocation
                .arg("")
                .arg("")
                .arg(Micros::of(deleted_at).get())
                .arg("");
        }
    }
    Ok(())
}

/// A bucket's expiry as the scripts take it (ms since the epoch, or '').
/// One step of `SCAN cursor MATCH pattern COUNT count`: the next cursor
/// (0 when done) and the keys of this step.
async fn scan_step(
    conn: &mut ConnectionManager,
    cursor: u64,
    pattern: &str,
    count: usize,
) -> StoreResult<(u64, Vec<String>)> {
    redis::cmd("SCAN")
        .arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await
        .map_err(classify)
}

impl RedisStore {
    /// How many entries these streams hold together (one pipelined round
    /// trip).
    async fn total_length(&self, streams: Vec<String>) -> StoreResult<u64> {
        let mut pipe = redis::pipe();
        for stream in streams {
            pipe.cmd("XLEN").arg(stream);
        }
        let lengths: Vec<u64> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        Ok(lengths.iter().sum())
    }

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
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(classify)?;
        let probe_conn =
            ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(classify)?;
        Ok(Self {
            client,
            connect_timeout: options.connect_timeout,
            conn,
            probe_conn,
            keys: KeySpace::new(options.key_prefix.clone()),
            counter_idle: options.counter_idle,
            counters_held: options.counters_held,
            scripts: Scripts {
                store_if_newer: Script::new(include_str!("lua/store_if_newer.lua")),
                accept_write: Script::new(concat!(
                    include_str!("lua/claims.lua"),
                    include_str!("lua/accept_write.lua")
                )),
                claim: Script::new(concat!(
                    include_str!("lua/claims.lua"),
                    include_str!("lua/claim.lua")
                )),
                ack: Script::new(include_str!("lua/ack.lua")),
                unlink_older: Script::new(include_str!("lua/unlink_older.lua")),
                raise: Script::new(
                    "if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '0') then \
                     redis.call('SET', KEYS[1], ARGV[1]) end return 0",
                ),
                unlink_unless_pinned: Script::new(include_str!("lua/unlink_unless_pinned.lua")),
                copy_in: Script::new(include_str!("lua/copy_in.lua")),
                counter_increment: Script::new(include_str!("lua/counter_increment.lua")),
                counter_seed: Script::new(include_str!("lua/counter_seed.lua")),
                counter_restore: Script::new(include_str!("lua/counter_restore.lua")),
                idempotency_claim: Script::new(include_str!("lua/idempotency_claim.lua")),
                idempotency_store: Script::new(include_str!("lua/idempotency_store.lua")),
            },
        })
    }

    pub fn keys(&self) -> &KeySpace {
        &self.keys
    }

    /// Where Redis holds the truth (a cache-only deployment), what in its
    /// configuration can lose acknowledged data: a policy that evicts keys,
    /// or no append-only file. (A managed Redis may refuse `CONFIG`: an
    /// error that is not unavailability.)
    pub async fn durability_risks(&self) -> StoreResult<Vec<String>> {
        let settings: std::collections::HashMap<String, String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .arg("appendonly")
            .query_async::<Vec<(String, String)>>(&mut self.probe_conn.clone())
            .await
            .map_err(classify)?
            .into_iter()
            .collect();
        let mut risks = Vec::new();
        if let Some(policy) = settings.get("maxmemory-policy")
            && policy != "noeviction"
        {
            risks.push(format!(
                "maxmemory-policy is {policy}: a key Redis evicts is a record lost (set noeviction)"
            ));
        }
        if settings.get("appendonly").is_some_and(|on| on == "no") {
            risks.push(
                "appendonly is no: a restart loses what came after the last snapshot (set appendonly yes)"
                    .to_owned(),
            );
        }
        Ok(risks)
    }

    /// The first `query.limit` ids of the per-shard sorted sets `set_of`
    /// names, in id order, after the query's cursor and within its prefix.
    async fn ids_in_range(
        &self,
        query: &ListQuery,
        set_of: impl Fn(u64) -> String,
    ) -> StoreResult<Vec<RecordKey>> {
        // One beyond the page: whether more follow.
        let limit = query.limit as usize + 1;
        let prefix = query.prefix.as_deref().unwrap_or("");
        // Lexicographic bounds: after the cursor, within the prefix.
        let min = match &query.after {
            Some(after) if after.as_str() >= prefix => format!("({after}"),
            _ if prefix.is_empty() => "-".to_owned(),
            _ => format!("[{prefix}"),
        };
        let max = match prefix.as_bytes().last() {
            None => "+".to_owned(),
            Some(last) => {
                let mut upper = prefix.as_bytes().to_vec();
                *upper.last_mut().expect("non-empty") = last + 1;
                format!("({}", String::from_utf8(upper).expect("ids are ASCII"))
            }
        };
        let mut pipe = redis::pipe();
        for shard in 0..SHARDS {
            pipe.cmd("ZRANGEBYLEX")
                .arg(set_of(shard))
                .arg(&min)
                .arg(&max)
                .arg("LIMIT")
                .arg(0)
                .arg(limit);
        }
        let per_shard: Vec<Vec<String>> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        let mut ids: Vec<String> = per_shard.into_iter().flatten().collect();
        ids.sort();
        Ok(ids
            .iter()
            .filter_map(|id| RecordId::parse(id).ok())
            .map(|id| RecordKey::new(query.collection.clone(), id))
            .collect())
    }

    /// Removes keys (copies or hints) unless pinned by a pending journal entry.
    /// The calls go out concurrently: the multiplexed connection pipelines them.
    async fn unlink_unpinned(&self, keys: Vec<String>, pinned_too: bool) -> StoreResult<u64> {
        let mut removed = 0;
        for chunk in keys.chunks(500) {
            let calls = chunk.iter().map(|key| {
                let mut conn = self.conn.clone();
                let script = &self.scripts.unlink_unless_pinned;
                async move {
                    script
                        .key(key.as_str())
                        .arg(if pinned_too { "1" } else { "0" })
                        .invoke_async::<i64>(&mut conn)
                        .await
                }
            });
            for gone in futures_util::future::join_all(calls).await {
                removed += gone.map_err(classify)? as u64;
            }
        }
        Ok(removed)
    }

    /// Creates the replay group of every journal stream (idempotent).
    async fn ensure_replay_groups(&self) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let record_streams = JournalKind::ALL
            .iter()
            .flat_map(|kind| self.keys.journals(*kind));
        for stream in record_streams.chain(self.keys.counter_journals()) {
            let created: Result<(), RedisError> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&stream)
                .arg(REPLAY_GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            match created {
                Ok(()) => {}
                Err(err) if err.code() == Some("BUSYGROUP") => {}
                Err(err) => return Err(classify(err)),
            }
        }
        Ok(())
    }

    /// Reads entries of `streams` through the replay group: with `recover`,
    /// first this consumer's unacknowledged ones and those idle longer than
    /// `claim_idle` (a crashed consumer's), then new ones, about `max` in
    /// all. Answers (index into `streams`, entry).
    async fn read_streams(
        &self,
        consumer: &str,
        streams: &[String],
        max: usize,
        recover: Option<Duration>,
    ) -> Result<Vec<(usize, StreamId)>, RedisError> {
        let mut conn = self.conn.clone();
        let mut raw: Vec<(usize, StreamId)> = Vec::new();
        if let Some(claim_idle) = recover {
            // Entries this consumer took but did not acknowledge (a replay
            // that failed half-way), and those a crashed consumer left: one
            // pipelined round trip for every stream.
            let idle = u64::try_from(claim_idle.as_millis()).unwrap_or(u64::MAX);
            let mut pipe = redis::pipe();
            for stream in streams {
                pipe.cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(REPLAY_GROUP)
                    .arg(consumer)
                    .arg("COUNT")
                    .arg(max)
                    .arg("STREAMS")
                    .arg(stream)
                    .arg("0");
                pipe.cmd("XAUTOCLAIM")
                    .arg(stream)
                    .arg(REPLAY_GROUP)
                    .arg(consumer)
                    .arg(idle)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(max);
            }
            let replies: Vec<(Option<StreamReadReply>, StreamAutoClaimReply)> =
                pipe.query_async(&mut conn).await?;
            for (index, (own, claimed)) in replies.into_iter().enumerate() {
                let own = own
                    .into_iter()
                    .flat_map(|reply| reply.keys)
                    .flat_map(|key| key.ids);
                raw.extend(own.map(|id| (index, id)));
                raw.extend(claimed.claimed.into_iter().map(|id| (index, id)));
            }
            raw.truncate(max);
        }
        if raw.len() < max {
            // New entries of every stream in one round trip.
            let per_stream = max.div_ceil(4).max(1);
            let mut pipe = redis::pipe();
            for stream in streams {
                pipe.cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(REPLAY_GROUP)
                    .arg(consumer)
                    .arg("COUNT")
                    .arg(per_stream)
                    .arg("STREAMS")
                    .arg(stream)
                    .arg(">");
            }
            let replies: Vec<Option<StreamReadReply>> = pipe.query_async(&mut conn).await?;
            for (index, reply) in replies.into_iter().enumerate() {
                let ids = reply
                    .into_iter()
                    .flat_map(|reply| reply.keys)
                    .flat_map(|key| key.ids);
                raw.extend(ids.map(|id| (index, id)));
            }
        }
        Ok(raw)
    }
}

#[async_trait]
impl Backend for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> StoreResult<()> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.probe_conn.clone())
            .await
            .map_err(classify)
    }
}

// One file per role the tier plays (declared after the macros above,
// which they use).
mod control;
mod counters;
mod idempotency;
mod journal;
mod records;
mod recovery;
mod states;
