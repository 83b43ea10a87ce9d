//! `GET /admin/database/health`: how each tier's breaker stands.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Healthy: calls go through.
    Closed,
    /// Failing: calls fail fast until a probe succeeds.
    Open,
    /// A probe is testing an open tier; calls still fail fast.
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// A snapshot of one tier's health, for status pages and metrics.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TierHealth {
    pub tier: String,
    pub backend: String,
    pub state: BreakerState,
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub since: OffsetDateTime,
    pub consecutive_failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub degradations: u64,
    /// Round trip of the last successful probe, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_latency_ms: Option<f64>,
}
