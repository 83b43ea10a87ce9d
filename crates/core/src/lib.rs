//! Domain types shared by every part of hybridstore.
//!
//! This crate is deliberately small and free of I/O: it names what a record, a
//! version and a collection are, which errors a storage tier can report, and the
//! traits every tier implements: small role traits, summed up as
//! [`DurableStore`] for the source of truth and [`CacheStore`] for the hot
//! copy. The engine is written against these traits only, so a tier (PostgreSQL, Redis, later SQLite or an in-process cache) can be
//! swapped without the strategy logic noticing.

mod clock;
mod collection;
mod control;
mod counters;
mod error;
mod journal;
mod merge_patch;
mod names;
mod record;
mod store;
mod version;

pub use clock::{Micros, now};
pub use collection::{CollectionSpec, Strategy};
pub use control::ControlState;
pub use counters::{
    Amount, Bucket, BucketValues, CacheIncrementOutcome, CounterIncrement, CounterJournalEntry,
    CounterValue, Granularity, MAX_DELTA_UNITS, MAX_TOTAL_UNITS, OP_ID_RETENTION, SeedTicket,
};
pub use error::{Error, StoreError, Tier};
pub use journal::{
    CacheWrite, CacheWriteOutcome, Change, JournalAck, JournalEntry, JournalKind, JournalPosition,
    MAX_DEAD_LETTERS, WriteChange,
};
pub use merge_patch::merge_patch;
pub use names::{
    CollectionName, CounterScope, FieldName, ID_PATTERN, ID_PREFIX_PATTERN, IndexName,
    NAME_PATTERN, NameError, RecordId, validate_id_prefix,
};
pub use record::{
    IndexEntry, JsonObject, ListPage, ListQuery, MAX_DATA_DEPTH, MAX_TTL_SECS, PageBuilder,
    Precondition, Record, RecordKey, RecordWrite, WriteOutcome, json_size, prefix_upper_bound,
    unstorable,
};
pub use store::{
    ApplyMode, Backend, CacheCounters, CacheEntry, CacheJournal, CacheLedger, CacheRecords,
    CacheRecovery, CacheStates, CacheStore, CachedState, ControlChannel, CopyOutcome,
    DurableControl, DurableCounters, DurableRecords, DurableStates, DurableStore, IdempotencyClaim,
    IdempotencyLedger, PURGE_BATCH, ReplayBounds, StoreResult,
};
pub use version::{Version, VersionParseError};

/// A new secret for a bearer token: 256 random bits from the operating
/// system's generator, as 64 hex digits.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every role trait of the tiers, for code that calls a concrete tier
/// (`RedisStore`, `PostgresStore`, ...) rather than a `dyn` one.
pub mod prelude {
    pub use crate::store::{
        Backend, CacheCounters, CacheJournal, CacheLedger, CacheRecords, CacheRecovery,
        CacheStates, ControlChannel, DurableControl, DurableCounters, DurableRecords,
        DurableStates, IdempotencyLedger,
    };
}
