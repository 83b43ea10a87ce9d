//! The strategy engine: which tier a write goes to, which tier a read comes from,
//! and in which order.
//!
//! Everything the SPEC's strategy table says lives in `strategy.rs`; the rest of
//! this crate applies it. The engine is written against the tier traits of
//! `hybridstore-core` only, so it runs unchanged over PostgreSQL + Redis or over
//! any other pair of tiers, and unit tests can drive it with in-memory fakes.

mod absent;
mod breaker;
mod catalog;
mod control;
mod counters;
mod engine;
mod guarded;
mod idempotency;
mod jobs;
mod journal;
mod maintenance;
mod records;
mod recovery;
mod settings;
mod shared;
mod stats;
mod status;
mod strategy;
mod transfer;

pub use absent::NoDurableTier;
pub use breaker::HealthSettings;
pub use catalog::{Catalog, CatalogError, Collection};
pub use counters::CounterValues;
pub use engine::Engine;
pub use records::{BatchGet, Page};
pub use settings::{CounterSettings, EngineSettings, JournalSettings, SyncSettings, Tiers};
pub use stats::{EngineStats, Histogram, Operation, Outcome, TierStats, in_background};
pub use strategy::{OnMiss, Plan};

// The reports the engine fills in are the admin API's own types.
pub use hybridstore_api::{
    BreakerState, ClassReport, CollectionReport, ConsistencyReport, DriftClass, HealthReport,
    ImportReport, JobState, JobView, LatencySummary, MetricsReport, OperationCounts, Overall,
    ProgressView, ReadPath, ReplayStats, StatusReport, SwitchOutcome, SyncDirection, TierHealth,
    WritePath,
};
