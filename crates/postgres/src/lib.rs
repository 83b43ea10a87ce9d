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
    Amount, ApplyMode, Backend, Bucket, BucketValues, CacheLedger, Change, CollectionName,
    ControlState, CounterIncrement, CounterScope, CounterValue, DurableControl, DurableCounters,
    DurableRecords, DurableStates, FieldName, Granularity, IndexEntry, IndexName, JsonObject,
    ListPage, ListQuery, MAX_TOTAL_UNITS, PageBuilder, Precondition, Record, RecordId, RecordKey,
    RecordWrite, StoreError, StoreResult, Tier, Version, WriteOutcome, prefix_upper_bound,
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
        version: Version::from_i64(row.try_get("version").map_err(classify)?),
        data,
        created_at: row.try_get("created_at").map_err(classify)?,
        updated_at: row.try_get("updated_at").map_err(classify)?,
        expires_at: row.try_get("expires_at").map_err(classify)?,
    })
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
        self.version.push(change.version().to_i64()?);
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

impl PostgresStore {
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
}

#[async_trait]
impl Backend for PostgresStore {
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
}

// One file per role the tier plays (declared after the macros above,
// which they use).
mod control;
mod counters;
mod ledger;
mod records;
mod states;

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
