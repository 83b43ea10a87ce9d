//! What makes a cache safe to serve again after it was unreachable or
//! restarted: its server's identity and the generation it was reconciled to
//! (cache side), the generation of writes around it and the keys whose newest
//! version waits in a journal (durable side, so every instance and every
//! restart of one can tell).

use std::time::Duration;

use async_trait::async_trait;

use crate::{CollectionName, RecordId, RecordKey, StoreResult, Version};

/// The cache tier's side of its recovery.
#[async_trait]
pub trait CacheRecovery: Send + Sync + 'static {
    /// An id of the server process (Redis `run_id`): a different id means the
    /// server restarted and may hold older copies than it acknowledged.
    /// `None` when the tier cannot tell.
    async fn server_id(&self) -> StoreResult<Option<String>>;

    /// Removes every record copy and lookup hint of this service, but never
    /// the truth of a cache-only collection, and pinned copies only with
    /// `pinned_too` (their journal entries stay); returns how many keys went.
    async fn invalidate_all(&self, pinned_too: bool) -> StoreResult<u64>;

    /// The durable tier's cache generation this cache was last reconciled
    /// to (0 when never).
    async fn reconciled_generation(&self) -> StoreResult<u64>;

    /// Records that this cache was reconciled to `generation` (never lowers
    /// it).
    async fn set_reconciled_generation(&self, generation: u64) -> StoreResult<()>;
}

/// The durable tier's record of what the cache tier may lack or hold
/// ahead of it.
#[async_trait]
pub trait CacheLedger: Send + Sync + 'static {
    /// How often a write went around the cache tier (it was unreachable):
    /// each episode bumps it before its first such write. Kept here, it
    /// survives a restart of the service and reaches every instance; a
    /// cache reconciled to a lower generation may hold stale copies.
    async fn cache_generation(&self) -> StoreResult<u64>;

    /// Bumps [`CacheLedger::cache_generation`]; returns the new value.
    async fn bump_cache_generation(&self) -> StoreResult<u64>;

    /// Records that these keys have journaled versions the cache tier holds
    /// and this tier may lack, so that another instance serving from this
    /// tier while the cache is unreachable can tell (SPEC section 5: an
    /// instance cannot read another's journal then). A key already held keeps
    /// the higher version.
    async fn hold(&self, held: &[(RecordKey, Version)]) -> StoreResult<()>;

    /// Of `ids`, those held (see [`CacheLedger::hold`]) at a version above
    /// what this tier stores of them: their newest version is in a journal.
    async fn held_above(
        &self,
        collection: &CollectionName,
        ids: &[RecordId],
    ) -> StoreResult<Vec<(RecordId, Version)>>;

    /// Whether any id of `collection` in `(after, until]` (`until: None`: no
    /// upper end) is held above what this tier stores.
    async fn any_held_above(
        &self,
        collection: &CollectionName,
        after: Option<&RecordId>,
        until: Option<&RecordId>,
    ) -> StoreResult<bool>;

    /// Forgets held keys this tier has caught up with and, given `stale`,
    /// those held longer (the journals were seen empty: their entries were
    /// set aside, or the journal that held them was lost); returns how many.
    async fn release_held(&self, stale: Option<Duration>) -> StoreResult<u64>;
}
