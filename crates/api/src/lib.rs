//! The admin API's answers, as types.
//!
//! The server serializes these and the CLI deserializes the very same
//! structs, so a field renamed on one side cannot silently go missing on the
//! other. The crate holds nothing but data and the words an operator reads:
//! the engine fills the reports in, the server's handlers send them.

mod check;
mod control;
mod health;
mod jobs;
mod metrics;
mod problem;
mod status;
mod transfer;

pub use check::{ClassReport, CollectionReport, ConsistencyReport, DriftClass, SyncDirection};
pub use control::SwitchOutcome;
pub use health::{BreakerState, TierHealth};
pub use jobs::{JobList, JobState, JobView, ProgressView};
pub use metrics::{LatencySummary, OperationCounts, ReplayStats};
pub use problem::ProblemDocument;
pub use status::{
    CollectionStatus, HealthReport, JournalBacklog, MetricsReport, Overall, PlanView, ReadPath,
    StatusReport, StrategyStatus, Switched, TierMetrics, UnreplayedKeys, WritePath,
};
pub use transfer::{ImportAnswer, ImportReport};
