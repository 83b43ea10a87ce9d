//! The strategy engine: which tier a write goes to, which tier a read comes from,
//! and in which order.
//!
//! Everything the SPEC's strategy table says lives in [`strategy`]; the rest of
//! this crate applies it. The engine is written against the tier traits of
//! `hybridstore-core` only, so it runs unchanged over PostgreSQL + Redis or over
//! any other pair of tiers, and unit tests can drive it with in-memory fakes.

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

pub use breaker::{BreakerState, HealthSettings, TierHealth};
pub use catalog::{Catalog, CatalogError, Collection};
pub use control::SwitchOutcome;
pub use counters::CounterValues;
pub use engine::Engine;
pub use jobs::{JobState, JobView, ProgressView};
pub use journal::ReplayStats;
pub use maintenance::{
    ClassReport, CollectionReport, ConsistencyReport, DriftClass, SyncDirection,
};
pub use records::{BatchGet, Page};
pub use settings::{CounterSettings, EngineSettings, JournalSettings, SyncSettings};
pub use stats::{
    EngineStats, Histogram, LatencySummary, Operation, OperationCounts, Outcome, TierStats,
};
pub use status::{HealthReport, MetricsReport, Overall, StatusReport};
pub use strategy::{OnMiss, Plan, ReadPath, WritePath};
pub use transfer::ImportReport;
