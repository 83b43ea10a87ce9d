//! `POST /admin/database/switch-strategy/{strategy}`.

use hybridstore_core::Strategy;
use serde::{Deserialize, Serialize};

/// The answer to a switch.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SwitchOutcome {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub previous: Strategy,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub strategy: Strategy,
    /// False when the strategy already was in force.
    pub changed: bool,
    pub revision: u64,
    /// Whether every cache copy was dropped because copies could be stale.
    pub cache_flushed: bool,
    /// The collections that follow the service-wide strategy (the others
    /// declare their own).
    pub collections: Vec<String>,
    /// Of those, the ones that cannot take it (unique indexes, which only
    /// the durable tier enforces, under a strategy that writes through the
    /// cache): they stay on `dual_write`.
    #[serde(default)]
    pub held_back: Vec<String>,
}
