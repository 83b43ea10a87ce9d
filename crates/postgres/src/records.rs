//! Live records as requests see them: get, write, delete, list, lookup.

use super::*;

const GET_LIVE: &str = concat!(
    "SELECT ",
    record_columns!(),
    " FROM records r ",
    "WHERE r.collection = $1 AND r.id = $2 AND ",
    live!("r", "$3")
);

const LOOKUP_LIVE: &str = concat!(
    "SELECT ",
    record_columns!(),
    " FROM record_index ri JOIN records r ON r.collection = ri.collection AND r.id = ri.record_id ",
    "WHERE ri.collection = $1 AND ri.index_name = $2 AND ri.value = $3 AND ",
    live!("r", "$4")
);

#[async_trait]
impl DurableRecords for PostgresStore {
    #[tracing::instrument(level = "debug", skip_all, fields(collection = %key.collection, id = %key.id))]
    async fn get(&self, key: &RecordKey, now: OffsetDateTime) -> StoreResult<Option<Record>> {
        let row = sqlx::query(GET_LIVE)
            .bind(key.collection.as_str())
            .bind(key.id.as_str())
            .bind(now)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        row.map(|row| record_from_row(&key.collection, &row))
            .transpose()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%collection, count = ids.len()))]
    async fn get_many(
        &self,
        collection: &CollectionName,
        ids: &[RecordId],
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Record>> {
        let rows = self
            .rows_by_ids(GET_MANY_LIVE, collection, ids, now)
            .await?;
        rows.iter()
            .map(|row| record_from_row(collection, row))
            .collect()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %write.key.collection, id = %write.key.id))]
    async fn put(&self, write: &RecordWrite) -> StoreResult<WriteOutcome> {
        let row = match &write.index_entries {
            None => Self::write_record(&self.pool, write).await?,
            Some(entries) => {
                let mut tx = self.pool.begin().await.map_err(classify)?;
                let row = Self::write_record(&mut *tx, write).await?;
                if row.is_some() {
                    Self::claim_index_entries(&mut tx, &write.key, write.now, entries).await?;
                    tx.commit().await.map_err(classify)?;
                }
                row
            }
        };
        let row = row.ok_or(StoreError::PreconditionFailed)?;
        Self::outcome(write, &row)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %key.collection, id = %key.id))]
    async fn delete(
        &self,
        key: &RecordKey,
        precondition: Precondition,
        now: OffsetDateTime,
    ) -> StoreResult<Version> {
        let expected = match precondition {
            Precondition::IfMatch(v) => Some(v.to_i64()?),
            Precondition::None | Precondition::Exists => None,
            // "Only if it does not exist": there is nothing to delete either way.
            Precondition::Absent => {
                return match self.get(key, now).await? {
                    Some(_) => Err(StoreError::PreconditionFailed),
                    None => Err(StoreError::NotFound),
                };
            }
        };
        let row = sqlx::query(DELETE_LIVE)
            .bind(key.collection.as_str())
            .bind(key.id.as_str())
            .bind(Version::next(None, now).to_i64()?)
            .bind(now)
            .bind(expected)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        if let Some(row) = row {
            return Ok(Version::from_i64(row.try_get("version").map_err(classify)?));
        }
        // Nothing deleted: tell "no such record" from "wrong version".
        match (precondition, self.get(key, now).await?) {
            (Precondition::IfMatch(_), Some(_)) => Err(StoreError::PreconditionFailed),
            _ => Err(StoreError::NotFound),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %query.collection))]
    async fn list(&self, query: &ListQuery) -> StoreResult<ListPage> {
        let prefix = query.prefix.as_deref().unwrap_or("");
        let rows = sqlx::query(LIST_LIVE)
            .bind(query.collection.as_str())
            .bind(query.after.as_ref().map_or("", RecordId::as_str))
            .bind(prefix)
            .bind(prefix_upper_bound(prefix))
            .bind(query.now)
            .bind(i64::from(query.limit) + 1)
            .bind(i64::try_from(query.max_bytes).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        let mut page = PageBuilder::new(query);
        for row in &rows {
            let size: i32 = row.try_get("data_bytes").map_err(classify)?;
            if !page.offer(
                record_from_row(&query.collection, row)?,
                size.max(0) as usize,
            ) {
                break;
            }
        }
        Ok(page.finish())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%collection, %index))]
    async fn lookup(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Option<Record>> {
        let row = sqlx::query(LOOKUP_LIVE)
            .bind(collection.as_str())
            .bind(index.as_str())
            .bind(value)
            .bind(now)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        row.map(|row| record_from_row(collection, &row)).transpose()
    }
}

impl PostgresStore {
    async fn write_record<'e>(
        executor: impl PgExecutor<'e>,
        write: &RecordWrite,
    ) -> StoreResult<Option<PgRow>> {
        let version = Version::next(None, write.now).to_i64()?;
        // $7 is the precondition: "must be absent" for the upsert, the expected
        // version (or NULL for "any") for the update of a live record.
        enum Guard {
            Upsert { require_absent: bool },
            UpdateLive { expected: Option<i64> },
        }
        let guard = match write.precondition {
            Precondition::None => Guard::Upsert {
                require_absent: false,
            },
            Precondition::Absent => Guard::Upsert {
                require_absent: true,
            },
            Precondition::Exists => Guard::UpdateLive { expected: None },
            Precondition::IfMatch(v) => Guard::UpdateLive {
                expected: Some(v.to_i64()?),
            },
        };
        let sql = match guard {
            Guard::Upsert { .. } => UPSERT,
            Guard::UpdateLive { .. } => UPDATE_LIVE,
        };
        let query = sqlx::query(sql)
            .bind(write.key.collection.as_str())
            .bind(write.key.id.as_str())
            .bind(version)
            .bind(Json(&write.data))
            .bind(write.now)
            .bind(write.expires_at);
        let query = match guard {
            Guard::Upsert { require_absent } => query.bind(require_absent),
            Guard::UpdateLive { expected } => query.bind(expected),
        };
        query.fetch_optional(executor).await.map_err(classify)
    }

    fn outcome(write: &RecordWrite, row: &PgRow) -> StoreResult<WriteOutcome> {
        let version: i64 = row.try_get("version").map_err(classify)?;
        let created_version: i64 = row.try_get("created_version").map_err(classify)?;
        Ok(WriteOutcome {
            created: version == created_version,
            record: Record {
                collection: write.key.collection.clone(),
                id: write.key.id.clone(),
                version: Version::from_i64(version),
                data: write.data.clone(),
                created_at: row.try_get("created_at").map_err(classify)?,
                updated_at: row.try_get("updated_at").map_err(classify)?,
                expires_at: write.expires_at,
            },
        })
    }
}
