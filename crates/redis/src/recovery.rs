//! What a recovery needs: the server's identity, the reconciled generation, dropping every copy.

use super::*;

#[async_trait]
impl CacheRecovery for RedisStore {
    async fn server_id(&self) -> StoreResult<Option<String>> {
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        Ok(info
            .lines()
            .find_map(|line| line.strip_prefix("run_id:"))
            .map(|id| id.trim().to_owned()))
    }

    async fn invalidate_all(&self, pinned_too: bool) -> StoreResult<u64> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}:*", self.keys.prefix());
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let (next, keys) = scan_step(&mut conn, cursor, &pattern, 1000).await?;
            let copies: Vec<String> = keys
                .into_iter()
                .filter(|key| self.keys.is_copy(key))
                .collect();
            removed += self.unlink_unpinned(copies, pinned_too).await?;
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    async fn reconciled_generation(&self) -> StoreResult<u64> {
        let generation: Option<u64> = redis::cmd("GET")
            .arg(self.keys.reconciled_generation())
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        Ok(generation.unwrap_or(0))
    }

    async fn set_reconciled_generation(&self, generation: u64) -> StoreResult<()> {
        self.scripts
            .raise
            .key(self.keys.reconciled_generation())
            .arg(generation)
            .invoke_async::<()>(&mut self.conn.clone())
            .await
            .map_err(classify)
    }
}
