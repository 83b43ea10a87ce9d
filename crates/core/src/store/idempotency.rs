//! Responses kept for `Idempotency-Key` retries, in the cache tier.

use std::time::Duration;

use async_trait::async_trait;

use crate::StoreResult;

/// How much the cache keeps of stored idempotent responses, per caller and
/// in all: a response past either bound is not stored (the call ran; its
/// retry runs again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayBounds {
    pub caller_responses: u64,
    pub caller_bytes: u64,
    pub total_responses: u64,
    pub total_bytes: u64,
}

impl Default for ReplayBounds {
    fn default() -> Self {
        Self {
            caller_responses: 10_000,
            caller_bytes: 16 << 20,
            total_responses: 100_000,
            total_bytes: 64 << 20,
        }
    }
}

/// What [`IdempotencyLedger::claim_idempotency`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// First use of the key: go ahead, then complete or release it.
    Claimed,
    /// Already answered: the stored response.
    Done(Vec<u8>),
    /// A first attempt is still running (or died less than a minute ago).
    InProgress,
    /// The key was used for a different request.
    Mismatch,
}

/// A cache tier's store of idempotent responses.
#[async_trait]
pub trait IdempotencyLedger: Send + Sync + 'static {
    /// Claims an idempotency key (`key` is already scoped to its caller,
    /// `owner`) for the request with this fingerprint; an unfinished claim
    /// lapses after `pending_ttl`.
    async fn claim_idempotency(
        &self,
        owner: &str,
        key: &str,
        fingerprint: &str,
        pending_ttl: Duration,
    ) -> StoreResult<IdempotencyClaim>;

    /// Stores the response of a claimed key for `ttl`, if it fits within
    /// `bounds`; otherwise gives the key up (a retry runs again). Returns
    /// whether it was stored.
    async fn complete_idempotency(
        &self,
        owner: &str,
        key: &str,
        fingerprint: &str,
        response: &[u8],
        ttl: Duration,
        bounds: ReplayBounds,
    ) -> StoreResult<bool>;

    /// Gives a claimed key up (the request failed inside; a retry may run).
    async fn release_idempotency(&self, owner: &str, key: &str) -> StoreResult<()>;
}
