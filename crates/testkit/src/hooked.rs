//! A durable tier that forwards every call to a real one and can hold some
//! of them at a chosen moment: the slow reader of the cache-fill race, or a
//! replay batch stuck behind one record while everything else goes on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use hybridstore_core::{
    ApplyMode, Backend, Bucket, BucketValues, CacheLedger, Change, CollectionName, ControlState,
    CounterIncrement, CounterScope, CounterValue, DurableControl, DurableCounters, DurableRecords,
    DurableStates, DurableStore, IndexEntry, IndexName, ListPage, ListQuery, Precondition, Record,
    RecordId, RecordKey, RecordWrite, StoreResult, Version, WriteOutcome,
};
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};

/// The real durable tier, with holds (see the module docs).
pub struct HookedDurable {
    /// Set when the service is built (see `TestAppBuilder::hooked`).
    real: std::sync::OnceLock<Arc<dyn DurableStore>>,
    get_armed: AtomicBool,
    get_reached: Notify,
    get_release: Notify,
    held_apply: watch::Sender<Option<RecordKey>>,
    applies_held: AtomicU64,
    /// Scans that still succeed before every scan fails (`u64::MAX`: never).
    scans_left: AtomicU64,
    /// How long a `put` waits, after the real tier carried it out, before
    /// it answers (ms; 0: at once): a write taken but answered late.
    put_answer_delay_ms: AtomicU64,
    /// How long a `hold` (publishing journaled keys) waits before it
    /// reaches the real tier (ms; 0: at once): a slow publisher.
    hold_delay_ms: AtomicU64,
}

impl HookedDurable {
    pub(crate) fn new() -> Self {
        Self {
            real: std::sync::OnceLock::new(),
            get_armed: AtomicBool::new(false),
            get_reached: Notify::new(),
            get_release: Notify::new(),
            held_apply: watch::Sender::new(None),
            applies_held: AtomicU64::new(0),
            scans_left: AtomicU64::new(u64::MAX),
            put_answer_delay_ms: AtomicU64::new(0),
            hold_delay_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn attach(&self, real: Arc<dyn DurableStore>) {
        assert!(self.real.set(real).is_ok(), "attached once");
    }

    fn inner(&self) -> &Arc<dyn DurableStore> {
        self.real
            .get()
            .expect("attached when the service was built")
    }

    /// Every `put` is carried out by the real tier and answered `delay`
    /// later (zero: at once again).
    pub fn answer_puts_late(&self, delay: Duration) {
        self.put_answer_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// The next `get` reads the durable tier and then waits, before it
    /// returns, until [`HookedDurable::release_get`].
    pub fn hold_next_get(&self) {
        self.get_armed.store(true, Ordering::SeqCst);
    }

    /// Waits until a held `get` has read the durable tier.
    pub async fn get_reached(&self) {
        tokio::time::timeout(Duration::from_secs(10), self.get_reached.notified())
            .await
            .expect("a held get was reached");
    }

    pub fn release_get(&self) {
        self.get_release.notify_one();
    }

    /// Every `apply_changes` that carries a change of `key` (a replay batch
    /// holding it) waits, before it touches the durable tier, until
    /// [`HookedDurable::release_applies`].
    pub fn hold_applies_of(&self, key: RecordKey) {
        self.held_apply.send_replace(Some(key));
    }

    pub fn release_applies(&self) {
        self.held_apply.send_replace(None);
    }

    /// After `n` more successful `scan` calls, every `scan` fails with an
    /// error the tier would give for a row it cannot read: an export that
    /// breaks half-way.
    pub fn fail_scans_after(&self, n: u64) {
        self.scans_left.store(n, Ordering::SeqCst);
    }

    /// Every `hold` (an instance publishing the keys it journaled) waits
    /// `delay` before it reaches the real tier (zero: at once again).
    pub fn delay_holds(&self, delay: Duration) {
        self.hold_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// How many `apply_changes` calls have been held so far.
    pub fn applies_held(&self) -> u64 {
        self.applies_held.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Backend for HookedDurable {
    fn backend(&self) -> &'static str {
        self.inner().backend()
    }
    async fn ping(&self) -> StoreResult<()> {
        self.inner().ping().await
    }
}

// Hooked: `get` and `put` (and `hold`, further down).
#[async_trait]
impl DurableRecords for HookedDurable {
    async fn get(&self, key: &RecordKey, now: OffsetDateTime) -> StoreResult<Option<Record>> {
        let result = self.inner().get(key, now).await;
        if self.get_armed.swap(false, Ordering::SeqCst) {
            self.get_reached.notify_one();
            self.get_release.notified().await;
        }
        result
    }
    async fn get_many(
        &self,
        c: &CollectionName,
        ids: &[RecordId],
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Record>> {
        self.inner().get_many(c, ids, now).await
    }
    async fn put(&self, write: &RecordWrite) -> StoreResult<WriteOutcome> {
        let done = self.inner().put(write).await;
        let delay = self.put_answer_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        done
    }
    async fn delete(
        &self,
        key: &RecordKey,
        p: Precondition,
        now: OffsetDateTime,
    ) -> StoreResult<Version> {
        self.inner().delete(key, p, now).await
    }
    async fn list(&self, query: &ListQuery) -> StoreResult<ListPage> {
        self.inner().list(query).await
    }
    async fn lookup(
        &self,
        c: &CollectionName,
        i: &IndexName,
        v: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Option<Record>> {
        self.inner().lookup(c, i, v, now).await
    }
}

// Hooked: `apply_changes` and `scan`.
#[async_trait]
impl DurableStates for HookedDurable {
    async fn apply_changes(&self, changes: &[Change], mode: ApplyMode) -> StoreResult<Vec<bool>> {
        let mut held = self.held_apply.subscribe();
        let holds = |held: &Option<RecordKey>| {
            held.as_ref()
                .is_some_and(|key| changes.iter().any(|change| &change.key() == key))
        };
        if holds(&held.borrow_and_update()) {
            self.applies_held.fetch_add(1, Ordering::SeqCst);
            let _ = held.wait_for(|held| !holds(held)).await;
        }
        self.inner().apply_changes(changes, mode).await
    }
    async fn scan(
        &self,
        c: &CollectionName,
        after: Option<&RecordId>,
        limit: usize,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Change>> {
        let left = self.scans_left.load(Ordering::SeqCst);
        if left == 0 {
            return Err(hybridstore_core::StoreError::internal(
                hybridstore_core::Tier::Durable,
                "a row could not be read",
            ));
        }
        if left != u64::MAX {
            self.scans_left.fetch_sub(1, Ordering::SeqCst);
        }
        self.inner().scan(c, after, limit, now).await
    }
    async fn get_states(
        &self,
        c: &CollectionName,
        ids: &[RecordId],
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Change>> {
        self.inner().get_states(c, ids, now).await
    }
    async fn count(&self, c: &CollectionName) -> StoreResult<u64> {
        self.inner().count(c).await
    }
    async fn set_index_entries(
        &self,
        key: &RecordKey,
        entries: &[IndexEntry],
        now: OffsetDateTime,
    ) -> StoreResult<()> {
        self.inner().set_index_entries(key, entries, now).await
    }
    async fn purge_expired(&self, now: OffsetDateTime, retention: Duration) -> StoreResult<u64> {
        self.inner().purge_expired(now, retention).await
    }
}

// The roles below are the real tier's, unhooked.
#[async_trait]
impl DurableCounters for HookedDurable {
    async fn apply_increments(&self, increments: &[CounterIncrement]) -> StoreResult<usize> {
        self.inner().apply_increments(increments).await
    }
    async fn counter_snapshot(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
        op_ids: &[String],
    ) -> StoreResult<(Vec<BucketValues>, std::collections::HashSet<String>)> {
        self.inner().counter_snapshot(scope, buckets, op_ids).await
    }
    async fn scan_counters(
        &self,
        after: Option<&CounterValue>,
        limit: usize,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<CounterValue>> {
        self.inner().scan_counters(after, limit, now).await
    }
    async fn restore_counters(
        &self,
        values: &[CounterValue],
        force: bool,
    ) -> StoreResult<Vec<bool>> {
        self.inner().restore_counters(values, force).await
    }
}

#[async_trait]
impl DurableControl for HookedDurable {
    async fn load_control(&self) -> StoreResult<Option<ControlState>> {
        self.inner().load_control().await
    }
    async fn save_control(&self, state: &ControlState) -> StoreResult<bool> {
        self.inner().save_control(state).await
    }
    async fn take_turn(&self, name: &str, holder: &str, period: Duration) -> StoreResult<bool> {
        self.inner().take_turn(name, holder, period).await
    }
}

#[async_trait]
impl CacheLedger for HookedDurable {
    async fn cache_generation(&self) -> StoreResult<u64> {
        self.inner().cache_generation().await
    }
    async fn bump_cache_generation(&self) -> StoreResult<u64> {
        self.inner().bump_cache_generation().await
    }
    async fn hold(&self, held: &[(RecordKey, Version)]) -> StoreResult<()> {
        let delay = self.hold_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        self.inner().hold(held).await
    }
    async fn held_above(
        &self,
        collection: &CollectionName,
        ids: &[RecordId],
    ) -> StoreResult<Vec<(RecordId, Version)>> {
        self.inner().held_above(collection, ids).await
    }
    async fn any_held_above(
        &self,
        collection: &CollectionName,
        after: Option<&RecordId>,
        until: Option<&RecordId>,
    ) -> StoreResult<bool> {
        self.inner().any_held_above(collection, after, until).await
    }
    async fn release_held(&self, stale: Option<Duration>) -> StoreResult<u64> {
        self.inner().release_held(stale).await
    }
}
