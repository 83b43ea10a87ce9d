//! Stored responses of Idempotency-Key requests, within their bounds.

use super::*;

#[async_trait]
impl IdempotencyLedger for MemoryCache {
    async fn claim_idempotency(
        &self,
        owner: &str,
        key: &str,
        fingerprint: &str,
        pending_ttl: Duration,
    ) -> StoreResult<IdempotencyClaim> {
        let mut state = self.lock();
        let now = Instant::now();
        if state
            .idempotency
            .get(key)
            .is_some_and(|held| expired(held.expires, now))
        {
            state.drop_idempotency(key);
        }
        match state.idempotency.get(key) {
            None => {
                state.idempotency.insert(
                    key.to_owned(),
                    IdempotencyRecord {
                        owner: owner.to_owned(),
                        fingerprint: fingerprint.to_owned(),
                        response: None,
                        expires: deadline(pending_ttl),
                    },
                );
                Ok(IdempotencyClaim::Claimed)
            }
            Some(held) if held.fingerprint != fingerprint => Ok(IdempotencyClaim::Mismatch),
            Some(held) => Ok(match &held.response {
                Some(response) => IdempotencyClaim::Done(response.clone()),
                None => IdempotencyClaim::InProgress,
            }),
        }
    }

    async fn complete_idempotency(
        &self,
        owner: &str,
        key: &str,
        fingerprint: &str,
        response: &[u8],
        ttl: Duration,
        bounds: ReplayBounds,
    ) -> StoreResult<bool> {
        let mut guard = self.lock();
        let state = &mut *guard;
        state.drop_idempotency(key);
        let size = response.len() as u64;
        let caller = state.replay_usage.get(owner).copied().unwrap_or_default();
        let total = state.replay_total;
        let fits = caller.responses < bounds.caller_responses
            && caller.bytes + size <= bounds.caller_bytes
            && total.responses < bounds.total_responses
            && total.bytes + size <= bounds.total_bytes;
        if !fits {
            return Ok(false);
        }
        for usage in [
            state.replay_usage.entry(owner.to_owned()).or_default(),
            &mut state.replay_total,
        ] {
            usage.responses += 1;
            usage.bytes += size;
        }
        state.idempotency.insert(
            key.to_owned(),
            IdempotencyRecord {
                owner: owner.to_owned(),
                fingerprint: fingerprint.to_owned(),
                response: Some(response.to_vec()),
                expires: deadline(ttl),
            },
        );
        Ok(true)
    }

    async fn release_idempotency(&self, _owner: &str, key: &str) -> StoreResult<()> {
        self.lock().drop_idempotency(key);
        Ok(())
    }
}
