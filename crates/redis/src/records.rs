//! Record copies, deletion markers and lookup hints as requests use them, and lists of a cache-only collection.

use super::*;

/// The fields a read takes from a record hash (`p`, the pin, is internal).
/// Records a list fetches at once (see `list`).
const LIST_CHUNK: usize = 16;

fn hmget_entry(pipe: &mut redis::Pipeline, key: String) {
    pipe.cmd("HMGET").arg(key).arg(&RECORD_FIELDS[..]);
}

#[async_trait]
impl CacheRecords for RedisStore {
    #[tracing::instrument(level = "debug", skip_all, fields(collection = %key.collection, id = %key.id))]
    async fn get(&self, key: &RecordKey) -> StoreResult<CacheEntry> {
        let raw: RawEntry = redis::cmd("HMGET")
            .arg(self.keys.record(key))
            .arg(&RECORD_FIELDS[..])
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        decode_entry(key, raw)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(count = keys.len()))]
    async fn get_many(&self, keys: &[RecordKey]) -> StoreResult<Vec<CacheEntry>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            hmget_entry(&mut pipe, self.keys.record(key));
        }
        let raw: Vec<RawEntry> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        keys.iter()
            .zip(raw)
            .map(|(key, raw)| decode_entry(key, raw))
            .collect()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %record.collection, id = %record.id, version = %record.version))]
    async fn store(&self, record: &Record, ttl: Duration) -> StoreResult<bool> {
        self.store_copy(&record.key(), record.version, Some(record), ttl)
            .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(collection = %key.collection, id = %key.id, %version))]
    async fn store_deleted(
        &self,
        key: &RecordKey,
        version: Version,
        ttl: Duration,
    ) -> StoreResult<bool> {
        self.store_copy(key, version, None, ttl).await
    }

    async fn invalidate(&self, keys: &[RecordKey]) -> StoreResult<()> {
        let keys: Vec<String> = keys.iter().map(|key| self.keys.record(key)).collect();
        self.unlink_unpinned(keys, false).await.map(drop)
    }

    async fn invalidate_older(&self, key: &RecordKey, version: Version) -> StoreResult<bool> {
        let removed: i64 = self
            .scripts
            .unlink_older
            .key(self.keys.record(key))
            .key(self.keys.pinned_of(key))
            .arg(version.to_padded())
            .arg(key.id.as_str())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        Ok(removed == 1)
    }

    async fn lookup_hint(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
    ) -> StoreResult<Option<RecordId>> {
        let id: Option<String> = redis::cmd("GET")
            .arg(self.keys.lookup_hint(collection, index, value))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        // A claim (cache-only) holds its owner's record key, a hint the id.
        // A hint that is not a valid id is ignored, as any stale hint would be.
        Ok(id.and_then(|id| {
            self.keys
                .record_id_in(collection, &id)
                .or_else(|| RecordId::parse(&id).ok())
        }))
    }

    async fn store_lookup_hint(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
        id: &RecordId,
        ttl: Duration,
    ) -> StoreResult<()> {
        redis::cmd("SET")
            .arg(self.keys.lookup_hint(collection, index, value))
            .arg(id.as_str())
            .arg("PX")
            .arg(ttl_millis(ttl))
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(classify)
    }

    async fn claim(
        &self,
        key: &RecordKey,
        claims: &[IndexEntry],
        now: OffsetDateTime,
    ) -> StoreResult<()> {
        let mut invocation = self.scripts.claim.key(self.keys.record(key));
        for claim in claims {
            invocation.key(
                self.keys
                    .lookup_hint(&key.collection, &claim.index, &claim.value),
            );
        }
        invocation.arg(Micros::of(now).get());
        for claim in claims {
            invocation.arg(claim.index.as_str()).arg(&claim.value);
        }
        let reply: Vec<String> = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        match reply.first().map(String::as_str) {
            Some("ok" | "gone") => Ok(()),
            Some("taken") => Err(StoreError::UniqueViolation {
                index: reply.get(1).cloned().unwrap_or_default(),
                value: reply.get(2).cloned().unwrap_or_default(),
            }),
            other => Err(corrupt(format!("claim answered {other:?}"))),
        }
    }

    async fn list(&self, query: &ListQuery) -> StoreResult<ListPage> {
        let keys = self
            .ids_in_range(query, |shard| self.keys.ids(shard, &query.collection))
            .await?;
        let mut page = PageBuilder::new(query);
        // Fetched a few at a time: a page of large records stops at its
        // byte bound, not after `limit` of them were read. Ids of expired
        // records linger in the sets; they are skipped here.
        'fetch: for chunk in keys.chunks(LIST_CHUNK) {
            for entry in self.get_many(chunk).await? {
                if let CacheEntry::Present(record) = entry
                    && !record.is_expired(query.now)
                {
                    let size = json_size(&record.data);
                    if !page.offer(record, size) {
                        break 'fetch;
                    }
                }
            }
        }
        Ok(page.finish())
    }
}

impl RedisStore {
    async fn store_copy(
        &self,
        key: &RecordKey,
        version: Version,
        record: Option<&Record>,
        ttl: Duration,
    ) -> StoreResult<bool> {
        let mut invocation = self.scripts.store_if_newer.key(self.keys.record(key));
        invocation.key(self.keys.pinned_of(key));
        invocation.arg(version.to_padded());
        copy_args(&mut invocation, record, OffsetDateTime::now_utc())?;
        let stored: i64 = invocation
            .arg(ttl_millis(ttl))
            .arg(key.id.as_str())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        Ok(stored == 1)
    }
}
