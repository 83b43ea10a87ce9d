//! The request path of records: writes, reads, lists, batch gets and
//! lookups, each following its collection's [`Plan`].
//!
//! Each public method resolves the collection, prepares what the tiers need
//! (schema check, index entries, expiry) and then follows the plan.
//! Durable-tier failures become API errors; cache-tier failures on the way
//! are logged and bypassed, because the durable tier holds the truth. A key
//! whose newest version may wait in a journal is settled first (see
//! `journal::settle`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use hybridstore_api::{ReadPath, WritePath};
use hybridstore_core::{
    CacheEntry, CacheStore, CollectionName, Error, JsonObject, ListPage, ListQuery, Precondition,
    Record, RecordId, RecordKey, RecordWrite, StoreError, Version, WriteOutcome, json_size,
    merge_patch,
};
use serde_json::Value;
use time::OffsetDateTime;

use crate::catalog::{Collection, index_value};
use crate::journal::Journal;
use crate::journal::settle::{Access, above};
use crate::shared::Shared;
use crate::stats::Operation;
use crate::strategy::{OnMiss, Plan};
use hybridstore_core::now;

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

/// How often a PATCH without `If-Match` re-reads and retries when a concurrent
/// writer got in between its read and its write.
const PATCH_ATTEMPTS: usize = 8;

/// The request path of records (see the module docs).
pub(crate) struct Records {
    shared: Arc<Shared>,
    journal: Arc<Journal>,
}

impl Records {
    pub fn new(shared: Arc<Shared>, journal: Arc<Journal>) -> Self {
        Self { shared, journal }
    }
}

impl Records {
    /// The current state of a record, from where the newest version lives:
    /// the cache when writes go through it (its copy may be newer than the
    /// durable tier's), the durable tier otherwise.
    async fn current(
        &self,
        collection: &Collection,
        key: &RecordKey,
        now: OffsetDateTime,
    ) -> Result<Option<Record>, Error> {
        let plan = self.shared.plan_for(collection)?;
        if plan.write.through_cache() {
            match self.shared.cache.call(|t| t.get(key)).await {
                Ok(CacheEntry::Present(record)) if !record.is_expired(now) => {
                    return Ok(Some(record));
                }
                Ok(CacheEntry::Present(_) | CacheEntry::Deleted(_)) => return Ok(None),
                Ok(CacheEntry::Miss) if plan.write == WritePath::CacheOnly => return Ok(None),
                Ok(CacheEntry::Miss) => {}
                Err(_) => return Err(self.shared.unavailable()),
            }
        } else {
            // Read to be written back guarded by its version: a conditional write.
            let access = Access::Write(Precondition::IfMatch(Version::new(0)));
            self.journal
                .settle(collection, std::slice::from_ref(key), access)
                .await?;
        }
        self.shared
            .durable
            .call(|t| t.get(key, now))
            .await
            .map_err(|err| self.shared.durable_failed(err))
    }

    /// Before a write commits: if the cache is being routed around, remember
    /// the key, so the cache's recovery removes the copy it may still hold.
    /// (Marked before the commit, so a recovery that completes meanwhile
    /// cannot miss it; the update after the commit covers the other order,
    /// and records durably what the memory of this process cannot keep.)
    fn before_commit(&self, collection: &Collection, plan: Plan, key: &RecordKey) {
        if self.shared.configured_plan(collection).uses_cache()
            && plan.write == WritePath::DurableOnly
        {
            self.shared.recovery.mark_dirty(key);
        }
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
        if !self.shared.configured_plan(collection).uses_cache() {
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
        if self.shared.recovery.wrote_around(key, version).await {
            // Remembered for this instance's recovery. But another instance
            // may have seen the cache back first and serve it already (this
            // one has not probed yet): the copy is brought up to date on the
            // tier itself, past the breaker, so that no instance serves an
            // older one once this write is acknowledged. A cache this
            // instance cannot reach, no other can serve from either (README,
            // "Several instances": a partition is the exception). The attempt
            // costs a refused connection, or a short wait on a hung cache (a
            // store that lands later still only moves forward). As a fill:
            // a recovery that removes older copies of this key runs wholly
            // before it (and then it is left out) or after it.
            let past_breaker = || async {
                let store = |tier| self.update_copy(tier, collection, key, update, now);
                Ok(self.shared.recovery.past_breaker(store).await.is_some())
            };
            let updated = match self.shared.recovery.fill(key, version, past_breaker).await {
                // A newer version was committed around the cache and its
                // older copies removed: nothing to update.
                None => return,
                Some(updated) => updated.unwrap_or(false),
            };
            tracing::trace!(id = %key.id, %version, updated, "committed around the cache");
            // Only a copy that could not be brought up to date may be stale:
            // that is recorded durably, for every instance and for this one
            // after a restart. A write whose update landed bumps nothing, so
            // instances recovering the cache at the same time do not send
            // each other through recovery after recovery.
            if !updated && let Err(err) = self.shared.write_around().await {
                tracing::warn!(error = %err, "could not record the write around the cache");
            }
            return;
        }
        if self.shared.recovery.overtaken(key, version) {
            tracing::trace!(id = %key.id, %version, "committed; the copy was overtaken");
            return;
        }
        let result = match self
            .shared
            .cache
            .call(|tier| self.update_copy(tier, collection, key, update, now))
            .await
        {
            // The update reached a busy cache and may land or not: sent
            // again (it only ever moves the copy forward) and waited for.
            Err(err) if err.is_busy() => {
                self.shared
                    .recovery
                    .patiently(|tier| self.update_copy(tier, collection, key, update, now))
                    .await
            }
            other => other,
        };
        tracing::trace!(id = %key.id, %version, stored = ?result, "cache copy updated after commit");
        if let Err(err) = result {
            if self.shared.cache.breaker.is_closed() {
                tracing::warn!(error = %err, collection = %key.collection, "cache update after commit failed; cache suspended until recovery");
            }
            self.shared.recovery.write_failed(key, version, &err);
            // The copy may be stale: recorded durably as well, in case this
            // process dies before the cache recovers.
            if let Err(err) = self.shared.write_around().await {
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
                tier.store_deleted(key, version, self.shared.settings.deleted_marker_ttl)
                    .await
            }
        }
    }

    /// Stores a copy in the cache (version-checked, so never over a newer one).
    async fn cache_record(&self, collection: &Collection, record: &Record, now: OffsetDateTime) {
        let Some(ttl) = record.cache_lifetime(collection.spec.cache_ttl, now) else {
            return;
        };
        let key = record.key();
        let fill = || self.shared.cache.call(|t| t.store(record, ttl));
        if let Some(Err(err)) = self.shared.recovery.fill(&key, record.version, fill).await {
            self.shared.cache_failed("store", &err);
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
        let plan = self.shared.plan_for(collection)?;
        if plan.write.through_cache() {
            return self.journal.put_journaled(collection, write).await;
        }
        let access = Access::Write(write.precondition);
        let settled = self
            .journal
            .settle(collection, std::slice::from_ref(&write.key), access)
            .await?;
        write.now = above(write.now, settled.floor);
        self.before_commit(collection, plan, &write.key);
        let outcome = self
            .shared
            .durable
            .call(|t| t.put(&write))
            .await
            .map_err(|err| self.shared.durable_failed(err))?;
        // The durable tier now holds a version above any journaled one.
        self.journal
            .unreplayed
            .replayed(&write.key, outcome.record.version);
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
        let collection = self.shared.catalog.get(&key.collection)?;
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
        let collection = self.shared.catalog.get(&key.collection)?;
        // A patch no tier could store is refused whatever the record holds:
        // the request is malformed, not the record's state (400 before 404
        // or 412).
        if let Some(problem) = hybridstore_core::unstorable(&patch) {
            return Err(Error::InvalidData(problem));
        }
        let patch = Value::Object(patch);
        for _ in 0..PATCH_ATTEMPTS {
            let now = now();
            let current = self.current(collection, &key, now).await?;
            let Some(current) = current else {
                return Err(Error::NotFound("record not found".into()));
            };
            if !precondition.admits(Some(current.version)) {
                // A version is named only to a client that named one.
                let named = matches!(precondition, Precondition::IfMatch(_));
                return Err(Error::VersionConflict {
                    current: named.then_some(current.version),
                });
            }
            let mut data = Value::Object(current.data);
            merge_patch(&mut data, &patch);
            let Value::Object(data) = data else {
                unreachable!("merging an object patch yields an object")
            };
            let size = serde_json::to_vec(&data).map_or(0, |bytes| bytes.len());
            if size > self.shared.settings.max_data_bytes {
                return Err(Error::PayloadTooLarge {
                    size,
                    limit: self.shared.settings.max_data_bytes,
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
        let collection = self.shared.catalog.get(&key.collection)?;
        let plan = self.shared.plan_for(collection)?;
        let now = now();
        // A cache that answered "miss" holds no pinned copy of the key; if
        // it was not asked, or failed, the durable tier may be behind.
        let mut cache_missed = false;
        if plan.reads_cache() {
            let entry = self.shared.cache.call(|t| t.get(key)).await;
            self.shared.stats.cache_lookup(
                matches!(&entry, Ok(CacheEntry::Present(r)) if !r.is_expired(now))
                    || matches!(entry, Ok(CacheEntry::Deleted(_))),
                1,
            );
            match entry {
                Ok(CacheEntry::Present(record)) if !record.is_expired(now) => {
                    tracing::trace!(id = %key.id, version = %record.version, "read from the cache");
                    return Ok(Some(record));
                }
                Ok(CacheEntry::Deleted(_)) => return Ok(None),
                Ok(_) => cache_missed = true,
                Err(err) => self.shared.cache_read_failed(plan, "get", &err)?,
            }
            match plan.on_miss() {
                OnMiss::NotFound => return Ok(None),
                OnMiss::Unavailable => return Err(self.shared.unavailable()),
                OnMiss::Durable { .. } => {}
            }
        }
        if !cache_missed {
            self.journal
                .settle(collection, std::slice::from_ref(key), Access::Read)
                .await?;
        }
        let record = self
            .shared
            .durable
            .call(|t| t.get(key, now))
            .await
            .map_err(|err| self.shared.durable_failed(err))?;
        tracing::trace!(id = %key.id, version = ?record.as_ref().map(|r| r.version), "read from the durable tier");
        if let (Some(record), OnMiss::Durable { fill: true }) = (&record, plan.on_miss()) {
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
        let collection = self.shared.catalog.get(&key.collection)?;
        let plan = self.shared.plan_for(collection)?;
        let now = now();
        if plan.write.through_cache() {
            return self
                .journal
                .delete_journaled(collection, key, precondition, now)
                .await;
        }
        let access = Access::Write(precondition);
        let settled = self
            .journal
            .settle(collection, std::slice::from_ref(key), access)
            .await?;
        let now = above(now, settled.floor);
        self.before_commit(collection, plan, key);
        let version = self
            .shared
            .durable
            .call(|t| t.delete(key, precondition, now))
            .await
            .map_err(|err| self.shared.durable_failed(err))?;
        self.journal.unreplayed.replayed(key, version);
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
        let spec = self.shared.catalog.get(collection)?;
        let plan = self.shared.plan_for(spec)?;
        let query = ListQuery {
            collection: collection.clone(),
            after,
            prefix,
            limit,
            max_bytes: self.shared.settings.page_bytes,
            now: now(),
        };
        let settled = plan.read == ReadPath::CacheAuthoritative
            || self.journal.settle_range(spec, &query).await?;
        let ListPage { records, more } = if plan.read == ReadPath::CacheAuthoritative {
            self.shared
                .cache
                .call(|t| t.list(&query))
                .await
                .map_err(|err| self.shared.journal_failed(err))?
        } else {
            self.shared
                .durable
                .call(|t| t.list(&query))
                .await
                .map_err(|err| self.shared.durable_failed(err))?
        };
        if !settled
            && plan.read == ReadPath::DurableOnly
            && self.shared.configured_plan(spec).uses_cache()
        {
            // Ids in this page's range whose newest version waits in the
            // unreachable journal: the page would show an older state.
            let until = if more {
                records.last().map(|r| &r.id)
            } else {
                None
            };
            let wrote_behind = self.journal.wrote_behind(spec);
            if self.journal.unreplayed.any_held_in(
                collection,
                wrote_behind,
                query.after.as_ref(),
                until,
            ) {
                return Err(self.shared.unavailable());
            }
            // Or one another instance journaled and published.
            self.journal.await_publishers(spec).await;
            if self
                .shared
                .durable
                .call(|t| t.any_held_above(collection, query.after.as_ref(), until))
                .await
                .map_err(|err| self.shared.durable_failed(err))?
            {
                return Err(self.shared.unavailable());
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
        let collection = self.shared.catalog.get(collection_name)?;
        let plan = self.shared.plan_for(collection)?;
        let now = now();
        let mut seen = HashSet::new();
        let ids: Vec<RecordId> = ids
            .into_iter()
            .filter(|id| seen.insert(id.clone()))
            .collect();

        // Per id: Some(found) / None (known missing), or still unknown.
        let mut answers: Vec<Option<Option<Record>>> = vec![None; ids.len()];
        let mut cache_answered = false;
        if plan.reads_cache() {
            let keys: Vec<RecordKey> = ids
                .iter()
                .map(|id| RecordKey::new(collection_name.clone(), id.clone()))
                .collect();
            match self.shared.cache.call(|t| t.get_many(&keys)).await {
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
                Err(err) => self.shared.cache_read_failed(plan, "get_many", &err)?,
            }
        }

        let unknown: Vec<RecordId> = ids
            .iter()
            .zip(&answers)
            .filter(|(_, answer)| answer.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        if plan.reads_cache() {
            let misses = unknown.len() as u64;
            self.shared
                .stats
                .cache_lookup(true, ids.len() as u64 - misses);
            self.shared.stats.cache_lookup(false, misses);
        }
        let fill = match plan.on_miss() {
            _ if unknown.is_empty() => false,
            OnMiss::NotFound => false,
            OnMiss::Unavailable => return Err(self.shared.unavailable()),
            OnMiss::Durable { fill } => fill,
        };
        if !unknown.is_empty() && !cache_answered {
            let keys: Vec<RecordKey> = unknown
                .iter()
                .map(|id| RecordKey::new(collection_name.clone(), id.clone()))
                .collect();
            self.journal.settle(collection, &keys, Access::Read).await?;
        }
        if !unknown.is_empty() && plan.on_miss() != OnMiss::NotFound {
            let mut fetched = self
                .shared
                .durable
                .call(|t| t.get_many(collection_name, &unknown, now))
                .await
                .map_err(|err| self.shared.durable_failed(err))?;
            if fill {
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
        let collection = self.shared.catalog.get(collection_name)?;
        let index = collection.index(index)?;
        let plan = self.shared.plan_for(collection)?;
        let now = now();
        if plan.reads_cache() {
            match self.lookup_cached(collection_name, index, value, now).await {
                Ok(Some(record)) => {
                    self.shared.stats.cache_lookup(true, 1);
                    return Ok(Some(record));
                }
                Ok(None) => {}
                Err(err) => self.shared.cache_read_failed(plan, "lookup", &err)?,
            }
            self.shared.stats.cache_lookup(false, 1);
        }
        let cached = match plan.on_miss() {
            OnMiss::NotFound => return Ok(None),
            OnMiss::Unavailable => return Err(self.shared.unavailable()),
            OnMiss::Durable { fill } => fill,
        };
        let mut record = self
            .shared
            .durable
            .call(|t| t.lookup(collection_name, index, value, now))
            .await
            .map_err(|err| self.shared.durable_failed(err))?;
        // The hint said nothing of the record the durable tier found: a
        // newer version of it may wait in a journal (settling costs nothing
        // when no journal may hold one).
        if let Some(found) = &record {
            let key = found.key();
            let settled = self
                .journal
                .settle(collection, std::slice::from_ref(&key), Access::Read)
                .await?;
            if settled.applied {
                // A newer version (or a deletion) of the record was applied.
                record = self
                    .shared
                    .durable
                    .call(|t| t.get(&key, now))
                    .await
                    .map_err(|err| self.shared.durable_failed(err))?
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
                match self.shared.cache.call(|t| t.get(&key)).await {
                    Ok(CacheEntry::Present(newer)) if newer.version >= found.version => {
                        (!newer.is_expired(now)).then_some(newer)
                    }
                    Ok(CacheEntry::Deleted(version)) if version > found.version => None,
                    Ok(_) => Some(found),
                    Err(err) => {
                        self.shared.cache_read_failed(plan, "get", &err)?;
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
                    .shared
                    .cache
                    .call(|t| t.store_lookup_hint(collection_name, index, value, &record.id, ttl))
                    .await;
                if let Err(err) = hint {
                    self.shared.cache_failed("store_lookup_hint", &err);
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
            .shared
            .cache
            .call(|t| t.lookup_hint(collection, index, value))
            .await?
        else {
            return Ok(None);
        };
        let key = RecordKey::new(collection.clone(), id);
        Ok(match self.shared.cache.call(|t| t.get(&key)).await? {
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
        if !self.shared.settings.tiers.durable_serves() {
            return Ok(0); // Redis lets expired records go itself.
        }
        self.shared
            .durable
            .call(|t| t.purge_expired(now(), self.shared.settings.tombstone_retention))
            .await
            .map_err(|err| self.shared.durable_failed(err))
    }

    /// The plan a collection follows now (configured, narrowed by health).
    pub fn plan(&self, collection: &CollectionName) -> Result<Plan, Error> {
        self.shared.plan_for(self.shared.catalog.get(collection)?)
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
        self.shared.observed(Operation::Put, work).await
    }

    /// Applies a JSON Merge Patch to an existing record.
    pub async fn patch(
        &self,
        key: RecordKey,
        patch: JsonObject,
        precondition: Precondition,
    ) -> Result<WriteOutcome, Error> {
        let work = self.patch_record(key, patch, precondition);
        self.shared.observed(Operation::Patch, work).await
    }

    /// Reads one record.
    pub async fn get(&self, key: &RecordKey) -> Result<Option<Record>, Error> {
        self.shared
            .observed(Operation::Get, self.read_record(key))
            .await
    }

    /// Deletes a record; returns the version of the deletion.
    pub async fn delete(
        &self,
        key: &RecordKey,
        precondition: Precondition,
    ) -> Result<Version, Error> {
        let work = self.delete_record(key, precondition);
        self.shared.observed(Operation::Delete, work).await
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
        self.shared.observed(Operation::List, work).await
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
                        || (!answer.records.is_empty()
                            && bytes + size > self.shared.settings.page_bytes);
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
        self.shared.observed(Operation::BatchGet, work).await
    }

    /// The record whose unique index `index` holds `value`.
    pub async fn lookup(
        &self,
        collection: &CollectionName,
        index: &str,
        value: &str,
    ) -> Result<Option<Record>, Error> {
        let work = self.lookup_unique(collection, index, value);
        self.shared.observed(Operation::Lookup, work).await
    }
}
