//! `GET /admin/database/metrics` (the JSON form of `/metrics`).

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

/// Counts for one operation kind.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OperationCounts {
    pub ok: u64,
    pub rejected: u64,
    pub failed: u64,
    pub latency: LatencySummary,
}

/// Replay counters since the process started (for status and metrics).
#[derive(Clone, Copy, Debug, Default, serde::Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReplayStats {
    /// Journal entries read and acknowledged.
    pub entries: u64,
    /// Changes applied to the durable tier (newest per record and batch).
    pub applied: u64,
    /// Changes the durable tier already had in that version or a newer one.
    pub superseded: u64,
}
