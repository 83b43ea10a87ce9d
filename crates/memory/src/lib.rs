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
    Amount, Bucket, BucketValues, CacheEntry, CacheIncrementOutcome, CacheStore, CacheWrite,
    CacheWriteOutcome, CachedState, Change, CollectionName, ControlState, CopyOutcome,
    CounterIncrement, CounterJournalEntry, CounterScope, FieldName, Granularity, IdempotencyClaim,
    IndexName, JournalAck, JournalEntry, JournalKind, JournalPosition, ListPage, ListQuery,
    PageBuilder, Precondition, Record, RecordId, RecordKey, ReplayBounds, StoreError, StoreResult,
    Tier, Version, WriteChange, json_size, prefix_upper_bound,
};
use time::OffsetDateTime;
use tokio::sync::broadcast;

/// How long an applied increment id is remembered (a retry comes sooner).
const OP_MARKER_TTL: Duration = Duration::from_secs(2 * 86_400);

/// Open scan cursors kept (an abandoned scan's cursor is dropped eventually).
const MAX_SCAN_CURSORS: usize = 4096;

/// Expired entries are swept at most this often.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

const COUNTER_STREAM: &str = "counters";

fn stream_name(kind: JournalKind) -> &'static str {
    match kind {
        JournalKind::WriteBehind => "write_behind",
        JournalKind::Outage => "outage",
    }
}

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
                bytes: copy_bytes(Some(record)),
            },
            Change::Delete { version, at, .. } => Self {
                version: *version,
                record: None,
                updated_at: *at,
                expires: None,
                pinned: None,
                authoritative: false,
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
        stream: stream.to_owned(),
        id: seq.to_string(),
        pinned_key: String::new(),
    }
}

fn sequence(position: &JournalPosition) -> StoreResult<u64> {
    position
        .id
        .parse()
        .map_err(|_| internal(format!("not a journal position: {:?}", position.id)))
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
    /// See `CacheStore::reconciled_generation`.
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

fn bucket_key(scope: &CounterScope, bucket: &Bucket) -> BucketKey {
    (scope.clone(), bucket.granularity, bucket.start)
}

/// The in-process cache.
pub struct MemoryCache {
    state: Mutex<State>,
    control: broadcast::Sender<ControlState>,
    run_id: String,
    bounds: Bounds,
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
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every step leaves the state consistent before it could panic.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.sweep_now_and_then();
        state
    }

    fn store_copy(&self, key: &RecordKey, copy: Copy, ttl: Duration) -> bool {
        let mut state = self.lock();
        if state
            .copy(key)
            .is_some_and(|current| current.version >= copy.version)
        {
            return false;
        }
        let copy = Copy {
            expires: deadline(ttl),
            ..copy
        };
        state.put_copy(key, copy, self.bounds);
        true
    }
}

#[async_trait]
impl CacheStore for MemoryCache {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn server_id(&self) -> StoreResult<Option<String>> {
        Ok(Some(self.run_id.clone()))
    }

    async fn invalidate(&self, keys: &[RecordKey]) -> StoreResult<()> {
        let mut state = self.lock();
        for key in keys {
            if state.copy(key).is_some_and(|copy| copy.is_plain()) {
                state.remove_copy(key);
            }
        }
        Ok(())
    }

    async fn invalidate_all(&self, pinned_too: bool) -> StoreResult<u64> {
        let mut state = self.lock();
        let mut removed = state.hints.len();
        state.hints.clear();
        let (mut copies_removed, mut bytes) = (0, 0);
        for copies in state.records.values_mut() {
            copies.retain(|_, copy| {
                let keep = copy.authoritative || (!pinned_too && copy.pinned.is_some());
                if !keep {
                    copies_removed += 1;
                    bytes += copy.bytes;
                }
                keep
            });
        }
        state.record_count -= copies_removed;
        state.record_bytes -= bytes;
        removed += copies_removed;
        Ok(removed as u64)
    }

    async fn invalidate_older(&self, key: &RecordKey, version: Version) -> StoreResult<bool> {
        let mut state = self.lock();
        let older = state
            .copy(key)
            .is_some_and(|copy| copy.version < version && !copy.authoritative);
        if older {
            state.remove_copy(key);
        }
        Ok(older)
    }

    async fn get(&self, key: &RecordKey) -> StoreResult<CacheEntry> {
        Ok(self
            .lock()
            .copy(key)
            .map_or(CacheEntry::Miss, |copy| copy.entry()))
    }

    async fn get_many(&self, keys: &[RecordKey]) -> StoreResult<Vec<CacheEntry>> {
        let mut state = self.lock();
        Ok(keys
            .iter()
            .map(|key| {
                state
                    .copy(key)
                    .map_or(CacheEntry::Miss, |copy| copy.entry())
            })
            .collect())
    }

    async fn store(&self, record: &Record, ttl: Duration) -> StoreResult<bool> {
        let copy = Copy::of(&Change::Put(record.clone()));
        Ok(self.store_copy(&record.key(), copy, ttl))
    }

    async fn store_deleted(
        &self,
        key: &RecordKey,
        version: Version,
        ttl: Duration,
    ) -> StoreResult<bool> {
        let copy = Copy::of(&Change::Delete {
            key: key.clone(),
            version,
            at: OffsetDateTime::now_utc(),
        });
        Ok(self.store_copy(key, copy, ttl))
    }

    async fn lookup_hint(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
    ) -> StoreResult<Option<RecordId>> {
        let key = (collection.clone(), index.clone(), value.to_owned());
        let state = self.lock();
        Ok(state
            .hints
            .get(&key)
            .filter(|(_, expires)| !expired(*expires, Instant::now()))
            .map(|(id, _)| id.clone()))
    }

    async fn store_lookup_hint(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
        id: &RecordId,
        ttl: Duration,
    ) -> StoreResult<()> {
        let key = (collection.clone(), index.clone(), value.to_owned());
        self.lock().hints.insert(key, (id.clone(), deadline(ttl)));
        Ok(())
    }

    async fn accept_write(&self, write: &CacheWrite) -> StoreResult<CacheWriteOutcome> {
        let mut state = self.lock();
        let current = state.copy(&write.key).cloned();
        // Cache-only, the cache is the truth: no entry means no record.
        if write.journal.is_some() && current.is_none() && !write.unknown_state_ok {
            return Ok(CacheWriteOutcome::UnknownState);
        }
        let live = current
            .as_ref()
            .and_then(|copy| copy.record.as_ref())
            .filter(|record| !record.is_expired(write.now));
        let current_version = current.as_ref().map(|copy| copy.version);
        let allowed = match write.precondition {
            Precondition::None => true,
            Precondition::IfMatch(expected) => live.is_some_and(|r| r.version == expected),
            Precondition::Exists => live.is_some(),
            Precondition::Absent => live.is_none(),
        };
        if !allowed {
            return Ok(CacheWriteOutcome::Conflict {
                current: current_version,
            });
        }
        if matches!(write.change, WriteChange::Delete) && live.is_none() {
            return Ok(CacheWriteOutcome::NotFound);
        }
        let version = Version::next(current_version, write.now);
        let created_at = live.map_or(write.now, |record| record.created_at);
        let created = (current.is_some() || write.journal.is_none()) && live.is_none();
        let change = match &write.change {
            WriteChange::Put { data, expires_at } => Change::Put(Record {
                collection: write.key.collection.clone(),
                id: write.key.id.clone(),
                version,
                data: data.clone(),
                created_at,
                updated_at: write.now,
                expires_at: *expires_at,
            }),
            WriteChange::Delete => Change::Delete {
                key: write.key.clone(),
                version,
                at: write.now,
            },
        };
        let mut copy = Copy::of(&change);
        match write.journal {
            Some(kind) => {
                copy.pinned = Some(version);
                state.journal(kind).append(change);
            }
            None => match &write.change {
                WriteChange::Put { expires_at, .. } => {
                    copy.authoritative = true;
                    copy.expires = expires_at.and_then(instant_of);
                }
                WriteChange::Delete => copy.expires = deadline(write.deleted_marker_ttl),
            },
        }
        state.put_copy(&write.key, copy, self.bounds);
        Ok(CacheWriteOutcome::Written {
            version,
            created,
            created_at,
        })
    }

    async fn read_journal(
        &self,
        consumer: &str,
        max: usize,
        recover: Option<Duration>,
    ) -> StoreResult<Vec<JournalEntry>> {
        let mut state = self.lock();
        let mut entries = Vec::new();
        for kind in [JournalKind::Outage, JournalKind::WriteBehind] {
            let room = max.saturating_sub(entries.len());
            let read = state.journal(kind).read(consumer, room, recover);
            entries.extend(read.into_iter().map(|(seq, change)| JournalEntry {
                kind,
                position: position(stream_name(kind), seq),
                change,
            }));
        }
        Ok(entries)
    }

    async fn ack_journal(&self, acks: &[JournalAck]) -> StoreResult<()> {
        let mut state = self.lock();
        for ack in acks {
            let kind = JournalKind::ALL
                .into_iter()
                .find(|kind| stream_name(*kind) == ack.position.stream)
                .ok_or_else(|| internal(format!("unknown journal {:?}", ack.position.stream)))?;
            let Some(change) = state.journal(kind).ack(sequence(&ack.position)?) else {
                continue;
            };
            let key = change.key();
            let Some(copy) = state.copy(&key) else {
                continue;
            };
            // A newer journaled write pinned it again; its own replay unpins.
            if copy.pinned != Some(ack.version) {
                continue;
            }
            if ack.superseded {
                state.remove_copy(&key);
            } else {
                copy.pinned = None;
                copy.expires = deadline(ack.ttl);
            }
        }
        Ok(())
    }

    async fn set_aside(&self, refused: &[(JournalEntry, String)]) -> StoreResult<()> {
        for (entry, reason) in refused {
            {
                let mut state = self.lock();
                if state.dead_letters.len() as u64 >= hybridstore_core::MAX_DEAD_LETTERS {
                    state.dead_letters.pop_front();
                }
                state
                    .dead_letters
                    .push_back((entry.change.clone(), reason.clone()));
            }
            self.ack_journal(&[JournalAck::set_aside(entry)]).await?;
        }
        Ok(())
    }

    async fn reconciled_generation(&self) -> StoreResult<u64> {
        Ok(self.lock().reconciled_generation)
    }

    async fn set_reconciled_generation(&self, generation: u64) -> StoreResult<()> {
        let mut state = self.lock();
        state.reconciled_generation = state.reconciled_generation.max(generation);
        Ok(())
    }

    async fn dead_letters(&self) -> StoreResult<u64> {
        Ok(self.lock().dead_letters.len() as u64)
    }

    async fn list(&self, query: &ListQuery) -> StoreResult<ListPage> {
        let mut state = self.lock();
        let prefix = query.prefix.as_deref().unwrap_or("");
        let upper = prefix_upper_bound(prefix);
        let now = Instant::now();
        let Some(copies) = state.records.get_mut(&query.collection) else {
            return Ok(ListPage::default());
        };
        // Ids after the cursor and within the prefix, straight from the ordered map.
        let lower = match query.after.as_ref().map(RecordId::as_str) {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        let mut page = PageBuilder::new(query);
        for record in copies
            .range::<str, _>((lower, Bound::Unbounded))
            .take_while(|(id, _)| id.as_str() < upper.as_str())
            .filter(|(_, copy)| copy.authoritative && !expired(copy.expires, now))
            .filter_map(|(_, copy)| copy.record.as_ref())
            .filter(|record| !record.is_expired(query.now))
        {
            let size = json_size(&record.data);
            if !page.offer(record.clone(), size) {
                break;
            }
        }
        Ok(page.finish())
    }

    async fn pinned(&self, query: &ListQuery) -> StoreResult<Vec<Change>> {
        let state = self.lock();
        let prefix = query.prefix.as_deref().unwrap_or("");
        let upper = prefix_upper_bound(prefix);
        let Some(copies) = state.records.get(&query.collection) else {
            return Ok(Vec::new());
        };
        let lower = match query.after.as_ref().map(RecordId::as_str) {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        // Pinned copies never expire or get evicted; the walk is bounded by
        // the cache's size.
        Ok(copies
            .range::<str, _>((lower, Bound::Unbounded))
            .take_while(|(id, _)| id.as_str() < upper.as_str())
            .filter(|(_, copy)| copy.pinned.is_some())
            .take(query.limit as usize)
            .map(|(id, copy)| copy.state(&RecordKey::new(query.collection.clone(), id.clone())))
            .collect())
    }

    async fn journal_backlog(&self, kind: JournalKind) -> StoreResult<u64> {
        Ok(self.lock().journal(kind).len())
    }

    async fn scan(
        &self,
        collection: &CollectionName,
        cursor: u64,
        count: usize,
    ) -> StoreResult<(u64, Vec<CachedState>)> {
        let mut state = self.lock();
        let after = match cursor {
            0 => None,
            token => Some(
                state
                    .scan_cursors
                    .remove(&token)
                    .ok_or_else(|| internal(format!("unknown scan cursor {token}")))?,
            ),
        };
        let now = Instant::now();
        let count = count.max(1);
        let page: Vec<CachedState> = match state.records.get(collection) {
            None => Vec::new(),
            Some(copies) => {
                let from = after.as_ref().map_or(Bound::Unbounded, Bound::Excluded);
                copies
                    .range::<RecordId, _>((from, Bound::Unbounded))
                    .filter(|(_, copy)| !expired(copy.expires, now))
                    .take(count)
                    .map(|(id, copy)| CachedState {
                        state: copy.state(&RecordKey::new(collection.clone(), id.clone())),
                        pinned: copy.pinned.is_some(),
                        authoritative: copy.authoritative,
                    })
                    .collect()
            }
        };
        if page.len() < count {
            return Ok((0, page));
        }
        state.next_cursor += 1;
        let token = state.next_cursor;
        let last = page.last().map(|s| s.state.key().id).expect("a full page");
        state.scan_cursors.insert(token, last);
        if state.scan_cursors.len() > MAX_SCAN_CURSORS {
            state.scan_cursors.pop_first();
        }
        Ok((token, page))
    }

    async fn get_states(&self, keys: &[RecordKey]) -> StoreResult<Vec<Option<CachedState>>> {
        let mut state = self.lock();
        Ok(keys
            .iter()
            .map(|key| {
                state.copy(key).map(|copy| CachedState {
                    state: copy.state(key),
                    pinned: copy.pinned.is_some(),
                    authoritative: copy.authoritative,
                })
            })
            .collect())
    }

    async fn copy_in(
        &self,
        change: &Change,
        lifetime: Duration,
        authoritative: bool,
        force: bool,
    ) -> StoreResult<CopyOutcome> {
        let key = change.key();
        let mut state = self.lock();
        if let Some(current) = state.copy(&key) {
            if current.pinned.is_some() {
                return Ok(CopyOutcome::Pinned);
            }
            let deletion = matches!(change, Change::Delete { .. });
            let adopt = authoritative
                && !deletion
                && current.version == change.version()
                && !current.authoritative;
            if current.version >= change.version() && !force && !adopt {
                return Ok(CopyOutcome::Kept);
            }
        }
        let mut copy = Copy::of(change);
        match change {
            Change::Put(record) if authoritative => {
                copy.authoritative = true;
                copy.expires = record.expires_at.and_then(instant_of);
            }
            _ => copy.expires = deadline(lifetime),
        }
        state.put_copy(&key, copy, self.bounds);
        Ok(CopyOutcome::Written)
    }

    async fn load_control(&self) -> StoreResult<Option<ControlState>> {
        Ok(self.lock().control.clone())
    }

    async fn publish_control(&self, control: &ControlState) -> StoreResult<()> {
        {
            let mut state = self.lock();
            if state
                .control
                .as_ref()
                .is_none_or(|held| held.revision < control.revision)
            {
                state.control = Some(control.clone());
            }
        }
        // No subscriber is fine: nobody is listening yet.
        let _ = self.control.send(control.clone());
        Ok(())
    }

    async fn subscribe_control(&self) -> StoreResult<BoxStream<'static, ControlState>> {
        let receiver = self.control.subscribe();
        let states = futures_util::stream::unfold(receiver, |mut receiver| async move {
            loop {
                match receiver.recv().await {
                    Ok(state) => return Some((state, receiver)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(states.boxed())
    }

    async fn increment(&self, increment: &CounterIncrement) -> StoreResult<CacheIncrementOutcome> {
        let mut state = self.lock();
        let cold: Vec<Bucket> = increment
            .buckets
            .iter()
            .filter(|bucket| {
                state
                    .bucket(&bucket_key(&increment.scope, bucket))
                    .is_none()
            })
            .cloned()
            .collect();
        if !cold.is_empty() {
            return Ok(CacheIncrementOutcome::Cold(cold));
        }
        if state.op_markers.contains_key(&increment.op_id) {
            return Ok(CacheIncrementOutcome::Duplicate);
        }
        // Every sum is checked before any is changed: all or nothing.
        let mut applied = Vec::with_capacity(increment.buckets.len());
        for bucket in &increment.buckets {
            let held = state
                .bucket(&bucket_key(&increment.scope, bucket))
                .expect("checked above");
            let mut values = Vec::with_capacity(increment.deltas.len());
            for (field, delta) in &increment.deltas {
                let current = held.values.get(field).copied().unwrap_or(Amount::ZERO);
                let sum =
                    current
                        .add_to_total(*delta)
                        .ok_or_else(|| StoreError::CounterOutOfRange {
                            field: field.to_string(),
                        })?;
                values.push((field.clone(), sum));
            }
            applied.push((
                BucketValues {
                    bucket: bucket.clone(),
                    values,
                },
                held.complete,
            ));
        }
        for (bucket_values, _) in &applied {
            let held = state
                .bucket(&bucket_key(&increment.scope, &bucket_values.bucket))
                .expect("checked above");
            held.values.extend(bucket_values.values.iter().cloned());
            held.expires_at = bucket_values.bucket.expires_at;
        }
        state
            .op_markers
            .insert(increment.op_id.clone(), deadline(OP_MARKER_TTL));
        state.counter_journal().append(increment.clone());
        Ok(CacheIncrementOutcome::Applied(applied))
    }

    async fn seed_buckets(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
        values: &[BucketValues],
        complete: bool,
    ) -> StoreResult<()> {
        let mut state = self.lock();
        for bucket in buckets {
            let key = bucket_key(scope, bucket);
            if state.bucket(&key).is_some() {
                continue;
            }
            let held = values.iter().find(|v| {
                v.bucket.granularity == bucket.granularity && v.bucket.start == bucket.start
            });
            state.buckets.insert(
                key,
                HeldBucket {
                    values: held
                        .into_iter()
                        .flat_map(|v| v.values.iter().cloned())
                        .collect(),
                    complete,
                    expires_at: bucket.expires_at,
                },
            );
        }
        Ok(())
    }

    async fn counter_buckets(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
    ) -> StoreResult<Vec<Option<(BucketValues, bool)>>> {
        let mut state = self.lock();
        Ok(buckets
            .iter()
            .map(|bucket| {
                state.bucket(&bucket_key(scope, bucket)).map(|held| {
                    let values = held
                        .values
                        .iter()
                        .map(|(field, amount)| (field.clone(), *amount))
                        .collect();
                    (
                        BucketValues {
                            bucket: bucket.clone(),
                            values,
                        },
                        held.complete,
                    )
                })
            })
            .collect())
    }

    async fn read_counter_journal(
        &self,
        consumer: &str,
        max: usize,
        recover: Option<Duration>,
    ) -> StoreResult<Vec<CounterJournalEntry>> {
        let read = self.lock().counter_journal().read(consumer, max, recover);
        Ok(read
            .into_iter()
            .map(|(seq, increment)| CounterJournalEntry {
                position: position(COUNTER_STREAM, seq),
                increment,
            })
            .collect())
    }

    async fn ack_counter_journal(&self, positions: &[JournalPosition]) -> StoreResult<()> {
        let mut state = self.lock();
        for position in positions {
            state.counter_journal().ack(sequence(position)?);
        }
        Ok(())
    }

    async fn counter_backlog(&self) -> StoreResult<u64> {
        Ok(self.lock().counter_journal().len())
    }

    async fn pending_increments(
        &self,
        scope: &CounterScope,
        limit: usize,
    ) -> StoreResult<Option<Vec<CounterIncrement>>> {
        let mut state = self.lock();
        let journal = state.counter_journal();
        if journal.len() > limit as u64 {
            return Ok(None);
        }
        Ok(Some(
            journal
                .entries
                .values()
                .filter(|delivery| &delivery.item.scope == scope)
                .map(|delivery| delivery.item.clone())
                .collect(),
        ))
    }

    async fn forget_buckets(&self, scope: &CounterScope, buckets: &[Bucket]) -> StoreResult<()> {
        let mut state = self.lock();
        for bucket in buckets {
            state.buckets.remove(&bucket_key(scope, bucket));
        }
        Ok(())
    }

    async fn forget_counters(&self) -> StoreResult<u64> {
        let mut state = self.lock();
        let count = state.buckets.len() as u64;
        state.buckets.clear();
        Ok(count)
    }

    async fn claim_idempotency(
        &self,
        owner: &str,
        key: &str,
        fingerprint: &str,
        pending_ttl: Duration,
    ) -> StoreResult<IdempotencyClaim> {
        let mut state = self.lock();
        let now = Instant::now();
        if state
            .idempotency
            .get(key)
            .is_some_and(|held| expired(held.expires, now))
        {
            state.drop_idempotency(key);
        }
        match state.idempotency.get(key) {
            None => {
                state.idempotency.insert(
                    key.to_owned(),
                    IdempotencyRecord {
                        owner: owner.to_owned(),
                        fingerprint: fingerprint.to_owned(),
                        response: None,
                        expires: deadline(pending_ttl),
                    },
                );
                Ok(IdempotencyClaim::Claimed)
            }
            Some(held) if held.fingerprint != fingerprint => Ok(IdempotencyClaim::Mismatch),
            Some(held) => Ok(match &held.response {
                Some(response) => IdempotencyClaim::Done(response.clone()),
                None => IdempotencyClaim::InProgress,
            }),
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
        let mut guard = self.lock();
        let state = &mut *guard;
        state.drop_idempotency(key);
        let size = response.len() as u64;
        let caller = state.replay_usage.get(owner).copied().unwrap_or_default();
        let total = state.replay_total;
        let fits = caller.responses < bounds.caller_responses
            && caller.bytes + size <= bounds.caller_bytes
            && total.responses < bounds.total_responses
            && total.bytes + size <= bounds.total_bytes;
        if !fits {
            return Ok(false);
        }
        for usage in [
            state.replay_usage.entry(owner.to_owned()).or_default(),
            &mut state.replay_total,
        ] {
            usage.responses += 1;
            usage.bytes += size;
        }
        state.idempotency.insert(
            key.to_owned(),
            IdempotencyRecord {
                owner: owner.to_owned(),
                fingerprint: fingerprint.to_owned(),
                response: Some(response.to_vec()),
                expires: deadline(ttl),
            },
        );
        Ok(true)
    }

    async fn release_idempotency(&self, _owner: &str, key: &str) -> StoreResult<()> {
        self.lock().drop_idempotency(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
