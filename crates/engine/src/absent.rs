//! The durable tier of a cache-only deployment (`POSTGRES_ENABLED=false`):
//! there is none, and this one says so.
//!
//! The engine is built over two tiers. In a cache-only deployment every
//! plan is `redis_only` and no loop, probe or job that needs a durable tier
//! runs ([`Tiers::CacheOnly`](crate::Tiers::CacheOnly)), so nothing should
//! call it. Should a path be missed, it fails loudly as an unavailable tier
//! (503) rather than storing anything where no one would look. Only the
//! control state answers: none was ever saved here (switches are refused in
//! such a deployment), and no instance holds a scheduled turn.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use hybridstore_core::{
    ApplyMode, Backend, Bucket, BucketValues, CacheLedger, Change, CollectionName, ControlState,
    CounterIncrement, CounterScope, CounterValue, DurableControl, DurableCounters, DurableRecords,
    DurableStates, IndexEntry, IndexName, ListPage, ListQuery, Precondition, Record, RecordId,
    RecordKey, RecordWrite, StoreError, StoreResult, Tier, Version, WriteOutcome,
};
use time::OffsetDateTime;

/// The durable tier that is not there (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDurableTier;

fn none<T>() -> StoreResult<T> {
    Err(StoreError::unavailable(
        Tier::Durable,
        "this deployment has no durable tier (POSTGRES_ENABLED=false)",
    ))
}

#[async_trait]
impl Backend for NoDurableTier {
    fn backend(&self) -> &'static str {
        "none"
    }

    async fn ping(&self) -> StoreResult<()> {
        none()
    }
}

#[async_trait]
impl DurableRecords for NoDurableTier {
    async fn get(&self, _: &RecordKey, _: OffsetDateTime) -> StoreResult<Option<Record>> {
        none()
    }

    async fn get_many(
        &self,
        _: &CollectionName,
        _: &[RecordId],
        _: OffsetDateTime,
    ) -> StoreResult<Vec<Record>> {
        none()
    }

    async fn put(&self, _: &RecordWrite) -> StoreResult<WriteOutcome> {
        none()
    }

    async fn delete(
        &self,
        _: &RecordKey,
        _: Precondition,
        _: OffsetDateTime,
    ) -> StoreResult<Version> {
        none()
    }

    async fn list(&self, _: &ListQuery) -> StoreResult<ListPage> {
        none()
    }

    async fn lookup(
        &self,
        _: &CollectionName,
        _: &IndexName,
        _: &str,
        _: OffsetDateTime,
    ) -> StoreResult<Option<Record>> {
        none()
    }
}

#[async_trait]
impl DurableStates for NoDurableTier {
    async fn apply_changes(&self, _: &[Change], _: ApplyMode) -> StoreResult<Vec<bool>> {
        none()
    }

    async fn scan(
        &self,
        _: &CollectionName,
        _: Option<&RecordId>,
        _: usize,
        _: OffsetDateTime,
    ) -> StoreResult<Vec<Change>> {
        none()
    }

    async fn get_states(
        &self,
        _: &CollectionName,
        _: &[RecordId],
        _: OffsetDateTime,
    ) -> StoreResult<Vec<Change>> {
        none()
    }

    async fn count(&self, _: &CollectionName) -> StoreResult<u64> {
        none()
    }

    async fn set_index_entries(
        &self,
        _: &RecordKey,
        _: &[IndexEntry],
        _: OffsetDateTime,
    ) -> StoreResult<()> {
        none()
    }

    async fn purge_expired(&self, _: OffsetDateTime, _: Duration) -> StoreResult<u64> {
        none()
    }
}

#[async_trait]
impl DurableCounters for NoDurableTier {
    async fn apply_increments(&self, _: &[CounterIncrement]) -> StoreResult<usize> {
        none()
    }

    async fn counter_snapshot(
        &self,
        _: &CounterScope,
        _: &[Bucket],
        _: &[String],
    ) -> StoreResult<(Vec<BucketValues>, HashSet<String>)> {
        none()
    }

    async fn scan_counters(
        &self,
        _: Option<&CounterValue>,
        _: usize,
        _: OffsetDateTime,
    ) -> StoreResult<Vec<CounterValue>> {
        none()
    }

    async fn restore_counters(&self, _: &[CounterValue], _: bool) -> StoreResult<Vec<bool>> {
        none()
    }
}

#[async_trait]
impl DurableControl for NoDurableTier {
    async fn load_control(&self) -> StoreResult<Option<ControlState>> {
        Ok(None)
    }

    async fn save_control(&self, _: &ControlState) -> StoreResult<bool> {
        none()
    }

    async fn take_turn(&self, _: &str, _: &str, _: Duration) -> StoreResult<bool> {
        Ok(false)
    }
}

#[async_trait]
impl CacheLedger for NoDurableTier {
    async fn cache_generation(&self) -> StoreResult<u64> {
        none()
    }

    async fn bump_cache_generation(&self) -> StoreResult<u64> {
        none()
    }

    async fn hold(&self, _: &[(RecordKey, Version)]) -> StoreResult<()> {
        none()
    }

    async fn held_above(
        &self,
        _: &CollectionName,
        _: &[RecordId],
    ) -> StoreResult<Vec<(RecordId, Version)>> {
        none()
    }

    async fn any_held_above(
        &self,
        _: &CollectionName,
        _: Option<&RecordId>,
        _: Option<&RecordId>,
    ) -> StoreResult<bool> {
        none()
    }

    async fn release_held(&self, _: Option<Duration>) -> StoreResult<u64> {
        none()
    }
}
