//! Writes through the cache's journal: the cache checks the precondition,
//! assigns the version and appends the entry in one atomic step.

use std::time::Duration;

use hybridstore_api::WritePath;
use hybridstore_core::{
    CacheEntry, CacheWrite, CacheWriteOutcome, Error, IndexEntry, JournalKind, Precondition,
    Record, RecordKey, RecordWrite, Version, WriteChange, WriteOutcome,
};
use time::OffsetDateTime;

use super::Journal;
use crate::catalog::Collection;
use crate::guarded::Route;

/// Longest a journaled write waits for its key to reach the durable tier's
/// held list past an open breaker (as long as a read asks the cache past
/// its breaker).
const DIRECT_HOLD_WAIT: Duration = Duration::from_millis(25);

/// How long after a publishing past the breaker that got no answer writes
/// do not try again (see `Journal::hold_past_breaker`).
const DIRECT_HOLD_BACKOFF: Duration = Duration::from_millis(50);

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

impl Journal {
    /// Which journal a write of `collection` through the cache goes to;
    /// `None` when the cache is its only tier.
    pub(crate) fn journal_kind(&self, collection: &Collection) -> Option<JournalKind> {
        match self.shared.configured_plan(collection).write {
            WritePath::CacheOnly => None,
            WritePath::CacheJournaled => Some(JournalKind::WriteBehind),
            _ => Some(JournalKind::Outage),
        }
    }

    /// Loads the durable tier's state of a record into the cache, so that the
    /// cache can check preconditions and continue the version sequence.
    pub(crate) async fn load_state(
        &self,
        collection: &Collection,
        key: &RecordKey,
        now: OffsetDateTime,
    ) -> Result<(), Error> {
        let current = self
            .shared
            .durable
            .call(|t| t.get(key, now))
            .await
            .map_err(|err| self.shared.durable_failed(err))?;
        let stored = match &current {
            Some(record) => {
                let ttl = record
                    .cache_lifetime(collection.spec.cache_ttl, now)
                    .unwrap_or(Duration::from_secs(1));
                self.shared.cache.call(|t| t.store(record, ttl)).await
            }
            // "Known absent": a marker below every real version.
            None => {
                self.shared
                    .cache
                    .call(|t| {
                        t.store_deleted(
                            key,
                            Version::new(0),
                            self.shared.settings.deleted_marker_ttl,
                        )
                    })
                    .await
            }
        };
        stored
            .map(drop)
            .map_err(|err| self.shared.journal_failed(err))
    }

    /// Runs a journaled write, loading the record's state first if the cache
    /// knows nothing of it.
    pub(crate) async fn journal(
        &self,
        collection: &Collection,
        write: &mut CacheWrite,
    ) -> Result<CacheWriteOutcome, Error> {
        for _ in 0..3 {
            let outcome = self
                .shared
                .cache
                .call(|t| t.accept_write(write))
                .await
                .map_err(|err| self.shared.journal_failed(err))?;
            match outcome {
                CacheWriteOutcome::UnknownState => {
                    if self.shared.durable.breaker.is_closed() {
                        self.load_state(collection, &write.key, write.now).await?;
                    } else if write.precondition == Precondition::None
                        && matches!(write.change, WriteChange::Put { .. })
                    {
                        // Nobody can say whether the record exists; an
                        // unconditional replace is right either way, and its
                        // clock-based version is above any the record had.
                        write.unknown_state_ok = true;
                    } else {
                        return Err(self.shared.unavailable());
                    }
                }
                CacheWriteOutcome::Written { version, .. } => {
                    tracing::trace!(id = %write.key.id, %version, journal = ?write.journal, "written in the cache");
                    if let Some(kind) = write.journal {
                        self.backlog(kind).mark();
                        self.unreplayed.journaled(&write.key, version);
                        // Taken after the key is among the unpublished: a
                        // publishing that started later has taken it.
                        let journaled = std::time::Instant::now();
                        if kind == JournalKind::Outage && !self.shared.durable.breaker.is_closed() {
                            self.hold_past_breaker(journaled).await;
                        }
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
        Err(self.shared.unavailable())
    }

    /// Publishes the keys journaled so far to the durable tier's held list
    /// past its open breaker, briefly, before the write that journaled is
    /// acknowledged.
    ///
    /// Why: this instance journals because its breaker is open, but the
    /// durable tier may be back already (the breaker closes on the next
    /// probe), and other instances may read from it. Should the cache fail
    /// before the entry is replayed, they would serve the older version the
    /// durable tier holds: the held list is how they learn to refuse it,
    /// and the periodic publisher only runs with the breaker closed. If the
    /// durable tier cannot be reached here, the other instances most likely
    /// cannot read from it either (a partition is the exception), and the
    /// publisher publishes once it is back.
    ///
    /// Cost: writes that arrive while one publishing runs wait for it (when
    /// it started after they journaled it took their keys: one round trip
    /// serves them all). A durable tier that is down refuses the ping at
    /// once (publishing through the pool instead waited out its connect
    /// retries, [`DIRECT_HOLD_WAIT`], for every write, and took an outage's
    /// write rate from 4,000 a second to 180). One that hangs costs the
    /// wait, so after a timeout writes do not try for the next
    /// [`DIRECT_HOLD_BACKOFF`]; the next attempt publishes what they
    /// journaled. A success also asks for a probe, so the breaker closes
    /// without waiting for its interval.
    pub(crate) async fn hold_past_breaker(&self, journaled: std::time::Instant) {
        let mut direct = self.direct_hold.lock().await;
        if direct.started.is_some_and(|started| started > journaled)
            || direct
                .failed
                .is_some_and(|failed| failed.elapsed() < DIRECT_HOLD_BACKOFF)
        {
            return;
        }
        direct.started = Some(std::time::Instant::now());
        // Asked first, on the probe's own connection, which a tier that is
        // down refuses at once (a pool retries a refused connect until its
        // acquire timeout): an outage then costs each write a refused
        // connect, not the handling of every key still unpublished.
        match tokio::time::timeout(DIRECT_HOLD_WAIT, self.shared.durable.tier.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                direct.failed = Some(std::time::Instant::now());
                return;
            }
        }
        let held = self.unreplayed.take_unpublished();
        if held.is_empty() {
            return;
        }
        let hold = self
            .shared
            .durable
            .call_on(Route::Direct, |t| t.hold(&held));
        match tokio::time::timeout(DIRECT_HOLD_WAIT, hold).await {
            Ok(Ok(())) => {
                direct.failed = None;
                self.shared.durable.breaker.probe_wanted.notify_one();
                tracing::trace!(keys = held.len(), "held keys published past the breaker");
            }
            // Refused at once (a durable tier that is down says so without
            // waiting): the next write tries again.
            Ok(Err(_)) => self.unreplayed.publish_failed(held),
            // No answer in time (a hung tier): writes stop trying for a while.
            Err(_) => {
                direct.failed = Some(std::time::Instant::now());
                self.unreplayed.publish_failed(held);
            }
        }
    }

    /// A put through the journal. A collection with unique indexes can only
    /// be written this way (during an outage) if the write keeps every indexed
    /// value as it is: only the durable tier can check a new value. (Where
    /// the cache is the only tier, it checks them itself: `claims`.) The check
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
            deleted_marker_ttl: self.shared.settings.deleted_marker_ttl,
            key: write.key.clone(),
            change: WriteChange::Put {
                data: write.data,
                expires_at: write.expires_at,
            },
            precondition: write.precondition,
            now: write.now,
            unknown_state_ok: false,
            claims: Vec::new(),
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
            if let (Some(entries), None) = (&write.index_entries, journaled.journal) {
                // The cache is the deployment's only tier (cache-only): it
                // enforces the values itself.
                journaled.claims = entries.clone();
            } else if let Some(entries) = &write.index_entries {
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
                        && journaled.claims.is_empty()
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
        let outcome = outcome.ok_or_else(|| self.shared.unavailable())?;
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
    pub(crate) async fn index_guard(
        &self,
        collection: &Collection,
        key: &RecordKey,
        entries: &[IndexEntry],
        asked: Precondition,
        now: OffsetDateTime,
    ) -> Result<Precondition, Error> {
        let current = match self.shared.cache.call(|t| t.get(key)).await {
            Ok(CacheEntry::Present(record)) if !record.is_expired(now) => record,
            _ => return Err(self.shared.unavailable()),
        };
        if collection.index_entries(&current.data)?.as_deref() != Some(entries) {
            return Err(self.shared.unavailable());
        }
        if asked.admits(Some(current.version)) {
            Ok(Precondition::IfMatch(current.version))
        } else {
            Err(Error::VersionConflict {
                current: Some(current.version),
            })
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
            deleted_marker_ttl: self.shared.settings.deleted_marker_ttl,
            key: key.clone(),
            change: WriteChange::Delete,
            precondition,
            now,
            unknown_state_ok: false,
            claims: Vec::new(),
        };
        match self.journal(collection, &mut journaled).await? {
            CacheWriteOutcome::Written { version, .. } => Ok(version),
            other => Err(Error::Internal(format!(
                "unexpected journal outcome {other:?}"
            ))),
        }
    }
}
