//! Stored responses of Idempotency-Key requests, within their bounds.

use super::*;

#[async_trait]
impl IdempotencyLedger for RedisStore {
    async fn claim_idempotency(
        &self,
        owner: &str,
        key: &str,
        fingerprint: &str,
        pending_ttl: Duration,
    ) -> StoreResult<IdempotencyClaim> {
        let reply: Vec<Vec<u8>> = self
            .scripts
            .idempotency_claim
            .key(self.keys.idempotency(owner, key))
            .arg(fingerprint)
            .arg(ttl_millis(pending_ttl))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        let mut reply = reply.into_iter();
        match reply.next().as_deref() {
            Some(b"claimed") => Ok(IdempotencyClaim::Claimed),
            Some(b"done") => Ok(IdempotencyClaim::Done(reply.next().unwrap_or_default())),
            Some(b"pending") => Ok(IdempotencyClaim::InProgress),
            Some(b"mismatch") => Ok(IdempotencyClaim::Mismatch),
            _ => Err(corrupt("idempotency_claim answered nothing known".into())),
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
        let (ledger, sizes) = self.keys.replay_ledger(owner);
        let (all_ledger, all_sizes) = self.keys.replay_ledger_all();
        let now = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        let stored: i64 = self
            .scripts
            .idempotency_store
            .key(self.keys.idempotency(owner, key))
            .key(ledger)
            .key(sizes)
            .key(all_ledger)
            .key(all_sizes)
            .arg(fingerprint)
            .arg(response)
            .arg(ttl_millis(ttl))
            .arg(now as i64)
            .arg(bounds.caller_responses)
            .arg(bounds.caller_bytes)
            .arg(bounds.total_responses)
            .arg(bounds.total_bytes)
            .arg(key)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        Ok(stored == 1)
    }

    async fn release_idempotency(&self, owner: &str, key: &str) -> StoreResult<()> {
        redis::cmd("DEL")
            .arg(self.keys.idempotency(owner, key))
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(classify)
    }
}
