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
    Amount, ApplyMode, Backend, Bucket, BucketValues, CacheLedger, Change, CollectionName,
    ControlState, CounterIncrement, CounterScope, CounterValue, DurableControl, DurableCounters,
    DurableRecords, DurableStates, FieldName, Granularity, IndexEntry, IndexName, JsonObject,
    ListPage, ListQuery, Micros, PageBuilder, Precondition, Record, RecordId, RecordKey,
    RecordWrite, StoreError, StoreResult, Tier, Version, WriteOutcome, prefix_upper_bound,
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
            version: Version::from_i64(self.version),
            data,
            created_at: Micros::new(self.created_at).time(Tier::Durable)?,
            updated_at: Micros::new(self.updated_at).time(Tier::Durable)?,
            expires_at: self
                .expires_at
                .map(|at| Micros::new(at).time(Tier::Durable))
                .transpose()?,
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
                if Current::of(tx, &holder_key)?
                    .is_some_and(|row| row.is_live(Micros::of(now).get()))
                {
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

#[async_trait]
impl Backend for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> StoreResult<()> {
        self.read(|tx| tx.query_row("SELECT 1", [], |_| Ok(())).map_err(classify))
            .await
    }
}

// One file per role the tier plays (declared after the macros above,
// which they use).
mod control;
mod counters;
mod ledger;
mod records;
mod states;
