//! Concurrent writers, and the race between a slow cache fill and a write.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use hybridstore_core::{
    ApplyMode, Bucket, BucketValues, Change, CollectionName, ControlState, CounterIncrement,
    CounterScope, CounterValue, DurableStore, IndexEntry, IndexName, ListQuery, Precondition,
    Record, RecordId, RecordKey, RecordWrite, StoreResult, Version, WriteOutcome,
};
use hybridstore_testkit::{TestApp, etag_version, spawn_app};
use reqwest::StatusCode;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::sync::Notify;

#[tokio::test]
async fn fifty_concurrent_writers_get_distinct_versions_and_the_tiers_agree() {
    let app = Arc::new(spawn_app().await);
    app.put("accounts", "hot", json!({"writer": -1})).await;
    let acknowledged = Arc::new(AtomicU64::new(0));
    let writing = Arc::new(AtomicBool::new(true));

    // Readers run through the writes and check read-your-writes: a read started
    // after a write was acknowledged returns that version or a newer one.
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (app, acknowledged, writing) = (app.clone(), acknowledged.clone(), writing.clone());
        readers.push(tokio::spawn(async move {
            let mut reads = 0;
            while writing.load(Ordering::SeqCst) {
                let floor = acknowledged.load(Ordering::SeqCst);
                let response = app.get("accounts", "hot").await;
                assert_eq!(response.status(), StatusCode::OK);
                let version = etag_version(&response);
                assert!(
                    version >= floor,
                    "read returned v{version} after v{floor} was acknowledged"
                );
                reads += 1;
            }
            reads
        }));
    }

    let writers: Vec<_> = (0..50)
        .map(|writer| {
            let (app, acknowledged) = (app.clone(), acknowledged.clone());
            tokio::spawn(async move {
                let response = app.put("accounts", "hot", json!({"writer": writer})).await;
                assert_eq!(response.status(), StatusCode::OK);
                let version = etag_version(&response);
                acknowledged.fetch_max(version, Ordering::SeqCst);
                (version, writer)
            })
        })
        .collect();
    let mut results = Vec::new();
    for writer in writers {
        results.push(writer.await.unwrap());
    }
    writing.store(false, Ordering::SeqCst);
    for reader in readers {
        assert!(reader.await.unwrap() > 0, "each reader read at least once");
    }

    let mut versions: Vec<u64> = results.iter().map(|(v, _)| *v).collect();
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(versions.len(), 50, "every write got its own version");

    // The write with the highest version is the one both tiers hold.
    let (last_version, last_writer) = *results.iter().max().unwrap();
    let expected = Some(hybridstore_testkit::StoredCopy {
        version: last_version,
        data: json!({"writer": last_writer}),
    });
    assert_eq!(app.postgres_copy("accounts", "hot").await, expected);
    assert_eq!(app.redis_copy("accounts", "hot").await, expected);
}

/// A durable tier that, when armed, holds the next `get` after it has read from
/// PostgreSQL and before it returns (that is, before the engine fills the cache).
struct GatedReads {
    inner: Arc<dyn DurableStore>,
    armed: AtomicBool,
    reached: Notify,
    release: Notify,
}

#[async_trait]
impl DurableStore for GatedReads {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }
    async fn get(&self, key: &RecordKey, now: OffsetDateTime) -> StoreResult<Option<Record>> {
        let result = self.inner.get(key, now).await;
        if self.armed.swap(false, Ordering::SeqCst) {
            self.reached.notify_one();
            self.release.notified().await;
        }
        result
    }
    async fn get_many(
        &self,
        c: &CollectionName,
        ids: &[RecordId],
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Record>> {
        self.inner.get_many(c, ids, now).await
    }
    async fn put(&self, write: &RecordWrite) -> StoreResult<WriteOutcome> {
        self.inner.put(write).await
    }
    async fn delete(
        &self,
        key: &RecordKey,
        p: Precondition,
        now: OffsetDateTime,
    ) -> StoreResult<Version> {
        self.inner.delete(key, p, now).await
    }
    async fn list(&self, query: &ListQuery) -> StoreResult<Vec<Record>> {
        self.inner.list(query).await
    }
    async fn lookup(
        &self,
        c: &CollectionName,
        i: &IndexName,
        v: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Option<Record>> {
        self.inner.lookup(c, i, v, now).await
    }
    async fn apply_changes(&self, changes: &[Change], mode: ApplyMode) -> StoreResult<Vec<bool>> {
        self.inner.apply_changes(changes, mode).await
    }
    async fn scan(
        &self,
        c: &CollectionName,
        after: Option<&RecordId>,
        limit: usize,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Change>> {
        self.inner.scan(c, after, limit, now).await
    }
    async fn get_states(
        &self,
        c: &CollectionName,
        ids: &[RecordId],
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Change>> {
        self.inner.get_states(c, ids, now).await
    }
    async fn count(&self, c: &CollectionName) -> StoreResult<u64> {
        self.inner.count(c).await
    }
    async fn load_control(&self) -> StoreResult<Option<ControlState>> {
        self.inner.load_control().await
    }
    async fn save_control(&self, state: &ControlState) -> StoreResult<bool> {
        self.inner.save_control(state).await
    }
    async fn apply_increments(&self, increments: &[CounterIncrement]) -> StoreResult<usize> {
        self.inner.apply_increments(increments).await
    }
    async fn counter_snapshot(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
        op_ids: &[String],
    ) -> StoreResult<(Vec<BucketValues>, std::collections::HashSet<String>)> {
        self.inner.counter_snapshot(scope, buckets, op_ids).await
    }
    async fn set_index_entries(
        &self,
        key: &RecordKey,
        entries: &[IndexEntry],
        now: OffsetDateTime,
    ) -> StoreResult<()> {
        self.inner.set_index_entries(key, entries, now).await
    }
    async fn scan_counters(
        &self,
        after: Option<&CounterValue>,
        limit: usize,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<CounterValue>> {
        self.inner.scan_counters(after, limit, now).await
    }
    async fn restore_counters(
        &self,
        values: &[CounterValue],
        force: bool,
    ) -> StoreResult<Vec<bool>> {
        self.inner.restore_counters(values, force).await
    }
    async fn purge_expired(&self, now: OffsetDateTime, retention: Duration) -> StoreResult<u64> {
        self.inner.purge_expired(now, retention).await
    }
}

async fn app_with_gate() -> (Arc<TestApp>, Arc<GatedReads>) {
    let gate = Arc::new(std::sync::Mutex::new(None::<Arc<GatedReads>>));
    let slot = gate.clone();
    let app = TestApp::builder()
        .wrap_durable(move |inner| {
            let gated = Arc::new(GatedReads {
                inner,
                armed: AtomicBool::new(false),
                reached: Notify::new(),
                release: Notify::new(),
            });
            *slot.lock().unwrap() = Some(gated.clone());
            gated
        })
        .spawn()
        .await;
    let gated = gate.lock().unwrap().take().expect("layer applied");
    (Arc::new(app), gated)
}

/// Starts a GET that misses the cache, reads PostgreSQL and is then held before
/// its cache fill. Returns the pending read.
async fn start_held_read(
    app: &Arc<TestApp>,
    gate: &GatedReads,
    id: &str,
) -> tokio::task::JoinHandle<reqwest::Response> {
    app.drop_cached_copy("accounts", id).await;
    gate.armed.store(true, Ordering::SeqCst);
    let reader = {
        let (app, id) = (app.clone(), id.to_owned());
        tokio::spawn(async move { app.get("accounts", &id).await })
    };
    tokio::time::timeout(Duration::from_secs(10), gate.reached.notified())
        .await
        .expect("the reader reached the gate");
    reader
}

#[tokio::test]
async fn a_slow_reader_cannot_fill_the_cache_over_a_newer_write() {
    let (app, gate) = app_with_gate().await;
    let v1 = etag_version(&app.put("accounts", "acct", json!({"n": 1})).await);

    let reader = start_held_read(&app, &gate, "acct").await;
    // The reader holds v1 from PostgreSQL; a writer commits v2 meanwhile.
    let v2 = etag_version(&app.put("accounts", "acct", json!({"n": 2})).await);
    assert!(v2 > v1);
    gate.release.notify_one();
    let held = reader.await.unwrap();
    assert_eq!(
        etag_version(&held),
        v1,
        "the held read answers what it read"
    );

    let cached = app
        .redis_copy("accounts", "acct")
        .await
        .expect("cached copy");
    assert_eq!(cached.version, v2, "the stale fill was rejected");
    assert_eq!(cached.data, json!({"n": 2}));
    assert_eq!(etag_version(&app.get("accounts", "acct").await), v2);
}

#[tokio::test]
async fn a_slow_reader_cannot_resurrect_a_deleted_record_in_the_cache() {
    let (app, gate) = app_with_gate().await;
    let v1 = etag_version(&app.put("accounts", "gone", json!({"n": 1})).await);

    let reader = start_held_read(&app, &gate, "gone").await;
    let deleted = app.delete("accounts", "gone").await;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    gate.release.notify_one();
    assert_eq!(etag_version(&reader.await.unwrap()), v1);

    let (marker, data) = app
        .redis_entry("accounts", "gone")
        .await
        .expect("deletion marker");
    assert!(
        marker > v1 && data.is_none(),
        "the cache keeps the deletion, not v{v1}"
    );
    assert_eq!(
        app.get("accounts", "gone").await.status(),
        StatusCode::NOT_FOUND
    );
    let body: Value = app.get("accounts", "gone").await.json().await.unwrap();
    assert_eq!(body["code"], "not_found");
}
