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
    Amount, Bucket, BucketValues, CacheEntry, CacheIncrementOutcome, CacheStore, CacheWrite,
    CacheWriteOutcome, CachedState, Change, CollectionName, ControlState, CopyOutcome,
    CounterIncrement, CounterJournalEntry, CounterScope, FieldName, IdempotencyClaim, IndexName,
    JournalAck, JournalEntry, JournalKind, JournalPosition, JsonObject, ListPage, ListQuery,
    MAX_DEAD_LETTERS, PageBuilder, Precondition, Record, RecordId, RecordKey, ReplayBounds,
    StoreError, StoreResult, Tier, Version, WriteChange, json_size,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{RedisError, Script, ServerErrorKind};
use time::OffsetDateTime;

pub use keys::{KeySpace, SHARDS};

/// How long an applied increment id is remembered (a retry comes sooner).
const OP_MARKER_TTL: Duration = Duration::from_secs(2 * 86_400);

/// The consumer group that replays journals into the durable tier.
const REPLAY_GROUP: &str = "replay";

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
}

#[derive(Clone)]
struct Scripts {
    store_if_newer: Script,
    accept_write: Script,
    ack: Script,
    unlink_older: Script,
    /// Raises a number kept at a key, never lowers it.
    raise: Script,
    unlink_unless_pinned: Script,
    copy_in: Script,
    counter_increment: Script,
    counter_seed: Script,
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

fn micros(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000) as i64
}

fn from_micros(value: i64) -> StoreResult<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(value) * 1_000)
        .map_err(|err| corrupt(format!("bad cached timestamp {value}: {err}")))
}

fn parse_version(text: &str) -> StoreResult<Version> {
    text.parse()
        .map_err(|err| corrupt(format!("bad cached version {text:?}: {err}")))
}

fn parse_data(bytes: &[u8]) -> StoreResult<JsonObject> {
    serde_json::from_slice(bytes).map_err(|err| corrupt(format!("undecodable cached data: {err}")))
}

/// The fields a read takes from a record hash (`p`, the pin, is internal).
/// Records a list fetches at once (see `list`).
const LIST_CHUNK: usize = 16;

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

/// A scanned hash as the state it holds (`None`: gone meanwhile).
fn decode_scanned(key: RecordKey, raw: RawScanned) -> StoreResult<Option<CachedState>> {
    let (version, data, created, updated, expires, pin, authoritative) = raw;
    let state = match decode_entry(&key, (version, data, created, updated, expires))? {
        CacheEntry::Miss => return Ok(None),
        CacheEntry::Present(record) => Change::Put(record),
        CacheEntry::Deleted(version) => Change::Delete {
            key,
            version,
            at: from_micros(updated.unwrap_or_default())?,
        },
    };
    Ok(Some(CachedState {
        state,
        pinned: pin.is_some(),
        authoritative: authoritative.is_some(),
    }))
}

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
        created_at: from_micros(created.ok_or_else(|| missing("created_at"))?)?,
        updated_at: from_micros(updated.ok_or_else(|| missing("updated_at"))?)?,
        expires_at: expires.map(from_micros).transpose()?,
    }))
}

fn hmget_entry(pipe: &mut redis::Pipeline, key: String) {
    pipe.cmd("HMGET").arg(key).arg(&RECORD_FIELDS[..]);
}

/// A journal entry as the write script appended it.
fn decode_journal_entry(
    kind: JournalKind,
    stream: &str,
    entry: &StreamId,
) -> StoreResult<JournalEntry> {
    let text = |field: &str| -> StoreResult<String> {
        entry
            .get::<String>(field)
            .ok_or_else(|| corrupt(format!("journal entry {} without {field}", entry.id)))
    };
    let number = |field: &str| -> StoreResult<i64> {
        text(field)?
            .parse()
            .map_err(|err| corrupt(format!("journal entry {}: {field}: {err}", entry.id)))
    };
    let collection =
        CollectionName::parse(&text("collection")?).map_err(|err| corrupt(err.to_string()))?;
    let id = RecordId::parse(&text("id")?).map_err(|err| corrupt(err.to_string()))?;
    let key = RecordKey::new(collection, id);
    let version = parse_version(&text("v")?)?;
    let updated_at = from_micros(number("u")?)?;
    let change = match text("op")?.as_str() {
        "put" => {
            let expires = text("x")?;
            Change::Put(Record {
                collection: key.collection,
                id: key.id,
                version,
                data: parse_data(text("d")?.as_bytes())?,
                created_at: from_micros(number("c")?)?,
                updated_at,
                expires_at: match expires.as_str() {
                    "" => None,
                    micros => Some(from_micros(
                        micros.parse().map_err(|_| corrupt("bad expiry".into()))?,
                    )?),
                },
            })
        }
        "delete" => Change::Delete {
            key,
            version,
            at: updated_at,
        },
        other => {
            return Err(corrupt(format!(
                "journal entry {}: unknown op {other:?}",
                entry.id
            )));
        }
    };
    Ok(JournalEntry {
        kind,
        position: JournalPosition {
            stream: stream.to_owned(),
            id: entry.id.clone(),
            pinned_key: text("key")?,
        },
        change,
    })
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
            let expires = record.expires_at.map(micros).map(|x| x.to_string());
            invocation
                .arg(data)
                .arg(micros(record.created_at))
                .arg(micros(record.updated_at))
                .arg(expires.unwrap_or_default());
        }
        None => {
            invocation.arg("").arg("").arg(micros(deleted_at)).arg("");
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

fn expiry_arg(bucket: &Bucket) -> String {
    bucket
        .expires_at
        .map(|at| (at.unix_timestamp_nanos() / 1_000_000).to_string())
        .unwrap_or_default()
}

fn amount_from_parts(units: &str, nanos: &str) -> StoreResult<Amount> {
    let units: i128 = units
        .parse()
        .map_err(|_| corrupt(format!("bad counter units {units:?}")))?;
    let nanos: i64 = nanos
        .parse()
        .map_err(|_| corrupt(format!("bad counter nanos {nanos:?}")))?;
    Amount::from_parts(units, nanos).ok_or_else(|| corrupt("counter out of range".into()))
}

/// A bucket hash (`HGETALL`) as its values and whether they are complete.
fn decode_bucket(
    bucket: &Bucket,
    fields: Vec<(String, String)>,
) -> StoreResult<Option<(BucketValues, bool)>> {
    if fields.is_empty() {
        return Ok(None);
    }
    let mut complete = false;
    let mut parts: std::collections::BTreeMap<String, (String, String)> = Default::default();
    for (name, value) in fields {
        if name == "_s" {
            complete = value == "1";
        } else if let Some(field) = name.strip_prefix("u:") {
            parts.entry(field.to_owned()).or_default().0 = value;
        } else if let Some(field) = name.strip_prefix("n:") {
            parts.entry(field.to_owned()).or_default().1 = value;
        }
    }
    let mut values = Vec::with_capacity(parts.len());
    for (field, (units, nanos)) in parts {
        let field = FieldName::parse(&field).map_err(|err| corrupt(err.to_string()))?;
        let units = if units.is_empty() { "0".into() } else { units };
        let nanos = if nanos.is_empty() { "0".into() } else { nanos };
        values.push((field, amount_from_parts(&units, &nanos)?));
    }
    Ok(Some((
        BucketValues {
            bucket: bucket.clone(),
            values,
        },
        complete,
    )))
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
            scripts: Scripts {
                store_if_newer: Script::new(include_str!("lua/store_if_newer.lua")),
                accept_write: Script::new(include_str!("lua/accept_write.lua")),
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
                idempotency_claim: Script::new(include_str!("lua/idempotency_claim.lua")),
                idempotency_store: Script::new(include_str!("lua/idempotency_store.lua")),
            },
        })
    }

    pub fn keys(&self) -> &KeySpace {
        &self.keys
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

    async fn store_copy(
        &self,
        key: &RecordKey,
        version: Version,
        record: Option<&Record>,
        ttl: Duration,
    ) -> StoreResult<bool> {
        let mut invocation = self.scripts.store_if_newer.key(self.keys.record(key));
        invocation.key(self.keys.pinned_of(key));
        invocation.arg(version.to_padded());
        copy_args(&mut invocation, record, OffsetDateTime::now_utc())?;
        let stored: i64 = invocation
            .arg(ttl_millis(ttl))
            .arg(key.id.as_str())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        Ok(stored == 1)
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

    async fn read_journal_once(
        &self,
        consumer: &str,
        max: usize,
        recover: Option<Duration>,
    ) -> Result<Vec<JournalEntry>, RedisError> {
        // Outage writes first: their backlog holds the configured strategy back.
        let (kinds, streams): (Vec<JournalKind>, Vec<String>) =
            [JournalKind::Outage, JournalKind::WriteBehind]
                .into_iter()
                .flat_map(|kind| {
                    self.keys
                        .journals(kind)
                        .into_iter()
                        .map(move |stream| (kind, stream))
                })
                .unzip();
        let raw: Vec<(JournalKind, &String, StreamId)> = self
            .read_streams(consumer, &streams, max, recover)
            .await?
            .into_iter()
            .map(|(index, id)| (kinds[index], &streams[index], id))
            .collect();
        let mut entries = Vec::with_capacity(raw.len());
        for (kind, stream, id) in &raw {
            match decode_journal_entry(*kind, stream, id) {
                Ok(entry) => entries.push(entry),
                Err(err) => {
                    // Never drop an entry silently; it stays pending and shows
                    // in the backlog.
                    tracing::error!(error = %err, stream, id = %id.id, "undecodable journal entry left in place");
                }
            }
        }
        Ok(entries)
    }
}

#[async_trait]
impl CacheStore for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> StoreResult<()> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.probe_conn.clone())
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
        let keys: Vec<String> = keys.iter().map(|key| self.keys.record(key)).collect();
        self.unlink_unpinned(keys, false).await.map(drop)
    }

    async fn invalidate_all(&self, pinned_too: bool) -> StoreResult<u64> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}:*", self.keys.prefix());
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let (next, keys) = scan_step(&mut conn, cursor, &pattern, 1000).await?;
            let copies: Vec<String> = keys
                .into_iter()
                .filter(|key| self.keys.is_copy(key))
                .collect();
            removed += self.unlink_unpinned(copies, pinned_too).await?;
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    async fn invalidate_older(&self, key: &RecordKey, version: Version) -> StoreResult<bool> {
        let removed: i64 = self
            .scripts
            .unlink_older
            .key(self.keys.record(key))
            .key(self.keys.pinned_of(key))
            .arg(version.to_padded())
            .arg(key.id.as_str())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        Ok(removed == 1)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %key.collection, id = %key.id))]
    async fn get(&self, key: &RecordKey) -> StoreResult<CacheEntry> {
        let raw: RawEntry = redis::cmd("HMGET")
            .arg(self.keys.record(key))
            .arg(&RECORD_FIELDS[..])
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        decode_entry(key, raw)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(count = keys.len()))]
    async fn get_many(&self, keys: &[RecordKey]) -> StoreResult<Vec<CacheEntry>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            hmget_entry(&mut pipe, self.keys.record(key));
        }
        let raw: Vec<RawEntry> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        keys.iter()
            .zip(raw)
            .map(|(key, raw)| decode_entry(key, raw))
            .collect()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %record.collection, id = %record.id, version = %record.version))]
    async fn store(&self, record: &Record, ttl: Duration) -> StoreResult<bool> {
        self.store_copy(&record.key(), record.version, Some(record), ttl)
            .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %key.collection, id = %key.id, %version))]
    async fn store_deleted(
        &self,
        key: &RecordKey,
        version: Version,
        ttl: Duration,
    ) -> StoreResult<bool> {
        self.store_copy(key, version, None, ttl).await
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

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %write.key.collection, id = %write.key.id))]
    async fn accept_write(&self, write: &CacheWrite) -> StoreResult<CacheWriteOutcome> {
        let (op, data, expires) = match &write.change {
            WriteChange::Put { data, expires_at } => (
                "put",
                serde_json::to_string(data)
                    .map_err(|err| StoreError::internal(Tier::Cache, err))?,
                expires_at
                    .map(micros)
                    .map(|x| x.to_string())
                    .unwrap_or_default(),
            ),
            WriteChange::Delete => ("delete", String::new(), String::new()),
        };
        let (precondition, expected) = match write.precondition {
            Precondition::None => ("none", String::new()),
            Precondition::IfMatch(version) => ("match", version.to_padded()),
            Precondition::Exists => ("exists", String::new()),
            Precondition::Absent => ("absent", String::new()),
        };
        let (mode, second) = match write.journal {
            Some(kind) => ("journal", self.keys.journal_of(&write.key, kind)),
            None => ("only", self.keys.ids_of(&write.key)),
        };
        let reply: Vec<String> = self
            .scripts
            .accept_write
            .key(self.keys.record(&write.key))
            .key(second)
            .key(self.keys.pinned_of(&write.key))
            .arg(op)
            .arg(Version::next(None, write.now).to_padded())
            .arg(precondition)
            .arg(expected)
            .arg(data)
            .arg(micros(write.now))
            .arg(expires)
            .arg(if write.unknown_state_ok { "1" } else { "0" })
            .arg(write.key.collection.as_str())
            .arg(write.key.id.as_str())
            .arg(mode)
            .arg(ttl_millis(write.deleted_marker_ttl))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        let field = |i: usize| reply.get(i).map(String::as_str).unwrap_or("");
        match field(0) {
            "ok" => Ok(CacheWriteOutcome::Written {
                version: parse_version(field(1))?,
                created: field(2) == "1",
                created_at: from_micros(
                    field(3)
                        .parse()
                        .map_err(|_| corrupt("bad created_at".into()))?,
                )?,
            }),
            "unknown" => Ok(CacheWriteOutcome::UnknownState),
            "conflict" => Ok(CacheWriteOutcome::Conflict {
                current: match field(1) {
                    "" => None,
                    version => Some(parse_version(version)?),
                },
            }),
            "notfound" => Ok(CacheWriteOutcome::NotFound),
            other => Err(corrupt(format!(
                "unexpected reply from the write script: {other:?}"
            ))),
        }
    }

    async fn read_journal(
        &self,
        consumer: &str,
        max: usize,
        recover: Option<Duration>,
    ) -> StoreResult<Vec<JournalEntry>> {
        match self.read_journal_once(consumer, max, recover).await {
            // The groups vanish with a Redis that restarted empty: recreate.
            Err(err) if is_nogroup(&err) => {
                self.ensure_replay_groups().await?;
                self.read_journal_once(consumer, max, recover)
                    .await
                    .map_err(classify)
            }
            result => result.map_err(classify),
        }
    }

    async fn ack_journal(&self, acks: &[JournalAck]) -> StoreResult<()> {
        // One script call per entry (unpin, XACK, XDEL in one step), all
        // sent at once: the multiplexed connection pipelines them.
        for chunk in acks.chunks(1000) {
            let calls = chunk.iter().map(|ack| {
                let mut conn = self.conn.clone();
                let mut invocation = self.scripts.ack.key(&ack.position.pinned_key);
                invocation
                    .key(self.keys.pinned_of(&ack.key))
                    .key(&ack.position.stream)
                    .arg(ack.version.to_padded())
                    .arg(ttl_millis(ack.ttl))
                    .arg(if ack.superseded { "1" } else { "0" })
                    .arg(ack.key.id.as_str())
                    .arg(REPLAY_GROUP)
                    .arg(&ack.position.id);
                async move { invocation.invoke_async::<i64>(&mut conn).await }
            });
            for acked in futures_util::future::join_all(calls).await {
                acked.map_err(classify)?;
            }
        }
        Ok(())
    }

    async fn set_aside(&self, refused: &[(JournalEntry, String)]) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        for (entry, reason) in refused {
            let key = entry.change.key();
            let (op, data) = match &entry.change {
                Change::Put(record) => (
                    "put",
                    serde_json::to_string(&record.data)
                        .map_err(|err| StoreError::internal(Tier::Cache, err))?,
                ),
                Change::Delete { .. } => ("delete", String::new()),
            };
            // Kept first, dropped from the journal after: a failure in
            // between sets it aside twice rather than losing it.
            redis::cmd("XADD")
                .arg(self.keys.dead_letters_of(&key))
                .arg("MAXLEN")
                .arg("~")
                .arg(MAX_DEAD_LETTERS)
                .arg("*")
                .arg(&[
                    ("collection", key.collection.as_str()),
                    ("id", key.id.as_str()),
                    ("op", op),
                    ("v", &entry.change.version().to_padded()),
                    ("d", &data),
                    ("reason", reason),
                    ("journal", &entry.position.stream),
                ])
                .query_async::<()>(&mut conn)
                .await
                .map_err(classify)?;
            self.ack_journal(&[JournalAck::set_aside(entry)]).await?;
        }
        Ok(())
    }

    async fn reconciled_generation(&self) -> StoreResult<u64> {
        let generation: Option<u64> = redis::cmd("GET")
            .arg(self.keys.reconciled_generation())
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        Ok(generation.unwrap_or(0))
    }

    async fn set_reconciled_generation(&self, generation: u64) -> StoreResult<()> {
        self.scripts
            .raise
            .key(self.keys.reconciled_generation())
            .arg(generation)
            .invoke_async::<()>(&mut self.conn.clone())
            .await
            .map_err(classify)
    }

    async fn dead_letters(&self) -> StoreResult<u64> {
        let mut pipe = redis::pipe();
        for stream in self.keys.all_dead_letters() {
            pipe.cmd("XLEN").arg(stream);
        }
        let lengths: Vec<u64> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        Ok(lengths.iter().sum())
    }

    async fn list(&self, query: &ListQuery) -> StoreResult<ListPage> {
        let keys = self
            .ids_in_range(query, |shard| self.keys.ids(shard, &query.collection))
            .await?;
        let mut page = PageBuilder::new(query);
        // Fetched a few at a time: a page of large records stops at its
        // byte bound, not after `limit` of them were read. Ids of expired
        // records linger in the sets; they are skipped here.
        'fetch: for chunk in keys.chunks(LIST_CHUNK) {
            for entry in self.get_many(chunk).await? {
                if let CacheEntry::Present(record) = entry
                    && !record.is_expired(query.now)
                {
                    let size = json_size(&record.data);
                    if !page.offer(record, size) {
                        break 'fetch;
                    }
                }
            }
        }
        Ok(page.finish())
    }

    async fn pinned(&self, query: &ListQuery) -> StoreResult<Vec<Change>> {
        let keys = self
            .ids_in_range(query, |shard| self.keys.pinned(shard, &query.collection))
            .await?;
        let mut pinned: Vec<Change> = self
            .get_states(&keys)
            .await?
            .into_iter()
            .flatten()
            .filter(|held| held.pinned)
            .map(|held| held.state)
            .collect();
        pinned.truncate(query.limit as usize);
        Ok(pinned)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%collection, cursor))]
    async fn scan(
        &self,
        collection: &CollectionName,
        cursor: u64,
        count: usize,
    ) -> StoreResult<(u64, Vec<CachedState>)> {
        let mut conn = self.conn.clone();
        let pattern = self.keys.record_pattern(collection);
        let (next, keys) = scan_step(&mut conn, cursor, &pattern, count).await?;
        let record_keys: Vec<RecordKey> = keys
            .iter()
            .filter_map(|key| self.keys.record_id(key, collection))
            .filter_map(|id| RecordId::parse(id).ok())
            .map(|id| RecordKey::new(collection.clone(), id))
            .collect();
        if record_keys.is_empty() {
            return Ok((next, Vec::new()));
        }
        let mut pipe = redis::pipe();
        for key in &record_keys {
            pipe.cmd("HMGET")
                .arg(self.keys.record(key))
                .arg(&SCAN_FIELDS[..]);
        }
        let raw: Vec<RawScanned> = pipe.query_async(&mut conn).await.map_err(classify)?;
        let mut states = Vec::with_capacity(raw.len());
        for (key, raw) in record_keys.into_iter().zip(raw) {
            if let Some(state) = decode_scanned(key, raw)? {
                states.push(state);
            }
        }
        Ok((next, states))
    }

    async fn get_states(&self, keys: &[RecordKey]) -> StoreResult<Vec<Option<CachedState>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("HMGET")
                .arg(self.keys.record(key))
                .arg(&SCAN_FIELDS[..]);
        }
        let raw: Vec<RawScanned> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        keys.iter()
            .zip(raw)
            .map(|(key, raw)| decode_scanned(key.clone(), raw))
            .collect()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(version = %state.version()))]
    async fn copy_in(
        &self,
        state: &Change,
        lifetime: Duration,
        authoritative: bool,
        force: bool,
    ) -> StoreResult<CopyOutcome> {
        let key = state.key();
        let mut invocation = self.scripts.copy_in.key(self.keys.record(&key));
        invocation
            .key(self.keys.ids_of(&key))
            .arg(state.version().to_padded());
        match state {
            Change::Put(record) => copy_args(&mut invocation, Some(record), record.updated_at)?,
            Change::Delete { at, .. } => copy_args(&mut invocation, None, *at)?,
        }
        let outcome: String = invocation
            .arg(ttl_millis(lifetime))
            .arg(if authoritative { "1" } else { "0" })
            .arg(if force { "1" } else { "0" })
            .arg(key.id.as_str())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        match outcome.as_str() {
            "written" => Ok(CopyOutcome::Written),
            "kept" => Ok(CopyOutcome::Kept),
            "pinned" => Ok(CopyOutcome::Pinned),
            other => Err(corrupt(format!("copy_in answered {other:?}"))),
        }
    }

    async fn load_control(&self) -> StoreResult<Option<ControlState>> {
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.keys.control())
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        raw.map(|bytes| {
            serde_json::from_slice(&bytes)
                .map_err(|err| corrupt(format!("undecodable control state: {err}")))
        })
        .transpose()
    }

    async fn publish_control(&self, state: &ControlState) -> StoreResult<()> {
        let payload =
            serde_json::to_vec(state).map_err(|err| StoreError::internal(Tier::Cache, err))?;
        // The mirror only moves forward; the broadcast goes out either way
        // (receivers ignore revisions they have).
        if self
            .load_control()
            .await?
            .is_none_or(|held| held.revision < state.revision)
        {
            redis::cmd("SET")
                .arg(self.keys.control())
                .arg(&payload)
                .query_async::<()>(&mut self.conn.clone())
                .await
                .map_err(classify)?;
        }
        redis::cmd("PUBLISH")
            .arg(self.keys.control_channel())
            .arg(&payload)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(classify)
    }

    async fn subscribe_control(&self) -> StoreResult<BoxStream<'static, ControlState>> {
        let connect = self.client.get_async_pubsub();
        let mut pubsub = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| StoreError::unavailable(Tier::Cache, "pub/sub connect timed out"))?
            .map_err(classify)?;
        pubsub
            .subscribe(self.keys.control_channel())
            .await
            .map_err(classify)?;
        let states = pubsub.into_on_message().filter_map(|message| async move {
            match serde_json::from_slice(message.get_payload_bytes()) {
                Ok(state) => Some(state),
                Err(err) => {
                    tracing::warn!(error = %err, "ignored an undecodable control message");
                    None
                }
            }
        });
        Ok(states.boxed())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(scope = %increment.scope))]
    async fn increment(&self, increment: &CounterIncrement) -> StoreResult<CacheIncrementOutcome> {
        let payload = serde_json::to_string(increment)
            .map_err(|err| StoreError::internal(Tier::Cache, err))?;
        let mut invocation = self.scripts.counter_increment.prepare_invoke();
        for bucket in &increment.buckets {
            invocation.key(self.keys.counter_bucket(&increment.scope, bucket));
        }
        invocation
            .key(self.keys.counter_journal_of(&increment.scope))
            .key(self.keys.counter_op(&increment.scope, &increment.op_id))
            .arg(increment.buckets.len())
            .arg(payload)
            .arg(increment.deltas.len());
        for (field, delta) in &increment.deltas {
            let (units, nanos) = delta.split();
            invocation
                .arg(field.as_str())
                .arg(units.to_string())
                .arg(nanos);
        }
        for bucket in &increment.buckets {
            invocation.arg(expiry_arg(bucket));
        }
        invocation.arg(ttl_millis(OP_MARKER_TTL));
        let reply: Vec<redis::Value> = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        let text = |value: &redis::Value| -> StoreResult<String> {
            redis::from_redis_value_ref(value).map_err(|err| corrupt(err.to_string()))
        };
        let mut reply = reply.iter();
        match reply.next().map(text).transpose()?.as_deref() {
            Some("dup") => Ok(CacheIncrementOutcome::Duplicate),
            Some("range") => Err(StoreError::CounterOutOfRange {
                field: reply.next().map(text).transpose()?.unwrap_or_default(),
            }),
            Some("cold") => {
                let mut cold = Vec::new();
                for index in reply {
                    let index: usize = redis::from_redis_value_ref(index)
                        .map_err(|err| corrupt(err.to_string()))?;
                    cold.push(increment.buckets[index - 1].clone());
                }
                Ok(CacheIncrementOutcome::Cold(cold))
            }
            Some("ok") => {
                let mut applied = Vec::with_capacity(increment.buckets.len());
                for bucket in &increment.buckets {
                    let complete = reply.next().map(text).transpose()?.as_deref() == Some("1");
                    let mut values = Vec::with_capacity(increment.deltas.len());
                    for (field, _) in &increment.deltas {
                        let units = reply.next().map(text).transpose()?.unwrap_or_default();
                        let nanos = reply.next().map(text).transpose()?.unwrap_or_default();
                        values.push((field.clone(), amount_from_parts(&units, &nanos)?));
                    }
                    applied.push((
                        BucketValues {
                            bucket: bucket.clone(),
                            values,
                        },
                        complete,
                    ));
                }
                Ok(CacheIncrementOutcome::Applied(applied))
            }
            other => Err(corrupt(format!("counter_increment answered {other:?}"))),
        }
    }

    async fn seed_buckets(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
        values: &[BucketValues],
        complete: bool,
    ) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        for bucket in buckets {
            let mut invocation = self
                .scripts
                .counter_seed
                .key(self.keys.counter_bucket(scope, bucket));
            invocation
                .arg(if complete { "1" } else { "0" })
                .arg(expiry_arg(bucket));
            let held = values.iter().find(|v| {
                v.bucket.granularity == bucket.granularity && v.bucket.start == bucket.start
            });
            for (field, amount) in held.into_iter().flat_map(|v| &v.values) {
                let (units, nanos) = amount.split();
                invocation
                    .arg(field.as_str())
                    .arg(units.to_string())
                    .arg(nanos);
            }
            let _: i64 = invocation.invoke_async(&mut conn).await.map_err(classify)?;
        }
        Ok(())
    }

    async fn counter_buckets(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
    ) -> StoreResult<Vec<Option<(BucketValues, bool)>>> {
        if buckets.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for bucket in buckets {
            pipe.cmd("HGETALL")
                .arg(self.keys.counter_bucket(scope, bucket));
        }
        let hashes: Vec<Vec<(String, String)>> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        buckets
            .iter()
            .zip(hashes)
            .map(|(bucket, fields)| decode_bucket(bucket, fields))
            .collect()
    }

    async fn read_counter_journal(
        &self,
        consumer: &str,
        max: usize,
        recover: Option<Duration>,
    ) -> StoreResult<Vec<CounterJournalEntry>> {
        let streams = self.keys.counter_journals();
        let raw = match self.read_streams(consumer, &streams, max, recover).await {
            Err(err) if is_nogroup(&err) => {
                self.ensure_replay_groups().await?;
                self.read_streams(consumer, &streams, max, recover).await
            }
            result => result,
        }
        .map_err(classify)?;
        let mut entries = Vec::with_capacity(raw.len());
        for (index, id) in raw {
            let decoded = id
                .get::<String>("p")
                .ok_or_else(|| "no payload".to_owned())
                .and_then(|payload| {
                    serde_json::from_str::<CounterIncrement>(&payload).map_err(|e| e.to_string())
                });
            match decoded {
                Ok(increment) => entries.push(CounterJournalEntry {
                    position: JournalPosition {
                        stream: streams[index].clone(),
                        id: id.id.clone(),
                        pinned_key: String::new(),
                    },
                    increment,
                }),
                Err(err) => {
                    tracing::error!(error = %err, stream = %streams[index], id = %id.id, "undecodable counter journal entry left in place");
                }
            }
        }
        Ok(entries)
    }

    async fn ack_counter_journal(&self, positions: &[JournalPosition]) -> StoreResult<()> {
        if positions.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for position in positions {
            pipe.cmd("XACK")
                .arg(&position.stream)
                .arg(REPLAY_GROUP)
                .arg(&position.id)
                .ignore()
                .cmd("XDEL")
                .arg(&position.stream)
                .arg(&position.id)
                .ignore();
        }
        pipe.query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(classify)
    }

    async fn counter_backlog(&self) -> StoreResult<u64> {
        let mut pipe = redis::pipe();
        for stream in self.keys.counter_journals() {
            pipe.cmd("XLEN").arg(stream);
        }
        let lengths: Vec<u64> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        Ok(lengths.iter().sum())
    }

    async fn pending_increments(
        &self,
        scope: &CounterScope,
        limit: usize,
    ) -> StoreResult<Option<Vec<CounterIncrement>>> {
        let stream = self.keys.counter_journal_of(scope);
        let mut conn = self.conn.clone();
        let length: usize = redis::cmd("XLEN")
            .arg(&stream)
            .query_async(&mut conn)
            .await
            .map_err(classify)?;
        if length > limit {
            return Ok(None);
        }
        let entries: Vec<StreamId> = {
            let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(&stream)
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await
                .map_err(classify)?;
            reply.ids
        };
        let mut pending = Vec::new();
        for entry in entries {
            let Some(payload) = entry.get::<String>("p") else {
                continue;
            };
            match serde_json::from_str::<CounterIncrement>(&payload) {
                Ok(increment) if &increment.scope == scope => pending.push(increment),
                Ok(_) => {}
                Err(err) => {
                    return Err(corrupt(format!(
                        "counter journal entry {}: {err}",
                        entry.id
                    )));
                }
            }
        }
        Ok(Some(pending))
    }

    async fn forget_buckets(&self, scope: &CounterScope, buckets: &[Bucket]) -> StoreResult<()> {
        if buckets.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = buckets
            .iter()
            .map(|bucket| self.keys.counter_bucket(scope, bucket))
            .collect();
        redis::cmd("UNLINK")
            .arg(keys)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(classify)
    }

    async fn forget_counters(&self) -> StoreResult<u64> {
        let mut conn = self.conn.clone();
        let pattern = self.keys.counter_pattern();
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let (next, keys) = scan_step(&mut conn, cursor, &pattern, 1000).await?;
            if !keys.is_empty() {
                removed += keys.len() as u64;
                redis::cmd("UNLINK")
                    .arg(keys)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(classify)?;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    async fn claim_idempotency(
        &self,
        owner: &str,
        key: &str,
        fingerprint: &str,
        pending_ttl: Duration,
    ) -> StoreResult<IdempotencyClaim> {
        let reply: Vec<Vec<u8>> = self
            .scripts
            .idempotency_claim
            .key(self.keys.idempotency(owner, key))
            .arg(fingerprint)
            .arg(ttl_millis(pending_ttl))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        let mut reply = reply.into_iter();
        match reply.next().as_deref() {
            Some(b"claimed") => Ok(IdempotencyClaim::Claimed),
            Some(b"done") => Ok(IdempotencyClaim::Done(reply.next().unwrap_or_default())),
            Some(b"pending") => Ok(IdempotencyClaim::InProgress),
            Some(b"mismatch") => Ok(IdempotencyClaim::Mismatch),
            _ => Err(corrupt("idempotency_claim answered nothing known".into())),
        }
    }

    async fn complete_idempotency(
        &self,
        owner: &str,
        key: &str,
        fingerprint: &str,
        response: &[u8],
        ttl: Duration,
        bounds: ReplayBounds,
    ) -> StoreResult<bool> {
        let (ledger, sizes) = self.keys.replay_ledger(owner);
        let (all_ledger, all_sizes) = self.keys.replay_ledger_all();
        let now = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        let stored: i64 = self
            .scripts
            .idempotency_store
            .key(self.keys.idempotency(owner, key))
            .key(ledger)
            .key(sizes)
            .key(all_ledger)
            .key(all_sizes)
            .arg(fingerprint)
            .arg(response)
            .arg(ttl_millis(ttl))
            .arg(now as i64)
            .arg(bounds.caller_responses)
            .arg(bounds.caller_bytes)
            .arg(bounds.total_responses)
            .arg(bounds.total_bytes)
            .arg(key)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        Ok(stored == 1)
    }

    async fn release_idempotency(&self, owner: &str, key: &str) -> StoreResult<()> {
        redis::cmd("DEL")
            .arg(self.keys.idempotency(owner, key))
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(classify)
    }

    async fn journal_backlog(&self, kind: JournalKind) -> StoreResult<u64> {
        let mut pipe = redis::pipe();
        for stream in self.keys.journals(kind) {
            pipe.cmd("XLEN").arg(stream);
        }
        let lengths: Vec<u64> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        Ok(lengths.iter().sum())
    }
}
