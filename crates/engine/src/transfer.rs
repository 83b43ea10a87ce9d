//! Export and import: every record and counter, in the lines of
//! `hybridstore-transfer`.
//!
//! Export walks the tier that holds the truth collection by collection in
//! id pages (the durable tier; the cache for a `redis_only` collection),
//! then the counters (the cache's buckets in a cache-only deployment, where
//! a bucket may come twice: the import keeps the first), in bounded memory;
//! it is not one snapshot, so a write during the export may or may not be
//! in it (each record is whole).
//! Import applies records with the same version rule as journal replay and
//! sync (an older version never replaces a newer one unless forced), so it
//! is idempotent; it rebuilds unique index entries, drops cache copies that
//! could now be stale, and sets counter values only where the target holds
//! none (unless forced): importing twice changes nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::Stream;
use hybridstore_api::ImportReport;
use hybridstore_core::{
    ApplyMode, Bucket, Change, CollectionName, CopyOutcome, CounterScope, CounterValue, Error,
    ListQuery, RecordId, RecordKey, StoreError, Strategy,
};
use hybridstore_transfer::{Counts, Deletion, Header, Line, Source};
use time::OffsetDateTime;

use crate::maintenance::Maintenance;
use crate::shared::Shared;

/// Records or counter values read per durable call.
const PAGE: usize = 1000;

/// Where an export stands.
enum Stage {
    Header,
    Records {
        collection: usize,
        after: Option<RecordId>,
    },
    Counters {
        after: Option<CounterValue>,
    },
    /// The counters of a cache-only deployment, walked in the cache.
    CacheCounters {
        cursor: u64,
    },
    End,
    Done,
}

fn count(map: &mut BTreeMap<String, u64>, collection: &CollectionName) {
    *map.entry(collection.to_string()).or_default() += 1;
}

/// Export and import (see the module docs).
pub(crate) struct Transfer {
    shared: Arc<Shared>,
    maintenance: Arc<Maintenance>,
}

impl Transfer {
    pub fn new(shared: Arc<Shared>, maintenance: Arc<Maintenance>) -> Self {
        Self {
            shared,
            maintenance,
        }
    }
}

impl Transfer {
    /// Every record, deletion marker and counter value the durable tier
    /// holds, as export lines in pages: a header first and an end line
    /// with the counts last.
    pub fn export(self: Arc<Self>) -> impl Stream<Item = Result<Vec<Line>, Error>> + Send {
        let collections: Vec<CollectionName> = self
            .shared
            .catalog
            .iter()
            .map(|collection| collection.spec.name.clone())
            .collect();
        let state = (self, Stage::Header, Counts::default());
        futures_util::stream::try_unfold(state, move |(transfer, stage, mut counts)| {
            let collections = collections.clone();
            async move {
                let now = OffsetDateTime::now_utc();
                let (lines, next) = match stage {
                    Stage::Done => return Ok(None),
                    Stage::Header => {
                        let backend = if transfer.shared.settings.tiers.durable_serves() {
                            transfer.shared.durable.backend()
                        } else {
                            transfer.shared.cache.backend()
                        };
                        let source = Source {
                            backend: backend.to_owned(),
                            instance: transfer.shared.instance_id.clone(),
                            service_version: env!("CARGO_PKG_VERSION").to_owned(),
                        };
                        let next = Stage::Records {
                            collection: 0,
                            after: None,
                        };
                        (vec![Line::Header(Header::new(source))], next)
                    }
                    Stage::Records { collection, after } => {
                        let Some(name) = collections.get(collection) else {
                            let counters = if transfer.shared.settings.tiers.durable_serves() {
                                Stage::Counters { after: None }
                            } else {
                                Stage::CacheCounters { cursor: 0 }
                            };
                            return Ok(Some((Vec::new(), (transfer, counters, counts))));
                        };
                        let (page, more) = transfer.records_page(name, after, now).await?;
                        let next = match page.last() {
                            Some(last) if more => Stage::Records {
                                collection,
                                after: Some(last.key().id),
                            },
                            _ => Stage::Records {
                                collection: collection + 1,
                                after: None,
                            },
                        };
                        let lines = page.into_iter().map(line_of).collect();
                        (lines, next)
                    }
                    Stage::Counters { after } => {
                        let page = transfer
                            .shared
                            .durable
                            .call(|t| t.scan_counters(after.as_ref(), PAGE, now))
                            .await
                            .map_err(|err| transfer.maintenance.work_stopped("export", err))?;
                        let next = match page.last() {
                            Some(last) if page.len() == PAGE => Stage::Counters {
                                after: Some(last.clone()),
                            },
                            _ => Stage::End,
                        };
                        (page.into_iter().map(Line::Counter).collect(), next)
                    }
                    Stage::CacheCounters { cursor } => {
                        let (next, lines) = transfer.cached_counters(cursor, now).await?;
                        let next = match next {
                            0 => Stage::End,
                            cursor => Stage::CacheCounters { cursor },
                        };
                        (lines, next)
                    }
                    Stage::End => (vec![Line::End(counts.clone())], Stage::Done),
                };
                for line in &lines {
                    counts.add(line);
                }
                Ok(Some((lines, (transfer, next, counts))))
            }
        })
    }

    /// One page of a collection's records from the tier that holds them:
    /// the durable tier's states (deletion markers too), or, for a
    /// collection the cache holds as the truth (`redis_only`), its live
    /// records; and whether more follow.
    async fn records_page(
        &self,
        name: &CollectionName,
        after: Option<RecordId>,
        now: OffsetDateTime,
    ) -> Result<(Vec<Change>, bool), Error> {
        let collection = self.shared.catalog.get(name)?;
        let stopped = |err| self.maintenance.work_stopped("export", err);
        if self.shared.strategy_of(collection) == Strategy::RedisOnly {
            let query = ListQuery {
                collection: name.clone(),
                after,
                prefix: None,
                limit: PAGE as u32,
                max_bytes: self.shared.settings.page_bytes,
                now,
            };
            let page = self
                .shared
                .cache
                .call(|t| t.list(&query))
                .await
                .map_err(stopped)?;
            return Ok((
                page.records.into_iter().map(Change::Put).collect(),
                page.more,
            ));
        }
        let page = self
            .shared
            .durable
            .call(|t| t.scan(name, after.as_ref(), PAGE, now))
            .await
            .map_err(stopped)?;
        let more = page.len() == PAGE;
        Ok((page, more))
    }

    /// One step of the walk over the counter buckets a cache-only
    /// deployment holds: the next cursor (0: done) and the values as lines,
    /// each bucket with the end of its retention.
    async fn cached_counters(
        &self,
        cursor: u64,
        now: OffsetDateTime,
    ) -> Result<(u64, Vec<Line>), Error> {
        let (next, buckets) = self
            .shared
            .cache
            .call(|t| t.scan_buckets(cursor, PAGE))
            .await
            .map_err(|err| self.maintenance.work_stopped("export", err))?;
        let settings = &self.shared.settings.counters;
        let mut lines = Vec::new();
        for (scope, held) in buckets {
            let bucket = settings.bucket(held.bucket.granularity, held.bucket.start);
            if bucket.expires_at.is_some_and(|end| end <= now) {
                continue;
            }
            for (field, value) in held.values {
                lines.push(Line::Counter(CounterValue {
                    scope: scope.clone(),
                    granularity: bucket.granularity,
                    bucket_start: bucket.start,
                    field,
                    value,
                    expires_at: bucket.expires_at,
                }));
            }
        }
        Ok((next, lines))
    }

    /// Why `line` cannot be imported here, if it cannot.
    pub fn check_import_line(&self, line: &Line) -> Result<(), String> {
        let collection = match line {
            Line::Record(record) => {
                // What the API refuses, an import refuses too: the same set
                // every tier can store and export again.
                if let Some(problem) = hybridstore_core::unstorable(&record.data) {
                    return Err(format!("record {}: {problem}", record.id));
                }
                &record.collection
            }
            Line::Deletion(deletion) => &deletion.collection,
            Line::Counter(_) => return Ok(()),
            Line::Header(_) | Line::End(_) => return Ok(()),
        };
        self.shared
            .catalog
            .get(collection)
            .map(drop)
            .map_err(|_| format!("collection {collection} is not declared here"))
    }

    /// Applies a batch of checked export lines (see the module comment).
    pub async fn import_batch(
        &self,
        lines: Vec<Line>,
        force: bool,
        report: &mut ImportReport,
    ) -> Result<(), Error> {
        let mut changes: BTreeMap<CollectionName, Vec<Change>> = BTreeMap::new();
        let mut counters = Vec::new();
        for line in lines {
            match line {
                Line::Record(record) => changes
                    .entry(record.collection.clone())
                    .or_default()
                    .push(Change::Put(record)),
                Line::Deletion(Deletion {
                    collection,
                    id,
                    version,
                    at,
                }) => changes
                    .entry(collection.clone())
                    .or_default()
                    .push(Change::Delete {
                        key: RecordKey::new(collection, id),
                        version,
                        at,
                    }),
                Line::Counter(value) => counters.push(value),
                Line::Header(_) | Line::End(_) => {}
            }
        }
        for (name, changes) in changes {
            self.import_changes(&name, changes, force, report).await?;
        }
        if !counters.is_empty() {
            self.import_counters(counters, force, report).await?;
        }
        Ok(())
    }

    async fn import_changes(
        &self,
        name: &CollectionName,
        changes: Vec<Change>,
        force: bool,
        report: &mut ImportReport,
    ) -> Result<(), Error> {
        let collection = self.shared.catalog.get(name)?;
        if self.shared.strategy_of(collection) == Strategy::RedisOnly {
            // The cache is this collection's truth.
            for change in &changes {
                let outcome = self
                    .maintenance
                    .copy_to_cache(collection, change, force)
                    .await
                    .map_err(|err| self.maintenance.work_stopped("import", err))?;
                let written = outcome == Some(CopyOutcome::Written);
                // Where the cache is the only tier, it holds the unique
                // index values too, as the durable tier's entries would.
                if let (true, false, Change::Put(record)) =
                    (written, self.shared.settings.tiers.durable_serves(), change)
                    && let Some(entries) = collection.index_entries(&record.data)?
                {
                    let (key, now) = (record.key(), OffsetDateTime::now_utc());
                    self.shared
                        .cache
                        .call(|t| t.claim(&key, &entries, now))
                        .await
                        .map_err(|err| self.import_failed(err))?;
                }
                count(
                    if written {
                        &mut report.applied
                    } else {
                        &mut report.skipped
                    },
                    name,
                );
            }
            return Ok(());
        }
        let mode = if force {
            ApplyMode::Force
        } else {
            ApplyMode::IfNewer
        };
        let keys: Vec<RecordKey> = changes.iter().map(Change::key).collect();
        if !self.shared.cache.breaker.is_closed() {
            // A copy the cache keeps through its outage goes when it returns.
            for key in &keys {
                self.shared.recovery.mark_dirty(key);
            }
        }
        let applied = self
            .shared
            .durable
            .call(|t| t.apply_changes(&changes, mode))
            .await
            .map_err(|err| self.maintenance.work_stopped("import", err))?;
        let now = OffsetDateTime::now_utc();
        let mut written = Vec::new();
        for (change, applied) in changes.iter().zip(applied) {
            if !applied {
                count(&mut report.skipped, name);
                continue;
            }
            count(&mut report.applied, name);
            written.push(change.key());
            if let Change::Put(record) = change
                && let Some(entries) = collection.index_entries(&record.data)?
            {
                let key = record.key();
                self.shared
                    .durable
                    .call(|t| t.set_index_entries(&key, &entries, now))
                    .await
                    .map_err(|err| self.import_failed(err))?;
            }
        }
        if self.shared.configured_plan(collection).uses_cache()
            && !written.is_empty()
            && let Err(err) = self.shared.cache.call(|t| t.invalidate(&written)).await
        {
            tracing::warn!(error = %err, "imported records: cache copies left to the recovery");
        }
        Ok(())
    }

    /// What an import answers when a tier refused it: a value a unique
    /// index holds already is the import's conflict, anything else stops it.
    fn import_failed(&self, err: StoreError) -> Error {
        match err {
            StoreError::UniqueViolation { index, value } => Error::UniqueViolation { index, value },
            other => self.maintenance.work_stopped("import", other),
        }
    }

    async fn import_counters(
        &self,
        values: Vec<CounterValue>,
        force: bool,
        report: &mut ImportReport,
    ) -> Result<(), Error> {
        if !self.shared.settings.tiers.durable_serves() {
            // The cache holds the counters' truth: set there, as the
            // durable tier would.
            let written = self
                .shared
                .cache
                .call(|t| t.restore_buckets(&values, force))
                .await
                .map_err(|err| self.maintenance.work_stopped("import", err))?;
            for written in written {
                if written {
                    report.counters_applied += 1;
                } else {
                    report.counters_skipped += 1;
                }
            }
            return Ok(());
        }
        let written = self
            .shared
            .durable
            .call(|t| t.restore_counters(&values, force))
            .await
            .map_err(|err| self.maintenance.work_stopped("import", err))?;
        let mut scopes: BTreeMap<CounterScope, Vec<Bucket>> = BTreeMap::new();
        for (value, written) in values.iter().zip(written) {
            if written {
                report.counters_applied += 1;
                scopes.entry(value.scope.clone()).or_default().push(Bucket {
                    granularity: value.granularity,
                    start: value.bucket_start,
                    expires_at: value.expires_at,
                });
            } else {
                report.counters_skipped += 1;
            }
        }
        // Cached buckets were seeded from the old values: seed them again.
        for (scope, buckets) in scopes {
            if self
                .shared
                .cache
                .call(|t| t.forget_buckets(&scope, &buckets))
                .await
                .is_err()
            {
                self.shared
                    .recovery
                    .counters_dirty
                    .store(true, Ordering::Release);
            }
        }
        Ok(())
    }
}

fn line_of(state: Change) -> Line {
    match state {
        Change::Put(record) => Line::Record(record),
        Change::Delete { key, version, at } => Line::Deletion(Deletion {
            collection: key.collection,
            id: key.id,
            version,
            at,
        }),
    }
}
