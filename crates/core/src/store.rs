//! The tier traits.
//!
//! A durable tier is the source of truth: it assigns versions, checks
//! preconditions and enforces unique indexes atomically. A cache tier holds copies
//! and only ever accepts a copy that is newer than what it holds, which is what
//! makes cache fills safe against concurrent writers (guarantee 1 of the spec).

use std::time::Duration;

use async_trait::async_trait;

use crate::ListPage;
use futures_util::stream::BoxStream;
use time::OffsetDateTime;

use crate::{
    Bucket, BucketValues, CacheIncrementOutcome, CacheWrite, CacheWriteOutcome, Change,
    CollectionName, ControlState, CounterIncrement, CounterJournalEntry, CounterScope,
    CounterValue, IndexEntry, IndexName, JournalAck, JournalEntry, JournalKind, JournalPosition,
    ListQuery, Precondition, Record, RecordId, RecordKey, RecordWrite, StoreError, Version,
    WriteOutcome,
};

pub type StoreResult<T> = Result<T, StoreError>;

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

/// How much the cache keeps of stored idempotent responses, per caller and
/// in all: a response past either bound is not stored (the call ran; its
/// retry runs again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayBounds {
    pub caller_responses: u64,
    pub caller_bytes: u64,
    pub total_responses: u64,
    pub total_bytes: u64,
}

impl Default for ReplayBounds {
    fn default() -> Self {
        Self {
            caller_responses: 10_000,
            caller_bytes: 16 << 20,
            total_responses: 100_000,
            total_bytes: 64 << 20,
        }
    }
}

/// What [`CacheStore::claim_idempotency`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// First use of the key: go ahead, then complete or release it.
    Claimed,
    /// Already answered: the stored response.
    Done(Vec<u8>),
    /// A first attempt is still running (or died less than a minute ago).
    InProgress,
    /// The key was used for a different request.
    Mismatch,
}

/// What [`CacheStore::copy_in`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyOutcome {
    Written,
    /// The cache already held the same or a newer version.
    Kept,
    /// The copy is pinned by a journal entry; its replay decides.
    Pinned,
}

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
    async fn list(&self, query: &ListQuery) -> StoreResult<ListPage>;

    /// The live record whose unique index `index` holds `value`.
    async fn lookup(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Option<Record>>;

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

    /// The operators' run-time state, if one was ever saved.
    async fn load_control(&self) -> StoreResult<Option<ControlState>>;

    /// Saves `state` unless the stored revision is not older (another change
    /// got in first); returns whether it was saved.
    async fn save_control(&self, state: &ControlState) -> StoreResult<bool>;

    /// Applies the increments whose `op_id` it has not applied before, all in
    /// one transaction (deltas to one bucket and field are summed into one
    /// upsert); returns how many were new. Replaying an increment is a no-op.
    async fn apply_increments(&self, increments: &[CounterIncrement]) -> StoreResult<usize>;

    /// How often a write went around the cache tier (it was unreachable):
    /// each episode bumps it before its first such write. Kept here, it
    /// survives a restart of the service and reaches every instance; a
    /// cache reconciled to a lower generation may hold stale copies.
    async fn cache_generation(&self) -> StoreResult<u64>;

    /// Bumps [`DurableStore::cache_generation`]; returns the new value.
    async fn bump_cache_generation(&self) -> StoreResult<u64>;

    /// Records that these keys have journaled versions the cache tier holds
    /// and this tier may lack, so that another instance serving from this
    /// tier while the cache is unreachable can tell (SPEC section 5: an
    /// instance cannot read another's journal then). A key already held keeps
    /// the higher version.
    async fn hold(&self, held: &[(RecordKey, Version)]) -> StoreResult<()>;

    /// Of `ids`, those held (see [`DurableStore::hold`]) at a version above
    /// what this tier stores of them: their newest version is in a journal.
    async fn held_above(
        &self,
        collection: &CollectionName,
        ids: &[RecordId],
    ) -> StoreResult<Vec<(RecordId, Version)>>;

    /// Whether any id of `collection` in `(after, until]` (`until: None`: no
    /// upper end) is held above what this tier stores.
    async fn any_held_above(
        &self,
        collection: &CollectionName,
        after: Option<&RecordId>,
        until: Option<&RecordId>,
    ) -> StoreResult<bool>;

    /// Forgets held keys this tier has caught up with and, given `stale`,
    /// those held longer (the journals were seen empty: their entries were
    /// set aside, or the journal that held them was lost); returns how many.
    async fn release_held(&self, stale: Option<Duration>) -> StoreResult<u64>;

    /// Every field of these buckets of one scope (a bucket without values is
    /// left out), and which of `op_ids` it has applied, read in one snapshot:
    /// values plus the deltas of the unapplied ones are then exact.
    async fn counter_snapshot(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
        op_ids: &[String],
    ) -> StoreResult<(Vec<BucketValues>, std::collections::HashSet<String>)>;

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

    /// Up to `limit` stored counter values ordered by (scope, granularity,
    /// bucket start, field), after `after`, leaving out expired buckets:
    /// export walks every counter with it in bounded memory.
    async fn scan_counters(
        &self,
        after: Option<&CounterValue>,
        limit: usize,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<CounterValue>>;

    /// Sets counter values carried in by an import, in one transaction: each
    /// only where the tier holds no value for that field of that bucket,
    /// unless `force`. Returns, per value, whether it was written. Setting
    /// (never adding) is what makes an import idempotent.
    async fn restore_counters(
        &self,
        values: &[CounterValue],
        force: bool,
    ) -> StoreResult<Vec<bool>>;

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

    /// Removes every record copy and lookup hint of this service, but never
    /// the truth of a cache-only collection, and pinned copies only with
    /// `pinned_too` (their journal entries stay); returns how many keys went.
    async fn invalidate_all(&self, pinned_too: bool) -> StoreResult<u64>;

    /// Removes the copy of `key` if it is older than `version` (pinned or
    /// not, never the truth of a cache-only collection): a write committed
    /// `version` in the durable tier around the cache. Returns whether it did.
    async fn invalidate_older(&self, key: &RecordKey, version: Version) -> StoreResult<bool>;

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

    /// Moves entries the durable tier refuses for good out of the journal,
    /// with the reason, into a bounded dead-letter journal an operator can
    /// inspect, so that replay goes on with the rest. The copy an entry
    /// pinned is dropped: the durable tier stays the truth.
    async fn set_aside(&self, refused: &[(JournalEntry, String)]) -> StoreResult<()>;

    /// The durable tier's cache generation this cache was last reconciled
    /// to (0 when never).
    async fn reconciled_generation(&self) -> StoreResult<u64>;

    /// Records that this cache was reconciled to `generation` (never lowers
    /// it).
    async fn set_reconciled_generation(&self, generation: u64) -> StoreResult<()>;

    /// How many entries were set aside and are still kept.
    async fn dead_letters(&self) -> StoreResult<u64>;

    /// One page of a collection the cache holds as the only tier
    /// (`redis_only`), ordered by id.
    async fn list(&self, query: &ListQuery) -> StoreResult<ListPage>;

    /// The states of `query.collection` pinned by journal entries not yet
    /// replayed (versions the durable tier may lack), in id order: after
    /// the query's cursor, within its prefix, at most `query.limit`.
    async fn pinned(&self, query: &ListQuery) -> StoreResult<Vec<Change>>;

    /// How many entries of one journal wait to be replayed.
    async fn journal_backlog(&self, kind: JournalKind) -> StoreResult<u64>;

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

    /// The mirror of the operators' run-time state.
    async fn load_control(&self) -> StoreResult<Option<ControlState>>;

    /// Updates the mirror (unless it holds a newer revision) and broadcasts
    /// `state` to every subscriber.
    async fn publish_control(&self, state: &ControlState) -> StoreResult<()>;

    /// Every state broadcast from now on, by any instance. The stream ends
    /// when the connection is lost; subscribe again.
    async fn subscribe_control(&self) -> StoreResult<BoxStream<'static, ControlState>>;

    /// Adds an increment to its buckets' values and journals it, in one
    /// atomic step; `Cold` (nothing changed) when a bucket is not held.
    async fn increment(&self, increment: &CounterIncrement) -> StoreResult<CacheIncrementOutcome>;

    /// Installs bucket values read from the durable tier for buckets the
    /// cache does not hold (a bucket held meanwhile is left alone).
    /// `complete: false` marks values that lack the durable tier's (it was
    /// unavailable): they count only what the cache accepted since.
    async fn seed_buckets(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
        values: &[BucketValues],
        complete: bool,
    ) -> StoreResult<()>;

    /// The values of these buckets, with whether each is complete; `None`
    /// for a bucket not held.
    async fn counter_buckets(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
    ) -> StoreResult<Vec<Option<(BucketValues, bool)>>>;

    /// About `max` journaled increments to replay (see [`Self::read_journal`]).
    async fn read_counter_journal(
        &self,
        consumer: &str,
        max: usize,
        recover: Option<Duration>,
    ) -> StoreResult<Vec<CounterJournalEntry>>;

    /// Removes replayed increments from the journal.
    async fn ack_counter_journal(&self, positions: &[JournalPosition]) -> StoreResult<()>;

    /// How many increments wait to be replayed.
    async fn counter_backlog(&self) -> StoreResult<u64>;

    /// The journaled increments of `scope` not yet replayed; `None` when more
    /// than `limit` increments (of any scope in its shard) wait, which would
    /// make reading them too slow.
    async fn pending_increments(
        &self,
        scope: &CounterScope,
        limit: usize,
    ) -> StoreResult<Option<Vec<CounterIncrement>>>;

    /// Drops these buckets (they are seeded again on their next increment).
    async fn forget_buckets(&self, scope: &CounterScope, buckets: &[Bucket]) -> StoreResult<()>;

    /// Drops every counter bucket of this service; returns how many.
    async fn forget_counters(&self) -> StoreResult<u64>;

    /// Claims an idempotency key (`key` is already scoped to its caller,
    /// `owner`) for the request with this fingerprint; an unfinished claim
    /// lapses after `pending_ttl`.
    async fn claim_idempotency(
        &self,
        owner: &str,
        key: &str,
        fingerprint: &str,
        pending_ttl: Duration,
    ) -> StoreResult<IdempotencyClaim>;

    /// Stores the response of a claimed key for `ttl`, if it fits within
    /// `bounds`; otherwise gives the key up (a retry runs again). Returns
    /// whether it was stored.
    async fn complete_idempotency(
        &self,
        owner: &str,
        key: &str,
        fingerprint: &str,
        response: &[u8],
        ttl: Duration,
        bounds: ReplayBounds,
    ) -> StoreResult<bool>;

    /// Gives a claimed key up (the request failed inside; a retry may run).
    async fn release_idempotency(&self, owner: &str, key: &str) -> StoreResult<()>;
}
