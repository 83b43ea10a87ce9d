//! The in-process cache tier of embedded mode.
//!
//! It keeps the same contract as the Redis tier, rule for rule (see the Lua
//! scripts of `hybridstore-redis`): copies carry versions and only a newer
//! version replaces one; a journaled write pins its copy until replayed; the
//! copies of a cache-only collection are authoritative and never evicted;
//! journals are delivered to a consumer and acknowledged, and redelivered
//! when not. Where Redis makes each step atomic with a script, this tier
//! holds one mutex for the step. Nothing here awaits, so the lock is never
//! held across a suspension point.
//!
//! Memory is bounded by `max_records` and by `max_bytes` (the copies' data
//! as JSON, plus a fixed allowance each): past either, expired copies go
//! first, then plain copies (never pinned or authoritative ones) until a
//! tenth is free.
//! Everything lives in the process: a restart starts cold, and journaled
//! writes not yet replayed (`cache_first`, or an outage of the durable tier)
//! die with the process, as they would with a Redis without persistence. The
//! README says so where it describes embedded mode.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use hybridstore_core::{
    Amount, Backend, Bucket, BucketValues, CacheCounters, CacheEntry, CacheIncrementOutcome,
    CacheJournal, CacheRecords, CacheRecovery, CacheStates, CacheWrite, CacheWriteOutcome,
    CachedState, Change, CollectionName, ControlChannel, ControlState, CopyOutcome,
    CounterIncrement, CounterJournalEntry, CounterScope, CounterValue, FieldName, Granularity,
    IdempotencyClaim, IdempotencyLedger, IndexEntry, IndexName, JournalAck, JournalEntry,
    JournalKind, JournalPosition, ListPage, ListQuery, PageBuilder, Record, RecordId, RecordKey,
    ReplayBounds, SeedTicket, StoreError, StoreResult, Tier, Version, WriteChange, json_size,
    prefix_upper_bound,
};
use time::OffsetDateTime;
use tokio::sync::broadcast;

/// Expired entries are swept at most this often.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

fn internal(what: impl Into<String>) -> StoreError {
    StoreError::internal(Tier::Cache, what.into())
}

/// `now + ttl`, or never for a lifetime too long to represent.
fn deadline(ttl: Duration) -> Option<Instant> {
    Instant::now().checked_add(ttl)
}

/// The instant of a wall-clock time (an expiry), now if it has passed.
fn instant_of(at: OffsetDateTime) -> Option<Instant> {
    let left = at - OffsetDateTime::now_utc();
    match Duration::try_from(left) {
        Ok(left) => deadline(left),
        Err(_) => Some(Instant::now()),
    }
}

fn expired(expires: Option<Instant>, now: Instant) -> bool {
    expires.is_some_and(|at| at <= now)
}

/// What the cache holds for one record key.
#[derive(Clone, Debug)]
struct Copy {
    version: Version,
    /// `None`: a deletion marker.
    record: Option<Record>,
    updated_at: OffsetDateTime,
    expires: Option<Instant>,
    /// The version of a journal entry not yet replayed.
    pinned: Option<Version>,
    /// The truth of a cache-only collection.
    authoritative: bool,
    /// The unique index values it claims, where the cache is the only tier
    /// (see [`State::claim_held_elsewhere`]).
    claims: Vec<IndexEntry>,
    /// What the copy counts against the byte bound (see [`copy_bytes`]).
    bytes: usize,
}

/// What a copy counts against the cache's byte bound: its data as compact
/// JSON plus a fixed allowance for the key, the version and the map entry.
/// (Parsed data can take more memory than its JSON; the bound is set with
/// that margin in mind.)
fn copy_bytes(record: Option<&Record>) -> usize {
    const OVERHEAD: usize = 256;
    OVERHEAD
        + record.map_or(0, |record| {
            json_size(&record.data) + record.id.as_str().len()
        })
}

impl Copy {
    fn of(change: &Change) -> Self {
        match change {
            Change::Put(record) => Self {
                version: record.version,
                updated_at: record.updated_at,
                record: Some(record.clone()),
                expires: None,
                pinned: None,
                authoritative: false,
                claims: Vec::new(),
                bytes: copy_bytes(Some(record)),
            },
            Change::Delete { version, at, .. } => Self {
                version: *version,
                record: None,
                updated_at: *at,
                expires: None,
                pinned: None,
                authoritative: false,
                claims: Vec::new(),
                bytes: copy_bytes(None),
            },
        }
    }

    fn entry(&self) -> CacheEntry {
        match &self.record {
            Some(record) => CacheEntry::Present(record.clone()),
            None => CacheEntry::Deleted(self.version),
        }
    }

    fn state(&self, key: &RecordKey) -> Change {
        match &self.record {
            Some(record) => Change::Put(record.clone()),
            None => Change::Delete {
                key: key.clone(),
                version: self.version,
                at: self.updated_at,
            },
        }
    }

    /// Held only as a copy: may be evicted or invalidated.
    fn is_plain(&self) -> bool {
        self.pinned.is_none() && !self.authoritative
    }
}

/// Entries appended in order, delivered to consumers, removed when
/// acknowledged (a Redis stream with one consumer group).
struct Journal<T> {
    next: u64,
    entries: BTreeMap<u64, Delivery<T>>,
}

struct Delivery<T> {
    item: T,
    /// To whom and when it was last delivered.
    delivered: Option<(String, Instant)>,
}

impl<T: Clone> Journal<T> {
    fn new() -> Self {
        Self {
            next: 1,
            entries: BTreeMap::new(),
        }
    }

    fn append(&mut self, item: T) {
        self.entries.insert(
            self.next,
            Delivery {
                item,
                delivered: None,
            },
        );
        self.next += 1;
    }

    /// About `max` entries: with `recover`, first this consumer's own
    /// unacknowledged ones and those idle longer than `recover` at another;
    /// then new ones.
    fn read(&mut self, consumer: &str, max: usize, recover: Option<Duration>) -> Vec<(u64, T)> {
        let now = Instant::now();
        let mut out = Vec::new();
        if let Some(idle) = recover {
            for (seq, delivery) in &mut self.entries {
                if out.len() >= max {
                    break;
                }
                let reclaim = delivery.delivered.as_ref().is_some_and(|(owner, at)| {
                    owner == consumer || now.duration_since(*at) >= idle
                });
                if reclaim {
                    delivery.delivered = Some((consumer.to_owned(), now));
                    out.push((*seq, delivery.item.clone()));
                }
            }
        }
        for (seq, delivery) in &mut self.entries {
            if out.len() >= max {
                break;
            }
            if delivery.delivered.is_none() {
                delivery.delivered = Some((consumer.to_owned(), now));
                out.push((*seq, delivery.item.clone()));
            }
        }
        out
    }

    fn ack(&mut self, seq: u64) -> Option<T> {
        self.entries.remove(&seq).map(|delivery| delivery.item)
    }

    fn len(&self) -> u64 {
        self.entries.len() as u64
    }
}

fn position(stream: &str, seq: u64) -> JournalPosition {
    JournalPosition {
        journal: stream.to_owned(),
        entry: seq.to_string(),
        copy: String::new(),
    }
}

fn sequence(position: &JournalPosition) -> StoreResult<u64> {
    position
        .entry
        .parse()
        .map_err(|_| internal(format!("not a journal position: {:?}", position.entry)))
}

type BucketKey = (CounterScope, Granularity, OffsetDateTime);

struct HeldBucket {
    values: BTreeMap<FieldName, Amount>,
    /// Seeded with the durable tier's values (not only what came since).
    complete: bool,
    expires_at: Option<OffsetDateTime>,
}

struct IdempotencyRecord {
    owner: String,
    fingerprint: String,
    response: Option<Vec<u8>>,
    expires: Option<Instant>,
}

/// Stored idempotent responses of one caller, or of all: how many, how
/// many bytes.
#[derive(Clone, Copy, Default)]
struct ReplayUsage {
    responses: u64,
    bytes: u64,
}

type HintKey = (CollectionName, IndexName, String);

#[derive(Default)]
struct State {
    records: HashMap<CollectionName, BTreeMap<RecordId, Copy>>,
    record_count: usize,
    /// What the copies count against the byte bound.
    record_bytes: usize,
    hints: HashMap<HintKey, (RecordId, Option<Instant>)>,
    journals: Option<[Journal<Change>; 2]>,
    counter_journal: Option<Journal<CounterIncrement>>,
    buckets: HashMap<BucketKey, HeldBucket>,
    /// How many times buckets were dropped (see `SeedTicket`).
    bucket_drops: u64,
    op_markers: HashMap<String, Option<Instant>>,
    control: Option<ControlState>,
    idempotency: HashMap<String, IdempotencyRecord>,
    replay_usage: HashMap<String, ReplayUsage>,
    replay_total: ReplayUsage,
    scan_cursors: BTreeMap<u64, RecordId>,
    next_cursor: u64,
    last_sweep: Option<Instant>,
    /// Entries the durable tier refused, with the reason (oldest first).
    dead_letters: std::collections::VecDeque<(Change, String)>,
    /// See `CacheRecovery::reconciled_generation`.
    reconciled_generation: u64,
}

impl State {
    fn journal(&mut self, kind: JournalKind) -> &mut Journal<Change> {
        let journals = self
            .journals
            .get_or_insert_with(|| [Journal::new(), Journal::new()]);
        match kind {
            JournalKind::WriteBehind => &mut journals[0],
            JournalKind::Outage => &mut journals[1],
        }
    }

    fn counter_journal(&mut self) -> &mut Journal<CounterIncrement> {
        self.counter_journal.get_or_insert_with(Journal::new)
    }

    /// The copy held for `key` (an expired one is dropped first).
    fn copy(&mut self, key: &RecordKey) -> Option<&mut Copy> {
        let copies = self.records.get_mut(&key.collection)?;
        if copies
            .get(&key.id)
            .is_some_and(|copy| expired(copy.expires, Instant::now()))
        {
            if let Some(removed) = copies.remove(&key.id) {
                self.record_count -= 1;
                self.record_bytes -= removed.bytes;
            }
            return None;
        }
        self.records.get_mut(&key.collection)?.get_mut(&key.id)
    }

    /// Whether a live record other than `id` holds this unique index value
    /// of `collection`. A claim is the value's lookup entry naming its
    /// owner; it counts only while the owner is live and still claims it.
    fn claim_held_elsewhere(
        &mut self,
        collection: &CollectionName,
        claim: &IndexEntry,
        id: &RecordId,
        now: OffsetDateTime,
    ) -> bool {
        let hint = (collection.clone(), claim.index.clone(), claim.value.clone());
        let Some((owner, _)) = self.hints.get(&hint).cloned() else {
            return false;
        };
        if &owner == id {
            return false;
        }
        let owner = RecordKey::new(collection.clone(), owner);
        self.copy(&owner).is_some_and(|copy| {
            copy.record.as_ref().is_some_and(|r| !r.is_expired(now)) && copy.claims.contains(claim)
        })
    }

    /// Frees the claims `key` held that are not among `claims`, and takes
    /// `claims` (recorded on its copy, which must be in place) until
    /// `expires`.
    fn retake_claims(
        &mut self,
        key: &RecordKey,
        held: &[IndexEntry],
        claims: &[IndexEntry],
        expires: Option<Instant>,
    ) {
        let hint = |claim: &IndexEntry| {
            (
                key.collection.clone(),
                claim.index.clone(),
                claim.value.clone(),
            )
        };
        for claim in held.iter().filter(|claim| !claims.contains(claim)) {
            if self
                .hints
                .get(&hint(claim))
                .is_some_and(|(owner, _)| owner == &key.id)
            {
                self.hints.remove(&hint(claim));
            }
        }
        for claim in claims {
            self.hints.insert(hint(claim), (key.id.clone(), expires));
        }
        if let Some(copy) = self.copy(key) {
            copy.claims = claims.to_vec();
        }
    }

    fn put_copy(&mut self, key: &RecordKey, copy: Copy, bounds: Bounds) {
        let copies = self.records.entry(key.collection.clone()).or_default();
        self.record_bytes += copy.bytes;
        match copies.insert(key.id.clone(), copy) {
            Some(replaced) => self.record_bytes -= replaced.bytes,
            None => self.record_count += 1,
        }
        if self.record_count > bounds.records || self.record_bytes > bounds.bytes {
            self.evict(bounds);
        }
    }

    fn remove_copy(&mut self, key: &RecordKey) -> Option<Copy> {
        let removed = self.records.get_mut(&key.collection)?.remove(&key.id);
        if let Some(removed) = &removed {
            self.record_count -= 1;
            self.record_bytes -= removed.bytes;
        }
        removed
    }

    /// Drops expired copies, then plain copies, until a tenth of the room
    /// (in count and in bytes) is free.
    fn evict(&mut self, bounds: Bounds) {
        self.sweep(Instant::now());
        let count_target = bounds.records - bounds.records / 10;
        let bytes_target = bounds.bytes - bounds.bytes / 10;
        for copies in self.records.values_mut() {
            if self.record_count <= count_target && self.record_bytes <= bytes_target {
                break;
            }
            let plain: Vec<RecordId> = copies
                .iter()
                .filter(|(_, copy)| copy.is_plain())
                .map(|(id, _)| id.clone())
                .collect();
            for id in plain {
                if self.record_count <= count_target && self.record_bytes <= bytes_target {
                    break;
                }
                if let Some(removed) = copies.remove(&id) {
                    self.record_count -= 1;
                    self.record_bytes -= removed.bytes;
                }
            }
        }
    }

    /// Removes everything expired (at most once a second unless evicting).
    fn sweep(&mut self, now: Instant) {
        self.last_sweep = Some(now);
        let (mut removed, mut bytes) = (0, 0);
        for copies in self.records.values_mut() {
            copies.retain(|_, copy| {
                let keep = !expired(copy.expires, now);
                if !keep {
                    removed += 1;
                    bytes += copy.bytes;
                }
                keep
            });
        }
        self.record_count -= removed;
        self.record_bytes -= bytes;
        self.hints.retain(|_, (_, expires)| !expired(*expires, now));
        self.op_markers.retain(|_, expires| !expired(*expires, now));
        let gone: Vec<String> = self
            .idempotency
            .iter()
            .filter(|(_, record)| expired(record.expires, now))
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            self.drop_idempotency(&key);
        }
        let wall = OffsetDateTime::now_utc();
        self.buckets
            .retain(|_, bucket| bucket.expires_at.is_none_or(|at| at > wall));
    }

    fn sweep_now_and_then(&mut self) {
        let now = Instant::now();
        if self
            .last_sweep
            .is_none_or(|last| now.duration_since(last) >= SWEEP_EVERY)
        {
            self.sweep(now);
        }
    }

    /// Removes a key's record, and its response from the usage.
    fn drop_idempotency(&mut self, key: &str) {
        let Some(record) = self.idempotency.remove(key) else {
            return;
        };
        if let Some(response) = &record.response {
            let size = response.len() as u64;
            for usage in [
                self.replay_usage.entry(record.owner.clone()).or_default(),
                &mut self.replay_total,
            ] {
                usage.responses -= 1;
                usage.bytes -= size;
            }
            if self
                .replay_usage
                .get(&record.owner)
                .is_some_and(|usage| usage.responses == 0)
            {
                self.replay_usage.remove(&record.owner);
            }
        }
    }

    fn bucket(&mut self, key: &BucketKey) -> Option<&mut HeldBucket> {
        let wall = OffsetDateTime::now_utc();
        if self
            .buckets
            .get(key)
            .is_some_and(|bucket| bucket.expires_at.is_some_and(|at| at <= wall))
        {
            self.buckets.remove(key);
        }
        self.buckets.get_mut(key)
    }
}

/// The in-process cache.
pub struct MemoryCache {
    state: Mutex<State>,
    control: broadcast::Sender<ControlState>,
    run_id: String,
    bounds: Bounds,
    /// How long a counter bucket stays without use (see
    /// `Bucket::cache_expiry`).
    counter_idle: Duration,
}

/// What the cache holds at most: record copies and markers, and the bytes
/// they count (see [`copy_bytes`]). Pinned and authoritative copies are
/// never evicted, so they can take the cache past either bound.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub records: usize,
    pub bytes: usize,
}

impl MemoryCache {
    /// A cache holding at most `max_records` record copies and markers,
    /// and at most `max_bytes` of them.
    pub fn new(max_records: usize, max_bytes: usize) -> Self {
        let (control, _) = broadcast::channel(16);
        let started = OffsetDateTime::now_utc().unix_timestamp_nanos();
        Self {
            state: Mutex::new(State::default()),
            control,
            run_id: format!("memory-{}-{started}", std::process::id()),
            bounds: Bounds {
                records: max_records.max(10),
                bytes: max_bytes.max(64 * 1024),
            },
            counter_idle: Duration::from_secs(300),
        }
    }

    /// Lets a counter bucket go after `idle` without use.
    pub fn with_counter_idle(mut self, idle: Duration) -> Self {
        self.counter_idle = idle;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every step leaves the state consistent before it could panic.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.sweep_now_and_then();
        state
    }
}

#[async_trait]
impl Backend for MemoryCache {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
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

#[cfg(test)]
mod tests;
