//! What the cache tier may lack or hold ahead of this one: the generation of writes around it, and held keys.

use super::*;

/// The cache generation (see `CacheLedger::cache_generation`): its own row
/// of the control table, the generation in `revision`.
const CACHE_GENERATION: &str = "SELECT revision FROM control WHERE name = 'cache'";

const BUMP_CACHE_GENERATION: &str = "INSERT INTO control AS c (name, revision, value, updated_at) \
    VALUES ('cache', 1, '{}', now()) ON CONFLICT (name) DO UPDATE \
    SET revision = c.revision + 1, updated_at = now() RETURNING revision";

/// Publishes held keys (see `CacheLedger::hold`); a key held already keeps
/// the higher version.
const HOLD: &str = "INSERT INTO held AS h (collection, id, version) \
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[]) \
    ON CONFLICT (collection, id) DO UPDATE \
    SET version = GREATEST(h.version, EXCLUDED.version), held_at = now()";

const HELD_ABOVE: &str = held_above!("h.id = ANY($2)");

const ANY_HELD_ABOVE: &str = concat!(
    "SELECT EXISTS (",
    held_above!("($2::text IS NULL OR h.id > $2) AND ($3::text IS NULL OR h.id <= $3)"),
    ")"
);

/// Forgets held keys `records` has caught up with, or held too long.
const RELEASE_HELD: &str = "DELETE FROM held h WHERE h.held_at < now() - $1::interval \
    OR EXISTS (SELECT 1 FROM records r WHERE r.collection = h.collection \
    AND r.id = h.id AND r.version >= h.version)";

#[async_trait]
impl CacheLedger for PostgresStore {
    async fn cache_generation(&self) -> StoreResult<u64> {
        let generation: Option<i64> = sqlx::query_scalar(CACHE_GENERATION)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        Ok(generation.map_or(0, |g| g.max(0) as u64))
    }

    async fn bump_cache_generation(&self) -> StoreResult<u64> {
        let generation: i64 = sqlx::query_scalar(BUMP_CACHE_GENERATION)
            .fetch_one(&self.pool)
            .await
            .map_err(classify)?;
        Ok(generation.max(0) as u64)
    }

    async fn hold(&self, held: &[(RecordKey, Version)]) -> StoreResult<()> {
        if held.is_empty() {
            return Ok(());
        }
        let mut collections = Vec::with_capacity(held.len());
        let mut ids = Vec::with_capacity(held.len());
        let mut versions = Vec::with_capacity(held.len());
        for (key, version) in held {
            collections.push(key.collection.as_str());
            ids.push(key.id.as_str());
            versions.push(version.to_i64()?);
        }
        sqlx::query(HOLD)
            .bind(&collections)
            .bind(&ids)
            .bind(&versions)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn held_above(
        &self,
        collection: &CollectionName,
        ids: &[RecordId],
    ) -> StoreResult<Vec<(RecordId, Version)>> {
        let names: Vec<&str> = ids.iter().map(RecordId::as_str).collect();
        let rows: Vec<(String, i64)> = sqlx::query_as(HELD_ABOVE)
            .bind(collection.as_str())
            .bind(&names)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, version)| {
                let id = ids.iter().find(|known| known.as_str() == id)?;
                Some((id.clone(), Version::new(version.max(0) as u64)))
            })
            .collect())
    }

    async fn any_held_above(
        &self,
        collection: &CollectionName,
        after: Option<&RecordId>,
        until: Option<&RecordId>,
    ) -> StoreResult<bool> {
        sqlx::query_scalar(ANY_HELD_ABOVE)
            .bind(collection.as_str())
            .bind(after.map(RecordId::as_str))
            .bind(until.map(RecordId::as_str))
            .fetch_one(&self.pool)
            .await
            .map_err(classify)
    }

    async fn release_held(&self, stale: Option<Duration>) -> StoreResult<u64> {
        let stale = stale
            .map(sqlx::postgres::types::PgInterval::try_from)
            .transpose()
            .map_err(|err| StoreError::internal(Tier::Durable, err))?;
        let released = sqlx::query(RELEASE_HELD)
            .bind(stale)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(released.rows_affected())
    }
}
