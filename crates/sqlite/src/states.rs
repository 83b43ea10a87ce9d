//! Every stored state, deletion markers included: replay, sync, export and import, purge.

use super::*;

const GET_STATE: &str = concat!(
    "SELECT ",
    row_columns!(),
    " FROM records WHERE collection = ?1 AND id = ?2 AND (expires_at IS NULL OR expires_at > ?3)"
);

const SCAN_STATES: &str = concat!(
    "SELECT ",
    row_columns!(),
    " FROM records WHERE collection = ?1 AND id > ?2 AND (expires_at IS NULL OR expires_at > ?3) ",
    "ORDER BY id LIMIT ?4"
);

const PURGE_RECORDS: &str = "DELETE FROM records WHERE (collection, id) IN (\
    SELECT collection, id FROM records WHERE expires_at <= ?1 \
    UNION ALL SELECT collection, id FROM records WHERE deleted AND updated_at <= ?2 LIMIT ?3)";

/// Applies one change carried over from the cache tier; whether it was.
fn apply_in(tx: &Connection, change: &Change, force: bool) -> StoreResult<bool> {
    let key = change.key();
    let version = change.version().to_i64()?;
    let current = Current::of(tx, &key)?;
    if !force && current.as_ref().is_some_and(|row| row.version >= version) {
        return Ok(false);
    }
    let row = match change {
        Change::Put(record) => {
            let updated_at = Micros::of(record.updated_at).get();
            let kept = current.as_ref().filter(|row| row.is_live(updated_at));
            let data = data_text(&record.data)?;
            return NewRow {
                key: &key,
                version,
                created_version: kept.map_or(version, |row| row.created_version),
                data: &data,
                created_at: kept.map_or(Micros::of(record.created_at).get(), |row| row.created_at),
                updated_at,
                expires_at: record.expires_at.map(|at| Micros::of(at).get()),
                deleted: false,
            }
            .write(tx)
            .map(|()| true);
        }
        Change::Delete { at, .. } => NewRow {
            key: &key,
            version,
            created_version: current.as_ref().map_or(version, |row| row.created_version),
            data: "{}",
            created_at: current
                .as_ref()
                .map_or(Micros::of(*at).get(), |row| row.created_at),
            updated_at: Micros::of(*at).get(),
            expires_at: None,
            deleted: true,
        },
    };
    row.write(tx).map(|()| true)
}

#[async_trait]
impl DurableStates for SqliteStore {
    #[tracing::instrument(level = "debug", skip_all, fields(count = changes.len()))]
    async fn apply_changes(&self, changes: &[Change], mode: ApplyMode) -> StoreResult<Vec<bool>> {
        let changes = changes.to_vec();
        let force = mode == ApplyMode::Force;
        self.write(move |tx| {
            changes
                .iter()
                .map(|change| apply_in(tx, change, force))
                .collect()
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%collection, limit))]
    async fn scan(
        &self,
        collection: &CollectionName,
        after: Option<&RecordId>,
        limit: usize,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Change>> {
        let (collection, after) = (collection.clone(), after.cloned());
        self.read(move |tx| {
            let rows = query_all(
                tx,
                SCAN_STATES,
                params![
                    collection.as_str(),
                    after.as_ref().map_or("", RecordId::as_str),
                    Micros::of(now).get(),
                    i64::try_from(limit).unwrap_or(i64::MAX),
                ],
                StoredRow::read,
            )?;
            rows.into_iter()
                .map(|row| row.into_change(&collection))
                .collect()
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%collection, count = ids.len()))]
    async fn get_states(
        &self,
        collection: &CollectionName,
        ids: &[RecordId],
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Change>> {
        let (collection, ids) = (collection.clone(), ids.to_vec());
        self.read(move |tx| {
            let mut states = Vec::with_capacity(ids.len());
            for id in &ids {
                let rows = query_all(
                    tx,
                    GET_STATE,
                    params![collection.as_str(), id.as_str(), Micros::of(now).get()],
                    StoredRow::read,
                )?;
                for row in rows {
                    states.push(row.into_change(&collection)?);
                }
            }
            Ok(states)
        })
        .await
    }

    async fn count(&self, collection: &CollectionName) -> StoreResult<u64> {
        let collection = collection.clone();
        self.read(move |tx| {
            tx.query_row(
                "SELECT count(*) FROM records WHERE collection = ?1",
                [collection.as_str()],
                |row| row.get::<_, i64>(0),
            )
            .map(|count| count.max(0) as u64)
            .map_err(classify)
        })
        .await
    }

    async fn set_index_entries(
        &self,
        key: &RecordKey,
        entries: &[IndexEntry],
        now: OffsetDateTime,
    ) -> StoreResult<()> {
        let (key, entries) = (key.clone(), entries.to_vec());
        self.write(move |tx| claim_index_entries(tx, &key, now, &entries))
            .await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn purge_expired(
        &self,
        now: OffsetDateTime,
        tombstone_retention: Duration,
    ) -> StoreResult<u64> {
        let (now, tombstones_before) = (
            Micros::of(now).get(),
            Micros::of(now - tombstone_retention).get(),
        );
        let ops_before =
            Micros::of(OffsetDateTime::now_utc() - hybridstore_core::OP_ID_RETENTION).get();
        let mut purged = 0;
        // Batches: the writer is not held for long at a time.
        loop {
            let done = self
                .write(move |tx| {
                    tx.execute(
                        PURGE_RECORDS,
                        params![now, tombstones_before, hybridstore_core::PURGE_BATCH as i64],
                    )
                    .map_err(classify)
                })
                .await?;
            purged += done as u64;
            if (done as usize) < hybridstore_core::PURGE_BATCH {
                break;
            }
        }
        purged += self
            .write(move |tx| {
                let counters = tx
                    .execute("DELETE FROM counters WHERE expires_at <= ?1", [now])
                    .map_err(classify)?;
                tx.execute(
                    "DELETE FROM counter_ops WHERE applied_at < ?1",
                    [ops_before],
                )
                .map_err(classify)?;
                Ok(counters as u64)
            })
            .await?;
        Ok(purged)
    }
}
