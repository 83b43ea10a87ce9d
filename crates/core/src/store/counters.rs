//! Counters: totals in the durable tier, hot buckets and a journal of
//! increments in the cache tier.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::{
    Bucket, BucketValues, CacheIncrementOutcome, CounterIncrement, CounterJournalEntry,
    CounterScope, CounterValue, JournalPosition, SeedTicket, StoreResult,
};

/// A durable tier's counter totals.
#[async_trait]
pub trait DurableCounters: Send + Sync + 'static {
    /// Applies the increments whose `op_id` it has not applied before, all in
    /// one transaction (deltas to one bucket and field are summed into one
    /// upsert); returns how many were new. Replaying an increment is a no-op.
    async fn apply_increments(&self, increments: &[CounterIncrement]) -> StoreResult<usize>;

    /// Every field of these buckets of one scope (a bucket without values is
    /// left out), and which of `op_ids` it has applied, read in one snapshot:
    /// values plus the deltas of the unapplied ones are then exact.
    async fn counter_snapshot(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
        op_ids: &[String],
    ) -> StoreResult<(Vec<BucketValues>, HashSet<String>)>;

    /// Up to `limit` stored counter values ordered by (scope, granularity,
    /// bucket start, field), after `after`, leaving out expired buckets:
    /// export walks every counter with it in bounded memory.
    async fn scan_counters(
        &self,
        after: Option<&CounterValue>,
        limit: usize,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<CounterValue>>;

    /// Sets counter values carried in by an import, in one transaction: each
    /// only where the tier holds no value for that field of that bucket,
    /// unless `force`. Returns, per value, whether it was written. Setting
    /// (never adding) is what makes an import idempotent.
    async fn restore_counters(
        &self,
        values: &[CounterValue],
        force: bool,
    ) -> StoreResult<Vec<bool>>;
}

/// A cache tier's counter buckets and increment journal.
#[async_trait]
pub trait CacheCounters: Send + Sync + 'static {
    /// Adds an increment to its buckets' values and journals it, in one
    /// atomic step; `Cold` (nothing changed) when a bucket is not held.
    async fn increment(&self, increment: &CounterIncrement) -> StoreResult<CacheIncrementOutcome>;

    /// Taken before reading what to seed `scope`'s buckets with (see
    /// [`SeedTicket`]).
    async fn seed_ticket(&self, scope: &CounterScope) -> StoreResult<SeedTicket>;

    /// Installs bucket values read from the durable tier for buckets the
    /// cache does not hold (a bucket held meanwhile is left alone), unless
    /// a bucket of the scope was dropped since `ticket` was taken (then
    /// nothing is installed). `complete: false` marks values that lack the
    /// durable tier's (it was unavailable): they count only what the cache
    /// accepted since.
    async fn seed_buckets(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
        values: &[BucketValues],
        complete: bool,
        ticket: SeedTicket,
    ) -> StoreResult<()>;

    /// The values of these buckets, with whether each is complete; `None`
    /// for a bucket not held.
    async fn counter_buckets(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
    ) -> StoreResult<Vec<Option<(BucketValues, bool)>>>;

    /// About `max` journaled increments to replay (see [`CacheJournal::read_journal`](crate::CacheJournal::read_journal)).
    async fn read_counter_journal(
        &self,
        consumer: &str,
        max: usize,
        recover: Option<Duration>,
    ) -> StoreResult<Vec<CounterJournalEntry>>;

    /// Removes replayed increments from the journal.
    async fn ack_counter_journal(&self, positions: &[JournalPosition]) -> StoreResult<()>;

    /// How many increments wait to be replayed.
    async fn counter_backlog(&self) -> StoreResult<u64>;

    /// The journaled increments of `scope` not yet replayed; `None` when more
    /// than `limit` increments (of any scope in its shard) wait, which would
    /// make reading them too slow.
    async fn pending_increments(
        &self,
        scope: &CounterScope,
        limit: usize,
    ) -> StoreResult<Option<Vec<CounterIncrement>>>;

    /// Drops these buckets (they are seeded again on their next increment);
    /// seeds whose ticket was taken before are not installed.
    async fn forget_buckets(&self, scope: &CounterScope, buckets: &[Bucket]) -> StoreResult<()>;

    /// Drops every counter bucket of this service; returns how many. Seeds
    /// whose ticket was taken before are not installed.
    async fn forget_counters(&self) -> StoreResult<u64>;

    /// One step of a walk over every bucket held, from `cursor` (0 to
    /// start): the next cursor (0 when done) and about `count` buckets with
    /// their values (each bucket's `expires_at` is left to the caller, who
    /// knows the retention). Like Redis `SCAN`, a bucket may come more than
    /// once. Export walks the counters of a cache-only deployment with it.
    async fn scan_buckets(
        &self,
        cursor: u64,
        count: usize,
    ) -> StoreResult<(u64, Vec<(CounterScope, BucketValues)>)>;

    /// Sets counter values carried in by an import where the cache holds
    /// the counters' truth (a cache-only deployment), as
    /// [`DurableCounters::restore_counters`] does: each only where its
    /// bucket holds no value for that field, unless `force`. A bucket
    /// written is complete. Returns, per value, whether it was written.
    async fn restore_buckets(&self, values: &[CounterValue], force: bool)
    -> StoreResult<Vec<bool>>;
}
