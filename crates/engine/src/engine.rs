//! The engine: a thin facade over the components that own its state.
//!
//! `Engine::new` wires the components; every public method hands the call to
//! the one component that carries it out:
//!
//! | component | file | owns |
//! |---|---|---|
//! | `Shared` | `shared.rs` | the tiers behind their breakers, the cache's recovery, the catalog, settings, the strategy in force, statistics |
//! | `Records` | `records.rs` | nothing of its own: the request path of records |
//! | `Journal` | `journal/` | backlogs, the keys journaled and not yet replayed, replay progress |
//! | `Counters` | `counters.rs` | the increment sequence and the counter journal's backlog |
//! | `Switches` | `control.rs` | nothing of its own: strategy switches and their broadcast |
//! | `Maintenance` | `maintenance.rs` | the jobs (sync, consistency check) |
//! | `Transfer` | `transfer.rs` | nothing of its own: export and import |
//! | `Replays` | `idempotency.rs` | nothing of its own: stored idempotent responses |
//! | `Recovery` | `recovery.rs` | what the cache's recovery remembers (dirty keys, server id, bumps) |
//!
//! Health probes run here, since they tie the cache's recovery to the
//! journal's replay; status reports (`status.rs`) read every component.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::Stream;
use hybridstore_transfer::Line;
use time::OffsetDateTime;

use hybridstore_api::{
    ConsistencyReport, ImportReport, JobView, ReplayStats, SwitchOutcome, SyncDirection, TierHealth,
};
use hybridstore_core::{
    Amount, CacheStore, CollectionName, CounterScope, DurableStore, Error, FieldName, Granularity,
    IdempotencyClaim, JsonObject, Precondition, Record, RecordId, RecordKey, StoreError, Strategy,
    Tier, Version, WriteOutcome,
};

use crate::breaker::Breaker;
use crate::catalog::{Catalog, Collection};
use crate::control::Switches;
use crate::counters::{CounterValues, Counters};
use crate::guarded::Guarded;
use crate::idempotency::Replays;

use crate::journal::Journal;
use crate::maintenance::Maintenance;
use crate::records::{BatchGet, Page, Records};
use crate::recovery::Recovery;
use crate::settings::{EngineSettings, Tiers};
use crate::shared::{Control, Shared, instance_id};
use crate::stats::{EngineStats, in_background};
use crate::strategy::Plan;
use crate::transfer::Transfer;

pub struct Engine {
    pub(crate) shared: Arc<Shared>,
    pub(crate) journal: Arc<Journal>,
    records: Records,
    pub(crate) counters: Arc<Counters>,
    switches: Arc<Switches>,
    maintenance: Arc<Maintenance>,
    transfer: Arc<Transfer>,
    replays: Replays,
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
        // A cache that holds the truth has nothing to check: a failure is
        // one like any tier's.
        let cache_threshold = match settings.tiers {
            Tiers::CacheOnly => health.failure_threshold,
            _ => 1,
        };
        let cache = Arc::new(Guarded::new(
            cache.clone(),
            Breaker::new(Tier::Cache, cache.backend(), cache_threshold),
            health.cache_call_timeout,
        ));
        let shared = Arc::new(Shared {
            recovery: Recovery::new(cache.clone()),
            durable,
            cache,
            catalog,
            control: Control::new(settings.strategy),
            stats: EngineStats::default(),
            instance_id: instance_id(),
            started: Instant::now(),
            settings,
        });
        let journal = Arc::new(Journal::new(shared.clone()));
        let maintenance = Arc::new(Maintenance::new(shared.clone()));
        Self {
            records: Records::new(shared.clone(), journal.clone()),
            counters: Arc::new(Counters::new(shared.clone())),
            switches: Arc::new(Switches::new(shared.clone(), journal.clone())),
            transfer: Arc::new(Transfer::new(shared.clone(), maintenance.clone())),
            replays: Replays::new(shared.clone()),
            maintenance,
            journal,
            shared,
        }
    }

    /// The health of each tier the deployment has (durable, then cache).
    pub fn health(&self) -> Vec<TierHealth> {
        self.shared
            .breakers()
            .map(|breaker| breaker.health())
            .collect()
    }

    /// The tiers themselves, without breakers (tests that look into them
    /// behind the service's back).
    #[cfg(feature = "test-hooks")]
    pub fn raw_tiers(&self) -> (Arc<dyn DurableStore>, Arc<dyn CacheStore>) {
        (
            self.shared.durable.tier.clone(),
            self.shared.cache.tier.clone(),
        )
    }

    /// Makes every call to `tier` fail as if it were unreachable (`down`),
    /// or ends that: a fault drill that works for any tier, including the
    /// in-process cache, which cannot be stopped from outside.
    #[cfg(feature = "test-hooks")]
    pub fn simulate_outage(&self, tier: Tier, down: bool) {
        match tier {
            Tier::Durable => self.shared.durable.breaker.simulate_outage(down),
            Tier::Cache => self.shared.cache.breaker.simulate_outage(down),
        }
    }

    /// Pings both tiers once and opens the breaker of each that does not
    /// answer, so a service started during an outage routes around it at once.
    pub async fn check_tiers_at_start(&self) {
        if self.shared.settings.tiers == Tiers::CacheOnly {
            // The cache holds the truth: nothing to compare or reconcile.
            return in_background(self.shared.cache.probe()).await;
        }
        // The durable tier first: the cache's check compares its generation.
        match self.shared.durable.tier.ping().await {
            Ok(()) => self.shared.durable.breaker.record_success(),
            Err(err) => self.shared.durable.breaker.force_open(&err),
        }
        in_background(async {
            self.probe_cache().await;
            self.journal.refresh_backlogs().await;
        })
        .await;
    }

    /// One probe of the cache, with what its recovery needs from the engine:
    /// the durable cache generation, and the journal replay.
    async fn probe_cache(&self) {
        let generation = self.shared.durable_cache_generation().await;
        self.shared
            .recovery
            .probe(generation, || self.journal.reconcile_cache())
            .await;
    }

    /// Probes both tiers forever (the half-open trials that close breakers),
    /// each on its own: a cache recovery that replays a journal must not
    /// keep the durable tier's failure from being noticed.
    pub async fn run_health_probes(self: Arc<Self>) {
        let shared = &self.shared;
        let durable = self.keep_probing(&shared.durable.breaker, || shared.durable.probe());
        let cache = self.keep_probing(&shared.cache.breaker, || self.probe_cache());
        // A cache that holds the truth has nothing to reconcile after an
        // outage or a restart: its probe is the plain one.
        let cache_alone = self.keep_probing(&shared.cache.breaker, || shared.cache.probe());
        match shared.settings.tiers {
            Tiers::Both => {
                in_background(async {
                    tokio::join!(durable, cache);
                })
                .await
            }
            Tiers::DurableOnly => in_background(durable).await,
            Tiers::CacheOnly => in_background(cache_alone).await,
        }
    }

    /// Probes one tier forever: every probe interval, and at once when a
    /// failed live call asks (a refused connection then opens the breaker
    /// within milliseconds).
    async fn keep_probing<F, R>(&self, breaker: &Breaker, probe: F)
    where
        F: Fn() -> R,
        R: Future<Output = ()>,
    {
        let mut ticks = self.probe_ticks();
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = breaker.probe_wanted.notified() => {}
            }
            probe().await;
        }
    }

    fn probe_ticks(&self) -> tokio::time::Interval {
        let mut ticks = tokio::time::interval(self.shared.settings.health.probe_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks
    }

    pub fn catalog(&self) -> &Catalog {
        &self.shared.catalog
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.shared.settings
    }
}

/// Each public operation, handed to the component that carries it out.
impl Engine {
    /// Removes expired records and old deletion markers from the durable tier.
    pub async fn purge_expired(&self) -> Result<u64, Error> {
        self.records.purge_expired().await
    }

    /// The plan a collection follows now (configured, narrowed by health).
    pub fn plan(&self, collection: &CollectionName) -> Result<Plan, Error> {
        self.records.plan(collection)
    }

    /// Creates or replaces a record.
    pub async fn put(
        &self,
        key: RecordKey,
        data: JsonObject,
        precondition: Precondition,
        ttl: Option<Duration>,
    ) -> Result<WriteOutcome, Error> {
        self.records.put(key, data, precondition, ttl).await
    }

    /// Applies a JSON Merge Patch to an existing record.
    pub async fn patch(
        &self,
        key: RecordKey,
        patch: JsonObject,
        precondition: Precondition,
    ) -> Result<WriteOutcome, Error> {
        self.records.patch(key, patch, precondition).await
    }

    /// Reads one record.
    pub async fn get(&self, key: &RecordKey) -> Result<Option<Record>, Error> {
        self.records.get(key).await
    }

    /// Deletes a record; returns the version of the deletion.
    pub async fn delete(
        &self,
        key: &RecordKey,
        precondition: Precondition,
    ) -> Result<Version, Error> {
        self.records.delete(key, precondition).await
    }

    /// One page of a collection, ordered by id.
    pub async fn list(
        &self,
        collection: &CollectionName,
        after: Option<RecordId>,
        prefix: Option<String>,
        limit: u32,
    ) -> Result<Page, Error> {
        self.records.list(collection, after, prefix, limit).await
    }

    /// Several records of one collection at once.
    pub async fn batch_get(
        &self,
        collection: &CollectionName,
        ids: Vec<RecordId>,
    ) -> Result<BatchGet, Error> {
        self.records.batch_get(collection, ids).await
    }

    /// The record whose unique index `index` holds `value`.
    pub async fn lookup(
        &self,
        collection: &CollectionName,
        index: &str,
        value: &str,
    ) -> Result<Option<Record>, Error> {
        self.records.lookup(collection, index, value).await
    }

    /// How many entries wait in each journal (for status and metrics).
    pub async fn journal_backlog(&self) -> Result<(u64, u64), Error> {
        self.journal.journal_backlog().await
    }

    /// Replays the journals into the durable tier, forever.
    pub async fn run_journal_replay(self: Arc<Self>) {
        if !self.shared.settings.tiers.journals() {
            return; // Nothing is ever journaled.
        }
        in_background(self.journal.clone().run_journal_replay()).await
    }

    /// Replay counters since the process started.
    pub fn replay_stats(&self) -> ReplayStats {
        self.journal.replay_stats()
    }

    /// One batch: read, apply, acknowledge. Returns how many entries it took.
    pub async fn replay_once(&self, recover: Option<Duration>) -> Result<usize, StoreError> {
        self.journal.replay_once(recover).await
    }

    /// Publishes the keys this instance journaled to the durable tier, for
    /// the other instances (see [`CacheLedger::hold`](hybridstore_core::CacheLedger::hold)): every
    /// `PUBLISH_INTERVAL` while it journals, at once when the cache breaker
    /// opens, again after a failure. Releases the keys the durable tier has
    /// caught up with every `RELEASE_INTERVAL`; with the journals seen
    /// empty, also those held longer than `HELD_STALE`.
    pub async fn run_held_publisher(self: Arc<Self>) {
        if !self.shared.settings.tiers.journals() {
            return;
        }
        in_background(self.journal.clone().run_held_publisher()).await
    }

    /// Adds `deltas` to every bucket `at` (default: now) falls into.
    /// `op_id`: the increment's identity when the client gave one (from its
    /// Idempotency-Key): an increment with an id applied before is not
    /// applied again, in either tier.
    pub async fn increment_counters(
        &self,
        scope: CounterScope,
        deltas: Vec<(FieldName, Amount)>,
        at: Option<OffsetDateTime>,
        op_id: Option<String>,
    ) -> Result<CounterValues, Error> {
        self.counters
            .increment_counters(scope, deltas, at, op_id)
            .await
    }

    /// The buckets of one granularity from `from` to `to` (default: every
    /// retained bucket up to now), oldest first; buckets without values are
    /// left out.
    pub async fn read_counters(
        &self,
        scope: CounterScope,
        granularity: Granularity,
        from: Option<OffsetDateTime>,
        to: Option<OffsetDateTime>,
    ) -> Result<CounterValues, Error> {
        self.counters
            .read_counters(scope, granularity, from, to)
            .await
    }

    /// Replays journaled increments into the durable tier, forever.
    pub async fn run_counter_replay(self: Arc<Self>) {
        if !self.shared.settings.tiers.journals() {
            return;
        }
        in_background(self.counters.clone().run_counter_replay()).await
    }

    /// One batch: read, apply (each increment id once), acknowledge.
    pub async fn replay_counters_once(
        &self,
        recover: Option<Duration>,
    ) -> Result<usize, StoreError> {
        self.counters.replay_counters_once(recover).await
    }

    /// How many increments wait in the counter journal.
    pub async fn counter_backlog(&self) -> Result<u64, Error> {
        self.counters.counter_backlog().await
    }

    /// Loads the saved state at start: from the durable tier, or the cache's
    /// mirror when the durable tier is down.
    pub async fn load_control_state(&self) {
        in_background(self.switches.load_control_state()).await
    }

    /// Switches the service-wide strategy on every instance sharing the stores.
    pub async fn switch_strategy(
        &self,
        target: Strategy,
        force: bool,
    ) -> Result<SwitchOutcome, Error> {
        self.switches.switch_strategy(target, force).await
    }

    /// Follows switches made by any instance, forever: the broadcast for
    /// speed, a poll of the saved state for certainty.
    pub async fn run_control_sync(self: Arc<Self>) {
        in_background(self.switches.clone().run_control_sync()).await
    }

    /// Switches one collection's strategy (`None`: back to what it
    /// declares or follows) on every instance.
    pub async fn switch_collection_strategy(
        &self,
        collection: &CollectionName,
        target: Option<Strategy>,
        force: bool,
    ) -> Result<SwitchOutcome, Error> {
        self.switches
            .switch_collection_strategy(collection, target, force)
            .await
    }

    /// Scheduled sync (`sync.*`): the warm-up at start and the periodic
    /// repair, one instance at a time.
    pub async fn run_scheduled_sync(self: Arc<Self>) {
        in_background(self.maintenance.clone().run_schedule()).await
    }

    /// Starts a sync job; `collection: None` syncs every collection.
    pub fn start_sync(
        &self,
        direction: SyncDirection,
        collection: Option<CollectionName>,
        force: bool,
    ) -> Result<JobView, Error> {
        self.maintenance.start_sync(direction, collection, force)
    }

    /// Starts a consistency check as a job (its report is the job's result).
    pub fn start_consistency_check(
        &self,
        collection: Option<CollectionName>,
        repair: bool,
    ) -> Result<JobView, Error> {
        self.maintenance.start_consistency_check(collection, repair)
    }

    /// Runs a consistency check to the end (the synchronous form of the API).
    pub async fn check_consistency(
        &self,
        collection: Option<CollectionName>,
        repair: bool,
    ) -> Result<ConsistencyReport, Error> {
        self.maintenance.check_consistency(collection, repair).await
    }

    pub fn job(&self, id: &str) -> Result<JobView, Error> {
        self.maintenance.job(id)
    }

    pub fn jobs(&self) -> Vec<JobView> {
        self.maintenance.jobs()
    }

    /// Every record, deletion marker and counter value the durable tier
    /// holds, as export lines in pages: a header first and an end line
    /// with the counts last.
    pub fn export(self: Arc<Self>) -> impl Stream<Item = Result<Vec<Line>, Error>> + Send {
        self.transfer.clone().export()
    }

    /// Why `line` cannot be imported here, if it cannot.
    pub fn check_import_line(&self, line: &Line) -> Result<(), String> {
        self.transfer.check_import_line(line)
    }

    /// Applies a batch of checked export lines (see the module comment).
    pub async fn import_batch(
        &self,
        lines: Vec<Line>,
        force: bool,
        report: &mut ImportReport,
    ) -> Result<(), Error> {
        self.transfer.import_batch(lines, force, report).await
    }

    /// Claims an idempotency key; `None` when the cache (which keeps them)
    /// cannot be asked: the request then runs without replay protection.
    pub async fn claim_idempotency(
        &self,
        owner: &str,
        key: &str,
        fingerprint: &str,
    ) -> Option<IdempotencyClaim> {
        self.replays
            .claim_idempotency(owner, key, fingerprint)
            .await
    }

    /// Stores the response of a claimed key, within the bounds of the
    /// settings; false when it was not stored (past a bound, or the cache
    /// failed: logged), and a retry runs again.
    pub async fn complete_idempotency(
        &self,
        owner: &str,
        key: &str,
        fingerprint: &str,
        response: &[u8],
    ) -> bool {
        self.replays
            .complete_idempotency(owner, key, fingerprint, response)
            .await
    }

    /// Gives a claimed key up.
    pub async fn release_idempotency(&self, owner: &str, key: &str) {
        self.replays.release_idempotency(owner, key).await
    }

    /// The strategy a collection follows now (its own, or the service's).
    pub fn strategy_of(&self, collection: &Collection) -> Strategy {
        self.shared.strategy_of(collection)
    }
}
