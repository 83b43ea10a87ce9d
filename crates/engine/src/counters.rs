//! Usage counters through the tiers.
//!
//! With `cache_first` (the default for counters) an increment is one cache
//! round trip: a script adds the deltas to every bucket of the scope and
//! journals the increment atomically. The replay loop applies journaled
//! increments to the durable tier in batches, many increments of one bucket
//! and field becoming one upsert, and the durable tier applies each increment
//! id once, so a replay repeated after a crash changes nothing. While the
//! cache is down, increments go to the durable tier directly (same id, so an
//! increment whose cache call timed out but ran is still counted once).
//! Increments commute, so no ordering between the two paths matters.
//!
//! The cache holds a bucket's full values only once it has been seeded: a
//! bucket it does not hold is read from the durable tier together with the
//! journaled increments the durable tier has not applied yet (one snapshot
//! tells which), so the seeded values are exact. Seeded while the durable
//! tier is down, a bucket is marked incomplete: answers say so, and the
//! bucket is seeded again once the durable tier is back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hybridstore_core::{
    Amount, Bucket, BucketValues, CacheIncrementOutcome, CounterIncrement, CounterScope, Error,
    FieldName, Granularity, StoreError, Strategy,
};
use time::OffsetDateTime;

use crate::journal::backlog::Backlog;
use crate::shared::Shared;
use crate::stats::Operation;
use hybridstore_core::now;

/// Most journaled increments read to seed or answer exactly; with more
/// waiting, values are marked incomplete until the replay has caught up.
const MAX_PENDING_READ: usize = 5_000;

/// How often an increment seeds cold buckets and tries again before it goes
/// to the durable tier instead.
const SEED_ATTEMPTS: usize = 3;

/// Values of several buckets, and whether they are known to be complete.
#[derive(Clone, Debug)]
pub struct CounterValues {
    pub scope: CounterScope,
    pub buckets: Vec<BucketValues>,
    /// False when part of the truth could not be read (a tier was down).
    pub complete: bool,
}

/// Per-engine counter state.
#[derive(Default)]
pub(crate) struct CounterState {
    next_op: AtomicU64,
    /// Whether journaled increments may wait to be replayed.
    pub(crate) backlog: Backlog,
}

/// Adds `pending` increments' deltas to `values` for these buckets.
fn add_pending(values: &mut Vec<BucketValues>, buckets: &[Bucket], pending: &[CounterIncrement]) {
    for increment in pending {
        for bucket in increment.buckets.iter().filter(|b| {
            buckets
                .iter()
                .any(|c| c.granularity == b.granularity && c.start == b.start)
        }) {
            let position = values.iter().position(|v| {
                v.bucket.granularity == bucket.granularity && v.bucket.start == bucket.start
            });
            let held = match position {
                Some(at) => &mut values[at],
                None => {
                    values.push(BucketValues {
                        bucket: bucket.clone(),
                        values: Vec::new(),
                    });
                    values.last_mut().expect("just pushed")
                }
            };
            for (field, delta) in &increment.deltas {
                match held.values.iter_mut().find(|(f, _)| f == field) {
                    Some((_, value)) => *value = value.checked_add(*delta).unwrap_or(*value),
                    None => held.values.push((field.clone(), *delta)),
                }
            }
        }
    }
}

/// Counters through the tiers (see the module docs).
pub(crate) struct Counters {
    shared: Arc<Shared>,
    state: CounterState,
}

impl Counters {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            state: CounterState::default(),
        }
    }
}

impl Counters {
    fn counters_journaled(&self) -> bool {
        self.shared.settings.counters.strategy == Strategy::CacheFirst
            && self.shared.settings.tiers.journals()
    }

    /// Adds `deltas` to every bucket `at` (default: now) falls into.
    #[tracing::instrument(level = "debug", skip(self, deltas), fields(%scope, fields = deltas.len()))]
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
        let work = self.increment(scope, deltas, at, op_id);
        self.shared.observed(Operation::Increment, work).await
    }

    async fn increment(
        &self,
        scope: CounterScope,
        deltas: Vec<(FieldName, Amount)>,
        at: Option<OffsetDateTime>,
        op_id: Option<String>,
    ) -> Result<CounterValues, Error> {
        let settings = &self.shared.settings.counters;
        if deltas.is_empty() {
            return Err(Error::InvalidRequest(
                "deltas must name at least one field".into(),
            ));
        }
        if deltas.len() > settings.max_fields {
            return Err(Error::InvalidRequest(format!(
                "at most {} fields per increment",
                settings.max_fields
            )));
        }
        let mut names: Vec<&FieldName> = deltas.iter().map(|(f, _)| f).collect();
        names.sort();
        names.dedup();
        if names.len() != deltas.len() {
            return Err(Error::InvalidRequest("a field appears twice".into()));
        }
        let now = now();
        let at = at.unwrap_or(now);
        if at > now + settings.max_future {
            return Err(Error::InvalidRequest(format!(
                "at is more than {} s in the future",
                settings.max_future.as_secs()
            )));
        }
        let buckets: Vec<Bucket> = Granularity::ALL
            .into_iter()
            .map(|g| settings.bucket(g, at))
            .filter(|b| b.expires_at.is_none_or(|expiry| expiry > now))
            .collect();
        let op_id = op_id.unwrap_or_else(|| {
            format!(
                "{}-{}",
                self.shared.instance_id,
                self.state.next_op.fetch_add(1, Ordering::Relaxed)
            )
        });
        let increment = CounterIncrement {
            op_id,
            scope,
            deltas,
            at,
            buckets,
        };
        if !self.shared.settings.tiers.durable_serves() {
            // The cache holds the counters' truth: its answer is the answer.
            return match self.increment_in_cache(&increment).await {
                Ok(values) => Ok(values),
                Err(StoreError::CounterOutOfRange { field }) => {
                    Err(crate::shared::out_of_range(&field))
                }
                Err(err) => Err(self.shared.journal_failed(err)),
            };
        }
        if self.counters_journaled() && self.shared.cache.breaker.is_closed() {
            match self.increment_in_cache(&increment).await {
                Ok(values) => return Ok(values),
                Err(StoreError::CounterOutOfRange { field }) => {
                    return Err(crate::shared::out_of_range(&field));
                }
                // A timeout may still have run the script: the same id makes
                // the durable tier count it once whichever way it arrives.
                Err(err) => {
                    tracing::debug!(error = %err, "cache increment failed; going to the durable tier");
                    if !self.shared.durable.breaker.is_closed() {
                        return Err(self.shared.journal_failed(err));
                    }
                }
            }
        }
        self.increment_in_durable(&increment).await
    }

    async fn increment_in_cache(
        &self,
        increment: &CounterIncrement,
    ) -> Result<CounterValues, StoreError> {
        for _ in 0..SEED_ATTEMPTS {
            match self.shared.cache.call(|t| t.increment(increment)).await? {
                CacheIncrementOutcome::Applied(applied) => {
                    self.state.backlog.mark();
                    let complete = applied.iter().all(|(_, complete)| *complete);
                    if !complete
                        && self.shared.settings.tiers.durable_serves()
                        && self.shared.durable.breaker.is_closed()
                        && !self.state.backlog.pending()
                    {
                        // Seeded without the durable tier's values (it was
                        // down, or the journal was long): now that the
                        // journal has drained, seed again.
                        let stale: Vec<Bucket> = applied
                            .iter()
                            .filter(|(_, complete)| !complete)
                            .map(|(values, _)| values.bucket.clone())
                            .collect();
                        self.shared
                            .cache
                            .call(|t| t.forget_buckets(&increment.scope, &stale))
                            .await?;
                    }
                    return Ok(CounterValues {
                        scope: increment.scope.clone(),
                        buckets: applied.into_iter().map(|(values, _)| values).collect(),
                        complete,
                    });
                }
                CacheIncrementOutcome::Cold(cold) => self.seed(&increment.scope, &cold).await?,
                // Applied before (a retry with the same key): today's values.
                CacheIncrementOutcome::Duplicate => {
                    let held = self
                        .shared
                        .cache
                        .call(|t| t.counter_buckets(&increment.scope, &increment.buckets))
                        .await?;
                    let complete = held.iter().all(|h| h.as_ref().is_some_and(|(_, ok)| *ok));
                    let fields: Vec<&FieldName> = increment.deltas.iter().map(|(f, _)| f).collect();
                    let buckets = held
                        .into_iter()
                        .flatten()
                        .map(|(mut values, _)| {
                            values.values.retain(|(f, _)| fields.contains(&f));
                            values
                        })
                        .collect();
                    return Ok(CounterValues {
                        scope: increment.scope.clone(),
                        buckets,
                        complete,
                    });
                }
            }
        }
        // Buckets dropped again between seeding and incrementing (the cache
        // is recovering): the durable tier takes it instead.
        Err(StoreError::internal(
            hybridstore_core::Tier::Cache,
            "counter buckets dropped while being seeded",
        ))
    }

    /// Installs exact values for buckets the cache does not hold: the
    /// durable tier's, plus journaled increments it has not applied yet.
    /// The ticket, taken first, keeps values read before a bucket of the
    /// scope was dropped from being installed after it (they could miss
    /// what the dropped bucket took); the increment then seeds again.
    async fn seed(&self, scope: &CounterScope, buckets: &[Bucket]) -> Result<(), StoreError> {
        let ticket = self.shared.cache.call(|t| t.seed_ticket(scope)).await?;
        if !self.shared.settings.tiers.durable_serves() {
            // Nothing anywhere else: a bucket the cache does not hold is zero.
            return self
                .shared
                .cache
                .call(|t| t.seed_buckets(scope, buckets, &[], true, ticket))
                .await;
        }
        let pending = if self.shared.durable.breaker.is_closed() {
            self.shared
                .cache
                .call(|t| t.pending_increments(scope, MAX_PENDING_READ))
                .await?
        } else {
            None
        };
        let Some(pending) = pending else {
            // Keep accepting increments; the values count from here on and
            // are seeded again once the durable tier is back and caught up.
            return self
                .shared
                .cache
                .call(|t| t.seed_buckets(scope, buckets, &[], false, ticket))
                .await;
        };
        let op_ids: Vec<String> = pending.iter().map(|i| i.op_id.clone()).collect();
        match self
            .shared
            .durable
            .call(|t| t.counter_snapshot(scope, buckets, &op_ids))
            .await
        {
            Ok((mut values, applied)) => {
                let unapplied: Vec<CounterIncrement> = pending
                    .into_iter()
                    .filter(|i| !applied.contains(&i.op_id))
                    .collect();
                add_pending(&mut values, buckets, &unapplied);
                self.shared
                    .cache
                    .call(|t| t.seed_buckets(scope, buckets, &values, true, ticket))
                    .await
            }
            Err(err) if err.is_unavailable() => {
                self.shared
                    .cache
                    .call(|t| t.seed_buckets(scope, buckets, &[], false, ticket))
                    .await
            }
            Err(err) => Err(err),
        }
    }

    async fn increment_in_durable(
        &self,
        increment: &CounterIncrement,
    ) -> Result<CounterValues, Error> {
        if self.counters_journaled() {
            // The cache's bucket values miss this increment from now on.
            self.shared
                .recovery
                .counters_dirty
                .store(true, std::sync::atomic::Ordering::Release);
            self.shared.write_around().await?;
        }
        self.shared
            .durable
            .call(|t| t.apply_increments(std::slice::from_ref(increment)))
            .await
            .map_err(|err| self.shared.durable_failed(err))?;
        if self.counters_journaled() {
            // The cache may have come back meanwhile and seeded these buckets
            // without this increment: drop them now if it is up (they are
            // seeded again), and have its next probe drop every bucket in
            // case a recovery raced with this write.
            self.shared
                .recovery
                .counters_dirty
                .store(true, std::sync::atomic::Ordering::Release);
            if self.shared.cache.breaker.is_closed() {
                let _ = self
                    .shared
                    .cache
                    .call(|t| t.forget_buckets(&increment.scope, &increment.buckets))
                    .await;
            }
        }
        let (values, _) = self
            .shared
            .durable
            .call(|t| t.counter_snapshot(&increment.scope, &increment.buckets, &[]))
            .await
            .map_err(|err| self.shared.durable_failed(err))?;
        let fields: Vec<&FieldName> = increment.deltas.iter().map(|(f, _)| f).collect();
        let buckets = values
            .into_iter()
            .map(|mut bucket| {
                bucket.values.retain(|(f, _)| fields.contains(&f));
                bucket
            })
            .collect();
        Ok(CounterValues {
            scope: increment.scope.clone(),
            buckets,
            // Increments journaled before the cache went down are not in
            // the durable tier yet.
            complete: !self.counters_journaled() || !self.state.backlog.pending(),
        })
    }

    /// The buckets of one granularity from `from` to `to` (default: every
    /// retained bucket up to now), oldest first; buckets without values are
    /// left out.
    #[tracing::instrument(level = "debug", skip(self), fields(%scope))]
    pub async fn read_counters(
        &self,
        scope: CounterScope,
        granularity: Granularity,
        from: Option<OffsetDateTime>,
        to: Option<OffsetDateTime>,
    ) -> Result<CounterValues, Error> {
        let work = self.read(scope, granularity, from, to);
        self.shared.observed(Operation::CounterRead, work).await
    }

    async fn read(
        &self,
        scope: CounterScope,
        granularity: Granularity,
        from: Option<OffsetDateTime>,
        to: Option<OffsetDateTime>,
    ) -> Result<CounterValues, Error> {
        let settings = &self.shared.settings.counters;
        let now = now();
        let to = to.unwrap_or(now);
        if from.is_some_and(|from| from > to) {
            return Err(Error::InvalidRequest("from is after to".into()));
        }
        // Nothing older than the oldest retained bucket is kept: a `from`
        // before it starts there, so that a read walks retained buckets only
        // (from year 0 by the hour would be 17.7 million of them).
        let oldest = settings
            .retention(granularity)
            .map(|retention| now - retention - granularity_span(granularity));
        let from = match (from, oldest) {
            (Some(from), Some(oldest)) => from.max(oldest),
            (Some(from), None) => from,
            (None, Some(oldest)) => oldest,
            (None, None) => OffsetDateTime::UNIX_EPOCH,
        };
        if from > to {
            // The whole range is older than what is retained.
            return Ok(CounterValues {
                scope,
                buckets: Vec::new(),
                complete: true,
            });
        }
        let mut buckets = Vec::new();
        let mut start = granularity.bucket_start(from);
        loop {
            let bucket = settings.bucket(granularity, start);
            if bucket.expires_at.is_none_or(|expiry| expiry > now) {
                buckets.push(bucket);
            }
            if buckets.len() > settings.max_buckets_per_read {
                return Err(Error::InvalidRequest(format!(
                    "the range spans more than {} {} buckets",
                    settings.max_buckets_per_read,
                    granularity.as_str()
                )));
            }
            match granularity.bucket_end(start) {
                Some(next) if next <= to => start = next,
                _ => break,
            }
        }
        if !self.shared.settings.tiers.durable_serves() {
            // The cache holds the truth; a bucket it does not hold is zero.
            let held = self
                .shared
                .cache
                .call(|t| t.counter_buckets(&scope, &buckets))
                .await
                .map_err(|err| self.shared.journal_failed(err))?;
            return Ok(CounterValues {
                scope,
                buckets: held
                    .into_iter()
                    .flatten()
                    .map(|(values, _)| values)
                    .collect(),
                complete: true,
            });
        }
        let journaled = self.counters_journaled();
        let cache_up = journaled && self.shared.cache.breaker.is_closed();
        if cache_up {
            match self
                .shared
                .cache
                .call(|t| t.counter_buckets(&scope, &buckets))
                .await
            {
                Ok(cached) if cached.iter().all(|c| c.as_ref().is_some_and(|(_, ok)| *ok)) => {
                    return Ok(CounterValues {
                        scope,
                        buckets: cached.into_iter().flatten().map(|(v, _)| v).collect(),
                        complete: true,
                    });
                }
                Ok(cached) if !self.shared.durable.breaker.is_closed() => {
                    let complete = cached.iter().all(|c| c.as_ref().is_some_and(|(_, ok)| *ok));
                    return Ok(CounterValues {
                        scope,
                        buckets: cached.into_iter().flatten().map(|(v, _)| v).collect(),
                        complete,
                    });
                }
                Ok(_) => {}
                Err(err) => tracing::debug!(error = %err, "counter read from the cache failed"),
            }
        }
        let pending = if cache_up {
            self.shared
                .cache
                .call(|t| t.pending_increments(&scope, MAX_PENDING_READ))
                .await
                .map_err(|err| self.shared.journal_failed(err))?
        } else {
            Some(Vec::new())
        };
        // Too many waiting to read: the durable tier's values, marked incomplete.
        let exact = pending.is_some();
        let pending = pending.unwrap_or_default();
        let op_ids: Vec<String> = pending.iter().map(|i| i.op_id.clone()).collect();
        let (mut values, applied) = self
            .shared
            .durable
            .call(|t| t.counter_snapshot(&scope, &buckets, &op_ids))
            .await
            .map_err(|err| self.shared.durable_failed(err))?;
        let unapplied: Vec<CounterIncrement> = pending
            .into_iter()
            .filter(|i| !applied.contains(&i.op_id))
            .collect();
        add_pending(&mut values, &buckets, &unapplied);
        values.sort_by_key(|v| v.bucket.start);
        Ok(CounterValues {
            scope,
            buckets: values,
            complete: exact && (!journaled || cache_up || !self.state.backlog.pending()),
        })
    }

    /// Replays journaled increments into the durable tier, forever.
    pub async fn run_counter_replay(self: Arc<Self>) {
        let claim_idle = self.shared.settings.journal.claim_idle;
        let mut recover = true;
        loop {
            let replayed = if self.shared.durable.breaker.is_closed()
                && self.shared.cache.breaker.is_closed()
            {
                match self
                    .replay_counters_once(recover.then_some(claim_idle))
                    .await
                {
                    Ok(replayed) => {
                        recover = false;
                        replayed
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "counter replay paused");
                        recover = true;
                        0
                    }
                }
            } else {
                recover = true;
                0
            };
            if replayed == 0 {
                tokio::time::sleep(self.shared.settings.journal.idle_interval).await;
            }
        }
    }

    /// One batch: read, apply (each increment id once), acknowledge.
    pub async fn replay_counters_once(
        &self,
        recover: Option<Duration>,
    ) -> Result<usize, StoreError> {
        let epoch = self.state.backlog.epoch();
        let entries = self
            .shared
            .cache
            .call(|t| {
                t.read_counter_journal(
                    &self.shared.instance_id,
                    self.shared.settings.journal.batch_size,
                    recover,
                )
            })
            .await?;
        if entries.is_empty() {
            let length = self.shared.cache.call(|t| t.counter_backlog()).await?;
            self.state.backlog.settle(epoch, length);
            return Ok(0);
        }
        let increments: Vec<CounterIncrement> =
            entries.iter().map(|e| e.increment.clone()).collect();
        let applied = self
            .shared
            .durable
            .call(|t| t.apply_increments(&increments))
            .await?;
        let positions: Vec<_> = entries.into_iter().map(|e| e.position).collect();
        self.shared
            .cache
            .call(|t| t.ack_counter_journal(&positions))
            .await?;
        tracing::debug!(
            entries = positions.len(),
            applied,
            "counter increments replayed"
        );
        Ok(positions.len())
    }

    /// How many increments wait in the counter journal.
    pub async fn counter_backlog(&self) -> Result<u64, Error> {
        self.shared
            .cache
            .call(|t| t.counter_backlog())
            .await
            .map_err(|_| self.shared.unavailable())
    }
}

/// One bucket's length (a month counts as 31 days), for default ranges.
fn granularity_span(granularity: Granularity) -> time::Duration {
    match granularity {
        Granularity::Total => time::Duration::ZERO,
        Granularity::Hour => time::Duration::HOUR,
        Granularity::Day => time::Duration::DAY,
        Granularity::Month => time::Duration::days(31),
    }
}
