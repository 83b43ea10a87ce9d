//! The tier traits: one small trait per role a tier plays, and the two
//! tiers as the sum of their roles.
//!
//! A durable tier (PostgreSQL, or SQLite in embedded mode) keeps records,
//! counter totals and the control state, and a ledger of what the cache tier
//! may lack. A cache tier (Redis, or an in-process cache in embedded mode)
//! keeps record copies, write and counter journals, the control channel and
//! idempotent responses. Each role lives in its own module with both tiers'
//! sides of it; a tier crate implements one role per file.
//!
//! The engine calls every role through one breaker wrapper, so a new method
//! on a role is a method on the tier and nothing else.

mod control;
mod counters;
mod idempotency;
mod journal;
mod records;
mod recovery;

use async_trait::async_trait;

use crate::StoreError;

pub use control::{ControlChannel, DurableControl};
pub use counters::{CacheCounters, DurableCounters};
pub use idempotency::{IdempotencyClaim, IdempotencyLedger, ReplayBounds};
pub use journal::CacheJournal;
pub use records::{
    ApplyMode, CacheEntry, CacheRecords, CacheStates, CachedState, CopyOutcome, DurableRecords,
    DurableStates, PURGE_BATCH,
};
pub use recovery::{CacheLedger, CacheRecovery};

pub type StoreResult<T> = Result<T, StoreError>;

/// What every tier is: a named backend that can be pinged.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Short backend name for logs and status (`"postgres"`, `"sqlite"`,
    /// `"redis"`, `"memory"`).
    fn backend(&self) -> &'static str;

    /// A cheap round trip that succeeds only when the tier can serve
    /// requests (the health probe).
    async fn ping(&self) -> StoreResult<()>;
}

/// The source of truth: every role a durable tier plays.
pub trait DurableStore:
    Backend + DurableRecords + DurableStates + DurableCounters + DurableControl + CacheLedger
{
}

impl<T> DurableStore for T where
    T: Backend
        + DurableRecords
        + DurableStates
        + DurableCounters
        + DurableControl
        + CacheLedger
        + ?Sized
{
}

/// The hot copy: every role a cache tier plays.
pub trait CacheStore:
    Backend
    + CacheRecords
    + CacheStates
    + CacheRecovery
    + CacheJournal
    + CacheCounters
    + ControlChannel
    + IdempotencyLedger
{
}

impl<T> CacheStore for T where
    T: Backend
        + CacheRecords
        + CacheStates
        + CacheRecovery
        + CacheJournal
        + CacheCounters
        + ControlChannel
        + IdempotencyLedger
        + ?Sized
{
}
