//! Writes taken ahead of the durable tier, their replay and the dead letters.

use super::*;

fn stream_name(kind: JournalKind) -> &'static str {
    match kind {
        JournalKind::WriteBehind => "write_behind",
        JournalKind::Outage => "outage",
    }
}

#[async_trait]
impl CacheJournal for MemoryCache {
    async fn accept_write(&self, write: &CacheWrite) -> StoreResult<CacheWriteOutcome> {
        let mut state = self.lock();
        let current = state.copy(&write.key).cloned();
        // Cache-only, the cache is the truth: no entry means no record.
        if write.journal.is_some() && current.is_none() && !write.unknown_state_ok {
            return Ok(CacheWriteOutcome::UnknownState);
        }
        let live = current
            .as_ref()
            .and_then(|copy| copy.record.as_ref())
            .filter(|record| !record.is_expired(write.now));
        let current_version = current.as_ref().map(|copy| copy.version);
        if !write.precondition.admits(live.map(|record| record.version)) {
            return Ok(CacheWriteOutcome::Conflict {
                current: current_version,
            });
        }
        if matches!(write.change, WriteChange::Delete) && live.is_none() {
            return Ok(CacheWriteOutcome::NotFound);
        }
        for claim in &write.claims {
            if state.claim_held_elsewhere(&write.key.collection, claim, &write.key.id, write.now) {
                return Err(StoreError::UniqueViolation {
                    index: claim.index.to_string(),
                    value: claim.value.clone(),
                });
            }
        }
        let version = Version::next(current_version, write.now);
        let created_at = live.map_or(write.now, |record| record.created_at);
        let created = (current.is_some() || write.journal.is_none()) && live.is_none();
        let change = match &write.change {
            WriteChange::Put { data, expires_at } => Change::Put(Record {
                collection: write.key.collection.clone(),
                id: write.key.id.clone(),
                version,
                data: data.clone(),
                created_at,
                updated_at: write.now,
                expires_at: *expires_at,
            }),
            WriteChange::Delete => Change::Delete {
                key: write.key.clone(),
                version,
                at: write.now,
            },
        };
        let mut copy = Copy::of(&change);
        match write.journal {
            Some(kind) => {
                copy.pinned = Some(version);
                state.journal(kind).append(change);
            }
            None => match &write.change {
                WriteChange::Put { expires_at, .. } => {
                    copy.authoritative = true;
                    copy.expires = expires_at.and_then(instant_of);
                }
                WriteChange::Delete => copy.expires = deadline(write.deleted_marker_ttl),
            },
        }
        let expires = copy.expires;
        state.put_copy(&write.key, copy, self.bounds);
        if write.journal.is_none() {
            let held = current.map(|copy| copy.claims).unwrap_or_default();
            let claims: &[IndexEntry] = match write.change {
                WriteChange::Put { .. } => &write.claims,
                WriteChange::Delete => &[],
            };
            state.retake_claims(&write.key, &held, claims, expires);
        }
        Ok(CacheWriteOutcome::Written {
            version,
            created,
            created_at,
        })
    }

    async fn read_journal(
        &self,
        consumer: &str,
        max: usize,
        recover: Option<Duration>,
    ) -> StoreResult<Vec<JournalEntry>> {
        let mut state = self.lock();
        let mut entries = Vec::new();
        for kind in [JournalKind::Outage, JournalKind::WriteBehind] {
            let room = max.saturating_sub(entries.len());
            let read = state.journal(kind).read(consumer, room, recover);
            entries.extend(read.into_iter().map(|(seq, change)| JournalEntry {
                kind,
                position: position(stream_name(kind), seq),
                change,
            }));
        }
        Ok(entries)
    }

    async fn ack_journal(&self, acks: &[JournalAck]) -> StoreResult<()> {
        let mut state = self.lock();
        for ack in acks {
            let kind = JournalKind::ALL
                .into_iter()
                .find(|kind| stream_name(*kind) == ack.position.journal)
                .ok_or_else(|| internal(format!("unknown journal {:?}", ack.position.journal)))?;
            let Some(change) = state.journal(kind).ack(sequence(&ack.position)?) else {
                continue;
            };
            let key = change.key();
            let Some(copy) = state.copy(&key) else {
                continue;
            };
            // A newer journaled write pinned it again; its own replay unpins.
            if copy.pinned != Some(ack.version) {
                continue;
            }
            if ack.superseded {
                state.remove_copy(&key);
            } else {
                copy.pinned = None;
                copy.expires = deadline(ack.ttl);
            }
        }
        Ok(())
    }

    async fn set_aside(&self, refused: &[(JournalEntry, String)]) -> StoreResult<()> {
        for (entry, reason) in refused {
            {
                let mut state = self.lock();
                if state.dead_letters.len() as u64 >= hybridstore_core::MAX_DEAD_LETTERS {
                    state.dead_letters.pop_front();
                }
                state
                    .dead_letters
                    .push_back((entry.change.clone(), reason.clone()));
            }
            self.ack_journal(&[JournalAck::set_aside(entry)]).await?;
        }
        Ok(())
    }

    async fn dead_letters(&self) -> StoreResult<u64> {
        Ok(self.lock().dead_letters.len() as u64)
    }

    async fn pinned(&self, query: &ListQuery) -> StoreResult<Vec<Change>> {
        let state = self.lock();
        let prefix = query.prefix.as_deref().unwrap_or("");
        let upper = prefix_upper_bound(prefix);
        let Some(copies) = state.records.get(&query.collection) else {
            return Ok(Vec::new());
        };
        let lower = match query.after.as_ref().map(RecordId::as_str) {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        // Pinned copies never expire or get evicted; the walk is bounded by
        // the cache's size.
        Ok(copies
            .range::<str, _>((lower, Bound::Unbounded))
            .take_while(|(id, _)| id.as_str() < upper.as_str())
            .filter(|(_, copy)| copy.pinned.is_some())
            .take(query.limit as usize)
            .map(|(id, copy)| copy.state(&RecordKey::new(query.collection.clone(), id.clone())))
            .collect())
    }

    async fn journal_backlog(&self, kind: JournalKind) -> StoreResult<u64> {
        Ok(self.lock().journal(kind).len())
    }
}
