//! What a recovery needs: the server's identity, the reconciled generation, dropping every copy.

use super::*;

#[async_trait]
impl CacheRecovery for MemoryCache {
    async fn server_id(&self) -> StoreResult<Option<String>> {
        Ok(Some(self.run_id.clone()))
    }

    async fn invalidate_all(&self, pinned_too: bool) -> StoreResult<u64> {
        let mut state = self.lock();
        let mut removed = state.hints.len();
        state.hints.clear();
        let (mut copies_removed, mut bytes) = (0, 0);
        for copies in state.records.values_mut() {
            copies.retain(|_, copy| {
                let keep = copy.authoritative || (!pinned_too && copy.pinned.is_some());
                if !keep {
                    copies_removed += 1;
                    bytes += copy.bytes;
                }
                keep
            });
        }
        state.record_count -= copies_removed;
        state.record_bytes -= bytes;
        removed += copies_removed;
        Ok(removed as u64)
    }

    async fn reconciled_generation(&self) -> StoreResult<u64> {
        Ok(self.lock().reconciled_generation)
    }

    async fn set_reconciled_generation(&self, generation: u64) -> StoreResult<()> {
        let mut state = self.lock();
        state.reconciled_generation = state.reconciled_generation.max(generation);
        Ok(())
    }
}
