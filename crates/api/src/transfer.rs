//! `POST /admin/database/import`.

use std::collections::BTreeMap;

use hybridstore_transfer::Counts;
use serde::{Deserialize, Serialize};

/// What an import did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImportReport {
    /// Records (and deletions) written, per collection.
    pub applied: BTreeMap<String, u64>,
    /// Left alone: the target held the same or a newer version.
    pub skipped: BTreeMap<String, u64>,
    pub counters_applied: u64,
    /// Left alone: the target held a value for that field of that bucket.
    pub counters_skipped: u64,
}

/// `POST /admin/database/import`: what the server read, and what it did.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImportAnswer {
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub read: Counts,
    pub report: ImportReport,
}
