//! The cache tier's journals: writes it took ahead of the durable tier
//! (write-behind, or during an outage of the durable tier), replayed into the
//! durable tier, and the dead letters the durable tier refused.

use std::time::Duration;

use async_trait::async_trait;

use crate::{
    CacheWrite, CacheWriteOutcome, Change, JournalAck, JournalEntry, JournalKind, ListQuery,
    StoreResult,
};

/// A cache tier's write journals.
#[async_trait]
pub trait CacheJournal: Send + Sync + 'static {
    /// Accepts a write ahead of the durable tier: updates the copy and appends
    /// a journal entry atomically, pinning the copy until it is replayed.
    async fn accept_write(&self, write: &CacheWrite) -> StoreResult<CacheWriteOutcome>;

    /// About `max` journal entries for `consumer` to replay: new ones and,
    /// with `recover: Some(claim_idle)`, also its own entries not yet
    /// acknowledged and those another consumer left unacknowledged for longer
    /// than `claim_idle` (asked for after a failure and now and then, since it
    /// costs a round trip per stream).
    async fn read_journal(
        &self,
        consumer: &str,
        max: usize,
        recover: Option<Duration>,
    ) -> StoreResult<Vec<JournalEntry>>;

    /// Removes replayed entries and unpins their copies.
    async fn ack_journal(&self, acks: &[JournalAck]) -> StoreResult<()>;

    /// Moves entries the durable tier refuses for good out of the journal,
    /// with the reason, into a bounded dead-letter journal an operator can
    /// inspect, so that replay goes on with the rest. The copy an entry
    /// pinned is dropped: the durable tier stays the truth.
    async fn set_aside(&self, refused: &[(JournalEntry, String)]) -> StoreResult<()>;

    /// How many entries were set aside and are still kept.
    async fn dead_letters(&self) -> StoreResult<u64>;

    /// The states of `query.collection` pinned by journal entries not yet
    /// replayed (versions the durable tier may lack), in id order: after
    /// the query's cursor, within its prefix, at most `query.limit`.
    async fn pinned(&self, query: &ListQuery) -> StoreResult<Vec<Change>>;

    /// How many entries of one journal wait to be replayed.
    async fn journal_backlog(&self, kind: JournalKind) -> StoreResult<u64>;
}
