//! What the cache tier may lack or hold ahead of this one: the generation of writes around it, and held keys.

use super::*;

#[async_trait]
impl CacheLedger for SqliteStore {
    async fn cache_generation(&self) -> StoreResult<u64> {
        self.read(|tx| {
            tx.query_row(
                "SELECT revision FROM control WHERE name = 'cache'",
                [],
                |row| row.get::<_, i64>(0),
            )
            .optional()
            .map(|generation| generation.map_or(0, |g| g.max(0) as u64))
            .map_err(classify)
        })
        .await
    }

    async fn bump_cache_generation(&self) -> StoreResult<u64> {
        let now = Micros::of(OffsetDateTime::now_utc()).get();
        self.write(move |tx| {
            tx.query_row(
                "INSERT INTO control (name, revision, value, updated_at) VALUES ('cache', 1, '{}', ?1) \
                 ON CONFLICT (name) DO UPDATE SET revision = control.revision + 1, updated_at = ?1 \
                 RETURNING revision",
                params![now],
                |row| row.get::<_, i64>(0),
            )
            .map(|generation| generation.max(0) as u64)
            .map_err(classify)
        })
        .await
    }

    // A SQLite file serves one process (embedded mode), which remembers the
    // keys it journaled itself: there is no other instance to tell.
    async fn hold(&self, _held: &[(RecordKey, Version)]) -> StoreResult<()> {
        Ok(())
    }

    async fn held_above(
        &self,
        _collection: &CollectionName,
        _ids: &[RecordId],
    ) -> StoreResult<Vec<(RecordId, Version)>> {
        Ok(Vec::new())
    }

    async fn any_held_above(
        &self,
        _collection: &CollectionName,
        _after: Option<&RecordId>,
        _until: Option<&RecordId>,
    ) -> StoreResult<bool> {
        Ok(false)
    }

    async fn release_held(&self, _stale: Option<Duration>) -> StoreResult<u64> {
        Ok(0)
    }
}
