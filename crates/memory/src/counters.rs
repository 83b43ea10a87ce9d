//! Counter buckets and the increment journal.

use super::*;

const COUNTER_STREAM: &str = "counters";

fn bucket_key(scope: &CounterScope, bucket: &Bucket) -> BucketKey {
    (scope.clone(), bucket.granularity, bucket.start)
}

#[async_trait]
impl CacheCounters for MemoryCache {
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
            held.expires_at = Some(
                bucket_values
                    .bucket
                    .cache_expiry(self.counter_idle, OffsetDateTime::now_utc()),
            );
        }
        state.op_markers.insert(
            increment.op_id.clone(),
            deadline(hybridstore_core::OP_ID_RETENTION),
        );
        state.counter_journal().append(increment.clone());
        Ok(CacheIncrementOutcome::Applied(applied))
    }

    async fn seed_ticket(&self, _scope: &CounterScope) -> StoreResult<SeedTicket> {
        Ok(SeedTicket(self.lock().bucket_drops))
    }

    async fn seed_buckets(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
        values: &[BucketValues],
        complete: bool,
        ticket: SeedTicket,
    ) -> StoreResult<()> {
        let mut state = self.lock();
        if state.bucket_drops != ticket.0 {
            // Read before a drop: it may miss what the dropped bucket took.
            return Ok(());
        }
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
                    expires_at: Some(
                        bucket.cache_expiry(self.counter_idle, OffsetDateTime::now_utc()),
                    ),
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
        state.bucket_drops += 1;
        for bucket in buckets {
            state.buckets.remove(&bucket_key(scope, bucket));
        }
        Ok(())
    }

    /// The cursor is a position in the buckets sorted by key: a bucket
    /// added or dropped meanwhile may shift the rest by one (one seen twice
    /// or missed), which a walk of a changing cache allows.
    async fn scan_buckets(
        &self,
        cursor: u64,
        count: usize,
    ) -> StoreResult<(u64, Vec<(CounterScope, BucketValues)>)> {
        let mut state = self.lock();
        let mut keys: Vec<BucketKey> = state.buckets.keys().cloned().collect();
        keys.sort();
        let from = usize::try_from(cursor)
            .unwrap_or(usize::MAX)
            .min(keys.len());
        let until = from.saturating_add(count.max(1)).min(keys.len());
        let mut buckets = Vec::with_capacity(until - from);
        for key in &keys[from..until] {
            if let Some(held) = state.bucket(key) {
                let (scope, granularity, start) = key.clone();
                let values = BucketValues {
                    bucket: Bucket {
                        granularity,
                        start,
                        expires_at: None,
                    },
                    values: held.values.iter().map(|(f, a)| (f.clone(), *a)).collect(),
                };
                buckets.push((scope, values));
            }
        }
        let next = if until < keys.len() { until as u64 } else { 0 };
        Ok((next, buckets))
    }

    async fn restore_buckets(
        &self,
        values: &[CounterValue],
        force: bool,
    ) -> StoreResult<Vec<bool>> {
        let mut state = self.lock();
        let mut written = Vec::with_capacity(values.len());
        let now = OffsetDateTime::now_utc();
        for value in values {
            if value.expires_at.is_some_and(|at| at <= now) {
                written.push(false); // Past its retention: nothing to keep.
                continue;
            }
            let key = (value.scope.clone(), value.granularity, value.bucket_start);
            if state.bucket(&key).is_none() {
                state.buckets.insert(
                    key.clone(),
                    HeldBucket {
                        values: Default::default(),
                        complete: true,
                        expires_at: value.expires_at,
                    },
                );
            }
            let held = state.bucket(&key).expect("just made");
            if !force && held.values.contains_key(&value.field) {
                written.push(false);
                continue;
            }
            held.values.insert(value.field.clone(), value.value);
            held.complete = true;
            written.push(true);
        }
        Ok(written)
    }

    async fn forget_counters(&self) -> StoreResult<u64> {
        let mut state = self.lock();
        state.bucket_drops += 1;
        let count = state.buckets.len() as u64;
        state.buckets.clear();
        Ok(count)
    }
}
