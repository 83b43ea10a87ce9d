//! The tier traits.
//!
//! A durable tier is the source of truth: it assigns versions, checks
//! preconditions and enforces unique indexes atomically. A cache tier holds copies
//! and only ever accepts a copy that is newer than what it holds, which is what
//! makes cache fills safe against concurrent writers (guarantee 1 of the spec).

use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::{
    CacheWrite, CacheWriteOutcome, Change, CollectionName, IndexName, JournalAck, JournalEntry,
    JournalKind, ListQuery, Precondition, Record, RecordId, RecordKey, RecordWrite, StoreError,
    Version, WriteOutcome,
};

pub type StoreResult<T> = Result<T, StoreError>;

/// The source of truth (PostgreSQL, or SQLite in embedded mode).
#[async_trait]
pub trait DurableStore: Send + Sync + 'static {
    /// Short backend name for logs and status (`"postgres"`).
    fn backend(&self) -> &'static str;

    /// A cheap round trip that succeeds only when the tier can serve requests
    /// (the health probe).
    async fn ping(&self) -> StoreResult<()>;

    /// The live record (not deleted, not expired at `now`).
    async fn get(&self, key: &RecordKey, now: OffsetDateTime) -> StoreResult<Option<Record>>;

    /// The live records among `ids`, in no particular order.
    async fn get_many(
        &self,
        collection: &CollectionName,
        ids: &[RecordId],
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Record>>;

    /// Applies a write atomically (record and its index entries) or nothing.
    /// Fails with `PreconditionFailed` or `UniqueViolation` without side effects.
    async fn put(&self, write: &RecordWrite) -> StoreResult<WriteOutcome>;

    /// Deletes a live record; returns the version of the deletion (greater than
    /// any version the record had), which caches keep as a tombstone.
    async fn delete(
        &self,
        key: &RecordKey,
        precondition: Precondition,
        now: OffsetDateTime,
    ) -> StoreResult<Version>;

    /// One page of live records, ordered by id.
    async fn list(&self, query: &ListQuery) -> StoreResult<Vec<Record>>;

    /// The live record whose unique index `index` holds `value`.
    async fn lookup(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Option<Record>>;

    /// Applies replayed journal changes, each only if it is newer than what the
    /// tier holds; returns, per change, whether it was applied (false: the
    /// tier already held that version or a newer one).
    async fn apply_changes(&self, changes: &[Change]) -> StoreResult<Vec<bool>>;

    /// Physically removes expired records and deletion markers older than
    /// `tombstone_retention`; returns how many rows went.
    async fn purge_expired(
        &self,
        now: OffsetDateTime,
        tombstone_retention: Duration,
    ) -> StoreResult<u64>;
}

/// What a cache holds for a key.
#[derive(Clone, Debug, PartialEq)]
pub enum CacheEntry {
    Miss,
    Present(Record),
    /// The record was deleted at this version.
    Deleted(Version),
}

/// The hot copy (Redis, or an in-process cache in embedded mode).
#[async_trait]
pub trait CacheStore: Send + Sync + 'static {
    fn backend(&self) -> &'static str;

    /// A cheap round trip that succeeds only when the tier can serve requests.
    async fn ping(&self) -> StoreResult<()>;

    /// An id of the server process (Redis `run_id`): a different id means the
    /// server restarted and may hold older copies than it acknowledged.
    /// `None` when the tier cannot tell.
    async fn server_id(&self) -> StoreResult<Option<String>>;

    /// Removes the copies of these records (written elsewhere while the cache
    /// could not be updated).
    async fn invalidate(&self, keys: &[RecordKey]) -> StoreResult<()>;

    /// Removes every record copy and lookup hint of this service; returns how
    /// many keys went.
    async fn invalidate_all(&self) -> StoreResult<u64>;

    async fn get(&self, key: &RecordKey) -> StoreResult<CacheEntry>;

    /// Entries for several keys, in the order of `keys`.
    async fn get_many(&self, keys: &[RecordKey]) -> StoreResult<Vec<CacheEntry>>;

    /// Stores `record` for `ttl` unless the cache already holds the same or a newer
    /// version (or a newer deletion). Returns whether it was stored.
    async fn store(&self, record: &Record, ttl: Duration) -> StoreResult<bool>;

    /// Records that `key` was deleted at `version`, under the same rule as `store`.
    async fn store_deleted(
        &self,
        key: &RecordKey,
        version: Version,
        ttl: Duration,
    ) -> StoreResult<bool>;

    /// The id that a unique index value pointed to when last seen. Only a hint:
    /// the engine checks it against the record it names.
    async fn lookup_hint(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
    ) -> StoreResult<Option<RecordId>>;

    async fn store_lookup_hint(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
        id: &RecordId,
        ttl: Duration,
    ) -> StoreResult<()>;

    /// Accepts a write ahead of the durable tier: updates the copy and appends
    /// a journal entry atomically, pinning the copy until it is replayed.
    async fn accept_write(&self, write: &CacheWrite) -> StoreResult<CacheWriteOutcome>;

    /// About `max` journal entries for `consumer` to replay: new ones and,
    /// with `recover: Some(claim_idle)`, also its own entries not yet
    /// acknowledged and those another consumer left unacknowledged for longer
    /// than `claim_idle` (asked for after a failure and now and then, since it
    /// costs a round trip per stream).
    async fn read_journal(
        &self,
        consumer: &str,
        max: usize,
        recover: Option<Duration>,
    ) -> StoreResult<Vec<JournalEntry>>;

    /// Removes replayed entries and unpins their copies.
    async fn ack_journal(&self, acks: &[JournalAck]) -> StoreResult<()>;

    /// One page of a collection the cache holds as the only tier
    /// (`redis_only`), ordered by id.
    async fn list(&self, query: &ListQuery) -> StoreResult<Vec<Record>>;

    /// How many entries of one journal wait to be replayed.
    async fn journal_backlog(&self, kind: JournalKind) -> StoreResult<u64>;
}
