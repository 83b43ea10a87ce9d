//! Record copies, deletion markers and lookup hints as requests use them, and lists of a cache-only collection.

use super::*;

#[async_trait]
impl CacheRecords for MemoryCache {
    async fn get(&self, key: &RecordKey) -> StoreResult<CacheEntry> {
        Ok(self
            .lock()
            .copy(key)
            .map_or(CacheEntry::Miss, |copy| copy.entry()))
    }

    async fn get_many(&self, keys: &[RecordKey]) -> StoreResult<Vec<CacheEntry>> {
        let mut state = self.lock();
        Ok(keys
            .iter()
            .map(|key| {
                state
                    .copy(key)
                    .map_or(CacheEntry::Miss, |copy| copy.entry())
            })
            .collect())
    }

    async fn store(&self, record: &Record, ttl: Duration) -> StoreResult<bool> {
        let copy = Copy::of(&Change::Put(record.clone()));
        Ok(self.store_copy(&record.key(), copy, ttl))
    }

    async fn store_deleted(
        &self,
        key: &RecordKey,
        version: Version,
        ttl: Duration,
    ) -> StoreResult<bool> {
        let copy = Copy::of(&Change::Delete {
            key: key.clone(),
            version,
            at: OffsetDateTime::now_utc(),
        });
        Ok(self.store_copy(key, copy, ttl))
    }

    async fn invalidate(&self, keys: &[RecordKey]) -> StoreResult<()> {
        let mut state = self.lock();
        for key in keys {
            if state.copy(key).is_some_and(|copy| copy.is_plain()) {
                state.remove_copy(key);
            }
        }
        Ok(())
    }

    async fn invalidate_older(&self, key: &RecordKey, version: Version) -> StoreResult<bool> {
        let mut state = self.lock();
        let older = state
            .copy(key)
            .is_some_and(|copy| copy.version < version && !copy.authoritative);
        if older {
            state.remove_copy(key);
        }
        Ok(older)
    }

    async fn lookup_hint(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
    ) -> StoreResult<Option<RecordId>> {
        let key = (collection.clone(), index.clone(), value.to_owned());
        let state = self.lock();
        Ok(state
            .hints
            .get(&key)
            .filter(|(_, expires)| !expired(*expires, Instant::now()))
            .map(|(id, _)| id.clone()))
    }

    async fn store_lookup_hint(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
        id: &RecordId,
        ttl: Duration,
    ) -> StoreResult<()> {
        let key = (collection.clone(), index.clone(), value.to_owned());
        self.lock().hints.insert(key, (id.clone(), deadline(ttl)));
        Ok(())
    }

    async fn claim(
        &self,
        key: &RecordKey,
        claims: &[IndexEntry],
        now: OffsetDateTime,
    ) -> StoreResult<()> {
        let mut state = self.lock();
        let Some(copy) = state.copy(key) else {
            return Ok(());
        };
        if copy
            .record
            .as_ref()
            .is_none_or(|record| record.is_expired(now))
        {
            return Ok(());
        }
        let (held, expires) = (copy.claims.clone(), copy.expires);
        for claim in claims {
            if state.claim_held_elsewhere(&key.collection, claim, &key.id, now) {
                return Err(StoreError::UniqueViolation {
                    index: claim.index.to_string(),
                    value: claim.value.clone(),
                });
            }
        }
        state.retake_claims(key, &held, claims, expires);
        Ok(())
    }

    async fn list(&self, query: &ListQuery) -> StoreResult<ListPage> {
        let mut state = self.lock();
        let prefix = query.prefix.as_deref().unwrap_or("");
        let upper = prefix_upper_bound(prefix);
        let now = Instant::now();
        let Some(copies) = state.records.get_mut(&query.collection) else {
            return Ok(ListPage::default());
        };
        // Ids after the cursor and within the prefix, straight from the ordered map.
        let lower = match query.after.as_ref().map(RecordId::as_str) {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        let mut page = PageBuilder::new(query);
        for record in copies
            .range::<str, _>((lower, Bound::Unbounded))
            .take_while(|(id, _)| id.as_str() < upper.as_str())
            .filter(|(_, copy)| copy.authoritative && !expired(copy.expires, now))
            .filter_map(|(_, copy)| copy.record.as_ref())
            .filter(|record| !record.is_expired(query.now))
        {
            let size = json_size(&record.data);
            if !page.offer(record.clone(), size) {
                break;
            }
        }
        Ok(page.finish())
    }
}

impl MemoryCache {
    fn store_copy(&self, key: &RecordKey, copy: Copy, ttl: Duration) -> bool {
        let mut state = self.lock();
        if state
            .copy(key)
            .is_some_and(|current| current.version >= copy.version)
        {
            return false;
        }
        let copy = Copy {
            expires: deadline(ttl),
            ..copy
        };
        state.put_copy(key, copy, self.bounds);
        true
    }
}
