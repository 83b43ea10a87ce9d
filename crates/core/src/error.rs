//! Errors.
//!
//! Two layers: [`StoreError`] is what a tier reports, and it knows whether a
//! failure means "this tier is unavailable" (the signal that drives degradation)
//! or something about the data. [`Error`] is what the engine reports to the API;
//! every variant maps to one stable problem `code`.

use std::time::Duration;

use crate::{NameError, Version};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The role of a tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    Cache,
    Durable,
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Cache => "cache",
            Tier::Durable => "durable",
        })
    }
}

/// A failure reported by a storage tier.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The tier could not be reached or did not answer in time. The operation may
    /// or may not have been applied; the tier should be treated as down.
    #[error("{tier} tier unavailable: {source}")]
    Unavailable {
        tier: Tier,
        #[source]
        source: BoxError,
    },
    /// The tier did not answer within the call's deadline, or had no room
    /// for the call (no pooled connection free in time). A busy tier is not
    /// a dead one: breakers leave the verdict to their probe.
    /// `maybe_applied`: the call reached the tier and may have taken effect
    /// (a write's outcome is unknown).
    #[error("{tier} tier busy: {source}")]
    Busy {
        tier: Tier,
        #[source]
        source: BoxError,
        maybe_applied: bool,
    },
    /// The record's state did not satisfy the write's precondition.
    #[error("precondition failed")]
    PreconditionFailed,
    #[error("record not found")]
    NotFound,
    #[error("unique index {index} already holds {value:?}")]
    UniqueViolation { index: String, value: String },
    /// An increment would take a counter total past what every tier can
    /// keep ([`crate::MAX_TOTAL_UNITS`]); nothing was applied.
    #[error("field {field} would leave the range of a counter total")]
    CounterOutOfRange { field: String },
    /// The tier answered, but with something it should not have (a bug, corrupt
    /// data, a schema mismatch). Not a reason to degrade.
    #[error("{tier} tier error: {source}")]
    Internal {
        tier: Tier,
        #[source]
        source: BoxError,
    },
}

impl StoreError {
    pub fn unavailable(tier: Tier, source: impl Into<BoxError>) -> Self {
        StoreError::Unavailable {
            tier,
            source: source.into(),
        }
    }

    pub fn internal(tier: Tier, source: impl Into<BoxError>) -> Self {
        StoreError::Internal {
            tier,
            source: source.into(),
        }
    }

    /// A call that timed out or found no room; see [`StoreError::Busy`].
    pub fn busy(tier: Tier, source: impl Into<BoxError>, maybe_applied: bool) -> Self {
        StoreError::Busy {
            tier,
            source: source.into(),
            maybe_applied,
        }
    }

    /// True when the tier could not serve the call (down, or too busy to
    /// answer in time): the request goes elsewhere or fails, rather than
    /// being wrong.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable { .. } | StoreError::Busy { .. }
        )
    }

    /// True when the tier is busy rather than known to be down.
    pub fn is_busy(&self) -> bool {
        matches!(self, StoreError::Busy { .. })
    }

    /// True when the tier's server refused the connection: nothing listens
    /// there, so the tier is down for certain, not merely slow.
    pub fn is_refused(&self) -> bool {
        let StoreError::Unavailable { source, .. } = self else {
            return false;
        };
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
        while let Some(err) = cause {
            if let Some(io) = err.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::ConnectionRefused
            {
                return true;
            }
            cause = err.source();
        }
        false
    }
}

/// A failure reported by the engine; each variant is one stable API error code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("unknown collection {0:?}")]
    UnknownCollection(String),
    #[error("{0}")]
    NotFound(String),
    /// Data that is valid JSON but that some tier cannot store.
    #[error("{0}")]
    InvalidData(String),
    #[error("data does not match the collection's schema")]
    SchemaViolation(Vec<String>),
    #[error("data is {size} bytes, the limit is {limit}")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("version precondition failed")]
    VersionConflict { current: Option<Version> },
    #[error("unique index {index} already holds {value:?}")]
    UniqueViolation { index: String, value: String },
    #[error("{0}")]
    CounterOutOfRange(String),
    /// The operation could lose data or durability; repeat it with `force`.
    #[error("{0}")]
    ForceRequired(String),
    /// The operation does not fit the declared collections.
    #[error("{0}")]
    NotAllowed(String),
    #[error("no storage tier can serve this request")]
    BackendsUnavailable { retry_after: Duration },
    /// The service or a tier is at capacity (busy, not down): the request
    /// was shed before it took effect.
    #[error("the service is at capacity")]
    Overloaded { retry_after: Duration },
    /// A write was sent to a tier that did not answer in time: it may or
    /// may not have been applied. Retried with the same Idempotency-Key, it
    /// is applied at most once.
    #[error("the write's outcome is unknown")]
    OutcomeUnknown { retry_after: Duration },
    /// Logged with its context where it happens; the API shows no detail.
    #[error("internal error: {0}")]
    Internal(String),
}
