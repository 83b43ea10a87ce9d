//! Every stored state, deletion markers included: replay, sync, export and import, purge.

use super::*;

/// A row of [`SCAN_STATES`] or [`GET_STATES`]: the record, or its deletion.
fn state_from_row(collection: &CollectionName, row: &PgRow) -> StoreResult<Change> {
    let record = record_from_row(collection, row)?;
    if row.try_get("deleted").map_err(classify)? {
        Ok(Change::Delete {
            key: record.key(),
            version: record.version,
            at: record.updated_at,
        })
    } else {
        Ok(Change::Put(record))
    }
}

/// Live records and tombstones (not expired ones): `$3` after, ordered by id.
const SCAN_STATES: &str = concat!(
    "SELECT ",
    record_columns!(),
    ", r.deleted FROM records r ",
    "WHERE r.collection = $1 AND r.id > $2 AND (r.expires_at IS NULL OR r.expires_at > $3) ",
    "ORDER BY r.id LIMIT $4"
);

const GET_STATES: &str = concat!(
    "SELECT ",
    record_columns!(),
    ", r.deleted FROM records r ",
    "WHERE r.collection = $1 AND r.id = ANY($2) AND (r.expires_at IS NULL OR r.expires_at > $3)"
);

const PURGE_COUNTERS: &str = "DELETE FROM counters WHERE ctid IN (\
    SELECT ctid FROM counters WHERE expires_at <= $1 LIMIT $2)";

const PURGE_RECORDS: &str = "DELETE FROM records WHERE ctid IN (\
    SELECT ctid FROM records WHERE expires_at <= $1 \
    UNION ALL SELECT ctid FROM records WHERE deleted AND updated_at <= $2 \
    LIMIT $3)";

#[async_trait]
impl DurableStates for PostgresStore {
    #[tracing::instrument(level = "debug", skip_all, fields(count = changes.len()))]
    async fn apply_changes(&self, changes: &[Change], mode: ApplyMode) -> StoreResult<Vec<bool>> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        // One row per record: a statement may not update a row twice, and
        // of two changes of one record only the newest can win anyway.
        let mut newest: HashMap<RecordKey, usize> = HashMap::new();
        for (at, change) in changes.iter().enumerate() {
            let held = newest.entry(change.key()).or_insert(at);
            if changes[*held].version() < change.version() {
                *held = at;
            }
        }
        let mut columns = ApplyColumns::with_capacity(newest.len());
        for &at in newest.values() {
            columns.push(&changes[at])?;
        }
        let rows = sqlx::query(APPLY_CHANGES)
            .bind(&columns.collection)
            .bind(&columns.id)
            .bind(&columns.version)
            .bind(&columns.data)
            .bind(&columns.created_at)
            .bind(&columns.updated_at)
            .bind(&columns.expires_at)
            .bind(&columns.deleted)
            .bind(mode == ApplyMode::Force)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        let mut written = HashSet::with_capacity(rows.len());
        for row in &rows {
            let collection: String = row.try_get("collection").map_err(classify)?;
            let id: String = row.try_get("id").map_err(classify)?;
            written.insert((collection, id));
        }
        Ok(changes
            .iter()
            .enumerate()
            .map(|(at, change)| {
                let key = change.key();
                newest.get(&key) == Some(&at)
                    && written.contains(&(key.collection.to_string(), key.id.to_string()))
            })
            .collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%collection, limit))]
    async fn scan(
        &self,
        collection: &CollectionName,
        after: Option<&RecordId>,
        limit: usize,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Change>> {
        let rows = sqlx::query(SCAN_STATES)
            .bind(collection.as_str())
            .bind(after.map_or("", RecordId::as_str))
            .bind(now)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        rows.iter()
            .map(|row| state_from_row(collection, row))
            .collect()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%collection, count = ids.len()))]
    async fn get_states(
        &self,
        collection: &CollectionName,
        ids: &[RecordId],
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Change>> {
        let rows = self.rows_by_ids(GET_STATES, collection, ids, now).await?;
        rows.iter()
            .map(|row| state_from_row(collection, row))
            .collect()
    }

    async fn count(&self, collection: &CollectionName) -> StoreResult<u64> {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM records WHERE collection = $1")
            .bind(collection.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(classify)?;
        Ok(count.max(0) as u64)
    }

    async fn set_index_entries(
        &self,
        key: &RecordKey,
        entries: &[IndexEntry],
        now: OffsetDateTime,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        Self::claim_index_entries(&mut tx, key, now, entries).await?;
        tx.commit().await.map_err(classify)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn purge_expired(
        &self,
        now: OffsetDateTime,
        tombstone_retention: Duration,
    ) -> StoreResult<u64> {
        let tombstones_before = now - tombstone_retention;
        let mut purged = 0;
        loop {
            let done = sqlx::query(PURGE_RECORDS)
                .bind(now)
                .bind(tombstones_before)
                .bind(hybridstore_core::PURGE_BATCH as i64)
                .execute(&self.pool)
                .await
                .map_err(classify)?
                .rows_affected();
            purged += done;
            if done < hybridstore_core::PURGE_BATCH as u64 {
                break;
            }
        }
        loop {
            let done = sqlx::query(PURGE_COUNTERS)
                .bind(now)
                .bind(hybridstore_core::PURGE_BATCH as i64)
                .execute(&self.pool)
                .await
                .map_err(classify)?
                .rows_affected();
            purged += done;
            if done < hybridstore_core::PURGE_BATCH as u64 {
                break;
            }
        }
        sqlx::query("DELETE FROM counter_ops WHERE applied_at < $1")
            .bind(now - hybridstore_core::OP_ID_RETENTION)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(purged)
    }
}
