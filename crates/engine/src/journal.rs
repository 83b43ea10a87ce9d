//! Writes through the cache's journal, and their replay into the durable tier.
//!
//! Two situations journal writes: a `cache_first` collection always does
//! (write-behind), and every collection that keeps cache copies does while the
//! durable tier is down (outage). Either way the cache tier checks the
//! precondition, assigns the version and appends the entry in one atomic step,
//! and the write is acknowledged only after that step.
//!
//! The replay loop reads entries through a consumer group (so several
//! instances share the work, and entries a crashed instance took are claimed
//! again), keeps the newest change per record, applies the batch to the durable
//! tier in one transaction guarded by version, and only then acknowledges the
//! entries. Applying an entry twice, or after a newer write, changes nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hybridstore_core::{
    ApplyMode, CacheEntry, CacheWrite, CacheWriteOutcome, Change, Error, IndexEntry, JournalAck,
    JournalEntry, JournalKind, Precondition, Record, RecordKey, RecordWrite, StoreError, Version,
    WriteChange, WriteOutcome,
};
use time::OffsetDateTime;

use crate::catalog::Collection;
use crate::engine::Engine;
use crate::guarded::Route;
use crate::strategy::WritePath;

/// How long a write guarded by a version it read itself (not by the
/// client) keeps reading again after concurrent writers got in between,
/// before it answers 503 (busy), never 412.
const GUARDED_RETRY_FOR: Duration = Duration::from_secs(2);

/// A short random pause before another attempt, so that writers racing on
/// one record stop meeting in lockstep.
async fn backoff(attempt: u32) {
    let nanos = u64::from(OffsetDateTime::now_utc().nanosecond());
    let ceiling = 200 * u64::from(attempt.min(10));
    tokio::time::sleep(Duration::from_micros(nanos % ceiling)).await;
}

/// How the replay loop works.
#[derive(Clone, Debug)]
pub struct JournalSettings {
    /// Size of a replay batch: each poll reads up to a quarter of it from
    /// every journal stream, and one durable-tier transaction applies the
    /// newest change per record of what the poll read.
    pub batch_size: usize,
    /// Entries another instance took but did not acknowledge for this long are
    /// taken over (that instance probably died).
    pub claim_idle: Duration,
    /// Pause between polls while the journal is empty.
    pub idle_interval: Duration,
}

impl Default for JournalSettings {
    fn default() -> Self {
        Self {
            batch_size: 500,
            claim_idle: Duration::from_secs(30),
            idle_interval: Duration::from_millis(100),
        }
    }
}

/// Replay counters since the process started (for status and metrics).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ReplayStats {
    /// Journal entries read and acknowledged.
    pub entries: u64,
    /// Changes applied to the durable tier (newest per record and batch).
    pub applied: u64,
    /// Changes the durable tier already had in that version or a newer one.
    pub superseded: u64,
}

/// The replay in progress: since when, and how much so far.
#[derive(Default)]
pub(crate) struct ReplayProgress {
    started: Option<std::time::Instant>,
    run: ReplayStats,
    total: ReplayStats,
}

/// Whether journaled writes of one kind may still wait to be replayed.
///
/// Set by every journaled write, cleared by the replay loop when the journal
/// is empty, but only if no write was journaled since the loop began to look:
/// otherwise a write landing between the length check and the clearing would
/// leave the flag down with its entry pending.
#[derive(Default)]
pub(crate) struct Backlog {
    /// (writes journaled so far, may entries wait)
    state: std::sync::Mutex<(u64, bool)>,
}

impl Backlog {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, bool)> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn pending(&self) -> bool {
        self.lock().1
    }

    pub(crate) fn mark(&self) {
        let mut state = self.lock();
        state.0 += 1;
        state.1 = true;
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.lock().0
    }

    /// Records the length seen; returns true when this cleared the flag.
    pub(crate) fn settle(&self, epoch: u64, length: u64) -> bool {
        let mut state = self.lock();
        if length > 0 {
            state.1 = true;
            false
        } else if state.0 == epoch && state.1 {
            state.1 = false;
            true
        } else {
            false
        }
    }
}

impl Engine {
    /// Which journal a write of `collection` through the cache goes to;
    /// `None` when the cache is its only tier.
    fn journal_kind(&self, collection: &Collection) -> Option<JournalKind> {
        match self.configured_plan(collection).write {
            WritePath::CacheOnly => None,
            WritePath::CacheJournaled => Some(JournalKind::WriteBehind),
            _ => Some(JournalKind::Outage),
        }
    }

    /// A cache failure on the journaled path: the write cannot be taken.
    pub(crate) fn journal_failed(&self, err: StoreError) -> Error {
        match err {
            StoreError::Internal { .. } => {
                Error::Internal(format!("{err} ({})", self.cache.backend()))
            }
            StoreError::Busy { maybe_applied, .. } => self.busy(maybe_applied),
            _ => self.unavailable(),
        }
    }

    /// Loads the durable tier's state of a record into the cache, so that the
    /// cache can check preconditions and continue the version sequence.
    async fn load_state(
        &self,
        collection: &Collection,
        key: &RecordKey,
        now: OffsetDateTime,
    ) -> Result<(), Error> {
        let current = self
            .durable
            .call(|t| t.get(key, now))
            .await
            .map_err(|err| self.durable_failed(err))?;
        let stored = match &current {
            Some(record) => {
                let ttl = record
                    .cache_lifetime(collection.spec.cache_ttl, now)
                    .unwrap_or(Duration::from_secs(1));
                self.cache.call(|t| t.store(record, ttl)).await
            }
            // "Known absent": a marker below every real version.
            None => {
                self.cache
                    .call(|t| {
                        t.store_deleted(key, Version::new(0), self.settings.deleted_marker_ttl)
                    })
                    .await
            }
        };
        stored.map(drop).map_err(|err| self.journal_failed(err))
    }

    /// Runs a journaled write, loading the record's state first if the cache
    /// knows nothing of it.
    async fn journal(
        &self,
        collection: &Collection,
        write: &mut CacheWrite,
    ) -> Result<CacheWriteOutcome, Error> {
        for _ in 0..3 {
            let outcome = self
                .cache
                .call(|t| t.accept_write(write))
                .await
                .map_err(|err| self.journal_failed(err))?;
            match outcome {
                CacheWriteOutcome::UnknownState => {
                    if self.durable.breaker.is_closed() {
                        self.load_state(collection, &write.key, write.now).await?;
                    } else if write.precondition == Precondition::None
                        && matches!(write.change, WriteChange::Put { .. })
                    {
                        // Nobody can say whether the record exists; an
                        // unconditional replace is right either way, and its
                        // clock-based version is above any the record had.
                        write.unknown_state_ok = true;
                    } else {
                        return Err(self.unavailable());
                    }
                }
                CacheWriteOutcome::Written { version, .. } => {
                    if let Some(kind) = write.journal {
                        self.backlog(kind).mark();
                        self.unreplayed.journaled(&write.key, version);
                    }
                    return Ok(outcome);
                }
                CacheWriteOutcome::Conflict { current } => {
                    return Err(Error::VersionConflict { current });
                }
                CacheWriteOutcome::NotFound => {
                    return Err(Error::NotFound("record not found".into()));
                }
            }
        }
        Err(self.unavailable())
    }

    /// A put through the journal. A collection with unique indexes can only
    /// be written this way (during an outage) if the write keeps every indexed
    /// value as it is: only the durable tier can check a new value. The check
    /// is made against the copy the write replaces, so the write is guarded
    /// by that copy's version; if a concurrent write got in between, a write
    /// without `If-Match` checks again rather than failing with 412, which is
    /// only ever the answer to a precondition the client gave.
    pub(crate) async fn put_journaled(
        &self,
        collection: &Collection,
        write: RecordWrite,
    ) -> Result<WriteOutcome, Error> {
        let mut journaled = CacheWrite {
            journal: self.journal_kind(collection),
            deleted_marker_ttl: self.settings.deleted_marker_ttl,
            key: write.key.clone(),
            change: WriteChange::Put {
                data: write.data,
                expires_at: write.expires_at,
            },
            precondition: write.precondition,
            now: write.now,
            unknown_state_ok: false,
        };
        let mut outcome = None;
        let started = std::time::Instant::now();
        for attempt in 0.. {
            if attempt > 0 {
                if started.elapsed() > GUARDED_RETRY_FOR {
                    break;
                }
                backoff(attempt).await;
            }
            if let Some(entries) = &write.index_entries {
                journaled.precondition = self
                    .index_guard(
                        collection,
                        &write.key,
                        entries,
                        write.precondition,
                        write.now,
                    )
                    .await?;
            }
            match self.journal(collection, &mut journaled).await {
                Err(Error::VersionConflict { .. })
                    if write.index_entries.is_some()
                        && !matches!(write.precondition, Precondition::IfMatch(_)) =>
                {
                    continue;
                }
                result => {
                    outcome = Some(result?);
                    break;
                }
            }
        }
        // Every attempt lost to a concurrent writer: busy, not a conflict.
        let outcome = outcome.ok_or_else(|| self.unavailable())?;
        // The data moves back out of the write rather than being copied.
        let WriteChange::Put { data, .. } = journaled.change else {
            unreachable!("built as a put above")
        };
        match outcome {
            CacheWriteOutcome::Written {
                version,
                created,
                created_at,
            } => Ok(WriteOutcome {
                created,
                record: Record {
                    collection: write.key.collection,
                    id: write.key.id,
                    version,
                    data,
                    created_at,
                    updated_at: write.now,
                    expires_at: write.expires_at,
                },
            }),
            other => Err(Error::Internal(format!(
                "unexpected journal outcome {other:?}"
            ))),
        }
    }

    /// For a journaled put in a collection with unique indexes: the
    /// precondition that makes it safe. The copy it replaces must be cached
    /// and carry the same indexed values; the write is then guarded by that
    /// copy's version. A client's own precondition is checked here.
    async fn index_guard(
        &self,
        collection: &Collection,
        key: &RecordKey,
        entries: &[IndexEntry],
        asked: Precondition,
        now: OffsetDateTime,
    ) -> Result<Precondition, Error> {
        let current = match self.cache.call(|t| t.get(key)).await {
            Ok(CacheEntry::Present(record)) if !record.is_expired(now) => record,
            _ => return Err(self.unavailable()),
        };
        if collection.index_entries(&current.data)?.as_deref() != Some(entries) {
            return Err(self.unavailable());
        }
        match asked {
            Precondition::IfMatch(v) if v != current.version => Err(Error::VersionConflict {
                current: Some(current.version),
            }),
            Precondition::Absent => Err(Error::VersionConflict {
                current: Some(current.version),
            }),
            _ => Ok(Precondition::IfMatch(current.version)),
        }
    }

    /// A delete through the journal.
    pub(crate) async fn delete_journaled(
        &self,
        collection: &Collection,
        key: &RecordKey,
        precondition: Precondition,
        now: OffsetDateTime,
    ) -> Result<Version, Error> {
        let mut journaled = CacheWrite {
            journal: self.journal_kind(collection),
            deleted_marker_ttl: self.settings.deleted_marker_ttl,
            key: key.clone(),
            change: WriteChange::Delete,
            precondition,
            now,
            unknown_state_ok: false,
        };
        match self.journal(collection, &mut journaled).await? {
            CacheWriteOutcome::Written { version, .. } => Ok(version),
            other => Err(Error::Internal(format!(
                "unexpected journal outcome {other:?}"
            ))),
        }
    }

    pub(crate) fn backlog(&self, kind: JournalKind) -> &Backlog {
        match kind {
            JournalKind::Outage => &self.outage_backlog,
            JournalKind::WriteBehind => &self.write_behind_backlog,
        }
    }

    /// Re-reads whether journaled writes still wait, per journal.
    pub(crate) async fn refresh_backlogs(&self) {
        let unreplayed = self.unreplayed.epoch();
        let mut empty = [false; 2];
        for (kind, empty) in JournalKind::ALL.into_iter().zip(&mut empty) {
            let epoch = self.backlog(kind).epoch();
            if let Ok(length) = self.cache.call(|t| t.journal_backlog(kind)).await {
                let cleared = self.backlog(kind).settle(epoch, length);
                if cleared && kind == JournalKind::Outage {
                    tracing::info!("outage journal replayed");
                }
                *empty = length == 0;
            }
        }
        let [write_behind, outage] = empty;
        if write_behind && self.control.strategy() != hybridstore_core::Strategy::CacheFirst {
            self.wrote_behind
                .store(false, std::sync::atomic::Ordering::Release);
        }
        self.unreplayed
            .journals_empty(unreplayed, outage, write_behind);
    }

    /// How many entries wait in each journal (for status and metrics).
    pub async fn journal_backlog(&self) -> Result<(u64, u64), Error> {
        let write_behind = self
            .cache
            .call(|t| t.journal_backlog(JournalKind::WriteBehind))
            .await;
        let outage = self
            .cache
            .call(|t| t.journal_backlog(JournalKind::Outage))
            .await;
        match (write_behind, outage) {
            (Ok(write_behind), Ok(outage)) => Ok((write_behind, outage)),
            _ => Err(self.unavailable()),
        }
    }

    /// Replays the journals into the durable tier, forever.
    pub async fn run_journal_replay(self: Arc<Self>) {
        let claim_idle = self.settings.journal.claim_idle;
        // Recover (own unacknowledged entries, a dead consumer's) at start,
        // after a failure, and every half claim period.
        let mut recover_due = true;
        let mut last_recover = std::time::Instant::now();
        loop {
            let replayed = if self.durable.breaker.is_closed() && self.cache.breaker.is_closed() {
                let recover = recover_due || last_recover.elapsed() >= claim_idle / 2;
                match self.replay_once(recover.then_some(claim_idle)).await {
                    Ok(replayed) => {
                        if recover {
                            recover_due = false;
                            last_recover = std::time::Instant::now();
                        }
                        replayed
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "journal replay paused");
                        recover_due = true;
                        0
                    }
                }
            } else {
                recover_due = true;
                0
            };
            if replayed == 0 {
                tokio::time::sleep(self.settings.journal.idle_interval).await;
            }
        }
    }

    /// Replay counters since the process started.
    pub fn replay_stats(&self) -> ReplayStats {
        self.replay.lock().unwrap_or_else(|e| e.into_inner()).total
    }

    /// One batch: read, apply, acknowledge. Returns how many entries it took.
    pub async fn replay_once(&self, recover: Option<Duration>) -> Result<usize, StoreError> {
        self.replay_from(Route::Breaker, recover).await
    }

    /// Before a recovering cache whose copies may all be stale serves again
    /// (its breaker is still open, so this talks to the tier directly).
    ///
    /// A cache that restarted may have reloaded an older snapshot: copies
    /// pinned then, whose versions the durable tier may have overtaken since,
    /// and journal entries already replayed (or not). A cache someone wrote
    /// around may hold pinned copies older than what was committed. Every
    /// entry its journals hold, whichever consumer took it, is replayed
    /// version-guarded: a pinned copy is then confirmed (the durable tier has
    /// its version) or dropped (it has a newer one).
    pub(crate) async fn reconcile_cache(&self) -> Result<(), StoreError> {
        if !self.durable.breaker.is_closed() {
            // Nothing can tell which copies are stale: none is kept. The
            // journal entries stay and replay once the durable tier is back;
            // meanwhile the cache takes writes, and answers for what it is
            // written from now on.
            let removed = self.cache.tier.invalidate_all(true).await?;
            tracing::warn!(
                removed,
                "the durable tier is down: every copy of the recovering cache dropped, pinned ones too"
            );
            return Ok(());
        }
        let started = std::time::Instant::now();
        let mut replayed = 0;
        loop {
            match self
                .replay_from(Route::Direct, Some(Duration::ZERO))
                .await?
            {
                0 => break,
                taken => replayed += taken,
            }
        }
        tracing::info!(
            entries = replayed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "journals of the recovering cache replayed before it serves"
        );
        Ok(())
    }

    /// One batch from the cache: through its breaker, or past it during a
    /// restarted cache's reconciliation.
    async fn replay_from(
        &self,
        route: Route,
        recover: Option<Duration>,
    ) -> Result<usize, StoreError> {
        let batch = self.settings.journal.batch_size;
        let entries = self
            .cache
            .call_on(route, |t| t.read_journal(&self.instance_id, batch, recover))
            .await?;
        if entries.is_empty() {
            self.refresh_backlogs().await;
            let finished = {
                let mut progress = self.replay.lock().unwrap_or_else(|e| e.into_inner());
                progress
                    .started
                    .take()
                    .map(|started| (started, std::mem::take(&mut progress.run)))
            };
            if let Some((started, run)) = finished {
                tracing::info!(
                    entries = run.entries,
                    applied = run.applied,
                    superseded = run.superseded,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "journal replay finished: the journal is empty"
                );
            }
            return Ok(0);
        }
        let starting = self
            .replay
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .started
            .is_none();
        if starting {
            let (write_behind, outage) = self.journal_backlog().await.unwrap_or((0, 0));
            tracing::info!(write_behind, outage, "journal replay started");
            self.replay
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .started = Some(std::time::Instant::now());
        }
        for entry in &entries {
            self.backlog(entry.kind).mark();
            // Held until applied: if the cache fails before that, this
            // instance knows the durable tier lacks the version.
            self.unreplayed
                .journaled(&entry.change.key(), entry.change.version());
        }

        // The newest change per record is the one that counts; older entries
        // of the same record are acknowledged with it.
        let mut newest: HashMap<RecordKey, &Change> = HashMap::new();
        for entry in &entries {
            let key = entry.change.key();
            let keep = newest
                .get(&key)
                .is_none_or(|kept| kept.version() < entry.change.version());
            if keep {
                newest.insert(key, &entry.change);
            }
        }
        let changes: Vec<Change> = newest.values().map(|change| (*change).clone()).collect();
        let read = entries.len();
        let (applied, refused) = self.apply_batch(&changes).await?;
        for (change, _) in changes.iter().zip(&applied) {
            if !refused.contains_key(&change.key()) {
                self.unreplayed.replayed(&change.key(), change.version());
            }
        }
        let (entries, set_aside): (Vec<JournalEntry>, Vec<JournalEntry>) = entries
            .into_iter()
            .partition(|entry| !refused.contains_key(&entry.change.key()));
        if !set_aside.is_empty() {
            let reasons: Vec<(JournalEntry, String)> = set_aside
                .into_iter()
                .map(|entry| {
                    let reason = refused[&entry.change.key()].clone();
                    (entry, reason)
                })
                .collect();
            self.cache.call_on(route, |t| t.set_aside(&reasons)).await?;
            for (entry, _) in &reasons {
                // Not coming: what the durable tier holds is the truth.
                self.unreplayed
                    .replayed(&entry.change.key(), entry.change.version());
            }
            tracing::error!(
                entries = reasons.len(),
                records = refused.len(),
                reason = %reasons[0].1,
                "the durable tier refused journaled writes; set aside as dead letters, replay goes on"
            );
        }
        let superseded: HashMap<(RecordKey, Version), bool> = changes
            .iter()
            .zip(&applied)
            .map(|(change, applied)| ((change.key(), change.version()), !applied))
            .collect();
        let applied_count = applied.iter().filter(|applied| **applied).count();

        let acks: Vec<JournalAck> = entries
            .iter()
            .map(|entry| {
                let key = entry.change.key();
                let ttl = match (&entry.change, self.catalog.get(&key.collection)) {
                    (Change::Put(_), Ok(collection)) => collection.spec.cache_ttl,
                    _ => self.settings.deleted_marker_ttl,
                };
                JournalAck {
                    key: key.clone(),
                    position: entry.position.clone(),
                    version: entry.change.version(),
                    ttl,
                    superseded: superseded
                        .get(&(key, entry.change.version()))
                        .copied()
                        .unwrap_or(false),
                }
            })
            .collect();
        self.cache.call_on(route, |t| t.ack_journal(&acks)).await?;
        let batch = ReplayStats {
            entries: entries.len() as u64,
            applied: applied_count as u64,
            superseded: (changes.len() - applied_count) as u64,
        };
        {
            let mut progress = self.replay.lock().unwrap_or_else(|e| e.into_inner());
            let progress = &mut *progress;
            for stats in [&mut progress.run, &mut progress.total] {
                stats.entries += batch.entries;
                stats.applied += batch.applied;
                stats.superseded += batch.superseded;
            }
        }
        tracing::debug!(
            entries = batch.entries,
            applied = batch.applied,
            "journal batch replayed"
        );
        Ok(read)
    }

    /// Applies one batch, version-guarded. A change the durable tier refuses
    /// (not: cannot be reached) must not hold back the others, so a refused
    /// batch is applied change by change, and what is refused comes back
    /// with its reason, by record.
    async fn apply_batch(
        &self,
        changes: &[Change],
    ) -> Result<(Vec<bool>, HashMap<RecordKey, String>), StoreError> {
        match self
            .durable
            .call(|t| t.apply_changes(changes, ApplyMode::IfNewer))
            .await
        {
            Ok(applied) => return Ok((applied, HashMap::new())),
            Err(err) if err.is_unavailable() => return Err(err),
            Err(err) => {
                tracing::warn!(error = %err, changes = changes.len(), "a replay batch was refused; applying it change by change");
            }
        }
        let mut applied = Vec::with_capacity(changes.len());
        let mut refused = HashMap::new();
        for change in changes {
            match self
                .durable
                .call(|t| t.apply_changes(std::slice::from_ref(change), ApplyMode::IfNewer))
                .await
            {
                Ok(one) => applied.push(one.first().copied().unwrap_or(false)),
                Err(err) if err.is_unavailable() => return Err(err),
                Err(err) => {
                    applied.push(false);
                    refused.insert(change.key(), err.to_string());
                }
            }
        }
        Ok((applied, refused))
    }
}

#[cfg(test)]
mod tests {
    use super::Backlog;

    #[test]
    fn a_write_during_the_check_keeps_the_backlog_pending() {
        let backlog = Backlog::default();
        backlog.mark();
        let epoch = backlog.epoch();
        backlog.mark(); // journaled after the length was read as 0
        assert!(!backlog.settle(epoch, 0));
        assert!(backlog.pending());
        let epoch = backlog.epoch();
        assert!(backlog.settle(epoch, 0));
        assert!(!backlog.pending());
        assert!(!backlog.settle(epoch, 3));
        assert!(backlog.pending(), "a non-empty journal sets it");
    }
}
