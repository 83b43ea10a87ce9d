//! The service-wide state operators change at run time, shared by every
//! instance that uses the same stores.
//!
//! It is small and changes rarely (a strategy switch, a cache flush), so it is
//! kept whole: the durable tier holds it (it survives restarts), the cache tier
//! holds a mirror (an instance starting while the durable tier is down still
//! finds it) and broadcasts every change (the others apply it within a second).
//! `revision` orders the copies: an instance applies a state only if it is newer
//! than the one it has, so a late or repeated message changes nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::Strategy;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlState {
    /// Increases with every change.
    pub revision: u64,
    /// The service-wide strategy set by an operator (`None`: the configured one).
    pub strategy: Option<Strategy>,
    /// Strategies an operator set for single collections (by name), over
    /// what they declare or follow. Absent in states saved before there
    /// were any.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub collections: BTreeMap<String, Strategy>,
    /// Increases whenever every cache copy was dropped because copies could
    /// have gone stale (for example, leaving `postgres_only`).
    pub cache_generation: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub changed_at: OffsetDateTime,
    /// The instance that made the change.
    pub changed_by: String,
}
