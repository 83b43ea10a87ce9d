//! Live records as requests see them: get, write, delete, list, lookup.

use super::*;

const GET_LIVE: &str = concat!(
    "SELECT ",
    row_columns!(),
    " FROM records WHERE collection = ?1 AND id = ?2 AND ",
    live!("?3")
);

/// A page, bounded in the query by count (?6, one beyond the page) and by
/// bytes (?7), as in the PostgreSQL tier: rows whose predecessors already
/// hold more than ?7 bytes are not read (the first two always are). Cut by
/// [`PageBuilder`] with the size in the last column.
const LIST_LIVE: &str = concat!(
    "SELECT ",
    row_columns!(),
    ", size FROM (SELECT ",
    row_columns!(),
    ", length(CAST(data AS BLOB)) AS size, ",
    "sum(length(CAST(data AS BLOB))) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) ",
    "- length(CAST(data AS BLOB)) AS before, ",
    "row_number() OVER (ORDER BY id) AS n ",
    "FROM records WHERE collection = ?1 AND id > ?2 AND id >= ?3 AND id < ?4 AND ",
    live!("?5"),
    " ORDER BY id LIMIT ?6) WHERE before <= ?7 OR n <= 2 ORDER BY id"
);

const LOOKUP_LIVE: &str = concat!(
    "SELECT r.id, r.version, r.data, r.created_at, r.updated_at, r.expires_at, r.deleted ",
    "FROM record_index ri JOIN records r ON r.collection = ri.collection AND r.id = ri.record_id ",
    "WHERE ri.collection = ?1 AND ri.index_name = ?2 AND ri.value = ?3 ",
    "AND NOT r.deleted AND (r.expires_at IS NULL OR r.expires_at > ?4)"
);

fn put_in(tx: &Connection, write: &RecordWrite) -> StoreResult<WriteOutcome> {
    let now = Micros::of(write.now).get();
    let current = Current::of(tx, &write.key)?;
    let live = current
        .as_ref()
        .filter(|row| row.is_live(now))
        .map(|row| Version::from_i64(row.version));
    if !write.precondition.admits(live) {
        return Err(StoreError::PreconditionFailed);
    }
    let clock = Version::next(None, write.now).to_i64()?;
    let version = current
        .as_ref()
        .map_or(clock, |row| clock.max(row.version + 1));
    let (created_version, created_at) = match &current {
        Some(row) if live.is_some() => (row.created_version, row.created_at),
        _ => (version, now),
    };
    let data = data_text(&write.data)?;
    NewRow {
        key: &write.key,
        version,
        created_version,
        data: &data,
        created_at,
        updated_at: now,
        expires_at: write.expires_at.map(|at| Micros::of(at).get()),
        deleted: false,
    }
    .write(tx)?;
    if let Some(entries) = &write.index_entries {
        claim_index_entries(tx, &write.key, write.now, entries)?;
    }
    Ok(WriteOutcome {
        created: version == created_version,
        record: Record {
            collection: write.key.collection.clone(),
            id: write.key.id.clone(),
            version: Version::from_i64(version),
            data: write.data.clone(),
            created_at: Micros::new(created_at).time(Tier::Durable)?,
            updated_at: Micros::new(now).time(Tier::Durable)?,
            expires_at: write.expires_at.map(Micros::truncate),
        },
    })
}

fn delete_in(
    tx: &Connection,
    key: &RecordKey,
    precondition: Precondition,
    at: OffsetDateTime,
) -> StoreResult<Version> {
    let now = Micros::of(at).get();
    let current = Current::of(tx, key)?;
    let Some(row) = current.filter(|row| row.is_live(now)) else {
        return Err(StoreError::NotFound);
    };
    if !precondition.admits(Some(Version::from_i64(row.version))) {
        return Err(StoreError::PreconditionFailed);
    }
    let version = Version::next(None, at).to_i64()?.max(row.version + 1);
    NewRow {
        key,
        version,
        created_version: row.created_version,
        data: "{}",
        created_at: row.created_at,
        updated_at: now,
        expires_at: None,
        deleted: true,
    }
    .write(tx)?;
    Ok(Version::from_i64(version))
}

#[async_trait]
impl DurableRecords for SqliteStore {
    #[tracing::instrument(level = "debug", skip_all, fields(collection = %key.collection, id = %key.id))]
    async fn get(&self, key: &RecordKey, now: OffsetDateTime) -> StoreResult<Option<Record>> {
        let key = key.clone();
        self.read(move |tx| {
            let rows = query_all(
                tx,
                GET_LIVE,
                params![
                    key.collection.as_str(),
                    key.id.as_str(),
                    Micros::of(now).get()
                ],
                StoredRow::read,
            )?;
            rows.into_iter()
                .next()
                .map(|row| row.into_record(&key.collection))
                .transpose()
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%collection, count = ids.len()))]
    async fn get_many(
        &self,
        collection: &CollectionName,
        ids: &[RecordId],
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Record>> {
        let (collection, ids) = (collection.clone(), ids.to_vec());
        self.read(move |tx| {
            let mut records = Vec::with_capacity(ids.len());
            for id in &ids {
                let rows = query_all(
                    tx,
                    GET_LIVE,
                    params![collection.as_str(), id.as_str(), Micros::of(now).get()],
                    StoredRow::read,
                )?;
                for row in rows {
                    records.push(row.into_record(&collection)?);
                }
            }
            Ok(records)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %write.key.collection, id = %write.key.id))]
    async fn put(&self, write: &RecordWrite) -> StoreResult<WriteOutcome> {
        let write = write.clone();
        self.write(move |tx| put_in(tx, &write)).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %key.collection, id = %key.id))]
    async fn delete(
        &self,
        key: &RecordKey,
        precondition: Precondition,
        now: OffsetDateTime,
    ) -> StoreResult<Version> {
        let key = key.clone();
        self.write(move |tx| delete_in(tx, &key, precondition, now))
            .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %query.collection))]
    async fn list(&self, query: &ListQuery) -> StoreResult<ListPage> {
        let query = query.clone();
        self.read(move |tx| {
            let prefix = query.prefix.as_deref().unwrap_or("");
            let rows = query_all(
                tx,
                LIST_LIVE,
                params![
                    query.collection.as_str(),
                    query.after.as_ref().map_or("", RecordId::as_str),
                    prefix,
                    prefix_upper_bound(prefix),
                    Micros::of(query.now).get(),
                    i64::from(query.limit) + 1,
                    i64::try_from(query.max_bytes).unwrap_or(i64::MAX),
                ],
                |row| Ok((StoredRow::read(row)?, row.get::<_, i64>(7)?)),
            )?;
            let mut page = PageBuilder::new(&query);
            for (row, size) in rows {
                if !page.offer(row.into_record(&query.collection)?, size.max(0) as usize) {
                    break;
                }
            }
            Ok(page.finish())
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%collection, %index))]
    async fn lookup(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Option<Record>> {
        let (collection, index, value) = (collection.clone(), index.clone(), value.to_owned());
        self.read(move |tx| {
            let rows = query_all(
                tx,
                LOOKUP_LIVE,
                params![
                    collection.as_str(),
                    index.as_str(),
                    value,
                    Micros::of(now).get()
                ],
                StoredRow::read,
            )?;
            rows.into_iter()
                .next()
                .map(|row| row.into_record(&collection))
                .transpose()
        })
        .await
    }
}
