//! Requests in, tier calls out.
//!
//! Each public method resolves the collection, prepares what the tiers need
//! (schema check, index entries, expiry) and then follows the collection's
//! [`Plan`]. Durable-tier failures become API errors; cache-tier failures on the
//! way are logged and bypassed, because the durable tier holds the truth.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use hybridstore_core::{
    CacheEntry, CacheStore, CollectionName, DurableStore, Error, JsonObject, ListPage, ListQuery,
    Precondition, Record, RecordId, RecordKey, RecordWrite, StoreError, Strategy, Tier, Version,
    WriteOutcome, json_size, merge_patch,
};
use serde_json::Value;
use time::OffsetDateTime;

use crate::breaker::{Breaker, HealthSettings, TierHealth};
use crate::catalog::{Catalog, Collection, index_value};
use crate::control::Control;
use crate::counters::{CounterSettings, CounterState};
use crate::guarded::Guarded;
use crate::jobs::Jobs;
use crate::journal::{Backlog, JournalSettings, ReplayProgress};
use crate::pending::{Access, Unreplayed, above};
use crate::recovery::Recovery;
use crate::stats::{EngineStats, Operation, Outcome};
use crate::strategy::{Plan, ReadPath, WritePath};

/// Limits and timings of the engine.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// The service-wide strategy from the configuration (an operator's switch,
    /// persisted in the stores, takes precedence).
    pub strategy: Strategy,
    /// Largest `data` object, in bytes of JSON.
    pub max_data_bytes: usize,
    /// Most bytes of record data one list page holds (one record always
    /// fits; a full page says where the next one starts).
    pub page_bytes: usize,
    /// How much of the cache stored idempotent responses may take.
    pub replay_bounds: hybridstore_core::ReplayBounds,
    /// How long a cache keeps the marker of a deleted record. It must outlive any
    /// read that started before the delete, so that read cannot fill the old copy.
    pub deleted_marker_ttl: Duration,
    /// How long PostgreSQL keeps deleted rows (the version sequence of a record
    /// continues across a re-create within this window).
    pub tombstone_retention: Duration,
    /// Suggested client back-off when no tier can serve.
    pub retry_after: Duration,
    pub health: HealthSettings,
    pub journal: JournalSettings,
    pub counters: CounterSettings,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            strategy: Strategy::DualWrite,
            max_data_bytes: 1024 * 1024,
            page_bytes: 4 * 1024 * 1024,
            replay_bounds: hybridstore_core::ReplayBounds::default(),
            deleted_marker_ttl: Duration::from_secs(60),
            tombstone_retention: Duration::from_secs(3600),
            retry_after: Duration::from_secs(1),
            health: HealthSettings::default(),
            journal: JournalSettings::default(),
            counters: CounterSettings::default(),
        }
    }
}

/// One page of a listing.
#[derive(Debug)]
pub struct Page {
    pub records: Vec<Record>,
    /// The cursor for the next page (`after=`), when there may be one.
    pub next: Option<RecordId>,
}

/// The answer to a batch get.
#[derive(Debug, Default)]
pub struct BatchGet {
    /// Found records, in the order their ids were asked for.
    pub records: Vec<Record>,
    pub missing: Vec<RecordId>,
    /// Ids not read because the answer was full (`page_bytes` of record
    /// data): ask for them again.
    pub unread: Vec<RecordId>,
}

/// Ids a batch-get reads at once: what one chunk can cost is bounded
/// (this many records of at most the body limit), and the answer stops at
/// `page_bytes` of data.
const BATCH_CHUNK: usize = 16;

/// What a committed write leaves in the cache.
#[derive(Clone, Copy)]
pub(crate) enum CacheUpdate<'a> {
    Record(&'a Record),
    Deleted(Version),
}

/// How long one bump of the durable cache generation covers the writes
/// around the cache that follow it (see `Engine::write_around`).
const BUMP_COVERS: Duration = Duration::from_millis(100);

/// How often a PATCH without `If-Match` re-reads and retries when a concurrent
/// writer got in between its read and its write.
const PATCH_ATTEMPTS: usize = 8;

pub struct Engine {
    pub(crate) durable: Arc<Guarded<dyn DurableStore>>,
    pub(crate) cache: Arc<Guarded<dyn CacheStore>>,
    /// What the cache's recovery remembers, and its probe.
    pub(crate) recovery: Recovery,
    pub(crate) catalog: Catalog,
    pub(crate) settings: EngineSettings,
    /// Whether writes taken during a durable-tier outage may still wait in
    /// the journal (kept current by the replay loop).
    pub(crate) outage_backlog: Backlog,
    /// Whether write-behind (`cache_first`) writes may still wait.
    pub(crate) write_behind_backlog: Backlog,
    /// Keys whose journaled version this instance has not seen reach the
    /// durable tier (consulted while the cache is unreachable).
    pub(crate) unreplayed: Unreplayed,
    /// Whether the service-wide strategy was `cache_first` since the
    /// write-behind journal was last seen empty (so collections that follow
    /// it may have write-behind entries). A process starts with the strategy
    /// it loads, without history: a switch away from `cache_first` followed
    /// at once by a restart while the cache is unreachable is not covered.
    pub(crate) wrote_behind: std::sync::atomic::AtomicBool,
    /// This instance's name as a journal consumer.
    pub(crate) instance_id: String,
    pub(crate) replay: std::sync::Mutex<ReplayProgress>,
    /// The service-wide strategy in force and the control state it came from.
    pub(crate) control: Control,
    pub(crate) stats: EngineStats,
    pub(crate) jobs: Jobs,
    pub(crate) started: Instant,
    pub(crate) counters: CounterState,
    pub(crate) counter_settings: CounterSettings,
}

/// A name for this process among the journal's consumers.
fn instance_id() -> String {
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    format!("hs-{}-{:x}", std::process::id(), nanos)
}

/// Wall-clock time at the precision both tiers store (microseconds).
pub(crate) fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
        .unwrap_or(now)
}

impl Engine {
    /// An engine over two tiers; each is put behind its own breaker.
    pub fn new(
        durable: Arc<dyn DurableStore>,
        cache: Arc<dyn CacheStore>,
        catalog: Catalog,
        settings: EngineSettings,
    ) -> Self {
        let health = &settings.health;
        let durable = Arc::new(Guarded::new(
            durable.clone(),
            Breaker::new(Tier::Durable, durable.backend(), health.failure_threshold),
            health.durable_call_timeout,
        ));
        // Threshold 1: any cache failure may hide a restart that lost writes,
        // so the cache stops serving until its recovery trial has checked.
        let cache = Arc::new(Guarded::new(
            cache.clone(),
            Breaker::new(Tier::Cache, cache.backend(), 1),
            health.cache_call_timeout,
        ));
        Self {
            recovery: Recovery::new(cache.clone()),
            durable,
            cache,
            catalog,
            outage_backlog: Backlog::default(),
            write_behind_backlog: Backlog::default(),
            unreplayed: Unreplayed::default(),
            wrote_behind: std::sync::atomic::AtomicBool::new(false),
            instance_id: instance_id(),
            replay: std::sync::Mutex::new(ReplayProgress::default()),
            control: Control::new(settings.strategy),
            stats: EngineStats::default(),
            jobs: Jobs::default(),
            started: Instant::now(),
            counters: CounterState::default(),
            counter_settings: settings.counters.clone(),
            settings,
        }
    }

    /// The health of the durable and the cache tier.
    pub fn health(&self) -> [TierHealth; 2] {
        [self.durable.breaker.health(), self.cache.breaker.health()]
    }

    /// The tiers themselves, without breakers (tools and tests that look
    /// into them behind the service's back).
    pub fn raw_tiers(&self) -> (Arc<dyn DurableStore>, Arc<dyn CacheStore>) {
        (self.durable.tier.clone(), self.cache.tier.clone())
    }

    /// Makes every call to `tier` fail as if it were unreachable (`down`),
    /// or ends that: a fault drill that works for any tier, including the
    /// in-process cache, which cannot be stopped from outside.
    pub fn simulate_outage(&self, tier: Tier, down: bool) {
        match tier {
            Tier::Durable => self.durable.breaker.simulate_outage(down),
            Tier::Cache => self.cache.breaker.simulate_outage(down),
        }
    }

    /// Pings both tiers once and opens the breaker of each that does not
    /// answer, so a service started during an outage routes around it at once.
    pub async fn check_tiers_at_start(&self) {
        // The durable tier first: the cache's check compares its generation.
        match self.durable.tier.ping().await {
            Ok(()) => self.durable.breaker.record_success(),
            Err(err) => self.durable.breaker.force_open(&err),
        }
        self.probe_cache().await;
        self.refresh_backlogs().await;
    }

    /// One probe of the cache, with what its recovery needs from the engine:
    /// the durable cache generation, and the journal replay.
    async fn probe_cache(&self) {
        let generation = self.durable_cache_generation().await;
        self.recovery
            .probe(generation, || self.reconcile_cache())
            .await;
    }

    /// Probes both tiers forever (the half-open trials that close breakers),
    /// each on its own: a cache recovery that replays a journal must not
    /// keep the durable tier's failure from being noticed.
    pub async fn run_health_probes(self: Arc<Self>) {
        let durable = async {
            let mut ticks = self.probe_ticks();
            loop {
                // A failed live call asks for a probe at once: a refused
                // connection then opens the breaker within milliseconds.
                tokio::select! {
                    _ = ticks.tick() => {}
                    () = self.durable.breaker.probe_wanted.notified() => {}
                }
                self.durable.probe().await;
            }
        };
        let cache = async {
            let mut ticks = self.probe_ticks();
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    () = self.cache.breaker.probe_wanted.notified() => {}
                }
                self.probe_cache().await;
            }
        };
        tokio::join!(durable, cache);
    }

    fn probe_ticks(&self) -> tokio::time::Interval {
        let mut ticks = tokio::time::interval(self.settings.health.probe_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks
    }

    pub(crate) fn unavailable(&self) -> Error {
        Error::BackendsUnavailable {
            retry_after: self.settings.retry_after,
        }
    }

    /// A tier too busy to answer in time: the request was shed, or (when
    /// it reached the tier) its outcome is unknown; either way the tier is
    /// not declared down for it.
    pub(crate) fn busy(&self, maybe_applied: bool) -> Error {
        let retry_after = self.settings.retry_after;
        if maybe_applied {
            Error::OutcomeUnknown { retry_after }
        } else {
            Error::Overloaded { retry_after }
        }
    }

    /// The strategy a collection follows now (its own, or the service's).
    pub fn strategy_of(&self, collection: &Collection) -> Strategy {
        collection.strategy(self.control.strategy())
    }

    /// The plan of the strategy a collection follows, before health narrows it.
    pub(crate) fn configured_plan(&self, collection: &Collection) -> Plan {
        Plan::of(self.strategy_of(collection))
    }

    /// The plan a collection follows now: its configured plan, narrowed by
    /// which tiers are usable. Fails at once when none is.
    pub(crate) fn plan_for(&self, collection: &Collection) -> Result<Plan, Error> {
        let durable_up = self.durable.breaker.is_closed();
        let cache_up = self.cache.breaker.is_closed();
        self.configured_plan(collection)
            .degraded(durable_up, cache_up)
            .ok_or_else(|| self.unavailable())
    }

    /// Whether the service-wide strategy may have left write-behind entries.
    pub(crate) fn service_wrote_behind(&self) -> bool {
        self.control.strategy() == Strategy::CacheFirst
            || self.wrote_behind.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The current state of a record, from where the newest version lives:
    /// the cache when writes go through it (its copy may be newer than the
    /// durable tier's), the durable tier otherwise.
    async fn current(
        &self,
        collection: &Collection,
        key: &RecordKey,
        now: OffsetDateTime,
    ) -> Result<Option<Record>, Error> {
        let plan = self.plan_for(collection)?;
        if plan.write.through_cache() {
            match self.cache.call(|t| t.get(key)).await {
                Ok(CacheEntry::Present(record)) if !record.is_expired(now) => {
                    return Ok(Some(record));
                }
                Ok(CacheEntry::Present(_) | CacheEntry::Deleted(_)) => return Ok(None),
                Ok(CacheEntry::Miss) if plan.write == WritePath::CacheOnly => return Ok(None),
                Ok(CacheEntry::Miss) => {}
                Err(_) => return Err(self.unavailable()),
            }
        } else {
            // Read to be written back guarded by its version: a conditional write.
            let access = Access::Write(Precondition::IfMatch(Version::new(0)));
            self.settle(collection, std::slice::from_ref(key), access)
                .await?;
        }
        self.durable
            .call(|t| t.get(key, now))
            .await
            .map_err(|err| self.durable_failed(err))
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// Turns a durable-tier failure into the API error it means.
    pub(crate) fn durable_failed(&self, err: StoreError) -> Error {
        match err {
            // The breaker logs the outage once; per request it is only debug.
            StoreError::Unavailable { .. } => {
                tracing::debug!(error = %err, backend = self.durable.backend(), "durable tier unavailable");
                self.unavailable()
            }
            StoreError::Busy { maybe_applied, .. } => {
                tracing::debug!(error = %err, backend = self.durable.backend(), "durable tier busy");
                self.busy(maybe_applied)
            }
            StoreError::PreconditionFailed => Error::VersionConflict { current: None },
            StoreError::NotFound => Error::NotFound("record not found".into()),
            StoreError::UniqueViolation { index, value } => Error::UniqueViolation { index, value },
            StoreError::CounterOutOfRange { field } => out_of_range(&field),
            StoreError::Internal { .. } => {
                Error::Internal(format!("{} ({})", err, self.durable.backend()))
            }
        }
    }

    /// A cache read failed. The durable tier can answer instead, unless
    /// writes currently go through the cache's journal: then the cache may
    /// hold versions the durable tier does not have yet.
    fn cache_read_failed(
        &self,
        plan: Plan,
        operation: &'static str,
        err: &StoreError,
    ) -> Result<(), Error> {
        self.cache_failed(operation, err);
        if plan.write.through_cache() {
            return Err(self.unavailable());
        }
        Ok(())
    }

    /// A cache failure is not the request's failure: log it and go on.
    pub(crate) fn cache_failed(&self, operation: &'static str, err: &StoreError) {
        tracing::warn!(error = %err, backend = self.cache.backend(), operation, "cache tier call failed; bypassing cache");
    }

    /// Before a write commits: if the cache is being routed around, remember
    /// the key, so the cache's recovery removes the copy it may still hold.
    /// (Marked before the commit, so a recovery that completes meanwhile
    /// cannot miss it; the update after the commit covers the other order,
    /// and records durably what the memory of this process cannot keep.)
    fn before_commit(&self, collection: &Collection, plan: Plan, key: &RecordKey) {
        if self.configured_plan(collection).uses_cache() && plan.write == WritePath::DurableOnly {
            self.recovery.mark_dirty(key);
        }
    }

    /// Records durably that writes go around the cache: bumps the durable
    /// cache generation, unless this instance did within the last
    /// [`BUMP_COVERS`] (concurrent writers share one bump). Bumping again
    /// after that matters: another instance may have reconciled the cache
    /// to the last bump meanwhile, and must learn of the writes since.
    pub(crate) async fn write_around(&self) -> Result<(), Error> {
        let mut bumped = self.recovery.bumped.lock().await;
        if bumped.is_some_and(|at| at.elapsed() < BUMP_COVERS) {
            return Ok(());
        }
        let at = Instant::now();
        let generation = self
            .durable
            .call(|t| t.bump_cache_generation())
            .await
            .map_err(|err| self.durable_failed(err))?;
        *bumped = Some(at);
        let mut own = self
            .recovery
            .own_bumps
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if own.is_empty() {
            tracing::info!(
                generation,
                "writes go around the cache: cache generation bumped"
            );
        }
        if own.len() < 10_000 {
            own.insert(generation);
        }
        Ok(())
    }

    /// The durable tier's cache generation, when it can be read.
    async fn durable_cache_generation(&self) -> Option<u64> {
        if !self.durable.breaker.is_closed() {
            return None;
        }
        self.durable.call(|t| t.cache_generation()).await.ok()
    }

    /// After a write committed: bring the cache copy up to date. If that
    /// fails, the copy may be stale, so the cache stops serving until its
    /// recovery has removed it.
    async fn after_commit(
        &self,
        collection: &Collection,
        key: &RecordKey,
        update: CacheUpdate<'_>,
        now: OffsetDateTime,
    ) {
        if !self.configured_plan(collection).uses_cache() {
            return;
        }
        // While the cache is out of service the version is only remembered:
        // its recovery removes older copies. Failing here would count as a
        // new failure and hold the recovery back for as long as writes keep
        // coming.
        let version = match update {
            CacheUpdate::Record(record) => record.version,
            CacheUpdate::Deleted(version) => version,
        };
        if self.recovery.wrote_around(key, version).await {
            // Remembered for this instance's recovery. But another instance
            // may have seen the cache back first and serve it already (this
            // one has not probed yet): the copy is brought up to date on the
            // tier itself, past the breaker, so that no instance serves an
            // older one once this write is acknowledged. A cache this
            // instance cannot reach, no other can serve from either (README,
            // "Several instances": a partition is the exception). The attempt
            // costs a refused connection, or a short wait on a hung cache (a
            // store that lands later still only moves forward).
            if self.recovery.overtaken(key, version) {
                return;
            }
            let updated = self
                .recovery
                .past_breaker(|tier| self.update_copy(tier, collection, key, update, now))
                .await
                .is_some();
            // Only a copy that could not be brought up to date may be stale:
            // that is recorded durably, for every instance and for this one
            // after a restart. A write whose update landed bumps nothing, so
            // instances recovering the cache at the same time do not send
            // each other through recovery after recovery.
            if !updated && let Err(err) = self.write_around().await {
                tracing::warn!(error = %err, "could not record the write around the cache");
            }
            return;
        }
        if self.recovery.overtaken(key, version) {
            return;
        }
        let result = match self
            .cache
            .call(|tier| self.update_copy(tier, collection, key, update, now))
            .await
        {
            // The update reached a busy cache and may land or not: sent
            // again (it only ever moves the copy forward) and waited for.
            Err(err) if err.is_busy() => {
                self.recovery
                    .patiently(|tier| self.update_copy(tier, collection, key, update, now))
                    .await
            }
            other => other,
        };
        if let Err(err) = result {
            if self.cache.breaker.is_closed() {
                tracing::warn!(error = %err, collection = %key.collection, "cache update after commit failed; cache suspended until recovery");
            }
            self.recovery.write_failed(key, version, &err);
            // The copy may be stale: recorded durably as well, in case this
            // process dies before the cache recovers.
            if let Err(err) = self.write_around().await {
                tracing::warn!(error = %err, "could not record the write around the cache");
            }
        }
    }

    /// Brings the copy of `key` in `tier` up to date after a commit.
    async fn update_copy(
        &self,
        tier: &dyn CacheStore,
        collection: &Collection,
        key: &RecordKey,
        update: CacheUpdate<'_>,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        match update {
            CacheUpdate::Record(record) => {
                match record.cache_lifetime(collection.spec.cache_ttl, now) {
                    Some(ttl) => tier.store(record, ttl).await,
                    None => tier
                        .invalidate(std::slice::from_ref(key))
                        .await
                        .map(|()| true),
                }
            }
            CacheUpdate::Deleted(version) => {
                tier.store_deleted(key, version, self.settings.deleted_marker_ttl)
                    .await
            }
        }
    }

    /// Stores a copy in the cache (version-checked, so never over a newer one).
    async fn cache_record(&self, collection: &Collection, record: &Record, now: OffsetDateTime) {
        let Some(ttl) = record.cache_lifetime(collection.spec.cache_ttl, now) else {
            return;
        };
        if let Err(err) = self.cache.call(|t| t.store(record, ttl)).await {
            self.cache_failed("store", &err);
        }
    }

    fn expires_at(
        collection: &Collection,
        ttl: Option<Duration>,
        now: OffsetDateTime,
    ) -> Option<OffsetDateTime> {
        ttl.or(collection.spec.record_ttl).map(|ttl| now + ttl)
    }

    fn prepare_write(
        collection: &Collection,
        key: RecordKey,
        data: JsonObject,
        precondition: Precondition,
        expires_at: Option<OffsetDateTime>,
        now: OffsetDateTime,
    ) -> Result<RecordWrite, Error> {
        if let Some(problem) = hybridstore_core::unstorable(&data) {
            return Err(Error::InvalidData(problem));
        }
        collection.validate(&data)?;
        let index_entries = collection.index_entries(&data)?;
        Ok(RecordWrite {
            key,
            data,
            index_entries,
            precondition,
            expires_at,
            now,
        })
    }

    async fn apply_write(
        &self,
        collection: &Collection,
        mut write: RecordWrite,
    ) -> Result<WriteOutcome, Error> {
        let plan = self.plan_for(collection)?;
        if plan.write.through_cache() {
            return self.put_journaled(collection, write).await;
        }
        let access = Access::Write(write.precondition);
        let settled = self
            .settle(collection, std::slice::from_ref(&write.key), access)
            .await?;
        write.now = above(write.now, settled.floor);
        self.before_commit(collection, plan, &write.key);
        let outcome = self
            .durable
            .call(|t| t.put(&write))
            .await
            .map_err(|err| self.durable_failed(err))?;
        // The durable tier now holds a version above any journaled one.
        self.unreplayed.replayed(&write.key, outcome.record.version);
        let update = CacheUpdate::Record(&outcome.record);
        self.after_commit(collection, &write.key, update, write.now)
            .await;
        Ok(outcome)
    }

    /// Creates or replaces a record.
    #[tracing::instrument(level = "debug", skip(self, data), fields(collection = %key.collection, id = %key.id))]
    async fn write_record(
        &self,
        key: RecordKey,
        data: JsonObject,
        precondition: Precondition,
        ttl: Option<Duration>,
    ) -> Result<WriteOutcome, Error> {
        let collection = self.catalog.get(&key.collection)?;
        let now = now();
        let expires_at = Self::expires_at(collection, ttl, now);
        let write = Self::prepare_write(collection, key, data, precondition, expires_at, now)?;
        self.apply_write(collection, write).await
    }

    /// Applies a JSON Merge Patch to an existing record. The merge is computed on
    /// the current version read from the durable tier and written back guarded by
    /// that version, so a concurrent write is never silently overwritten: with
    /// `If-Match` it is a conflict, without it the patch is re-applied on top.
    #[tracing::instrument(level = "debug", skip(self, patch), fields(collection = %key.collection, id = %key.id))]
    async fn patch_record(
        &self,
        key: RecordKey,
        patch: JsonObject,
        precondition: Precondition,
    ) -> Result<WriteOutcome, Error> {
        let collection = self.catalog.get(&key.collection)?;
        let patch = Value::Object(patch);
        for _ in 0..PATCH_ATTEMPTS {
            let now = now();
            let current = self.current(collection, &key, now).await?;
            let current = match (current, precondition) {
                (None, _) => return Err(Error::NotFound("record not found".into())),
                (Some(_), Precondition::Absent) => {
                    return Err(Error::VersionConflict { current: None });
                }
                (Some(current), Precondition::IfMatch(expected)) if current.version != expected => {
                    return Err(Error::VersionConflict {
                        current: Some(current.version),
                    });
                }
                (Some(current), _) => current,
            };
            let mut data = Value::Object(current.data);
            merge_patch(&mut data, &patch);
            let Value::Object(data) = data else {
                unreachable!("merging an object patch yields an object")
            };
            let size = serde_json::to_vec(&data).map_or(0, |bytes| bytes.len());
            if size > self.settings.max_data_bytes {
                return Err(Error::PayloadTooLarge {
                    size,
                    limit: self.settings.max_data_bytes,
                });
            }
            let guard = Precondition::IfMatch(current.version);
            let write = Self::prepare_write(
                collection,
                key.clone(),
                data,
                guard,
                current.expires_at,
                now,
            )?;
            match self.apply_write(collection, write).await {
                Err(Error::VersionConflict { .. })
                    if !matches!(precondition, Precondition::IfMatch(_)) =>
                {
                    continue;
                }
                result => return result,
            }
        }
        Err(Error::VersionConflict { current: None })
    }

    /// Reads one record.
    #[tracing::instrument(level = "debug", skip(self), fields(collection = %key.collection, id = %key.id))]
    async fn read_record(&self, key: &RecordKey) -> Result<Option<Record>, Error> {
        let collection = self.catalog.get(&key.collection)?;
        let plan = self.plan_for(collection)?;
        let now = now();
        // A cache that answered "miss" holds no pinned copy of the key; if
        // it was not asked, or failed, the durable tier may be behind.
        let mut cache_missed = false;
        if plan.read != ReadPath::DurableOnly {
            let entry = self.cache.call(|t| t.get(key)).await;
            self.stats.cache_lookup(
                matches!(&entry, Ok(CacheEntry::Present(r)) if !r.is_expired(now))
                    || matches!(entry, Ok(CacheEntry::Deleted(_))),
                1,
            );
            match entry {
                Ok(CacheEntry::Present(record)) if !record.is_expired(now) => {
                    return Ok(Some(record));
                }
                Ok(CacheEntry::Deleted(_)) => return Ok(None),
                Ok(_) => cache_missed = true,
                Err(err) => self.cache_read_failed(plan, "get", &err)?,
            }
            match plan.read {
                // The cache is the truth: a miss means no such record.
                ReadPath::CacheAuthoritative => return Ok(None),
                // A miss says nothing about the record while the durable tier
                // that knows is down.
                ReadPath::CacheOnly => return Err(self.unavailable()),
                _ => {}
            }
        }
        if !cache_missed {
            self.settle(collection, std::slice::from_ref(key), Access::Read)
                .await?;
        }
        let record = self
            .durable
            .call(|t| t.get(key, now))
            .await
            .map_err(|err| self.durable_failed(err))?;
        if let (Some(record), ReadPath::CacheThenDurable) = (&record, plan.read) {
            self.cache_record(collection, record, now).await;
        }
        Ok(record)
    }

    /// Deletes a record; returns the version of the deletion.
    #[tracing::instrument(level = "debug", skip(self), fields(collection = %key.collection, id = %key.id))]
    async fn delete_record(
        &self,
        key: &RecordKey,
        precondition: Precondition,
    ) -> Result<Version, Error> {
        let collection = self.catalog.get(&key.collection)?;
        let plan = self.plan_for(collection)?;
        let now = now();
        if plan.write.through_cache() {
            return self
                .delete_journaled(collection, key, precondition, now)
                .await;
        }
        let access = Access::Write(precondition);
        let settled = self
            .settle(collection, std::slice::from_ref(key), access)
            .await?;
        let now = above(now, settled.floor);
        self.before_commit(collection, plan, key);
        let version = self
            .durable
            .call(|t| t.delete(key, precondition, now))
            .await
            .map_err(|err| self.durable_failed(err))?;
        self.unreplayed.replayed(key, version);
        self.after_commit(collection, key, CacheUpdate::Deleted(version), now)
            .await;
        Ok(version)
    }

    /// One page of a collection, ordered by id, from the durable tier (the only
    /// tier that holds every record).
    #[tracing::instrument(level = "debug", skip(self))]
    async fn list_page(
        &self,
        collection: &CollectionName,
        after: Option<RecordId>,
        prefix: Option<String>,
        limit: u32,
    ) -> Result<Page, Error> {
        let spec = self.catalog.get(collection)?;
        let plan = self.plan_for(spec)?;
        let query = ListQuery {
            collection: collection.clone(),
            after,
            prefix,
            limit,
            max_bytes: self.settings.page_bytes,
            now: now(),
        };
        let settled =
            plan.read == ReadPath::CacheAuthoritative || self.settle_range(spec, &query).await?;
        let ListPage { records, more } = if plan.read == ReadPath::CacheAuthoritative {
            self.cache
                .call(|t| t.list(&query))
                .await
                .map_err(|err| self.journal_failed(err))?
        } else {
            self.durable
                .call(|t| t.list(&query))
                .await
                .map_err(|err| self.durable_failed(err))?
        };
        if !settled && plan.read == ReadPath::DurableOnly && self.configured_plan(spec).uses_cache()
        {
            // Ids in this page's range whose newest version waits in the
            // unreachable journal: the page would show an older state.
            let until = if more {
                records.last().map(|r| &r.id)
            } else {
                None
            };
            let wrote_behind = self.wrote_behind(spec);
            if self
                .unreplayed
                .any_held_in(collection, wrote_behind, query.after.as_ref(), until)
            {
                return Err(self.unavailable());
            }
            // Or one another instance journaled and published.
            if self
                .durable
                .call(|t| t.any_held_above(collection, query.after.as_ref(), until))
                .await
                .map_err(|err| self.durable_failed(err))?
            {
                return Err(self.unavailable());
            }
        }
        let next = if more {
            records.last().map(|record| record.id.clone())
        } else {
            None
        };
        Ok(Page { records, next })
    }

    /// Several records of one collection at once.
    #[tracing::instrument(level = "debug", skip(self, ids), fields(count = ids.len()))]
    async fn read_many(
        &self,
        collection_name: &CollectionName,
        ids: Vec<RecordId>,
    ) -> Result<BatchGet, Error> {
        let collection = self.catalog.get(collection_name)?;
        let plan = self.plan_for(collection)?;
        let now = now();
        let mut seen = HashSet::new();
        let ids: Vec<RecordId> = ids
            .into_iter()
            .filter(|id| seen.insert(id.clone()))
            .collect();

        // Per id: Some(found) / None (known missing), or still unknown.
        let mut answers: Vec<Option<Option<Record>>> = vec![None; ids.len()];
        let mut cache_answered = false;
        if plan.read != ReadPath::DurableOnly {
            let keys: Vec<RecordKey> = ids
                .iter()
                .map(|id| RecordKey::new(collection_name.clone(), id.clone()))
                .collect();
            match self.cache.call(|t| t.get_many(&keys)).await {
                Ok(entries) => {
                    cache_answered = true;
                    for (answer, entry) in answers.iter_mut().zip(entries) {
                        *answer = match entry {
                            CacheEntry::Present(record) if !record.is_expired(now) => {
                                Some(Some(record))
                            }
                            CacheEntry::Deleted(_) => Some(None),
                            _ => None,
                        };
                    }
                }
                Err(err) => self.cache_read_failed(plan, "get_many", &err)?,
            }
        }

        let unknown: Vec<RecordId> = ids
            .iter()
            .zip(&answers)
            .filter(|(_, answer)| answer.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        if plan.read != ReadPath::DurableOnly {
            let misses = unknown.len() as u64;
            self.stats.cache_lookup(true, ids.len() as u64 - misses);
            self.stats.cache_lookup(false, misses);
        }
        if !unknown.is_empty() && plan.read == ReadPath::CacheOnly {
            return Err(self.unavailable());
        }
        if !unknown.is_empty() && !cache_answered {
            let keys: Vec<RecordKey> = unknown
                .iter()
                .map(|id| RecordKey::new(collection_name.clone(), id.clone()))
                .collect();
            self.settle(collection, &keys, Access::Read).await?;
        }
        if !unknown.is_empty() && plan.read != ReadPath::CacheAuthoritative {
            let mut fetched = self
                .durable
                .call(|t| t.get_many(collection_name, &unknown, now))
                .await
                .map_err(|err| self.durable_failed(err))?;
            if plan.read == ReadPath::CacheThenDurable {
                // Concurrent calls share the multiplexed connection: one
                // pipelined burst instead of a round trip per record.
                join_all(
                    fetched
                        .iter()
                        .map(|record| self.cache_record(collection, record, now)),
                )
                .await;
            }
            for (id, answer) in ids.iter().zip(answers.iter_mut()) {
                if answer.is_none() {
                    let position = fetched.iter().position(|record| &record.id == id);
                    *answer = Some(position.map(|at| fetched.swap_remove(at)));
                }
            }
        }

        let mut result = BatchGet::default();
        for (id, answer) in ids.into_iter().zip(answers) {
            match answer.flatten() {
                Some(record) => result.records.push(record),
                None => result.missing.push(id),
            }
        }
        Ok(result)
    }

    /// The record whose unique index `index` holds `value`.
    ///
    /// The cache keeps a hint (value -> id) next to the record copies. A hint is
    /// trusted only if the cached record it names still carries `value`; any
    /// doubt goes to the durable tier, which enforces uniqueness.
    #[tracing::instrument(level = "debug", skip(self, value))]
    async fn lookup_unique(
        &self,
        collection_name: &CollectionName,
        index: &str,
        value: &str,
    ) -> Result<Option<Record>, Error> {
        let collection = self.catalog.get(collection_name)?;
        let index = collection.index(index)?;
        let plan = self.plan_for(collection)?;
        let now = now();
        if plan.read != ReadPath::DurableOnly {
            match self.lookup_cached(collection_name, index, value, now).await {
                Ok(Some(record)) => {
                    self.stats.cache_lookup(true, 1);
                    return Ok(Some(record));
                }
                Ok(None) => {}
                Err(err) => self.cache_read_failed(plan, "lookup", &err)?,
            }
        }
        if plan.read != ReadPath::DurableOnly {
            self.stats.cache_lookup(false, 1);
        }
        if plan.read == ReadPath::CacheOnly {
            return Err(self.unavailable());
        }
        let cached = plan.read == ReadPath::CacheThenDurable;
        let mut record = self
            .durable
            .call(|t| t.lookup(collection_name, index, value, now))
            .await
            .map_err(|err| self.durable_failed(err))?;
        // The hint said nothing of the record the durable tier found: a
        // newer version of it may wait in a journal (settling costs nothing
        // when no journal may hold one).
        if let Some(found) = &record {
            let key = found.key();
            let settled = self
                .settle(collection, std::slice::from_ref(&key), Access::Read)
                .await?;
            if settled.applied {
                // A newer version (or a deletion) of the record was applied.
                record = self
                    .durable
                    .call(|t| t.get(&key, now))
                    .await
                    .map_err(|err| self.durable_failed(err))?
                    .filter(|newer| {
                        index_value(&newer.data, index).ok().flatten().as_deref() == Some(value)
                    });
            }
        }
        // With writes journaled, the cache may hold a newer version of the
        // record PostgreSQL found (indexed values cannot change meanwhile).
        let record = match (plan.write, record) {
            (WritePath::CacheJournaled, Some(found)) => {
                let key = found.key();
                match self.cache.call(|t| t.get(&key)).await {
                    Ok(CacheEntry::Present(newer)) if newer.version >= found.version => {
                        (!newer.is_expired(now)).then_some(newer)
                    }
                    Ok(CacheEntry::Deleted(version)) if version > found.version => None,
                    Ok(_) => Some(found),
                    Err(err) => {
                        self.cache_read_failed(plan, "get", &err)?;
                        Some(found)
                    }
                }
            }
            (_, record) => record,
        };
        if let (true, Some(record)) = (cached, &record) {
            self.cache_record(collection, record, now).await;
            if let Some(ttl) = record.cache_lifetime(collection.spec.cache_ttl, now) {
                let hint = self
                    .cache
                    .call(|t| t.store_lookup_hint(collection_name, index, value, &record.id, ttl))
                    .await;
                if let Err(err) = hint {
                    self.cache_failed("store_lookup_hint", &err);
                }
            }
        }
        Ok(record)
    }

    async fn lookup_cached(
        &self,
        collection: &CollectionName,
        index: &hybridstore_core::IndexName,
        value: &str,
        now: OffsetDateTime,
    ) -> Result<Option<Record>, StoreError> {
        let Some(id) = self
            .cache
            .call(|t| t.lookup_hint(collection, index, value))
            .await?
        else {
            return Ok(None);
        };
        let key = RecordKey::new(collection.clone(), id);
        Ok(match self.cache.call(|t| t.get(&key)).await? {
            CacheEntry::Present(record)
                if !record.is_expired(now)
                    && index_value(&record.data, index).ok().flatten().as_deref()
                        == Some(value) =>
            {
                Some(record)
            }
            _ => None,
        })
    }

    /// Removes expired records and old deletion markers from the durable tier.
    pub async fn purge_expired(&self) -> Result<u64, Error> {
        self.durable
            .call(|t| t.purge_expired(now(), self.settings.tombstone_retention))
            .await
            .map_err(|err| self.durable_failed(err))
    }

    /// The plan a collection follows now (configured, narrowed by health).
    pub fn plan(&self, collection: &CollectionName) -> Result<Plan, Error> {
        self.plan_for(self.catalog.get(collection)?)
    }
}

/// The public operations, each counted and timed in [`EngineStats`].
impl Engine {
    async fn observed<T>(
        &self,
        operation: Operation,
        work: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let started = Instant::now();
        let result = work.await;
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(Error::BackendsUnavailable { .. } | Error::Internal(_)) => Outcome::Failed,
            Err(_) => Outcome::Rejected,
        };
        self.stats.record(operation, outcome, started.elapsed());
        result
    }

    /// Creates or replaces a record.
    pub async fn put(
        &self,
        key: RecordKey,
        data: JsonObject,
        precondition: Precondition,
        ttl: Option<Duration>,
    ) -> Result<WriteOutcome, Error> {
        let work = self.write_record(key, data, precondition, ttl);
        self.observed(Operation::Put, work).await
    }

    /// Applies a JSON Merge Patch to an existing record.
    pub async fn patch(
        &self,
        key: RecordKey,
        patch: JsonObject,
        precondition: Precondition,
    ) -> Result<WriteOutcome, Error> {
        let work = self.patch_record(key, patch, precondition);
        self.observed(Operation::Patch, work).await
    }

    /// Reads one record.
    pub async fn get(&self, key: &RecordKey) -> Result<Option<Record>, Error> {
        self.observed(Operation::Get, self.read_record(key)).await
    }

    /// Deletes a record; returns the version of the deletion.
    pub async fn delete(
        &self,
        key: &RecordKey,
        precondition: Precondition,
    ) -> Result<Version, Error> {
        let work = self.delete_record(key, precondition);
        self.observed(Operation::Delete, work).await
    }

    /// One page of a collection, ordered by id.
    pub async fn list(
        &self,
        collection: &CollectionName,
        after: Option<RecordId>,
        prefix: Option<String>,
        limit: u32,
    ) -> Result<Page, Error> {
        let work = self.list_page(collection, after, prefix, limit);
        self.observed(Operation::List, work).await
    }

    /// Several records of one collection at once.
    pub async fn batch_get(
        &self,
        collection: &CollectionName,
        ids: Vec<RecordId>,
    ) -> Result<BatchGet, Error> {
        let work = async {
            let mut seen = HashSet::new();
            let ids: Vec<RecordId> = ids
                .into_iter()
                .filter(|id| seen.insert(id.clone()))
                .collect();
            let mut answer = BatchGet::default();
            let (mut bytes, mut full) = (0, false);
            for chunk in ids.chunks(BATCH_CHUNK) {
                if full {
                    answer.unread.extend_from_slice(chunk);
                    continue;
                }
                let read = self.read_many(collection, chunk.to_vec()).await?;
                answer.missing.extend(read.missing);
                for record in read.records {
                    let size = json_size(&record.data);
                    full = full
                        || (!answer.records.is_empty() && bytes + size > self.settings.page_bytes);
                    if full {
                        answer.unread.push(record.id);
                    } else {
                        bytes += size;
                        answer.records.push(record);
                    }
                }
            }
            Ok(answer)
        };
        self.observed(Operation::BatchGet, work).await
    }

    /// The record whose unique index `index` holds `value`.
    pub async fn lookup(
        &self,
        collection: &CollectionName,
        index: &str,
        value: &str,
    ) -> Result<Option<Record>, Error> {
        let work = self.lookup_unique(collection, index, value);
        self.observed(Operation::Lookup, work).await
    }
}

/// The API error for an increment refused by [`StoreError::CounterOutOfRange`].
pub(crate) fn out_of_range(field: &str) -> Error {
    Error::CounterOutOfRange(format!(
        "the increment would take {field} past {}, the largest total a counter keeps; nothing was applied",
        hybridstore_core::MAX_TOTAL_UNITS
    ))
}
