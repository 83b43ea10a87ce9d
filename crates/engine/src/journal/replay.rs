//! The replay loop: journal entries into the durable tier, newest change
//! per record, version-guarded, acknowledged only after they are applied.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hybridstore_api::ReplayStats;
use hybridstore_core::{
    ApplyMode, Change, Error, JournalAck, JournalEntry, JournalKind, ListQuery, RecordId,
    RecordKey, StoreError, Version, now,
};

use super::Journal;
use super::backlog::Backlog;
use crate::guarded::Route;

impl Journal {
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
            if let Ok(length) = self.shared.cache.call(|t| t.journal_backlog(kind)).await {
                let cleared = self.backlog(kind).settle(epoch, length);
                if cleared && kind == JournalKind::Outage {
                    tracing::info!("outage journal replayed");
                }
                *empty = length == 0;
            }
        }
        let [write_behind, outage] = empty;
        if write_behind {
            // Collections that follow cache_first now say so themselves.
            self.left_write_behind
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            self.wrote_behind
                .store(false, std::sync::atomic::Ordering::Release);
        }
        self.unreplayed
            .journals_empty(unreplayed, outage, write_behind);
    }

    /// How many entries wait in each journal (for status and metrics).
    pub async fn journal_backlog(&self) -> Result<(u64, u64), Error> {
        let write_behind = self
            .shared
            .cache
            .call(|t| t.journal_backlog(JournalKind::WriteBehind))
            .await;
        let outage = self
            .shared
            .cache
            .call(|t| t.journal_backlog(JournalKind::Outage))
            .await;
        match (write_behind, outage) {
            (Ok(write_behind), Ok(outage)) => Ok((write_behind, outage)),
            _ => Err(self.shared.unavailable()),
        }
    }

    /// Replays the journals into the durable tier, forever.
    pub async fn run_journal_replay(self: Arc<Self>) {
        let claim_idle = self.shared.settings.journal.claim_idle;
        // Recover (own unacknowledged entries, a dead consumer's) at start,
        // after a failure, and every half claim period.
        let mut recover_due = true;
        let mut last_recover = std::time::Instant::now();
        loop {
            let replayed = if self.shared.durable.breaker.is_closed()
                && self.shared.cache.breaker.is_closed()
            {
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
                tokio::time::sleep(self.shared.settings.journal.idle_interval).await;
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
        if !self.shared.durable.breaker.is_closed() {
            // Nothing can tell which copies are stale: none is kept. The
            // journal entries stay and replay once the durable tier is back;
            // meanwhile the cache takes writes, and answers for what it is
            // written from now on.
            let removed = self.shared.cache.tier.invalidate_all(true).await?;
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
        let dropped = self.drop_superseded_pins().await?;
        tracing::info!(
            entries = replayed,
            superseded_pins = dropped,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "journals of the recovering cache replayed before it serves"
        );
        Ok(())
    }

    /// Removes every pinned copy older than what the durable tier holds.
    ///
    /// Why: replaying before serving takes the entries this instance can
    /// claim, but another instance recovering the same cache may hold some
    /// of them in its own replay right now (a Redis restarted from an older
    /// snapshot brings back old pinned copies and their entries). Until that
    /// replay acknowledges them, their copies stay pinned, and this
    /// instance would serve them: a campaign (seed 162, two instances,
    /// `cache_first`) read such a copy, a second older than a write
    /// acknowledged before Redis died. A pinned copy the durable tier has
    /// passed is superseded whatever replays its entry, so it can go now.
    async fn drop_superseded_pins(&self) -> Result<usize, StoreError> {
        const PAGE: u32 = 500;
        let cache = &self.shared.cache.tier;
        let durable = &self.shared.durable.tier;
        let mut dropped = 0;
        for collection in self.shared.catalog.iter() {
            let mut after = None;
            loop {
                let query = ListQuery {
                    collection: collection.spec.name.clone(),
                    after: after.clone(),
                    prefix: None,
                    limit: PAGE,
                    max_bytes: usize::MAX,
                    now: now(),
                };
                let pinned = cache.pinned(&query).await?;
                let Some(last) = pinned.last() else {
                    break;
                };
                after = Some(last.key().id);
                let ids: Vec<RecordId> = pinned.iter().map(|c| c.key().id).collect();
                let stored = durable.get_states(&query.collection, &ids, now()).await?;
                for change in &pinned {
                    let key = change.key();
                    let newer = stored
                        .iter()
                        .find(|state| state.key() == key)
                        .map(Change::version)
                        .filter(|version| *version > change.version());
                    if let Some(version) = newer
                        && cache.invalidate_older(&key, version).await?
                    {
                        dropped += 1;
                    }
                }
                if pinned.len() < PAGE as usize {
                    break;
                }
            }
        }
        Ok(dropped)
    }

    /// One batch from the cache: through its breaker, or past it during a
    /// restarted cache's reconciliation.
    pub(crate) async fn replay_from(
        &self,
        route: Route,
        recover: Option<Duration>,
    ) -> Result<usize, StoreError> {
        let batch = self.shared.settings.journal.batch_size;
        let entries = self
            .shared
            .cache
            .call_on(route, |t| {
                t.read_journal(&self.shared.instance_id, batch, recover)
            })
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
            self.shared
                .cache
                .call_on(route, |t| t.set_aside(&reasons))
                .await?;
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
                let ttl = match (&entry.change, self.shared.catalog.get(&key.collection)) {
                    (Change::Put(_), Ok(collection)) => collection.spec.cache_ttl,
                    _ => self.shared.settings.deleted_marker_ttl,
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
        for ack in &acks {
            tracing::trace!(id = %ack.key.id, version = %ack.version, superseded = ack.superseded, "replayed");
        }
        self.shared
            .cache
            .call_on(route, |t| t.ack_journal(&acks))
            .await?;
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
    pub(crate) async fn apply_batch(
        &self,
        changes: &[Change],
    ) -> Result<(Vec<bool>, HashMap<RecordKey, String>), StoreError> {
        match self
            .shared
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
                .shared
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
