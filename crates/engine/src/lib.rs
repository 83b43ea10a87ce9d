//! The strategy engine: which tier a write goes to, which tier a read comes from,
//! and in which order.
//!
//! Everything the SPEC's strategy table says lives in [`strategy`]; the rest of
//! this crate applies it. The engine is written against the tier traits of
//! `hybridstore-core` only, so it runs unchanged over PostgreSQL + Redis or over
//! any other pair of tiers, and unit tests can drive it with in-memory fakes.

mod catalog;
mod engine;
mod health;
mod journal;
mod strategy;

pub use catalog::{Catalog, CatalogError, Collection};
pub use engine::{BatchGet, Engine, EngineSettings, Page};
pub use health::{BreakerState, HealthSettings, TierHealth};
pub use journal::{JournalSettings, ReplayStats};
pub use strategy::{Plan, ReadPath, WritePath};
