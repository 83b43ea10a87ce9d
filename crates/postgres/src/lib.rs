//! The PostgreSQL durable tier: the source of truth.
//!
//! Every write is one statement, or one transaction when the collection has unique
//! indexes, so a record and its index entries change together or not at all.
//! Versions are assigned inside the statement (`GREATEST(version + 1, clock)`) so
//! concurrent writers of one record are serialised by its row lock and each gets a
//! distinct, larger version. Preconditions are part of the statement's `WHERE`
//! clause, never a separate read, so there is no window between check and write.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap, HashSet};

use hybridstore_core::{
    Amount, ApplyMode, Bucket, BucketValues, Change, CollectionName, ControlState,
    CounterIncrement, CounterScope, CounterValue, DurableStore, FieldName, Granularity, IndexEntry,
    IndexName, JsonObject, ListPage, ListQuery, MAX_TOTAL_UNITS, PageBuilder, Precondition, Record,
    RecordId, RecordKey, RecordWrite, StoreError, StoreResult, Tier, Version, WriteOutcome,
    prefix_upper_bound,
};
use sqlx::postgres::{PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{PgExecutor, PgPool, Row};
use time::OffsetDateTime;

pub use sqlx::migrate::Migrator;
pub use sqlx::postgres::PgConnectOptions;

/// The schema, embedded in the binary and applied at start.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// How to reach PostgreSQL.
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    pub connect: PgConnectOptions,
    pub pool_size: u32,
    /// How long a request may wait for a connection (or a new one to open).
    pub acquire_timeout: Duration,
    /// Server-side limit for one statement.
    pub statement_timeout: Duration,
}

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Set once the migrations have been applied by this process: a server
    /// that was down at start gets its schema on the first successful ping.
    migrated: Arc<AtomicBool>,
    /// The probe's own connection, opened on first use and again after a
    /// failure: a ping must not wait for a pooled connection while every
    /// one is at work, or a busy server would look like a dead one.
    probe: Arc<tokio::sync::Mutex<Option<sqlx::PgConnection>>>,
}

impl PostgresStore {
    /// Creates the pool without connecting: the service may start while
    /// PostgreSQL is down and connect when it comes up.
    pub fn new_lazy(options: PostgresOptions) -> Self {
        let timeout_ms = options.statement_timeout.as_millis().to_string();
        let connect = options
            .connect
            .options([("statement_timeout", timeout_ms.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(options.pool_size)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect);
        Self::from_pool(pool)
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            migrated: Arc::new(AtomicBool::new(false)),
            probe: Arc::default(),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies pending migrations (concurrent starts are serialised by the
    /// migrator's advisory lock).
    pub async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.pool).await.map_err(|err| match err {
            sqlx::migrate::MigrateError::Execute(err) => classify(err),
            other => StoreError::internal(Tier::Durable, other),
        })?;
        self.migrated.store(true, Ordering::Release);
        Ok(())
    }
}

/// Sorts a driver error into "PostgreSQL is unavailable" (drives degradation) or
/// an internal error.
fn classify(err: sqlx::Error) -> StoreError {
    match &err {
        // No pooled connection came free in time: every connection is at
        // work, the call never left. A busy tier, not a dead one (the
        // probe, on a connection of its own, tells which).
        sqlx::Error::PoolTimedOut => return StoreError::busy(Tier::Durable, err, false),
        // 57014: the statement ran past statement_timeout and was
        // cancelled, its transaction rolled back.
        sqlx::Error::Database(db) if db.code().as_deref() == Some("57014") => {
            return StoreError::busy(Tier::Durable, err, false);
        }
        _ => {}
    }
    let unavailable = match &err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::BeginFailed => true,
        // 08: connection exception, 57P: operator intervention (shutdown, crash
        // recovery), 53300: too many connections.
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || code.starts_with("57P") || code == "53300"
        }),
        _ => false,
    };
    if unavailable {
        StoreError::unavailable(Tier::Durable, err)
    } else {
        StoreError::internal(Tier::Durable, err)
    }
}

fn version_param(version: Version) -> StoreResult<i64> {
    i64::try_from(version.get())
        .map_err(|_| StoreError::internal(Tier::Durable, "version out of range"))
}

fn version_from(value: i64) -> Version {
    Version::new(value.max(0) as u64)
}

/// The columns `record_from_row` reads, from a `records` row aliased `r`.
macro_rules! record_columns {
    () => {
        "r.id, r.version, r.data, r.created_at, r.updated_at, r.expires_at"
    };
}

fn record_from_row(collection: &CollectionName, row: &PgRow) -> StoreResult<Record> {
    let id: String = row.try_get("id").map_err(classify)?;
    let id = RecordId::parse(&id).map_err(|err| StoreError::internal(Tier::Durable, err))?;
    let Json(data): Json<JsonObject> = row.try_get("data").map_err(classify)?;
    Ok(Record {
        collection: collection.clone(),
        id,
        version: version_from(row.try_get("version").map_err(classify)?),
        data,
        created_at: row.try_get("created_at").map_err(classify)?,
        updated_at: row.try_get("updated_at").map_err(classify)?,
        expires_at: row.try_get("expires_at").map_err(classify)?,
    })
}

/// A row of [`SCAN_STATES`] or [`GET_STATES`]: the record, or its deletion.
fn state_from_row(collection: &CollectionName, row: &PgRow) -> StoreResult<Change> {
    let record = record_from_row(collection, row)?;
    if row.try_get("deleted").map_err(classify)? {
        Ok(Change::Delete {
            key: record.key(),
            version: record.version,
            at: record.updated_at,
        })
    } else {
        Ok(Change::Put(record))
    }
}

/// A record is live when it is neither deleted nor expired at `$now`.
macro_rules! live {
    ($alias:literal, $now:literal) => {
        concat!(
            "NOT ",
            $alias,
            ".deleted AND (",
            $alias,
            ".expires_at IS NULL OR ",
            $alias,
            ".expires_at > ",
            $now,
            ")"
        )
    };
}

/// Create-or-replace (no precondition, or `Absent` when `$7` is true).
const UPSERT: &str = concat!(
    "INSERT INTO records AS r ",
    "(collection, id, version, created_version, data, created_at, updated_at, expires_at, deleted) ",
    "VALUES ($1, $2, $3, $3, $4, $5, $5, $6, false) ",
    "ON CONFLICT (collection, id) DO UPDATE SET ",
    "version = GREATEST(r.version + 1, EXCLUDED.version), ",
    "created_version = CASE WHEN ",
    live!("r", "EXCLUDED.updated_at"),
    " THEN r.created_version ELSE GREATEST(r.version + 1, EXCLUDED.version) END, ",
    "created_at = CASE WHEN ",
    live!("r", "EXCLUDED.updated_at"),
    " THEN r.created_at ELSE EXCLUDED.created_at END, ",
    "data = EXCLUDED.data, updated_at = EXCLUDED.updated_at, ",
    "expires_at = EXCLUDED.expires_at, deleted = false ",
    "WHERE NOT $7 OR NOT (",
    live!("r", "EXCLUDED.updated_at"),
    ") ",
    "RETURNING version, created_version, created_at, updated_at"
);

/// Replace an existing live record (`IfMatch` when `$7` is set, or `Exists`).
const UPDATE_LIVE: &str = concat!(
    "UPDATE records AS r SET version = GREATEST(r.version + 1, $3), data = $4, ",
    "updated_at = $5, expires_at = $6 ",
    "WHERE r.collection = $1 AND r.id = $2 AND ",
    live!("r", "$5"),
    " AND ($7::bigint IS NULL OR r.version = $7) ",
    "RETURNING version, created_version, created_at, updated_at"
);

/// Inserts an index entry unless the value already has one.
const INSERT_INDEX_ENTRY: &str = "INSERT INTO record_index (collection, index_name, value, record_id) \
    VALUES ($1, $2, $3, $4) ON CONFLICT (collection, index_name, value) DO NOTHING RETURNING 1";

/// Locks an existing index entry and says which record holds it.
const LOCK_INDEX_ENTRY: &str = "SELECT record_id FROM record_index \
    WHERE collection = $1 AND index_name = $2 AND value = $3 FOR UPDATE";

const HOLDER_IS_LIVE: &str = concat!(
    "SELECT EXISTS (SELECT 1 FROM records h WHERE h.collection = $1 AND h.id = $2 AND ",
    live!("h", "$3"),
    ")"
);

const TAKE_OVER_INDEX_ENTRY: &str = "UPDATE record_index SET record_id = $4 \
    WHERE collection = $1 AND index_name = $2 AND value = $3";

const DELETE_LIVE: &str = concat!(
    "UPDATE records AS r SET deleted = true, data = '{}', ",
    "version = GREATEST(r.version + 1, $3), updated_at = $4, expires_at = NULL ",
    "WHERE r.collection = $1 AND r.id = $2 AND ",
    live!("r", "$4"),
    " AND ($5::bigint IS NULL OR r.version = $5) ",
    "RETURNING version"
);

const GET_LIVE: &str = concat!(
    "SELECT ",
    record_columns!(),
    " FROM records r ",
    "WHERE r.collection = $1 AND r.id = $2 AND ",
    live!("r", "$3")
);

const GET_MANY_LIVE: &str = concat!(
    "SELECT ",
    record_columns!(),
    " FROM records r ",
    "WHERE r.collection = $1 AND r.id = ANY($2) AND ",
    live!("r", "$3")
);

/// Keyset page: ids in `($2, $4)` exclusive-inclusive bounds built by `list`.
/// A page, bounded in the query by count ($6, one beyond the page) and by
/// bytes ($7): a row whose predecessors already hold more than $7 bytes of
/// data is not even read (the first two always are, so that a first record
/// larger than the bound still shows whether more follow). The rows are
/// then cut by [`PageBuilder`].
const LIST_LIVE: &str = concat!(
    "SELECT * FROM (SELECT ",
    record_columns!(),
    ", r.data_bytes, ",
    "sum(r.data_bytes) OVER (ORDER BY r.id ROWS UNBOUNDED PRECEDING) - r.data_bytes AS before, ",
    "row_number() OVER (ORDER BY r.id) AS n ",
    "FROM records r ",
    "WHERE r.collection = $1 AND r.id > $2 AND r.id >= $3 AND r.id < $4 AND ",
    live!("r", "$5"),
    " ORDER BY r.id LIMIT $6) r WHERE r.before <= $7 OR r.n <= 2 ORDER BY r.id"
);

const LOOKUP_LIVE: &str = concat!(
    "SELECT ",
    record_columns!(),
    " FROM record_index ri JOIN records r ON r.collection = ri.collection AND r.id = ri.record_id ",
    "WHERE ri.collection = $1 AND ri.index_name = $2 AND ri.value = $3 AND ",
    live!("r", "$4")
);

/// Replays a journaled put: applied only over an older version, unless `$8`
/// forces it.
/// Applies states carried over from the cache tier (replay, sync, import),
/// all in one statement: each only over an older version unless `$9`
/// forces it. A deletion leaves a tombstone and keeps the incarnation's
/// creation; a put over a dead row starts a new incarnation. Returns the
/// keys it wrote.
const APPLY_CHANGES: &str = concat!(
    "INSERT INTO records AS r ",
    "(collection, id, version, created_version, data, created_at, updated_at, expires_at, deleted) ",
    "SELECT c, i, v, v, d, ca, ua, xa, del FROM UNNEST(",
    "$1::text[], $2::text[], $3::bigint[], $4::jsonb[], $5::timestamptz[], $6::timestamptz[], ",
    "$7::timestamptz[], $8::bool[]) AS t(c, i, v, d, ca, ua, xa, del) ",
    "ON CONFLICT (collection, id) DO UPDATE SET ",
    "version = EXCLUDED.version, ",
    "created_version = CASE WHEN EXCLUDED.deleted OR ",
    live!("r", "EXCLUDED.updated_at"),
    " THEN r.created_version ELSE EXCLUDED.version END, ",
    "created_at = CASE WHEN EXCLUDED.deleted OR ",
    live!("r", "EXCLUDED.updated_at"),
    " THEN r.created_at ELSE EXCLUDED.created_at END, ",
    "data = EXCLUDED.data, updated_at = EXCLUDED.updated_at, ",
    "expires_at = EXCLUDED.expires_at, deleted = EXCLUDED.deleted ",
    "WHERE r.version < EXCLUDED.version OR $9 RETURNING r.collection, r.id"
);

/// The columns of [`APPLY_CHANGES`], one entry per change.
struct ApplyColumns {
    collection: Vec<String>,
    id: Vec<String>,
    version: Vec<i64>,
    data: Vec<Json<JsonObject>>,
    created_at: Vec<OffsetDateTime>,
    updated_at: Vec<OffsetDateTime>,
    expires_at: Vec<Option<OffsetDateTime>>,
    deleted: Vec<bool>,
}

impl ApplyColumns {
    fn with_capacity(n: usize) -> Self {
        Self {
            collection: Vec::with_capacity(n),
            id: Vec::with_capacity(n),
            version: Vec::with_capacity(n),
            data: Vec::with_capacity(n),
            created_at: Vec::with_capacity(n),
            updated_at: Vec::with_capacity(n),
            expires_at: Vec::with_capacity(n),
            deleted: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, change: &Change) -> StoreResult<()> {
        let key = change.key();
        self.collection.push(key.collection.to_string());
        self.id.push(key.id.to_string());
        self.version.push(version_param(change.version())?);
        match change {
            Change::Put(record) => {
                self.data.push(Json(record.data.clone()));
                self.created_at.push(record.created_at);
                self.updated_at.push(record.updated_at);
                self.expires_at.push(record.expires_at);
                self.deleted.push(false);
            }
            Change::Delete { at, .. } => {
                self.data.push(Json(JsonObject::new()));
                self.created_at.push(*at);
                self.updated_at.push(*at);
                self.expires_at.push(None);
                self.deleted.push(true);
            }
        }
        Ok(())
    }
}

/// Live records and tombstones (not expired ones): `$3` after, ordered by id.
const SCAN_STATES: &str = concat!(
    "SELECT ",
    record_columns!(),
    ", r.deleted FROM records r ",
    "WHERE r.collection = $1 AND r.id > $2 AND (r.expires_at IS NULL OR r.expires_at > $3) ",
    "ORDER BY r.id LIMIT $4"
);

const GET_STATES: &str = concat!(
    "SELECT ",
    record_columns!(),
    ", r.deleted FROM records r ",
    "WHERE r.collection = $1 AND r.id = ANY($2) AND (r.expires_at IS NULL OR r.expires_at > $3)"
);

const LOAD_CONTROL: &str = "SELECT value FROM control WHERE name = 'state'";

/// The cache generation (see `DurableStore::cache_generation`): its own row
/// of the control table, the generation in `revision`.
const CACHE_GENERATION: &str = "SELECT revision FROM control WHERE name = 'cache'";

const BUMP_CACHE_GENERATION: &str = "INSERT INTO control AS c (name, revision, value, updated_at) \
    VALUES ('cache', 1, '{}', now()) ON CONFLICT (name) DO UPDATE \
    SET revision = c.revision + 1, updated_at = now() RETURNING revision";

/// Saves the state only over an older revision.
const SAVE_CONTROL: &str = "INSERT INTO control AS c (name, revision, value, updated_at) \
    VALUES ('state', $1, $2, now()) ON CONFLICT (name) DO UPDATE \
    SET revision = EXCLUDED.revision, value = EXCLUDED.value, updated_at = now() \
    WHERE c.revision < EXCLUDED.revision RETURNING 1";

/// Publishes held keys (see `DurableStore::hold`); a key held already keeps
/// the higher version.
const HOLD: &str = "INSERT INTO held AS h (collection, id, version) \
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[]) \
    ON CONFLICT (collection, id) DO UPDATE \
    SET version = GREATEST(h.version, EXCLUDED.version), held_at = now()";

/// Held keys above the version `records` stores (or with no row there).
macro_rules! held_above {
    ($where:literal) => {
        concat!(
            "SELECT h.id, h.version FROM held h LEFT JOIN records r ",
            "ON r.collection = h.collection AND r.id = h.id ",
            "WHERE h.collection = $1 AND (r.version IS NULL OR r.version < h.version) AND ",
            $where
        )
    };
}
const HELD_ABOVE: &str = held_above!("h.id = ANY($2)");
const ANY_HELD_ABOVE: &str = concat!(
    "SELECT EXISTS (",
    held_above!("($2::text IS NULL OR h.id > $2) AND ($3::text IS NULL OR h.id <= $3)"),
    ")"
);

/// Forgets held keys `records` has caught up with, or held too long.
const RELEASE_HELD: &str = "DELETE FROM held h WHERE h.held_at < now() - $1::interval \
    OR EXISTS (SELECT 1 FROM records r WHERE r.collection = h.collection \
    AND r.id = h.id AND r.version >= h.version)";

/// Marks increments applied; answers the ids that were not applied before.
const CLAIM_OPS: &str = "INSERT INTO counter_ops (op_id) SELECT unnest($1::text[]) \
    ON CONFLICT DO NOTHING RETURNING op_id";

/// Adds summed deltas, one row per (scope, bucket, field).
const ADD_TO_COUNTERS: &str = "INSERT INTO counters AS c \
    (scope, granularity, bucket_start, field, value, expires_at) \
    SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], \
        $5::text[]::numeric[], $6::timestamptz[]) \
    ON CONFLICT (scope, granularity, bucket_start, field) \
    DO UPDATE SET value = c.value + EXCLUDED.value, expires_at = EXCLUDED.expires_at \
    RETURNING field, abs(value) > $7::numeric AS out_of_range";

const COUNTER_BUCKETS: &str = "SELECT granularity, bucket_start, field, value::text AS value, \
    expires_at FROM counters WHERE scope = $1 AND (granularity, bucket_start) IN \
    (SELECT * FROM unnest($2::text[], $3::timestamptz[])) \
    ORDER BY granularity, bucket_start, field";

const PURGE_COUNTERS: &str = "DELETE FROM counters WHERE ctid IN (\
    SELECT ctid FROM counters WHERE expires_at <= $1 LIMIT $2)";

/// Counter values after a (scope, granularity, start, field) position
/// (`$1` NULL: from the start), not expired at `$5`.
const SCAN_COUNTERS: &str = "SELECT scope, granularity, bucket_start, field, \
    value::text AS value, expires_at FROM counters \
    WHERE ($1::text IS NULL OR (scope, granularity, bucket_start, field) > ($1, $2, $3, $4)) \
    AND (expires_at IS NULL OR expires_at > $5) \
    ORDER BY scope, granularity, bucket_start, field LIMIT $6";

/// Sets one counter value where none is held (or over it, `$7` forcing).
const RESTORE_COUNTER: &str = "INSERT INTO counters AS c \
    (scope, granularity, bucket_start, field, value, expires_at) \
    VALUES ($1, $2, $3, $4, $5::numeric, $6) \
    ON CONFLICT (scope, granularity, bucket_start, field) \
    DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at WHERE $7 \
    RETURNING 1";

fn counter_value_from_row(row: &PgRow) -> StoreResult<CounterValue> {
    let bad = |err: String| StoreError::internal(Tier::Durable, err);
    let scope: String = row.try_get("scope").map_err(classify)?;
    let granularity: String = row.try_get("granularity").map_err(classify)?;
    let field: String = row.try_get("field").map_err(classify)?;
    let value: String = row.try_get("value").map_err(classify)?;
    Ok(CounterValue {
        scope: CounterScope::parse(&scope).map_err(|err| bad(err.to_string()))?,
        granularity: Granularity::parse(&granularity)
            .ok_or_else(|| bad(format!("unknown granularity {granularity:?}")))?,
        bucket_start: row.try_get("bucket_start").map_err(classify)?,
        field: FieldName::parse(&field).map_err(|err| bad(err.to_string()))?,
        value: Amount::parse_stored(&value).map_err(bad)?,
        expires_at: row.try_get("expires_at").map_err(classify)?,
    })
}

/// Applied-increment ids are kept this long (replays come within seconds).
const COUNTER_OPS_RETENTION: time::Duration = time::Duration::days(2);

/// Rows of [`COUNTER_BUCKETS`], grouped by bucket in
/// the order they came.
fn bucket_values(rows: &[PgRow]) -> StoreResult<Vec<BucketValues>> {
    let mut grouped: Vec<BucketValues> = Vec::new();
    for row in rows {
        let granularity: String = row.try_get("granularity").map_err(classify)?;
        let granularity = Granularity::parse(&granularity)
            .ok_or_else(|| StoreError::internal(Tier::Durable, "unknown granularity"))?;
        let start: OffsetDateTime = row.try_get("bucket_start").map_err(classify)?;
        let field: String = row.try_get("field").map_err(classify)?;
        let field =
            FieldName::parse(&field).map_err(|err| StoreError::internal(Tier::Durable, err))?;
        let value: String = row.try_get("value").map_err(classify)?;
        let value =
            Amount::parse_stored(&value).map_err(|err| StoreError::internal(Tier::Durable, err))?;
        let expires_at = row.try_get("expires_at").map_err(classify)?;
        match grouped.last_mut() {
            Some(last) if last.bucket.granularity == granularity && last.bucket.start == start => {
                last.values.push((field, value));
            }
            _ => grouped.push(BucketValues {
                bucket: Bucket {
                    granularity,
                    start,
                    expires_at,
                },
                values: vec![(field, value)],
            }),
        }
    }
    Ok(grouped)
}

const PURGE_BATCH: &str = "DELETE FROM records WHERE ctid IN (\
    SELECT ctid FROM records WHERE expires_at <= $1 \
    UNION ALL SELECT ctid FROM records WHERE deleted AND updated_at <= $2 \
    LIMIT $3)";

const PURGE_BATCH_SIZE: i64 = 1000;

impl PostgresStore {
    async fn write_record<'e>(
        executor: impl PgExecutor<'e>,
        write: &RecordWrite,
    ) -> StoreResult<Option<PgRow>> {
        let version = version_param(Version::next(None, write.now))?;
        // $7 is the precondition: "must be absent" for the upsert, the expected
        // version (or NULL for "any") for the update of a live record.
        enum Guard {
            Upsert { require_absent: bool },
            UpdateLive { expected: Option<i64> },
        }
        let guard = match write.precondition {
            Precondition::None => Guard::Upsert {
                require_absent: false,
            },
            Precondition::Absent => Guard::Upsert {
                require_absent: true,
            },
            Precondition::Exists => Guard::UpdateLive { expected: None },
            Precondition::IfMatch(v) => Guard::UpdateLive {
                expected: Some(version_param(v)?),
            },
        };
        let sql = match guard {
            Guard::Upsert { .. } => UPSERT,
            Guard::UpdateLive { .. } => UPDATE_LIVE,
        };
        let query = sqlx::query(sql)
            .bind(write.key.collection.as_str())
            .bind(write.key.id.as_str())
            .bind(version)
            .bind(Json(&write.data))
            .bind(write.now)
            .bind(write.expires_at);
        let query = match guard {
            Guard::Upsert { require_absent } => query.bind(require_absent),
            Guard::UpdateLive { expected } => query.bind(expected),
        };
        query.fetch_optional(executor).await.map_err(classify)
    }

    /// Replaces the record's index entries with `entries`, inside `tx`.
    /// Runs a query taking (collection, ids, now), like [`GET_MANY_LIVE`].
    async fn rows_by_ids(
        &self,
        sql: &'static str,
        collection: &CollectionName,
        ids: &[RecordId],
        now: OffsetDateTime,
    ) -> StoreResult<Vec<PgRow>> {
        let ids: Vec<&str> = ids.iter().map(RecordId::as_str).collect();
        sqlx::query(sql)
            .bind(collection.as_str())
            .bind(&ids)
            .bind(now)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)
    }

    async fn claim_index_entries(
        tx: &mut sqlx::PgConnection,
        key: &RecordKey,
        now: OffsetDateTime,
        entries: &[IndexEntry],
    ) -> StoreResult<()> {
        sqlx::query("DELETE FROM record_index WHERE collection = $1 AND record_id = $2")
            .bind(key.collection.as_str())
            .bind(key.id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        for entry in entries {
            if !Self::claim_index_entry(tx, key, now, entry).await? {
                return Err(StoreError::UniqueViolation {
                    index: entry.index.to_string(),
                    value: entry.value.clone(),
                });
            }
        }
        Ok(())
    }

    /// Makes `entry` point at the written record, unless a live record holds it.
    ///
    /// Why several statements: under READ COMMITTED a statement sees the
    /// database as of its own start. A holder committed by a concurrent
    /// transaction while this one waited on the entry would be invisible to a
    /// check inside the same statement, and its value would look free. So the
    /// entry is locked first, and the holder is checked by a later statement,
    /// whose snapshot includes every transaction that touched the entry before.
    async fn claim_index_entry(
        tx: &mut sqlx::PgConnection,
        key: &RecordKey,
        now: OffsetDateTime,
        entry: &IndexEntry,
    ) -> StoreResult<bool> {
        let (collection, id) = (key.collection.as_str(), key.id.as_str());
        // The entry may vanish between the insert and the lock (its holder
        // changed value); then the insert is tried again.
        for _ in 0..3 {
            let inserted = sqlx::query(INSERT_INDEX_ENTRY)
                .bind(collection)
                .bind(entry.index.as_str())
                .bind(&entry.value)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(classify)?;
            if inserted.is_some() {
                return Ok(true);
            }
            let holder: Option<String> = sqlx::query_scalar(LOCK_INDEX_ENTRY)
                .bind(collection)
                .bind(entry.index.as_str())
                .bind(&entry.value)
                .fetch_optional(&mut *tx)
                .await
                .map_err(classify)?;
            let Some(holder) = holder else { continue };
            if holder == id {
                return Ok(true);
            }
            let live: bool = sqlx::query_scalar(HOLDER_IS_LIVE)
                .bind(collection)
                .bind(&holder)
                .bind(now)
                .fetch_one(&mut *tx)
                .await
                .map_err(classify)?;
            if live {
                return Ok(false);
            }
            sqlx::query(TAKE_OVER_INDEX_ENTRY)
                .bind(collection)
                .bind(entry.index.as_str())
                .bind(&entry.value)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
            return Ok(true);
        }
        Err(StoreError::internal(
            Tier::Durable,
            "index entry kept changing while being claimed",
        ))
    }

    fn outcome(write: &RecordWrite, row: &PgRow) -> StoreResult<WriteOutcome> {
        let version: i64 = row.try_get("version").map_err(classify)?;
        let created_version: i64 = row.try_get("created_version").map_err(classify)?;
        Ok(WriteOutcome {
            created: version == created_version,
            record: Record {
                collection: write.key.collection.clone(),
                id: write.key.id.clone(),
                version: version_from(version),
                data: write.data.clone(),
                created_at: row.try_get("created_at").map_err(classify)?,
                updated_at: row.try_get("updated_at").map_err(classify)?,
                expires_at: write.expires_at,
            },
        })
    }
}

#[async_trait]
impl DurableStore for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> StoreResult<()> {
        // The pool retries a refused connection until its acquire timeout,
        // as if the server were starting: a dead server would look slow for
        // that long. A connection of our own tells refused apart at once.
        let options = self.pool.connect_options();
        if options.get_socket().is_none() {
            let address = (options.get_host(), options.get_port());
            if let Err(err) = tokio::net::TcpStream::connect(address).await
                && err.kind() == std::io::ErrorKind::ConnectionRefused
            {
                return Err(StoreError::unavailable(Tier::Durable, err));
            }
        }
        if !self.migrated.load(Ordering::Acquire) {
            self.migrate().await?;
        }
        // Taken out while in use and put back only after an answer: a ping
        // cut off by its timeout drops the connection with it, rather than
        // leaving one with a query half-done for the next ping.
        let held = self.probe.lock().await.take();
        let mut connection = match held {
            Some(connection) => connection,
            None => {
                use sqlx::Connection;
                let options = self.pool.connect_options();
                sqlx::PgConnection::connect_with(&options)
                    .await
                    .map_err(classify)?
            }
        };
        sqlx::query("SELECT 1")
            .execute(&mut connection)
            .await
            .map_err(classify)?;
        *self.probe.lock().await = Some(connection);
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %key.collection, id = %key.id))]
    async fn get(&self, key: &RecordKey, now: OffsetDateTime) -> StoreResult<Option<Record>> {
        let row = sqlx::query(GET_LIVE)
            .bind(key.collection.as_str())
            .bind(key.id.as_str())
            .bind(now)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        row.map(|row| record_from_row(&key.collection, &row))
            .transpose()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%collection, count = ids.len()))]
    async fn get_many(
        &self,
        collection: &CollectionName,
        ids: &[RecordId],
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Record>> {
        let rows = self
            .rows_by_ids(GET_MANY_LIVE, collection, ids, now)
            .await?;
        rows.iter()
            .map(|row| record_from_row(collection, row))
            .collect()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %write.key.collection, id = %write.key.id))]
    async fn put(&self, write: &RecordWrite) -> StoreResult<WriteOutcome> {
        let row = match &write.index_entries {
            None => Self::write_record(&self.pool, write).await?,
            Some(entries) => {
                let mut tx = self.pool.begin().await.map_err(classify)?;
                let row = Self::write_record(&mut *tx, write).await?;
                if row.is_some() {
                    Self::claim_index_entries(&mut tx, &write.key, write.now, entries).await?;
                    tx.commit().await.map_err(classify)?;
                }
                row
            }
        };
        let row = row.ok_or(StoreError::PreconditionFailed)?;
        Self::outcome(write, &row)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %key.collection, id = %key.id))]
    async fn delete(
        &self,
        key: &RecordKey,
        precondition: Precondition,
        now: OffsetDateTime,
    ) -> StoreResult<Version> {
        let expected = match precondition {
            Precondition::IfMatch(v) => Some(version_param(v)?),
            Precondition::None | Precondition::Exists => None,
            // "Only if it does not exist": there is nothing to delete either way.
            Precondition::Absent => {
                return match self.get(key, now).await? {
                    Some(_) => Err(StoreError::PreconditionFailed),
                    None => Err(StoreError::NotFound),
                };
            }
        };
        let row = sqlx::query(DELETE_LIVE)
            .bind(key.collection.as_str())
            .bind(key.id.as_str())
            .bind(version_param(Version::next(None, now))?)
            .bind(now)
            .bind(expected)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        if let Some(row) = row {
            return Ok(version_from(row.try_get("version").map_err(classify)?));
        }
        // Nothing deleted: tell "no such record" from "wrong version".
        match (precondition, self.get(key, now).await?) {
            (Precondition::IfMatch(_), Some(_)) => Err(StoreError::PreconditionFailed),
            _ => Err(StoreError::NotFound),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %query.collection))]
    async fn list(&self, query: &ListQuery) -> StoreResult<ListPage> {
        let prefix = query.prefix.as_deref().unwrap_or("");
        let rows = sqlx::query(LIST_LIVE)
            .bind(query.collection.as_str())
            .bind(query.after.as_ref().map_or("", RecordId::as_str))
            .bind(prefix)
            .bind(prefix_upper_bound(prefix))
            .bind(query.now)
            .bind(i64::from(query.limit) + 1)
            .bind(i64::try_from(query.max_bytes).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        let mut page = PageBuilder::new(query);
        for row in &rows {
            let size: i32 = row.try_get("data_bytes").map_err(classify)?;
            if !page.offer(
                record_from_row(&query.collection, row)?,
                size.max(0) as usize,
            ) {
                break;
            }
        }
        Ok(page.finish())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%collection, %index))]
    async fn lookup(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Option<Record>> {
        let row = sqlx::query(LOOKUP_LIVE)
            .bind(collection.as_str())
            .bind(index.as_str())
            .bind(value)
            .bind(now)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        row.map(|row| record_from_row(collection, &row)).transpose()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(count = changes.len()))]
    async fn apply_changes(&self, changes: &[Change], mode: ApplyMode) -> StoreResult<Vec<bool>> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        // One row per record: a statement may not update a row twice, and
        // of two changes of one record only the newest can win anyway.
        let mut newest: HashMap<RecordKey, usize> = HashMap::new();
        for (at, change) in changes.iter().enumerate() {
            let held = newest.entry(change.key()).or_insert(at);
            if changes[*held].version() < change.version() {
                *held = at;
            }
        }
        let mut columns = ApplyColumns::with_capacity(newest.len());
        for &at in newest.values() {
            columns.push(&changes[at])?;
        }
        let rows = sqlx::query(APPLY_CHANGES)
            .bind(&columns.collection)
            .bind(&columns.id)
            .bind(&columns.version)
            .bind(&columns.data)
            .bind(&columns.created_at)
            .bind(&columns.updated_at)
            .bind(&columns.expires_at)
            .bind(&columns.deleted)
            .bind(mode == ApplyMode::Force)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        let mut written = HashSet::with_capacity(rows.len());
        for row in &rows {
            let collection: String = row.try_get("collection").map_err(classify)?;
            let id: String = row.try_get("id").map_err(classify)?;
            written.insert((collection, id));
        }
        Ok(changes
            .iter()
            .enumerate()
            .map(|(at, change)| {
                let key = change.key();
                newest.get(&key) == Some(&at)
                    && written.contains(&(key.collection.to_string(), key.id.to_string()))
            })
            .collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%collection, limit))]
    async fn scan(
        &self,
        collection: &CollectionName,
        after: Option<&RecordId>,
        limit: usize,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Change>> {
        let rows = sqlx::query(SCAN_STATES)
            .bind(collection.as_str())
            .bind(after.map_or("", RecordId::as_str))
            .bind(now)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        rows.iter()
            .map(|row| state_from_row(collection, row))
            .collect()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%collection, count = ids.len()))]
    async fn get_states(
        &self,
        collection: &CollectionName,
        ids: &[RecordId],
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Change>> {
        let rows = self.rows_by_ids(GET_STATES, collection, ids, now).await?;
        rows.iter()
            .map(|row| state_from_row(collection, row))
            .collect()
    }

    async fn count(&self, collection: &CollectionName) -> StoreResult<u64> {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM records WHERE collection = $1")
            .bind(collection.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(classify)?;
        Ok(count.max(0) as u64)
    }

    async fn load_control(&self) -> StoreResult<Option<ControlState>> {
        let value: Option<Json<ControlState>> = sqlx::query_scalar(LOAD_CONTROL)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        Ok(value.map(|Json(state)| state))
    }

    async fn save_control(&self, state: &ControlState) -> StoreResult<bool> {
        let revision = i64::try_from(state.revision)
            .map_err(|_| StoreError::internal(Tier::Durable, "control revision out of range"))?;
        let saved = sqlx::query(SAVE_CONTROL)
            .bind(revision)
            .bind(Json(state))
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        Ok(saved.is_some())
    }

    async fn cache_generation(&self) -> StoreResult<u64> {
        let generation: Option<i64> = sqlx::query_scalar(CACHE_GENERATION)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        Ok(generation.map_or(0, |g| g.max(0) as u64))
    }

    async fn bump_cache_generation(&self) -> StoreResult<u64> {
        let generation: i64 = sqlx::query_scalar(BUMP_CACHE_GENERATION)
            .fetch_one(&self.pool)
            .await
            .map_err(classify)?;
        Ok(generation.max(0) as u64)
    }

    async fn hold(&self, held: &[(RecordKey, Version)]) -> StoreResult<()> {
        if held.is_empty() {
            return Ok(());
        }
        let mut collections = Vec::with_capacity(held.len());
        let mut ids = Vec::with_capacity(held.len());
        let mut versions = Vec::with_capacity(held.len());
        for (key, version) in held {
            collections.push(key.collection.as_str());
            ids.push(key.id.as_str());
            versions.push(version_param(*version)?);
        }
        sqlx::query(HOLD)
            .bind(&collections)
            .bind(&ids)
            .bind(&versions)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn held_above(
        &self,
        collection: &CollectionName,
        ids: &[RecordId],
    ) -> StoreResult<Vec<(RecordId, Version)>> {
        let names: Vec<&str> = ids.iter().map(RecordId::as_str).collect();
        let rows: Vec<(String, i64)> = sqlx::query_as(HELD_ABOVE)
            .bind(collection.as_str())
            .bind(&names)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, version)| {
                let id = ids.iter().find(|known| known.as_str() == id)?;
                Some((id.clone(), Version::new(version.max(0) as u64)))
            })
            .collect())
    }

    async fn any_held_above(
        &self,
        collection: &CollectionName,
        after: Option<&RecordId>,
        until: Option<&RecordId>,
    ) -> StoreResult<bool> {
        sqlx::query_scalar(ANY_HELD_ABOVE)
            .bind(collection.as_str())
            .bind(after.map(RecordId::as_str))
            .bind(until.map(RecordId::as_str))
            .fetch_one(&self.pool)
            .await
            .map_err(classify)
    }

    async fn release_held(&self, stale: Option<Duration>) -> StoreResult<u64> {
        let stale = stale
            .map(sqlx::postgres::types::PgInterval::try_from)
            .transpose()
            .map_err(|err| StoreError::internal(Tier::Durable, err))?;
        let released = sqlx::query(RELEASE_HELD)
            .bind(stale)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(released.rows_affected())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(count = increments.len()))]
    async fn apply_increments(&self, increments: &[CounterIncrement]) -> StoreResult<usize> {
        if increments.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let ids: Vec<&str> = increments.iter().map(|i| i.op_id.as_str()).collect();
        let fresh: HashSet<String> = sqlx::query_scalar(CLAIM_OPS)
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?
            .into_iter()
            .collect();
        // One row per (scope, bucket, field): many increments, one upsert.
        type RowKey = (String, Granularity, OffsetDateTime, String);
        let mut sums: BTreeMap<RowKey, (Amount, Option<OffsetDateTime>)> = BTreeMap::new();
        for increment in increments.iter().filter(|i| fresh.contains(&i.op_id)) {
            for bucket in &increment.buckets {
                for (field, delta) in &increment.deltas {
                    let key = (
                        increment.scope.to_string(),
                        bucket.granularity,
                        bucket.start,
                        field.to_string(),
                    );
                    let entry = sums.entry(key).or_insert((Amount::ZERO, bucket.expires_at));
                    entry.0 = entry.0.add_to_total(*delta).ok_or_else(|| {
                        StoreError::CounterOutOfRange {
                            field: field.to_string(),
                        }
                    })?;
                }
            }
        }
        if !sums.is_empty() {
            let mut columns = (
                Vec::with_capacity(sums.len()),
                Vec::with_capacity(sums.len()),
                Vec::with_capacity(sums.len()),
                Vec::with_capacity(sums.len()),
                Vec::with_capacity(sums.len()),
                Vec::with_capacity(sums.len()),
            );
            for ((scope, granularity, start, field), (sum, expires_at)) in sums {
                columns.0.push(scope);
                columns.1.push(granularity.as_str());
                columns.2.push(start);
                columns.3.push(field);
                columns.4.push(sum.to_string());
                columns.5.push(expires_at);
            }
            let totals: Vec<(String, bool)> = sqlx::query_as(ADD_TO_COUNTERS)
                .bind(columns.0)
                .bind(columns.1)
                .bind(columns.2)
                .bind(columns.3)
                .bind(columns.4)
                .bind(columns.5)
                .bind(MAX_TOTAL_UNITS.to_string())
                .fetch_all(&mut *tx)
                .await
                .map_err(classify)?;
            // Dropping the transaction rolls the whole increment back.
            if let Some((field, _)) = totals.into_iter().find(|(_, out)| *out) {
                return Err(StoreError::CounterOutOfRange { field });
            }
        }
        tx.commit().await.map_err(classify)?;
        Ok(fresh.len())
    }

    async fn counter_snapshot(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
        op_ids: &[String],
    ) -> StoreResult<(Vec<BucketValues>, HashSet<String>)> {
        let granularities: Vec<&str> = buckets.iter().map(|b| b.granularity.as_str()).collect();
        let starts: Vec<OffsetDateTime> = buckets.iter().map(|b| b.start).collect();
        let mut tx = self.pool.begin().await.map_err(classify)?;
        if !op_ids.is_empty() {
            // Both reads must see the same commits.
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
        }
        let rows = sqlx::query(COUNTER_BUCKETS)
            .bind(scope.as_str())
            .bind(&granularities)
            .bind(&starts)
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?;
        let applied: HashSet<String> = if op_ids.is_empty() {
            HashSet::new()
        } else {
            sqlx::query_scalar("SELECT op_id FROM counter_ops WHERE op_id = ANY($1)")
                .bind(op_ids)
                .fetch_all(&mut *tx)
                .await
                .map_err(classify)?
                .into_iter()
                .collect()
        };
        tx.commit().await.map_err(classify)?;
        Ok((bucket_values(&rows)?, applied))
    }

    async fn set_index_entries(
        &self,
        key: &RecordKey,
        entries: &[IndexEntry],
        now: OffsetDateTime,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        Self::claim_index_entries(&mut tx, key, now, entries).await?;
        tx.commit().await.map_err(classify)
    }

    async fn scan_counters(
        &self,
        after: Option<&CounterValue>,
        limit: usize,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<CounterValue>> {
        let rows = sqlx::query(SCAN_COUNTERS)
            .bind(after.map(|a| a.scope.as_str()))
            .bind(after.map(|a| a.granularity.as_str()))
            .bind(after.map(|a| a.bucket_start))
            .bind(after.map(|a| a.field.as_str()))
            .bind(now)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        rows.iter().map(counter_value_from_row).collect()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(count = values.len()))]
    async fn restore_counters(
        &self,
        values: &[CounterValue],
        force: bool,
    ) -> StoreResult<Vec<bool>> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let mut written = Vec::with_capacity(values.len());
        for value in values {
            let row = sqlx::query(RESTORE_COUNTER)
                .bind(value.scope.as_str())
                .bind(value.granularity.as_str())
                .bind(value.bucket_start)
                .bind(value.field.as_str())
                .bind(value.value.to_string())
                .bind(value.expires_at)
                .bind(force)
                .fetch_optional(&mut *tx)
                .await
                .map_err(classify)?;
            written.push(row.is_some());
        }
        tx.commit().await.map_err(classify)?;
        Ok(written)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn purge_expired(
        &self,
        now: OffsetDateTime,
        tombstone_retention: Duration,
    ) -> StoreResult<u64> {
        let tombstones_before = now - tombstone_retention;
        let mut purged = 0;
        loop {
            let done = sqlx::query(PURGE_BATCH)
                .bind(now)
                .bind(tombstones_before)
                .bind(PURGE_BATCH_SIZE)
                .execute(&self.pool)
                .await
                .map_err(classify)?
                .rows_affected();
            purged += done;
            if done < PURGE_BATCH_SIZE as u64 {
                break;
            }
        }
        loop {
            let done = sqlx::query(PURGE_COUNTERS)
                .bind(now)
                .bind(PURGE_BATCH_SIZE)
                .execute(&self.pool)
                .await
                .map_err(classify)?
                .rows_affected();
            purged += done;
            if done < PURGE_BATCH_SIZE as u64 {
                break;
            }
        }
        sqlx::query("DELETE FROM counter_ops WHERE applied_at < $1")
            .bind(now - COUNTER_OPS_RETENTION)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(purged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_mention_every_parameter() {
        for (sql, params) in [
            (UPSERT, 7),
            (UPDATE_LIVE, 7),
            (DELETE_LIVE, 5),
            (LIST_LIVE, 6),
        ] {
            for n in 1..=params {
                assert!(sql.contains(&format!("${n}")), "${n} missing in {sql}");
            }
        }
    }
}
