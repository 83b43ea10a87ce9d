//! The SQLite durable tier: the source of truth of embedded mode.
//!
//! One file (`./data/hybridstore.db` by default) in WAL mode with
//! `synchronous = FULL`: a write is acknowledged only after its commit reached
//! the disk, so neither `kill -9` nor a power cut loses it. SQLite allows one
//! writer at a time; every write here runs on the one writer connection inside
//! a `BEGIN IMMEDIATE` transaction, so a check and the write it guards (a
//! precondition, a unique index, a version comparison) see the same state and
//! plain Rust code can do what PostgreSQL does in a single statement. Reads go
//! to a small pool of read-only connections and never wait for the writer
//! (WAL readers see the last commit). SQLite calls block, so each runs on
//! tokio's blocking pool.
//!
//! A lock file beside the database keeps a second server off the same file:
//! each embedded server has its own in-process cache, and two of them would
//! serve each other's stale copies.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use hybridstore_core::{
    Amount, ApplyMode, Bucket, BucketValues, Change, CollectionName, ControlState,
    CounterIncrement, CounterScope, CounterValue, DurableStore, FieldName, Granularity, IndexEntry,
    IndexName, JsonObject, ListPage, ListQuery, PageBuilder, Precondition, Record, RecordId,
    RecordKey, RecordWrite, StoreError, StoreResult, Tier, Version, WriteOutcome,
    prefix_upper_bound,
};
use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, Row, Transaction, TransactionBehavior,
    params,
};
use time::OffsetDateTime;

/// The schema; `PRAGMA user_version` says which of these a file has.
const MIGRATIONS: [&str; 1] = [include_str!("schema.sql")];

/// Read-only connections kept open (more are opened under load, then closed).
const READERS: usize = 4;

/// Applied-increment ids are kept this long (replays come within seconds).
const COUNTER_OPS_RETENTION: time::Duration = time::Duration::days(2);

/// Where the embedded database lives.
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    pub path: PathBuf,
}

#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    /// Held (flock) for as long as the store lives.
    _lock: File,
}

/// Sorts an SQLite error into "the database cannot serve" (drives
/// degradation: a full disk, an I/O error, a lock held too long) or an
/// internal error.
fn classify(err: rusqlite::Error) -> StoreError {
    let unavailable = matches!(
        err.sqlite_error_code(),
        Some(
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::SystemIoFailure
                | ErrorCode::DiskFull
                | ErrorCode::CannotOpen
                | ErrorCode::ReadOnly
        )
    );
    if unavailable {
        StoreError::unavailable(Tier::Durable, err)
    } else {
        StoreError::internal(Tier::Durable, err)
    }
}

fn corrupt(what: impl Into<String>) -> StoreError {
    StoreError::internal(Tier::Durable, what.into())
}

fn micros(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000) as i64
}

fn from_micros(value: i64) -> StoreResult<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(value) * 1_000)
        .map_err(|err| corrupt(format!("bad stored time {value}: {err}")))
}

/// `at` as the tier stores it (microseconds: what a read gives back).
fn truncated(at: OffsetDateTime) -> StoreResult<OffsetDateTime> {
    from_micros(micros(at))
}

fn version_param(version: Version) -> StoreResult<i64> {
    i64::try_from(version.get()).map_err(|_| corrupt("version out of range"))
}

fn version_from(value: i64) -> Version {
    Version::new(value.max(0) as u64)
}

fn amount_param(amount: Amount) -> String {
    amount.nanos().to_string()
}

fn amount_from(text: &str) -> StoreResult<Amount> {
    text.parse::<i128>()
        .map(Amount::from_nanos)
        .map_err(|_| corrupt(format!("bad stored counter value {text:?}")))
}

/// A record is live when it is neither deleted nor expired at `?now`.
macro_rules! live {
    ($now:literal) => {
        concat!(
            "NOT deleted AND (expires_at IS NULL OR expires_at > ",
            $now,
            ")"
        )
    };
}

/// The columns [`StoredRow::read`] takes, in order.
macro_rules! row_columns {
    () => {
        "id, version, data, created_at, updated_at, expires_at, deleted"
    };
}

const GET_LIVE: &str = concat!(
    "SELECT ",
    row_columns!(),
    " FROM records WHERE collection = ?1 AND id = ?2 AND ",
    live!("?3")
);

const GET_STATE: &str = concat!(
    "SELECT ",
    row_columns!(),
    " FROM records WHERE collection = ?1 AND id = ?2 AND (expires_at IS NULL OR expires_at > ?3)"
);

/// A page, bounded in the query by count (?6, one beyond the page) and by
/// bytes (?7), as in the PostgreSQL tier: rows whose predecessors already
/// hold more than ?7 bytes are not read (the first two always are). Cut by
/// [`PageBuilder`] with the size in the last column.
const LIST_LIVE: &str = concat!(
    "SELECT ",
    row_columns!(),
    ", size FROM (SELECT ",
    row_columns!(),
    ", length(CAST(data AS BLOB)) AS size, ",
    "sum(length(CAST(data AS BLOB))) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) ",
    "- length(CAST(data AS BLOB)) AS before, ",
    "row_number() OVER (ORDER BY id) AS n ",
    "FROM records WHERE collection = ?1 AND id > ?2 AND id >= ?3 AND id < ?4 AND ",
    live!("?5"),
    " ORDER BY id LIMIT ?6) WHERE before <= ?7 OR n <= 2 ORDER BY id"
);

const SCAN_STATES: &str = concat!(
    "SELECT ",
    row_columns!(),
    " FROM records WHERE collection = ?1 AND id > ?2 AND (expires_at IS NULL OR expires_at > ?3) ",
    "ORDER BY id LIMIT ?4"
);

const LOOKUP_LIVE: &str = concat!(
    "SELECT r.id, r.version, r.data, r.created_at, r.updated_at, r.expires_at, r.deleted ",
    "FROM record_index ri JOIN records r ON r.collection = ri.collection AND r.id = ri.record_id ",
    "WHERE ri.collection = ?1 AND ri.index_name = ?2 AND ri.value = ?3 ",
    "AND NOT r.deleted AND (r.expires_at IS NULL OR r.expires_at > ?4)"
);

/// What a write needs to know of the row it replaces.
const CURRENT: &str = "SELECT version, created_version, created_at, expires_at, deleted \
    FROM records WHERE collection = ?1 AND id = ?2";

/// Writes every column of a row (computed by the caller, under the writer lock).
const UPSERT_ROW: &str = "INSERT INTO records \
    (collection, id, version, created_version, data, created_at, updated_at, expires_at, deleted) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
    ON CONFLICT (collection, id) DO UPDATE SET version = excluded.version, \
    created_version = excluded.created_version, data = excluded.data, \
    created_at = excluded.created_at, updated_at = excluded.updated_at, \
    expires_at = excluded.expires_at, deleted = excluded.deleted";

const SAVE_CONTROL: &str = "INSERT INTO control (name, revision, value, updated_at) \
    VALUES ('state', ?1, ?2, ?3) ON CONFLICT (name) DO UPDATE \
    SET revision = excluded.revision, value = excluded.value, updated_at = excluded.updated_at \
    WHERE control.revision < excluded.revision";

const SCAN_COUNTERS: &str = "SELECT scope, granularity, bucket_start, field, nanos, expires_at \
    FROM counters \
    WHERE (?1 IS NULL OR (scope, granularity, bucket_start, field) > (?1, ?2, ?3, ?4)) \
    AND (expires_at IS NULL OR expires_at > ?5) \
    ORDER BY scope, granularity, bucket_start, field LIMIT ?6";

const SET_COUNTER: &str = "INSERT INTO counters \
    (scope, granularity, bucket_start, field, nanos, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
    ON CONFLICT (scope, granularity, bucket_start, field) \
    DO UPDATE SET nanos = excluded.nanos, expires_at = excluded.expires_at WHERE ?7";

const PURGE_BATCH: &str = "DELETE FROM records WHERE (collection, id) IN (\
    SELECT collection, id FROM records WHERE expires_at <= ?1 \
    UNION ALL SELECT collection, id FROM records WHERE deleted AND updated_at <= ?2 LIMIT ?3)";

const PURGE_BATCH_SIZE: i64 = 1000;

/// One `records` row as [`row_columns!`] selects it.
struct StoredRow {
    id: String,
    version: i64,
    data: String,
    created_at: i64,
    updated_at: i64,
    expires_at: Option<i64>,
    deleted: bool,
}

impl StoredRow {
    fn read(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            version: row.get(1)?,
            data: row.get(2)?,
            created_at: row.get(3)?,
            updated_at: row.get(4)?,
            expires_at: row.get(5)?,
            deleted: row.get(6)?,
        })
    }

    fn into_record(self, collection: &CollectionName) -> StoreResult<Record> {
        let data: JsonObject = serde_json::from_str(&self.data)
            .map_err(|err| corrupt(format!("undecodable stored data: {err}")))?;
        Ok(Record {
            collection: collection.clone(),
            id: RecordId::parse(&self.id).map_err(|err| corrupt(err.to_string()))?,
            version: version_from(self.version),
            data,
            created_at: from_micros(self.created_at)?,
            updated_at: from_micros(self.updated_at)?,
            expires_at: self.expires_at.map(from_micros).transpose()?,
        })
    }

    /// The record, or its deletion.
    fn into_change(self, collection: &CollectionName) -> StoreResult<Change> {
        let deleted = self.deleted;
        let record = self.into_record(collection)?;
        Ok(if deleted {
            Change::Delete {
                key: record.key(),
                version: record.version,
                at: record.updated_at,
            }
        } else {
            Change::Put(record)
        })
    }
}

/// What a write needs to know about the row it replaces.
struct Current {
    version: i64,
    created_version: i64,
    created_at: i64,
    expires_at: Option<i64>,
    deleted: bool,
}

impl Current {
    fn of(tx: &Connection, key: &RecordKey) -> StoreResult<Option<Self>> {
        tx.prepare_cached(CURRENT)
            .and_then(|mut statement| {
                statement
                    .query_row(params![key.collection.as_str(), key.id.as_str()], |row| {
                        Ok(Self {
                            version: row.get(0)?,
                            created_version: row.get(1)?,
                            created_at: row.get(2)?,
                            expires_at: row.get(3)?,
                            deleted: row.get(4)?,
                        })
                    })
                    .optional()
            })
            .map_err(classify)
    }

    fn is_live(&self, now: i64) -> bool {
        !self.deleted && self.expires_at.is_none_or(|at| at > now)
    }
}

/// The columns of one row, as [`UPSERT_ROW`] takes them.
struct NewRow<'a> {
    key: &'a RecordKey,
    version: i64,
    created_version: i64,
    data: &'a str,
    created_at: i64,
    updated_at: i64,
    expires_at: Option<i64>,
    deleted: bool,
}

impl NewRow<'_> {
    fn write(&self, tx: &Connection) -> StoreResult<()> {
        tx.prepare_cached(UPSERT_ROW)
            .and_then(|mut statement| {
                statement.execute(params![
                    self.key.collection.as_str(),
                    self.key.id.as_str(),
                    self.version,
                    self.created_version,
                    self.data,
                    self.created_at,
                    self.updated_at,
                    self.expires_at,
                    self.deleted,
                ])
            })
            .map(drop)
            .map_err(classify)
    }
}

fn data_text(data: &JsonObject) -> StoreResult<String> {
    serde_json::to_string(data).map_err(|err| StoreError::internal(Tier::Durable, err))
}

/// Runs `sql` with `params`, collecting each row through `read`.
fn query_all<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    read: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
) -> StoreResult<Vec<T>> {
    let mut statement = conn.prepare_cached(sql).map_err(classify)?;
    let rows = statement.query_map(params, read).map_err(classify)?;
    rows.collect::<rusqlite::Result<Vec<T>>>().map_err(classify)
}

fn open_connection(path: &Path, flags: OpenFlags) -> StoreResult<Connection> {
    let conn = Connection::open_with_flags(path, flags).map_err(classify)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(classify)?;
    Ok(conn)
}

/// Takes the lock file beside the database, or says who holds it.
fn lock_beside(path: &Path) -> StoreResult<File> {
    use std::os::fd::AsRawFd;
    let lock_path = path.with_extension("lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|err| {
            StoreError::internal(
                Tier::Durable,
                format!("cannot open {}: {err}", lock_path.display()),
            )
        })?;
    // SAFETY: flock on a descriptor this function owns; no memory is shared.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if !locked {
        return Err(StoreError::internal(
            Tier::Durable,
            format!(
                "{} is in use by another hybridstore process (lock {})",
                path.display(),
                lock_path.display()
            ),
        ));
    }
    Ok(file)
}

impl SqliteStore {
    /// Opens (creating the directory and file if needed) and migrates the
    /// database. Fails if another process holds it.
    pub fn open(options: &SqliteOptions) -> StoreResult<Self> {
        let path = options.path.clone();
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|err| {
                StoreError::internal(
                    Tier::Durable,
                    format!("cannot create {}: {err}", dir.display()),
                )
            })?;
        }
        let lock = lock_beside(&path)?;
        let mut writer = open_connection(&path, OpenFlags::default())?;
        // WAL: readers never wait for the writer. FULL: a commit returns only
        // once the WAL is on disk, so an acknowledged write survives a crash
        // of the process or of the machine.
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
            )
            .map_err(classify)?;
        migrate(&mut writer)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                writer: Mutex::new(writer),
                readers: Mutex::new(Vec::new()),
                _lock: lock,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `work` in one write transaction on the writer connection.
    async fn write<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Transaction<'_>) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.writer.lock().unwrap_or_else(PoisonError::into_inner);
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(classify)?;
            // An error drops `tx`, which rolls everything back.
            let value = work(&tx)?;
            tx.commit().map_err(classify)?;
            Ok(value)
        })
        .await
        .map_err(|err| StoreError::internal(Tier::Durable, err))?
    }

    /// Runs `work` on a read-only connection, inside one read transaction
    /// (one snapshot).
    async fn read<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Transaction<'_>) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = inner
                .readers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            let mut conn = match pooled {
                Some(conn) => conn,
                None => open_connection(
                    &inner.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?,
            };
            let result = conn
                .transaction_with_behavior(TransactionBehavior::Deferred)
                .map_err(classify)
                .and_then(|tx| {
                    let value = work(&tx)?;
                    tx.finish().map_err(classify)?;
                    Ok(value)
                });
            let mut readers = inner.readers.lock().unwrap_or_else(PoisonError::into_inner);
            if readers.len() < READERS {
                readers.push(conn);
            }
            result
        })
        .await
        .map_err(|err| StoreError::internal(Tier::Durable, err))?
    }
}

fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let applied: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(classify)?;
    let applied = usize::try_from(applied).unwrap_or(usize::MAX);
    if applied > MIGRATIONS.len() {
        return Err(corrupt(format!(
            "the database has schema version {applied}, newer than this build knows ({})",
            MIGRATIONS.len()
        )));
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Exclusive)
            .map_err(classify)?;
        tx.execute_batch(sql).map_err(classify)?;
        tx.pragma_update(None, "user_version", (index + 1) as i64)
            .map_err(classify)?;
        tx.commit().map_err(classify)?;
    }
    Ok(())
}

fn put_in(tx: &Connection, write: &RecordWrite) -> StoreResult<WriteOutcome> {
    let now = micros(write.now);
    let current = Current::of(tx, &write.key)?;
    let live = current.as_ref().is_some_and(|row| row.is_live(now));
    let allowed = match write.precondition {
        Precondition::None => true,
        Precondition::Absent => !live,
        Precondition::Exists => live,
        Precondition::IfMatch(expected) => {
            live && current.as_ref().map(|row| row.version) == Some(version_param(expected)?)
        }
    };
    if !allowed {
        return Err(StoreError::PreconditionFailed);
    }
    let clock = version_param(Version::next(None, write.now))?;
    let version = current
        .as_ref()
        .map_or(clock, |row| clock.max(row.version + 1));
    let (created_version, created_at) = match &current {
        Some(row) if live => (row.created_version, row.created_at),
        _ => (version, now),
    };
    let data = data_text(&write.data)?;
    NewRow {
        key: &write.key,
        version,
        created_version,
        data: &data,
        created_at,
        updated_at: now,
        expires_at: write.expires_at.map(micros),
        deleted: false,
    }
    .write(tx)?;
    if let Some(entries) = &write.index_entries {
        claim_index_entries(tx, &write.key, write.now, entries)?;
    }
    Ok(WriteOutcome {
        created: version == created_version,
        record: Record {
            collection: write.key.collection.clone(),
            id: write.key.id.clone(),
            version: version_from(version),
            data: write.data.clone(),
            created_at: from_micros(created_at)?,
            updated_at: from_micros(now)?,
            expires_at: write.expires_at.map(truncated).transpose()?,
        },
    })
}

/// Points the record's unique index entries at it, unless a live record
/// holds one of the values (then the whole write is rolled back).
fn claim_index_entries(
    tx: &Connection,
    key: &RecordKey,
    now: OffsetDateTime,
    entries: &[IndexEntry],
) -> StoreResult<()> {
    let (collection, id) = (key.collection.as_str(), key.id.as_str());
    tx.prepare_cached("DELETE FROM record_index WHERE collection = ?1 AND record_id = ?2")
        .and_then(|mut statement| statement.execute(params![collection, id]))
        .map_err(classify)?;
    for entry in entries {
        let holder: Option<String> = tx
            .prepare_cached(
                "SELECT record_id FROM record_index \
                 WHERE collection = ?1 AND index_name = ?2 AND value = ?3",
            )
            .and_then(|mut statement| {
                statement
                    .query_row(
                        params![collection, entry.index.as_str(), entry.value],
                        |row| row.get(0),
                    )
                    .optional()
            })
            .map_err(classify)?;
        let sql = match holder {
            None => {
                "INSERT INTO record_index (collection, index_name, value, record_id) \
                 VALUES (?1, ?2, ?3, ?4)"
            }
            Some(holder) => {
                let holder_key = RecordKey::new(
                    key.collection.clone(),
                    RecordId::parse(&holder).map_err(|err| corrupt(err.to_string()))?,
                );
                if Current::of(tx, &holder_key)?.is_some_and(|row| row.is_live(micros(now))) {
                    return Err(StoreError::UniqueViolation {
                        index: entry.index.to_string(),
                        value: entry.value.clone(),
                    });
                }
                "UPDATE record_index SET record_id = ?4 \
                 WHERE collection = ?1 AND index_name = ?2 AND value = ?3"
            }
        };
        tx.prepare_cached(sql)
            .and_then(|mut statement| {
                statement.execute(params![collection, entry.index.as_str(), entry.value, id])
            })
            .map_err(classify)?;
    }
    Ok(())
}

fn delete_in(
    tx: &Connection,
    key: &RecordKey,
    precondition: Precondition,
    at: OffsetDateTime,
) -> StoreResult<Version> {
    let now = micros(at);
    let current = Current::of(tx, key)?;
    let Some(row) = current.filter(|row| row.is_live(now)) else {
        return Err(StoreError::NotFound);
    };
    match precondition {
        Precondition::Absent => return Err(StoreError::PreconditionFailed),
        Precondition::IfMatch(expected) if version_param(expected)? != row.version => {
            return Err(StoreError::PreconditionFailed);
        }
        _ => {}
    }
    let version = version_param(Version::next(None, at))?.max(row.version + 1);
    NewRow {
        key,
        version,
        created_version: row.created_version,
        data: "{}",
        created_at: row.created_at,
        updated_at: now,
        expires_at: None,
        deleted: true,
    }
    .write(tx)?;
    Ok(version_from(version))
}

/// Applies one change carried over from the cache tier; whether it was.
fn apply_in(tx: &Connection, change: &Change, force: bool) -> StoreResult<bool> {
    let key = change.key();
    let version = version_param(change.version())?;
    let current = Current::of(tx, &key)?;
    if !force && current.as_ref().is_some_and(|row| row.version >= version) {
        return Ok(false);
    }
    let row = match change {
        Change::Put(record) => {
            let updated_at = micros(record.updated_at);
            let kept = current.as_ref().filter(|row| row.is_live(updated_at));
            let data = data_text(&record.data)?;
            return NewRow {
                key: &key,
                version,
                created_version: kept.map_or(version, |row| row.created_version),
                data: &data,
                created_at: kept.map_or(micros(record.created_at), |row| row.created_at),
                updated_at,
                expires_at: record.expires_at.map(micros),
                deleted: false,
            }
            .write(tx)
            .map(|()| true);
        }
        Change::Delete { at, .. } => NewRow {
            key: &key,
            version,
            created_version: current.as_ref().map_or(version, |row| row.created_version),
            data: "{}",
            created_at: current.as_ref().map_or(micros(*at), |row| row.created_at),
            updated_at: micros(*at),
            expires_at: None,
            deleted: true,
        },
    };
    row.write(tx).map(|()| true)
}

fn apply_increments_in(tx: &Connection, increments: &[CounterIncrement]) -> StoreResult<usize> {
    let applied_at = micros(OffsetDateTime::now_utc());
    // One value per (scope, bucket, field): many increments, one write.
    type ValueKey = (String, Granularity, i64, String);
    let mut sums: BTreeMap<ValueKey, (Amount, Option<i64>)> = BTreeMap::new();
    let mut fresh = 0;
    for increment in increments {
        let new = tx
            .prepare_cached(
                "INSERT INTO counter_ops (op_id, applied_at) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            )
            .and_then(|mut statement| statement.execute(params![increment.op_id, applied_at]))
            .map_err(classify)?;
        if new == 0 {
            continue;
        }
        fresh += 1;
        for bucket in &increment.buckets {
            for (field, delta) in &increment.deltas {
                let key = (
                    increment.scope.to_string(),
                    bucket.granularity,
                    micros(bucket.start),
                    field.to_string(),
                );
                let entry = sums
                    .entry(key)
                    .or_insert((Amount::ZERO, bucket.expires_at.map(micros)));
                entry.0 =
                    entry
                        .0
                        .add_to_total(*delta)
                        .ok_or_else(|| StoreError::CounterOutOfRange {
                            field: field.to_string(),
                        })?;
            }
        }
    }
    for ((scope, granularity, start, field), (sum, expires_at)) in sums {
        let held: Option<String> = tx
            .prepare_cached(
                "SELECT nanos FROM counters \
                 WHERE scope = ?1 AND granularity = ?2 AND bucket_start = ?3 AND field = ?4",
            )
            .and_then(|mut statement| {
                statement
                    .query_row(params![scope, granularity.as_str(), start, field], |row| {
                        row.get(0)
                    })
                    .optional()
            })
            .map_err(classify)?;
        let total = match held {
            Some(held) => {
                amount_from(&held)?
                    .add_to_total(sum)
                    .ok_or(StoreError::CounterOutOfRange {
                        field: field.clone(),
                    })?
            }
            None => sum,
        };
        set_counter(
            tx,
            (&scope, granularity, start, &field),
            total,
            expires_at,
            true,
        )?;
    }
    Ok(fresh)
}

/// Sets one counter value (over a held one only when `replace`); whether it did.
fn set_counter(
    tx: &Connection,
    (scope, granularity, start, field): (&str, Granularity, i64, &str),
    value: Amount,
    expires_at: Option<i64>,
    replace: bool,
) -> StoreResult<bool> {
    tx.prepare_cached(SET_COUNTER)
        .and_then(|mut statement| {
            statement.execute(params![
                scope,
                granularity.as_str(),
                start,
                field,
                amount_param(value),
                expires_at,
                replace
            ])
        })
        .map(|changed| changed > 0)
        .map_err(classify)
}

fn counter_value_from(
    row: &Row<'_>,
) -> rusqlite::Result<(String, String, i64, String, String, Option<i64>)> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
    ))
}

fn decode_counter_value(
    (scope, granularity, start, field, nanos, expires_at): (
        String,
        String,
        i64,
        String,
        String,
        Option<i64>,
    ),
) -> StoreResult<CounterValue> {
    Ok(CounterValue {
        scope: CounterScope::parse(&scope).map_err(|err| corrupt(err.to_string()))?,
        granularity: Granularity::parse(&granularity)
            .ok_or_else(|| corrupt(format!("unknown granularity {granularity:?}")))?,
        bucket_start: from_micros(start)?,
        field: FieldName::parse(&field).map_err(|err| corrupt(err.to_string()))?,
        value: amount_from(&nanos)?,
        expires_at: expires_at.map(from_micros).transpose()?,
    })
}

#[async_trait]
impl DurableStore for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> StoreResult<()> {
        self.read(|tx| tx.query_row("SELECT 1", [], |_| Ok(())).map_err(classify))
            .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %key.collection, id = %key.id))]
    async fn get(&self, key: &RecordKey, now: OffsetDateTime) -> StoreResult<Option<Record>> {
        let key = key.clone();
        self.read(move |tx| {
            let rows = query_all(
                tx,
                GET_LIVE,
                params![key.collection.as_str(), key.id.as_str(), micros(now)],
                StoredRow::read,
            )?;
            rows.into_iter()
                .next()
                .map(|row| row.into_record(&key.collection))
                .transpose()
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%collection, count = ids.len()))]
    async fn get_many(
        &self,
        collection: &CollectionName,
        ids: &[RecordId],
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Record>> {
        let (collection, ids) = (collection.clone(), ids.to_vec());
        self.read(move |tx| {
            let mut records = Vec::with_capacity(ids.len());
            for id in &ids {
                let rows = query_all(
                    tx,
                    GET_LIVE,
                    params![collection.as_str(), id.as_str(), micros(now)],
                    StoredRow::read,
                )?;
                for row in rows {
                    records.push(row.into_record(&collection)?);
                }
            }
            Ok(records)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %write.key.collection, id = %write.key.id))]
    async fn put(&self, write: &RecordWrite) -> StoreResult<WriteOutcome> {
        let write = write.clone();
        self.write(move |tx| put_in(tx, &write)).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %key.collection, id = %key.id))]
    async fn delete(
        &self,
        key: &RecordKey,
        precondition: Precondition,
        now: OffsetDateTime,
    ) -> StoreResult<Version> {
        let key = key.clone();
        self.write(move |tx| delete_in(tx, &key, precondition, now))
            .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %query.collection))]
    async fn list(&self, query: &ListQuery) -> StoreResult<ListPage> {
        let query = query.clone();
        self.read(move |tx| {
            let prefix = query.prefix.as_deref().unwrap_or("");
            let rows = query_all(
                tx,
                LIST_LIVE,
                params![
                    query.collection.as_str(),
                    query.after.as_ref().map_or("", RecordId::as_str),
                    prefix,
                    prefix_upper_bound(prefix),
                    micros(query.now),
                    i64::from(query.limit) + 1,
                    i64::try_from(query.max_bytes).unwrap_or(i64::MAX),
                ],
                |row| Ok((StoredRow::read(row)?, row.get::<_, i64>(7)?)),
            )?;
            let mut page = PageBuilder::new(&query);
            for (row, size) in rows {
                if !page.offer(row.into_record(&query.collection)?, size.max(0) as usize) {
                    break;
                }
            }
            Ok(page.finish())
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%collection, %index))]
    async fn lookup(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Option<Record>> {
        let (collection, index, value) = (collection.clone(), index.clone(), value.to_owned());
        self.read(move |tx| {
            let rows = query_all(
                tx,
                LOOKUP_LIVE,
                params![collection.as_str(), index.as_str(), value, micros(now)],
                StoredRow::read,
            )?;
            rows.into_iter()
                .next()
                .map(|row| row.into_record(&collection))
                .transpose()
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(count = changes.len()))]
    async fn apply_changes(&self, changes: &[Change], mode: ApplyMode) -> StoreResult<Vec<bool>> {
        let changes = changes.to_vec();
        let force = mode == ApplyMode::Force;
        self.write(move |tx| {
            changes
                .iter()
                .map(|change| apply_in(tx, change, force))
                .collect()
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%collection, limit))]
    async fn scan(
        &self,
        collection: &CollectionName,
        after: Option<&RecordId>,
        limit: usize,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Change>> {
        let (collection, after) = (collection.clone(), after.cloned());
        self.read(move |tx| {
            let rows = query_all(
                tx,
                SCAN_STATES,
                params![
                    collection.as_str(),
                    after.as_ref().map_or("", RecordId::as_str),
                    micros(now),
                    i64::try_from(limit).unwrap_or(i64::MAX),
                ],
                StoredRow::read,
            )?;
            rows.into_iter()
                .map(|row| row.into_change(&collection))
                .collect()
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%collection, count = ids.len()))]
    async fn get_states(
        &self,
        collection: &CollectionName,
        ids: &[RecordId],
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Change>> {
        let (collection, ids) = (collection.clone(), ids.to_vec());
        self.read(move |tx| {
            let mut states = Vec::with_capacity(ids.len());
            for id in &ids {
                let rows = query_all(
                    tx,
                    GET_STATE,
                    params![collection.as_str(), id.as_str(), micros(now)],
                    StoredRow::read,
                )?;
                for row in rows {
                    states.push(row.into_change(&collection)?);
                }
            }
            Ok(states)
        })
        .await
    }

    async fn count(&self, collection: &CollectionName) -> StoreResult<u64> {
        let collection = collection.clone();
        self.read(move |tx| {
            tx.query_row(
                "SELECT count(*) FROM records WHERE collection = ?1",
                [collection.as_str()],
                |row| row.get::<_, i64>(0),
            )
            .map(|count| count.max(0) as u64)
            .map_err(classify)
        })
        .await
    }

    async fn load_control(&self) -> StoreResult<Option<ControlState>> {
        let value: Option<String> = self
            .read(|tx| {
                tx.query_row(
                    "SELECT value FROM control WHERE name = 'state'",
                    [],
                    |row| row.get(0),
                )
                .optional()
                .map_err(classify)
            })
            .await?;
        value
            .map(|text| {
                serde_json::from_str(&text)
                    .map_err(|err| corrupt(format!("undecodable control state: {err}")))
            })
            .transpose()
    }

    async fn save_control(&self, state: &ControlState) -> StoreResult<bool> {
        let revision =
            i64::try_from(state.revision).map_err(|_| corrupt("control revision out of range"))?;
        let value =
            serde_json::to_string(state).map_err(|err| StoreError::internal(Tier::Durable, err))?;
        let now = micros(OffsetDateTime::now_utc());
        self.write(move |tx| {
            tx.execute(SAVE_CONTROL, params![revision, value, now])
                .map(|changed| changed > 0)
                .map_err(classify)
        })
        .await
    }

    async fn cache_generation(&self) -> StoreResult<u64> {
        self.read(|tx| {
            tx.query_row(
                "SELECT revision FROM control WHERE name = 'cache'",
                [],
                |row| row.get::<_, i64>(0),
            )
            .optional()
            .map(|generation| generation.map_or(0, |g| g.max(0) as u64))
            .map_err(classify)
        })
        .await
    }

    // A SQLite file serves one process (embedded mode), which remembers the
    // keys it journaled itself: there is no other instance to tell.
    async fn hold(&self, _held: &[(RecordKey, Version)]) -> StoreResult<()> {
        Ok(())
    }

    async fn held_above(
        &self,
        _collection: &CollectionName,
        _ids: &[RecordId],
    ) -> StoreResult<Vec<(RecordId, Version)>> {
        Ok(Vec::new())
    }

    async fn any_held_above(
        &self,
        _collection: &CollectionName,
        _after: Option<&RecordId>,
        _until: Option<&RecordId>,
    ) -> StoreResult<bool> {
        Ok(false)
    }

    async fn release_held(&self, _stale: Option<Duration>) -> StoreResult<u64> {
        Ok(0)
    }

    async fn bump_cache_generation(&self) -> StoreResult<u64> {
        let now = micros(OffsetDateTime::now_utc());
        self.write(move |tx| {
            tx.query_row(
                "INSERT INTO control (name, revision, value, updated_at) VALUES ('cache', 1, '{}', ?1) \
                 ON CONFLICT (name) DO UPDATE SET revision = control.revision + 1, updated_at = ?1 \
                 RETURNING revision",
                params![now],
                |row| row.get::<_, i64>(0),
            )
            .map(|generation| generation.max(0) as u64)
            .map_err(classify)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(count = increments.len()))]
    async fn apply_increments(&self, increments: &[CounterIncrement]) -> StoreResult<usize> {
        if increments.is_empty() {
            return Ok(0);
        }
        let increments = increments.to_vec();
        self.write(move |tx| apply_increments_in(tx, &increments))
            .await
    }

    async fn counter_snapshot(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
        op_ids: &[String],
    ) -> StoreResult<(Vec<BucketValues>, HashSet<String>)> {
        let (scope, buckets, op_ids) = (scope.clone(), buckets.to_vec(), op_ids.to_vec());
        // One read transaction: values and applied ids come from one snapshot.
        self.read(move |tx| {
            let mut values = Vec::new();
            for bucket in &buckets {
                let rows = query_all(
                    tx,
                    "SELECT field, nanos, expires_at FROM counters \
                     WHERE scope = ?1 AND granularity = ?2 AND bucket_start = ?3 ORDER BY field",
                    params![
                        scope.as_str(),
                        bucket.granularity.as_str(),
                        micros(bucket.start)
                    ],
                    |row| {
                        Ok((
                            row.get::<_, String>(0)?,
                            row.get::<_, String>(1)?,
                            row.get::<_, Option<i64>>(2)?,
                        ))
                    },
                )?;
                let Some(expires_at) = rows.first().map(|row| row.2) else {
                    continue;
                };
                let mut fields = Vec::with_capacity(rows.len());
                for (field, nanos, _) in rows {
                    let field = FieldName::parse(&field).map_err(|err| corrupt(err.to_string()))?;
                    fields.push((field, amount_from(&nanos)?));
                }
                values.push(BucketValues {
                    bucket: Bucket {
                        granularity: bucket.granularity,
                        start: bucket.start,
                        expires_at: expires_at.map(from_micros).transpose()?,
                    },
                    values: fields,
                });
            }
            let mut applied = HashSet::new();
            for op_id in op_ids {
                let known = query_all(
                    tx,
                    "SELECT 1 FROM counter_ops WHERE op_id = ?1",
                    [&op_id],
                    |_| Ok(()),
                )?;
                if !known.is_empty() {
                    applied.insert(op_id);
                }
            }
            Ok((values, applied))
        })
        .await
    }

    async fn set_index_entries(
        &self,
        key: &RecordKey,
        entries: &[IndexEntry],
        now: OffsetDateTime,
    ) -> StoreResult<()> {
        let (key, entries) = (key.clone(), entries.to_vec());
        self.write(move |tx| claim_index_entries(tx, &key, now, &entries))
            .await
    }

    async fn scan_counters(
        &self,
        after: Option<&CounterValue>,
        limit: usize,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<CounterValue>> {
        let after = after.cloned();
        self.read(move |tx| {
            let rows = query_all(
                tx,
                SCAN_COUNTERS,
                params![
                    after.as_ref().map(|a| a.scope.as_str()),
                    after.as_ref().map(|a| a.granularity.as_str()),
                    after.as_ref().map(|a| micros(a.bucket_start)),
                    after.as_ref().map(|a| a.field.as_str()),
                    micros(now),
                    i64::try_from(limit).unwrap_or(i64::MAX),
                ],
                counter_value_from,
            )?;
            rows.into_iter().map(decode_counter_value).collect()
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(count = values.len()))]
    async fn restore_counters(
        &self,
        values: &[CounterValue],
        force: bool,
    ) -> StoreResult<Vec<bool>> {
        let values = values.to_vec();
        self.write(move |tx| {
            values
                .iter()
                .map(|value| {
                    set_counter(
                        tx,
                        (
                            value.scope.as_str(),
                            value.granularity,
                            micros(value.bucket_start),
                            value.field.as_str(),
                        ),
                        value.value,
                        value.expires_at.map(micros),
                        force,
                    )
                })
                .collect()
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn purge_expired(
        &self,
        now: OffsetDateTime,
        tombstone_retention: Duration,
    ) -> StoreResult<u64> {
        let (now, tombstones_before) = (micros(now), micros(now - tombstone_retention));
        let ops_before = micros(OffsetDateTime::now_utc() - COUNTER_OPS_RETENTION);
        let mut purged = 0;
        // Batches: the writer is not held for long at a time.
        loop {
            let done = self
                .write(move |tx| {
                    tx.execute(
                        PURGE_BATCH,
                        params![now, tombstones_before, PURGE_BATCH_SIZE],
                    )
                    .map_err(classify)
                })
                .await?;
            purged += done as u64;
            if (done as i64) < PURGE_BATCH_SIZE {
                break;
            }
        }
        purged += self
            .write(move |tx| {
                let counters = tx
                    .execute("DELETE FROM counters WHERE expires_at <= ?1", [now])
                    .map_err(classify)?;
                tx.execute(
                    "DELETE FROM counter_ops WHERE applied_at < ?1",
                    [ops_before],
                )
                .map_err(classify)?;
                Ok(counters as u64)
            })
            .await?;
        Ok(purged)
    }
}
