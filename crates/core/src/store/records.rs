//! Records: what a request reads and writes, and the states sync, repair,
//! export and import carry between the tiers.
//!
//! A durable tier is the source of truth: it assigns versions, checks
//! preconditions and enforces unique indexes atomically. A cache tier holds
//! copies and only ever accepts a copy that is newer than what it holds, which
//! is what makes cache fills safe against concurrent writers (guarantee 1 of
//! the spec).

use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::{
    Change, CollectionName, IndexEntry, IndexName, ListPage, ListQuery, Precondition, Record,
    RecordId, RecordKey, RecordWrite, StoreResult, Version, WriteOutcome,
};

/// How many rows a durable tier's purge removes per statement: a purge of
/// millions of expired rows holds no lock for long.
pub const PURGE_BATCH: usize = 1000;

/// How a state carried over from the other tier is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyMode {
    /// Only over an older version: applying twice, or after a newer write,
    /// changes nothing. Journal replay, sync and repair use this.
    IfNewer,
    /// Over whatever the tier holds, even a newer version (an operator's
    /// `force`).
    Force,
}

/// What a cache holds for a key.
#[derive(Clone, Debug, PartialEq)]
pub enum CacheEntry {
    Miss,
    Present(Record),
    /// The record was deleted at this version.
    Deleted(Version),
}

/// What a cache holds for a key, as found by a scan.
#[derive(Clone, Debug, PartialEq)]
pub struct CachedState {
    /// The copy (`Put`) or the deletion marker (`Delete`).
    pub state: Change,
    /// A journal entry not yet replayed pinned it: newer than the durable tier.
    pub pinned: bool,
    /// Held as the truth of a cache-only collection.
    pub authoritative: bool,
}

/// What [`CacheStates::copy_in`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyOutcome {
    Written,
    /// The cache already held the same or a newer version.
    Kept,
    /// The copy is pinned by a journal entry; its replay decides.
    Pinned,
}

/// The durable tier's records as requests see them: live records only.
#[async_trait]
pub trait DurableRecords: Send + Sync + 'static {
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
    async fn list(&self, query: &ListQuery) -> StoreResult<ListPage>;

    /// The live record whose unique index `index` holds `value`.
    async fn lookup(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Option<Record>>;
}

/// Every stored state of a durable tier's records, deletion markers
/// included: what replay, sync, repair, export and import carry.
#[async_trait]
pub trait DurableStates: Send + Sync + 'static {
    /// Applies changes carried over from the cache tier (journal replay, sync,
    /// repair) in one transaction; returns, per change, whether it was applied
    /// (false: under `IfNewer`, the tier already held that version or a newer one).
    async fn apply_changes(&self, changes: &[Change], mode: ApplyMode) -> StoreResult<Vec<bool>>;

    /// The stored states of up to `limit` records of `collection` whose ids
    /// sort after `after`, ordered by id: live records and deletion markers,
    /// without expired records. Sync and consistency checks walk a collection
    /// with it page by page, in bounded memory.
    async fn scan(
        &self,
        collection: &CollectionName,
        after: Option<&RecordId>,
        limit: usize,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Change>>;

    /// The stored states (live or deleted) of these ids; none for an id the
    /// tier holds nothing about, or whose record expired.
    async fn get_states(
        &self,
        collection: &CollectionName,
        ids: &[RecordId],
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Change>>;

    /// How many records (live and deleted) a collection holds, for progress.
    async fn count(&self, collection: &CollectionName) -> StoreResult<u64>;

    /// Points a record's unique index entries at it (replacing the ones it
    /// had), as a write would; fails with `UniqueViolation`, changing
    /// nothing, when a live record holds one of the values. Imports use it
    /// after `apply_changes`, which carries records but not their entries.
    async fn set_index_entries(
        &self,
        key: &RecordKey,
        entries: &[IndexEntry],
        now: OffsetDateTime,
    ) -> StoreResult<()>;

    /// Physically removes expired records and deletion markers older than
    /// `tombstone_retention`; returns how many rows went.
    async fn purge_expired(
        &self,
        now: OffsetDateTime,
        tombstone_retention: Duration,
    ) -> StoreResult<u64>;
}

/// A cache tier's copies as requests see them, and the truth of a
/// cache-only collection.
#[async_trait]
pub trait CacheRecords: Send + Sync + 'static {
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

    /// Removes the copies of these records (written elsewhere while the cache
    /// could not be updated).
    async fn invalidate(&self, keys: &[RecordKey]) -> StoreResult<()>;

    /// Removes the copy of `key` if it is older than `version` (pinned or
    /// not, never the truth of a cache-only collection): a write committed
    /// `version` in the durable tier around the cache. Returns whether it did.
    async fn invalidate_older(&self, key: &RecordKey, version: Version) -> StoreResult<bool>;

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

    /// One page of a collection the cache holds as the only tier
    /// (`redis_only`), ordered by id.
    async fn list(&self, query: &ListQuery) -> StoreResult<ListPage>;

    /// Points a record held as the truth of a cache-only deployment at its
    /// unique index values, as a put with claims does (see
    /// [`CacheWrite::claims`](crate::CacheWrite::claims)): an import, after
    /// `copy_in`, which carries the record but not its claims. Fails with
    /// `UniqueViolation`, changing nothing, when another live record holds
    /// one; does nothing for a record that is not live at `now`.
    async fn claim(
        &self,
        key: &RecordKey,
        claims: &[IndexEntry],
        now: OffsetDateTime,
    ) -> StoreResult<()>;
}

/// What a cache tier holds, pins included: what sync, the consistency
/// check and the settling of journaled keys read and write.
#[async_trait]
pub trait CacheStates: Send + Sync + 'static {
    /// One step of a scan over the entries of `collection`, from `cursor`
    /// (0 to start): the next cursor (0 when done) and about `count` entries.
    /// Like Redis `SCAN`, an entry may come more than once.
    async fn scan(
        &self,
        collection: &CollectionName,
        cursor: u64,
        count: usize,
    ) -> StoreResult<(u64, Vec<CachedState>)>;

    /// What the cache holds for each key (`None`: nothing), with the pin:
    /// recovery asks this before the durable tier answers for a key whose
    /// newest version may still wait in a journal.
    async fn get_states(&self, keys: &[RecordKey]) -> StoreResult<Vec<Option<CachedState>>>;

    /// Stores a state carried over from the durable tier (sync, repair): a
    /// copy that lives for `lifetime`, or, `authoritative`, the truth of a
    /// cache-only collection (no expiry but the record's own); a deletion
    /// becomes a marker living for `lifetime`. Only over an older version
    /// unless `force`; never over a pinned copy.
    async fn copy_in(
        &self,
        state: &Change,
        lifetime: Duration,
        authoritative: bool,
        force: bool,
    ) -> StoreResult<CopyOutcome>;
}
