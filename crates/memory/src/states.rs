//! What the cache holds, pins included: scans, states and copies carried in by sync and repair.

use super::*;

/// Open scan cursors kept (an abandoned scan's cursor is dropped eventually).
const MAX_SCAN_CURSORS: usize = 4096;

#[async_trait]
impl CacheStates for MemoryCache {
    async fn scan(
        &self,
        collection: &CollectionName,
        cursor: u64,
        count: usize,
    ) -> StoreResult<(u64, Vec<CachedState>)> {
        let mut state = self.lock();
        let after = match cursor {
            0 => None,
            token => Some(
                state
                    .scan_cursors
                    .remove(&token)
                    .ok_or_else(|| internal(format!("unknown scan cursor {token}")))?,
            ),
        };
        let now = Instant::now();
        let count = count.max(1);
        let page: Vec<CachedState> = match state.records.get(collection) {
            None => Vec::new(),
            Some(copies) => {
                let from = after.as_ref().map_or(Bound::Unbounded, Bound::Excluded);
                copies
                    .range::<RecordId, _>((from, Bound::Unbounded))
                    .filter(|(_, copy)| !expired(copy.expires, now))
                    .take(count)
                    .map(|(id, copy)| CachedState {
                        state: copy.state(&RecordKey::new(collection.clone(), id.clone())),
                        pinned: copy.pinned.is_some(),
                        authoritative: copy.authoritative,
                    })
                    .collect()
            }
        };
        if page.len() < count {
            return Ok((0, page));
        }
        state.next_cursor += 1;
        let token = state.next_cursor;
        let last = page.last().map(|s| s.state.key().id).expect("a full page");
        state.scan_cursors.insert(token, last);
        if state.scan_cursors.len() > MAX_SCAN_CURSORS {
            state.scan_cursors.pop_first();
        }
        Ok((token, page))
    }

    async fn get_states(&self, keys: &[RecordKey]) -> StoreResult<Vec<Option<CachedState>>> {
        let mut state = self.lock();
        Ok(keys
            .iter()
            .map(|key| {
                state.copy(key).map(|copy| CachedState {
                    state: copy.state(key),
                    pinned: copy.pinned.is_some(),
                    authoritative: copy.authoritative,
                })
            })
            .collect())
    }

    async fn copy_in(
        &self,
        change: &Change,
        lifetime: Duration,
        authoritative: bool,
        force: bool,
    ) -> StoreResult<CopyOutcome> {
        let key = change.key();
        let mut state = self.lock();
        if let Some(current) = state.copy(&key) {
            if current.pinned.is_some() {
                return Ok(CopyOutcome::Pinned);
            }
            let deletion = matches!(change, Change::Delete { .. });
            let adopt = authoritative
                && !deletion
                && current.version == change.version()
                && !current.authoritative;
            if current.version >= change.version() && !force && !adopt {
                return Ok(CopyOutcome::Kept);
            }
        }
        let mut copy = Copy::of(change);
        match change {
            Change::Put(record) if authoritative => {
                copy.authoritative = true;
                copy.expires = record.expires_at.and_then(instant_of);
            }
            _ => copy.expires = deadline(lifetime),
        }
        state.put_copy(&key, copy, self.bounds);
        Ok(CopyOutcome::Written)
    }
}
