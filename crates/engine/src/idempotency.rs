//! `Idempotency-Key`: a retried mutating call answers with the first
//! response instead of running again.
//!
//! The cache keeps one record per key (scoped to the caller by the HTTP
//! layer): the request's fingerprint, and the response once there is one. A
//! first attempt holds the key for a minute; a retry meanwhile is told it is
//! in progress, a retry after a failure inside runs again. Counter increments
//! also take their id from the key, so even a retry that runs again (the
//! response was never stored) is applied once, in both tiers.

use std::time::Duration;

use hybridstore_core::IdempotencyClaim;

use std::sync::Arc;

use crate::shared::Shared;

/// How long an answered Idempotency-Key replays its response.
const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a first attempt holds its key before a retry may run again.
const IDEMPOTENCY_PENDING: Duration = Duration::from_secs(60);

/// Stored responses for `Idempotency-Key` retries, in the cache tier.
pub(crate) struct Replays {
    shared: Arc<Shared>,
}

impl Replays {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

impl Replays {
    /// Claims an idempotency key; `None` when the cache (which keeps them)
    /// cannot be asked: the request then runs without replay protection.
    pub async fn claim_idempotency(
        &self,
        owner: &str,
        key: &str,
        fingerprint: &str,
    ) -> Option<IdempotencyClaim> {
        if !self.shared.cache.breaker.is_closed() {
            return None;
        }
        self.shared
            .cache
            .call(|t| t.claim_idempotency(owner, key, fingerprint, IDEMPOTENCY_PENDING))
            .await
            .inspect_err(|err| tracing::warn!(error = %err, "idempotency key not claimed"))
            .ok()
    }

    /// Stores the response of a claimed key, within the bounds of the
    /// settings; false when it was not stored (past a bound, or the cache
    /// failed: logged), and a retry runs again.
    pub async fn complete_idempotency(
        &self,
        owner: &str,
        key: &str,
        fingerprint: &str,
        response: &[u8],
    ) -> bool {
        let stored = self
            .shared
            .cache
            .call(|t| {
                t.complete_idempotency(
                    owner,
                    key,
                    fingerprint,
                    response,
                    IDEMPOTENCY_TTL,
                    self.shared.settings.replay_bounds,
                )
            })
            .await;
        match stored {
            Ok(stored) => stored,
            Err(err) => {
                tracing::warn!(error = %err, "idempotent response not stored");
                false
            }
        }
    }

    /// Gives a claimed key up.
    pub async fn release_idempotency(&self, owner: &str, key: &str) {
        if let Err(err) = self
            .shared
            .cache
            .call(|t| t.release_idempotency(owner, key))
            .await
        {
            tracing::warn!(error = %err, "idempotency key not released");
        }
    }
}
