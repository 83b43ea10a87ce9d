//! Operator jobs over whole collections: sync between the tiers and the
//! consistency check (with repair).
//!
//! Both walk the stores page by page (the durable tier in id order, the cache
//! with `SCAN`), so memory stays bounded whatever the data size, and every
//! write they make is version-guarded: a sync or a repair never lets an older
//! version replace a newer one (unless the operator forces a sync), so running
//! one twice, or alongside live traffic, is safe.
//!
//! The consistency check compares each record's version in both tiers:
//!
//! | class                | the cache holds                  | meaning                    |
//! |----------------------|----------------------------------|----------------------------|
//! | `missing_in_postgres`| a record PostgreSQL lacks        | data at risk               |
//! | `redis_ahead`        | a newer version                  | a write not yet synced     |
//! | `redis_stale`        | an older version                 | a stale copy               |
//! | `content_mismatch`   | the same version, other data     | corruption or manual edits |
//! | `missing_in_redis`   | nothing (cache-reading strategies)| a cold cache, informational|
//!
//! Each difference is confirmed by reading both tiers again before it is
//! reported, so writes racing with the check do not show up as drift.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::future::join_all;
use hybridstore_api::{CollectionReport, ConsistencyReport, DriftClass, JobView, SyncDirection};
use hybridstore_core::{
    ApplyMode, CacheEntry, Change, CollectionName, CopyOutcome, Error, RecordKey, StoreError,
    Strategy,
};

use crate::catalog::Collection;
use crate::jobs::Jobs;
use crate::jobs::{Job, Progress};
use crate::shared::Shared;
use crate::stats::in_background;
use hybridstore_core::now;

/// Records per page read from either tier.
const PAGE: usize = 500;
/// The turn instances take for the scheduled repair.
const SCHEDULED_REPAIR: &str = "scheduled_repair";

/// Sample ids reported per class and collection.
const SAMPLES: usize = 10;

/// What one record looks like in both tiers.
struct Pair {
    durable: Option<Change>,
    cache: CacheEntry,
}

impl Pair {
    /// The class of difference, if the tiers disagree.
    fn classify(&self, reads_cache: bool) -> Option<DriftClass> {
        use DriftClass::*;
        match (&self.durable, &self.cache) {
            (None, CacheEntry::Present(_)) => Some(MissingInPostgres),
            (None | Some(Change::Delete { .. }), CacheEntry::Miss | CacheEntry::Deleted(_)) => None,
            (Some(Change::Put(_)), CacheEntry::Miss) => reads_cache.then_some(MissingInRedis),
            (Some(Change::Delete { version, .. }), CacheEntry::Present(copy)) => {
                Some(if copy.version > *version {
                    MissingInPostgres
                } else {
                    RedisStale
                })
            }
            (Some(Change::Put(record)), CacheEntry::Deleted(version)) => {
                Some(if *version > record.version {
                    RedisAhead
                } else {
                    RedisStale
                })
            }
            (Some(Change::Put(record)), CacheEntry::Present(copy)) => {
                if copy.version > record.version {
                    Some(RedisAhead)
                } else if copy.version < record.version {
                    Some(RedisStale)
                } else if copy.data != record.data {
                    Some(ContentMismatch)
                } else {
                    None
                }
            }
        }
    }

    /// The cache's state as a change for the durable tier.
    fn cache_change(&self, key: &RecordKey) -> Option<Change> {
        match &self.cache {
            CacheEntry::Present(record) => Some(Change::Put(record.clone())),
            CacheEntry::Deleted(version) => Some(Change::Delete {
                key: key.clone(),
                version: *version,
                at: now(),
            }),
            CacheEntry::Miss => None,
        }
    }
}

/// Sync and the consistency check, run as jobs.
pub(crate) struct Maintenance {
    shared: Arc<Shared>,
    jobs: Jobs,
}

impl Maintenance {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            jobs: Jobs::default(),
        }
    }
}

impl Maintenance {
    /// Starts a sync job; `collection: None` syncs every collection.
    pub fn start_sync(
        self: &Arc<Self>,
        direction: SyncDirection,
        collection: Option<CollectionName>,
        force: bool,
    ) -> Result<JobView, Error> {
        let collections = self.selected(collection.as_ref())?;
        let params = serde_json::json!({
            "direction": direction,
            "collection": collection.as_ref().map(|c| c.as_str()),
            "force": force,
        });
        let job = self.jobs.create(direction.kind(), params);
        let maintenance = self.clone();
        let running = job.clone();
        tokio::spawn(in_background(async move {
            let outcome = maintenance
                .sync(direction, &collections, force, &running)
                .await;
            match &outcome {
                Ok(()) => {
                    tracing::info!(job = %running.id, progress = ?running.view().progress, "sync finished")
                }
                Err(err) => tracing::warn!(job = %running.id, error = %err, "sync failed"),
            }
            running.finish(outcome.map(|()| None).map_err(|err| err.to_string()));
        }));
        Ok(job.view())
    }

    /// Starts a consistency check as a job (its report is the job's result).
    pub fn start_consistency_check(
        self: &Arc<Self>,
        collection: Option<CollectionName>,
        repair: bool,
    ) -> Result<JobView, Error> {
        let collections = self.selected(collection.as_ref())?;
        let params = serde_json::json!({
            "collection": collection.as_ref().map(|c| c.as_str()),
            "repair": repair,
        });
        let job = self.jobs.create("consistency_check", params);
        let maintenance = self.clone();
        let running = job.clone();
        tokio::spawn(in_background(async move {
            let outcome = maintenance.check(&collections, repair, &running).await;
            if let Err(err) = &outcome {
                tracing::warn!(job = %running.id, error = %err, "consistency check failed");
            }
            running.finish(
                outcome
                    .map(|report| serde_json::to_value(report).ok())
                    .map_err(|err| err.to_string()),
            );
        }));
        Ok(job.view())
    }

    /// Scheduled sync, for as long as the service runs (nothing unless
    /// `sync.enabled`). With `sync.on_startup` the cache is warmed from the
    /// durable tier once, at start. Every `sync.interval`, the instance
    /// whose turn it is (taken in the durable tier, so one instance at a
    /// time) runs a repairing consistency check: records at risk in the
    /// cache alone reach the durable tier, stale copies are refreshed, and
    /// every write it makes is version-guarded, so live traffic is safe.
    /// Both run as jobs, like an operator's, with `"scheduled"` among their
    /// parameters. A repair longer than the interval may overlap the next
    /// instance's; being version-guarded, both stay safe.
    pub async fn run_schedule(self: Arc<Self>) {
        let schedule = self.shared.settings.sync.clone();
        if !schedule.enabled || self.shared.settings.tiers.alone().is_some() {
            return;
        }
        let all = self.selected(None).unwrap_or_default();
        if schedule.on_startup {
            let direction = SyncDirection::PostgresToRedis;
            let params = serde_json::json!({"direction": direction, "scheduled": "startup"});
            let job = self.jobs.create(direction.kind(), params);
            let outcome = self.sync(direction, &all, false, &job).await;
            match &outcome {
                Ok(()) => {
                    tracing::info!(job = %job.id, progress = ?job.view().progress, "the cache was warmed from the durable tier")
                }
                Err(err) => {
                    tracing::warn!(job = %job.id, error = %err, "warming the cache at start failed")
                }
            }
            job.finish(outcome.map(|()| None).map_err(|err| err.to_string()));
        }
        let first = tokio::time::Instant::now() + schedule.interval;
        let mut ticks = tokio::time::interval_at(first, schedule.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let holder = &self.shared.instance_id;
            let turn = self
                .shared
                .durable
                .call(|t| t.take_turn(SCHEDULED_REPAIR, holder, schedule.interval))
                .await;
            match turn {
                Ok(true) => {}
                Ok(false) => {
                    tracing::debug!("another instance runs this period's scheduled repair");
                    continue;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "the scheduled repair waits for the durable tier");
                    continue;
                }
            }
            let params = serde_json::json!({"repair": true, "scheduled": true});
            let job = self.jobs.create("consistency_check", params);
            let outcome = self.check(&all, true, &job).await;
            match &outcome {
                Ok(report) => tracing::info!(
                    job = %job.id,
                    consistent = report.consistent,
                    "scheduled repair finished"
                ),
                Err(err) => tracing::warn!(job = %job.id, error = %err, "scheduled repair failed"),
            }
            job.finish(match &outcome {
                Ok(report) => Ok(serde_json::to_value(report).ok()),
                Err(err) => Err(err.to_string()),
            });
        }
    }

    /// Runs a consistency check to the end (the synchronous form of the API).
    pub async fn check_consistency(
        &self,
        collection: Option<CollectionName>,
        repair: bool,
    ) -> Result<ConsistencyReport, Error> {
        let collections = self.selected(collection.as_ref())?;
        let job = self.jobs.create(
            "consistency_check",
            serde_json::json!({"collection": collection.as_ref().map(|c| c.as_str()), "repair": repair}),
        );
        let outcome = self.check(&collections, repair, &job).await;
        job.finish(match &outcome {
            Ok(report) => Ok(serde_json::to_value(report).ok()),
            Err(err) => Err(err.to_string()),
        });
        outcome
    }

    pub fn job(&self, id: &str) -> Result<JobView, Error> {
        self.jobs
            .get(id)
            .map(|job| job.view())
            .ok_or_else(|| Error::NotFound(format!("no job {id:?} on this instance")))
    }

    pub fn jobs(&self) -> Vec<JobView> {
        self.jobs.all()
    }

    fn selected(&self, collection: Option<&CollectionName>) -> Result<Vec<CollectionName>, Error> {
        if let Some(why) = self.shared.settings.tiers.alone() {
            return Err(Error::NotAllowed(format!(
                "{why}; there is nothing to sync or compare between tiers"
            )));
        }
        match collection {
            Some(name) => Ok(vec![self.shared.catalog.get(name)?.spec.name.clone()]),
            None => Ok(self
                .shared
                .catalog
                .iter()
                .map(|c| c.spec.name.clone())
                .collect()),
        }
    }

    /// Tells the job how many records it will walk (an estimate: the
    /// stores change meanwhile; a count that fails counts nothing).
    async fn expect_total(&self, collections: &[CollectionName], job: &Job) {
        for name in collections {
            let count = self
                .shared
                .durable
                .call(|t| t.count(name))
                .await
                .unwrap_or(0);
            Progress::add(&job.progress.total, count);
        }
    }

    /// A tier failure inside a job.
    /// A tier failure that stopped long work (a job, an export or import),
    /// saying whether running it again helps. The caller logs it.
    pub(crate) fn work_stopped(&self, what: &str, err: StoreError) -> Error {
        match err {
            StoreError::Unavailable { tier, .. } => Error::Internal(format!(
                "the {tier} tier became unavailable; the {what} stopped (safe to run again)"
            )),
            other => Error::Internal(other.to_string()),
        }
    }

    async fn sync(
        &self,
        direction: SyncDirection,
        collections: &[CollectionName],
        force: bool,
        job: &Job,
    ) -> Result<(), Error> {
        self.expect_total(collections, job).await;
        for name in collections {
            let collection = self.shared.catalog.get(name)?;
            match direction {
                SyncDirection::RedisToPostgres => self.sync_to_durable(name, force, job).await?,
                SyncDirection::PostgresToRedis => {
                    self.sync_to_cache(collection, force, job).await?
                }
            }
        }
        Ok(())
    }

    async fn sync_to_durable(
        &self,
        collection: &CollectionName,
        force: bool,
        job: &Job,
    ) -> Result<(), Error> {
        let mode = if force {
            ApplyMode::Force
        } else {
            ApplyMode::IfNewer
        };
        let mut cursor = 0;
        loop {
            let (next, states) = self
                .shared
                .cache
                .call(|t| t.scan(collection, cursor, PAGE))
                .await
                .map_err(|err| self.work_stopped("job", err))?;
            let changes: Vec<Change> = states.into_iter().map(|s| s.state).collect();
            Progress::add(&job.progress.scanned, changes.len() as u64);
            if !changes.is_empty() {
                let applied = match self
                    .shared
                    .durable
                    .call(|t| t.apply_changes(&changes, mode))
                    .await
                {
                    Ok(applied) => applied.into_iter().map(Some).collect(),
                    Err(err) if err.is_unavailable() => return Err(self.work_stopped("job", err)),
                    // One bad record fails its page's transaction: apply the
                    // page record by record to find it and keep the rest.
                    Err(_) => self.apply_one_by_one(&changes, mode).await?,
                };
                for outcome in applied {
                    let counter = match outcome {
                        Some(true) => &job.progress.written,
                        Some(false) => &job.progress.skipped_older,
                        None => &job.progress.failed,
                    };
                    Progress::add(counter, 1);
                }
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Applies changes one at a time: `None` for each that failed (logged).
    async fn apply_one_by_one(
        &self,
        changes: &[Change],
        mode: ApplyMode,
    ) -> Result<Vec<Option<bool>>, Error> {
        let mut outcomes = Vec::with_capacity(changes.len());
        for change in changes {
            match self
                .shared
                .durable
                .call(|t| t.apply_changes(std::slice::from_ref(change), mode))
                .await
            {
                Ok(applied) => outcomes.push(applied.first().copied()),
                Err(err) if err.is_unavailable() => return Err(self.work_stopped("job", err)),
                Err(err) => {
                    let key = change.key();
                    // Ids can be user names: at warn level only the collection.
                    tracing::warn!(error = %err, collection = %key.collection, "sync could not apply a record");
                    tracing::debug!(collection = %key.collection, id = %key.id, "the record sync could not apply");
                    outcomes.push(None);
                }
            }
        }
        Ok(outcomes)
    }

    async fn sync_to_cache(
        &self,
        collection: &Collection,
        force: bool,
        job: &Job,
    ) -> Result<(), Error> {
        let name = &collection.spec.name;
        let mut after = None;
        loop {
            let states = self
                .shared
                .durable
                .call(|t| t.scan(name, after.as_ref(), PAGE, now()))
                .await
                .map_err(|err| self.work_stopped("job", err))?;
            Progress::add(&job.progress.scanned, states.len() as u64);
            let copies = states
                .iter()
                .map(|state| self.copy_to_cache(collection, state, force));
            for (state, outcome) in states.iter().zip(join_all(copies).await) {
                let counter = match outcome {
                    Ok(Some(CopyOutcome::Written)) => &job.progress.written,
                    Ok(Some(CopyOutcome::Kept) | None) => &job.progress.skipped_older,
                    Ok(Some(CopyOutcome::Pinned)) => &job.progress.skipped_pinned,
                    Err(err) if err.is_unavailable() => return Err(self.work_stopped("job", err)),
                    Err(err) => {
                        let key = state.key();
                        // Ids can be user names: at warn level only the collection.
                        tracing::warn!(error = %err, collection = %key.collection, "sync could not copy a record");
                        tracing::debug!(collection = %key.collection, id = %key.id, "the record sync could not copy");
                        &job.progress.failed
                    }
                };
                Progress::add(counter, 1);
            }
            match states.last() {
                Some(last) if states.len() == PAGE => after = Some(last.key().id),
                _ => return Ok(()),
            }
        }
    }

    /// Copies a durable state into the cache, as the collection keeps it
    /// there: the truth of a `redis_only` collection, a copy otherwise.
    /// `None` when there is nothing to copy (the record expired).
    pub(crate) async fn copy_to_cache(
        &self,
        collection: &Collection,
        state: &Change,
        force: bool,
    ) -> Result<Option<CopyOutcome>, StoreError> {
        let authoritative = self.shared.strategy_of(collection) == Strategy::RedisOnly;
        let lifetime = match state {
            Change::Put(record) => match record.cache_lifetime(collection.spec.cache_ttl, now()) {
                Some(lifetime) => lifetime,
                None => return Ok(None),
            },
            Change::Delete { .. } => self.shared.settings.deleted_marker_ttl,
        };
        let copy = || {
            self.shared
                .cache
                .call(|t| t.copy_in(state, lifetime, authoritative, force))
        };
        let key = state.key();
        match self.shared.recovery.fill(&key, state.version(), copy).await {
            Some(copied) => copied.map(Some),
            // A newer version was committed around the cache meanwhile.
            None => Ok(Some(CopyOutcome::Kept)),
        }
    }

    async fn check(
        &self,
        collections: &[CollectionName],
        repair: bool,
        job: &Job,
    ) -> Result<ConsistencyReport, Error> {
        self.expect_total(collections, job).await;
        let mut reports = Vec::with_capacity(collections.len());
        for name in collections {
            let collection = self.shared.catalog.get(name)?;
            reports.push(self.check_collection(collection, repair, job).await?);
        }
        let consistent = reports.iter().all(|report| {
            report
                .differences
                .iter()
                .all(|(class, found)| class.informational() || found.count == found.repaired)
        });
        Ok(ConsistencyReport {
            consistent,
            repair,
            durable_backend: self.shared.durable.backend().to_owned(),
            cache_backend: self.shared.cache.backend().to_owned(),
            collections: reports,
        })
    }

    async fn check_collection(
        &self,
        collection: &Collection,
        repair: bool,
        job: &Job,
    ) -> Result<CollectionReport, Error> {
        let name = &collection.spec.name;
        let strategy = self.shared.strategy_of(collection);
        let mut report = CollectionReport {
            collection: name.to_string(),
            strategy,
            scanned_postgres: 0,
            scanned_redis: 0,
            differences: BTreeMap::new(),
        };

        // Pass 1: every durable state against the cache.
        let mut after = None;
        loop {
            let states = self
                .shared
                .durable
                .call(|t| t.scan(name, after.as_ref(), PAGE, now()))
                .await
                .map_err(|err| self.work_stopped("job", err))?;
            report.scanned_postgres += states.len() as u64;
            Progress::add(&job.progress.scanned, states.len() as u64);
            let keys: Vec<RecordKey> = states.iter().map(Change::key).collect();
            let entries = self
                .shared
                .cache
                .call(|t| t.get_many(&keys))
                .await
                .map_err(|err| self.work_stopped("job", err))?;
            for (state, cache) in states.iter().zip(entries) {
                let pair = Pair {
                    durable: Some(state.clone()),
                    cache,
                };
                if pair.classify(true).is_some() {
                    self.confirm_and_repair(collection, &state.key(), repair, &mut report)
                        .await?;
                }
            }
            match states.last() {
                Some(last) if states.len() == PAGE => after = Some(last.key().id),
                _ => break,
            }
        }

        // Pass 2: cache entries whose record the durable tier does not hold.
        let mut cursor = 0;
        loop {
            let (next, cached) = self
                .shared
                .cache
                .call(|t| t.scan(name, cursor, PAGE))
                .await
                .map_err(|err| self.work_stopped("job", err))?;
            report.scanned_redis += cached.len() as u64;
            let ids: Vec<_> = cached.iter().map(|c| c.state.key().id).collect();
            let held = self
                .shared
                .durable
                .call(|t| t.get_states(name, &ids, now()))
                .await
                .map_err(|err| self.work_stopped("job", err))?;
            for entry in &cached {
                let key = entry.state.key();
                let in_durable = held.iter().any(|state| state.key().id == key.id);
                if !in_durable && matches!(entry.state, Change::Put(_)) {
                    self.confirm_and_repair(collection, &key, repair, &mut report)
                        .await?;
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(report)
    }

    /// Both tiers' states of one record, read now.
    async fn pair(&self, key: &RecordKey) -> Result<Pair, Error> {
        let durable = self
            .shared
            .durable
            .call(|t| t.get_states(&key.collection, std::slice::from_ref(&key.id), now()))
            .await
            .map_err(|err| self.work_stopped("job", err))?
            .pop();
        let cache = self
            .shared
            .cache
            .call(|t| t.get(key))
            .await
            .map_err(|err| self.work_stopped("job", err))?;
        Ok(Pair { durable, cache })
    }

    /// Reads a record in both tiers again; if they still disagree, reports
    /// the difference and, with `repair`, makes them agree.
    async fn confirm_and_repair(
        &self,
        collection: &Collection,
        key: &RecordKey,
        repair: bool,
        report: &mut CollectionReport,
    ) -> Result<(), Error> {
        let reads_cache = self.shared.configured_plan(collection).reads_cache();
        let pair = self.pair(key).await?;
        let Some(class) = pair.classify(reads_cache) else {
            return Ok(());
        };
        let found = report.differences.entry(class).or_default();
        found.count += 1;
        if found.sample_ids.len() < SAMPLES {
            found.sample_ids.push(key.id.to_string());
        }
        if repair && self.repair(collection, key, class, &pair).await? {
            found.repaired += 1;
        }
        Ok(())
    }

    /// Makes the tiers agree on one record, the newer version winning; at
    /// the same version, the tier that holds the collection's truth wins.
    /// Returns whether the tiers now agree.
    async fn repair(
        &self,
        collection: &Collection,
        key: &RecordKey,
        class: DriftClass,
        pair: &Pair,
    ) -> Result<bool, Error> {
        let redis_is_truth = self.shared.strategy_of(collection) == Strategy::RedisOnly;
        let to_durable = |mode| async move {
            let change = pair
                .cache_change(key)
                .expect("a difference has a cache side");
            self.shared
                .durable
                .call(|t| t.apply_changes(std::slice::from_ref(&change), mode))
                .await
                .map(|applied| applied.first().copied().unwrap_or(false))
                .map_err(|err| self.work_stopped("job", err))
        };
        let to_cache = |force| async move {
            let Some(state) = &pair.durable else {
                return Ok(false);
            };
            let outcome = self
                .copy_to_cache(collection, state, force)
                .await
                .map_err(|err| self.work_stopped("job", err))?;
            Ok(outcome == Some(CopyOutcome::Written))
        };
        match class {
            DriftClass::MissingInPostgres | DriftClass::RedisAhead => {
                to_durable(ApplyMode::IfNewer).await
            }
            DriftClass::RedisStale => to_cache(false).await,
            DriftClass::ContentMismatch if redis_is_truth => to_durable(ApplyMode::Force).await,
            DriftClass::ContentMismatch => to_cache(true).await,
            // The truth of a redis_only collection is Redis: a record only
            // PostgreSQL holds may have been deleted there.
            DriftClass::MissingInRedis if redis_is_truth => Ok(false),
            DriftClass::MissingInRedis => to_cache(false).await,
        }
    }
}
