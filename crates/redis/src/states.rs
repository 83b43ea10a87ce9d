//! What the cache holds, pins included: scans, states and copies carried in by sync and repair.

use super::*;

/// A scanned hash as the state it holds (`None`: gone meanwhile).
fn decode_scanned(key: RecordKey, raw: RawScanned) -> StoreResult<Option<CachedState>> {
    let (version, data, created, updated, expires, pin, authoritative) = raw;
    let state = match decode_entry(&key, (version, data, created, updated, expires))? {
        CacheEntry::Miss => return Ok(None),
        CacheEntry::Present(record) => Change::Put(record),
        CacheEntry::Deleted(version) => Change::Delete {
            key,
            version,
            at: Micros::new(updated.unwrap_or_default()).time(Tier::Cache)?,
        },
    };
    Ok(Some(CachedState {
        state,
        pinned: pin.is_some(),
        authoritative: authoritative.is_some(),
    }))
}

#[async_trait]
impl CacheStates for RedisStore {
    #[tracing::instrument(level = "debug", skip_all, fields(%collection, cursor))]
    async fn scan(
        &self,
        collection: &CollectionName,
        cursor: u64,
        count: usize,
    ) -> StoreResult<(u64, Vec<CachedState>)> {
        let mut conn = self.conn.clone();
        let pattern = self.keys.record_pattern(collection);
        let (next, keys) = scan_step(&mut conn, cursor, &pattern, count).await?;
        let record_keys: Vec<RecordKey> = keys
            .iter()
            .filter_map(|key| self.keys.record_id(key, collection))
            .filter_map(|id| RecordId::parse(id).ok())
            .map(|id| RecordKey::new(collection.clone(), id))
            .collect();
        if record_keys.is_empty() {
            return Ok((next, Vec::new()));
        }
        let mut pipe = redis::pipe();
        for key in &record_keys {
            pipe.cmd("HMGET")
                .arg(self.keys.record(key))
                .arg(&SCAN_FIELDS[..]);
        }
        let raw: Vec<RawScanned> = pipe.query_async(&mut conn).await.map_err(classify)?;
        let mut states = Vec::with_capacity(raw.len());
        for (key, raw) in record_keys.into_iter().zip(raw) {
            if let Some(state) = decode_scanned(key, raw)? {
                states.push(state);
            }
        }
        Ok((next, states))
    }

    async fn get_states(&self, keys: &[RecordKey]) -> StoreResult<Vec<Option<CachedState>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("HMGET")
                .arg(self.keys.record(key))
                .arg(&SCAN_FIELDS[..]);
        }
        let raw: Vec<RawScanned> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        keys.iter()
            .zip(raw)
            .map(|(key, raw)| decode_scanned(key.clone(), raw))
            .collect()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(version = %state.version()))]
    async fn copy_in(
        &self,
        state: &Change,
        lifetime: Duration,
        authoritative: bool,
        force: bool,
    ) -> StoreResult<CopyOutcome> {
        let key = state.key();
        let mut invocation = self.scripts.copy_in.key(self.keys.record(&key));
        invocation
            .key(self.keys.ids_of(&key))
            .arg(state.version().to_padded());
        match state {
            Change::Put(record) => copy_args(&mut invocation, Some(record), record.updated_at)?,
            Change::Delete { at, .. } => copy_args(&mut invocation, None, *at)?,
        }
        let outcome: String = invocation
            .arg(ttl_millis(lifetime))
            .arg(if authoritative { "1" } else { "0" })
            .arg(if force { "1" } else { "0" })
            .arg(key.id.as_str())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        match outcome.as_str() {
            "written" => Ok(CopyOutcome::Written),
            "kept" => Ok(CopyOutcome::Kept),
            "pinned" => Ok(CopyOutcome::Pinned),
            other => Err(corrupt(format!("copy_in answered {other:?}"))),
        }
    }
}
