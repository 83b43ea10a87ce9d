//! Journaled writes the durable tier does not hold yet, and what a request
//! that goes to the durable tier meanwhile must do about them.
//!
//! After a durable-tier outage, and beside `cache_first` collections, the
//! cache's journals hold versions the durable tier lacks until replay has
//! applied them. Requests do not wait for replay: once the durable tier is
//! back, every request takes its configured path at once. A request that
//! would have the durable tier answer for a key first *settles* it: if the
//! cache holds a pinned copy (a journaled version not yet replayed), that
//! version is applied to the durable tier, guarded by version exactly as
//! replay applies it, and only then is the request checked and served there.
//! So a pinned version is always the base of what follows it: no write is
//! checked or merged against an older durable copy, no read returns one. The
//! cost is one cache round trip per request, paid only while a journal may
//! hold entries of the collection.
//!
//! While the cache is unreachable its journals cannot be read. Each instance
//! therefore remembers the keys it journaled (or took from the journal to
//! replay) and has not seen reach the durable tier ([`Unreplayed`]). For
//! those keys, and only those, the durable tier is behind: reads answer 503,
//! never an older version; unconditional writes are given a version above the
//! journaled one (its replay then finds itself superseded); conditional
//! writes, which would be checked against the older base, answer 503.
//! Everything else is served by the durable tier as usual. An instance cannot
//! know what another instance journaled: see README, "Several instances".

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hybridstore_core::{
    ApplyMode, Change, CollectionName, Error, ListQuery, Precondition, RecordId, RecordKey,
    Strategy, Version,
};
use time::OffsetDateTime;

use crate::catalog::Collection;
use crate::engine::Engine;

/// Most keys remembered one by one; past this, any key may be unreplayed
/// until the journals are seen empty.
const MAX_UNREPLAYED: usize = 100_000;

/// How often the keys journaled meanwhile are published for other instances.
const PUBLISH_INTERVAL: Duration = Duration::from_millis(100);
/// How often published keys the durable tier has caught up with are released.
const RELEASE_INTERVAL: Duration = Duration::from_secs(5);
/// A key held this long, with the journals seen empty, was set aside or lost.
const HELD_STALE: Duration = Duration::from_secs(60);

/// What this instance knows of one key's journaled versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Held {
    /// Nothing of it waits in a journal (as far as this instance knows).
    No,
    /// A journaled version, possibly not replayed yet.
    At(Version),
    /// Not known: the process remembered too many keys since the journals
    /// were last seen empty.
    Unknown,
}

/// The keys this instance journaled, or read from a journal, whose version
/// it has not yet seen reach the durable tier.
pub(crate) struct Unreplayed {
    state: Mutex<UnreplayedState>,
    /// Whether any key is remembered: every durable-tier write reports its
    /// version here, and most find nothing to forget without the lock.
    remembers: AtomicBool,
}

struct UnreplayedState {
    keys: HashMap<RecordKey, Version>,
    /// Keys journaled since they were last published to the durable tier
    /// (see [`Engine::run_held_publisher`]).
    unpublished: HashMap<RecordKey, Version>,
    /// Any key may be held (see [`Held::Unknown`]) by the outage journal,
    /// or by the write-behind journal.
    unknown_outage: bool,
    unknown_write_behind: bool,
    /// Counts every note, so that clearing after an empty journal was seen
    /// does not drop a key journaled while the journal was being looked at.
    epoch: u64,
}

impl Default for Unreplayed {
    /// A new process remembers nothing: what an earlier one journaled it
    /// published to the durable tier (every [`PUBLISH_INTERVAL`], and at once
    /// when the cache became unreachable), where [`Engine::settle`] finds it
    /// like what any other instance journaled.
    fn default() -> Self {
        Self {
            state: Mutex::new(UnreplayedState {
                keys: HashMap::new(),
                unpublished: HashMap::new(),
                unknown_outage: false,
                unknown_write_behind: false,
                epoch: 0,
            }),
            remembers: AtomicBool::new(false),
        }
    }
}

impl Unreplayed {
    fn lock(&self) -> std::sync::MutexGuard<'_, UnreplayedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `key` has a journaled `version` the durable tier may lack.
    pub(crate) fn journaled(&self, key: &RecordKey, version: Version) {
        let mut state = self.lock();
        state.epoch += 1;
        if state.keys.len() >= MAX_UNREPLAYED && !state.keys.contains_key(key) {
            state.keys.clear();
            state.unpublished.clear();
            self.remembers.store(false, Ordering::Release);
            state.unknown_outage = true;
            state.unknown_write_behind = true;
            return;
        }
        let held = state.keys.entry(key.clone()).or_insert(version);
        *held = (*held).max(version);
        let unpublished = state.unpublished.entry(key.clone()).or_insert(version);
        *unpublished = (*unpublished).max(version);
        self.remembers.store(true, Ordering::Release);
    }

    /// The keys journaled since the last call, to publish.
    fn take_unpublished(&self) -> Vec<(RecordKey, Version)> {
        let mut state = self.lock();
        if state.unpublished.is_empty() {
            return Vec::new();
        }
        let unpublished = std::mem::take(&mut state.unpublished);
        // A key replayed meanwhile needs no publishing.
        unpublished
            .into_iter()
            .filter(|(key, version)| state.keys.get(key).is_some_and(|held| held >= version))
            .collect()
    }

    /// Publishing `held` failed: they are published with the next ones.
    fn publish_failed(&self, held: Vec<(RecordKey, Version)>) {
        let mut state = self.lock();
        for (key, version) in held {
            let unpublished = state.unpublished.entry(key).or_insert(version);
            *unpublished = (*unpublished).max(version);
        }
    }

    /// The durable tier holds `version` of `key`, or a newer one.
    pub(crate) fn replayed(&self, key: &RecordKey, version: Version) {
        if !self.remembers.load(Ordering::Acquire) {
            return;
        }
        let mut state = self.lock();
        if state.keys.get(key).is_some_and(|held| *held <= version) {
            state.keys.remove(key);
            self.remembers
                .store(!state.keys.is_empty(), Ordering::Release);
        }
    }

    /// What is known of `key`; `wrote_behind`: whether its collection may
    /// have write-behind entries.
    pub(crate) fn held(&self, key: &RecordKey, wrote_behind: bool) -> Held {
        let state = self.lock();
        if state.unknown(wrote_behind) {
            return Held::Unknown;
        }
        state
            .keys
            .get(key)
            .map_or(Held::No, |version| Held::At(*version))
    }

    /// Whether a key of `collection` whose id lies in `(after, until]`
    /// (`until: None`: no upper end) may be held.
    pub(crate) fn any_held_in(
        &self,
        collection: &CollectionName,
        wrote_behind: bool,
        after: Option<&RecordId>,
        until: Option<&RecordId>,
    ) -> bool {
        let state = self.lock();
        state.unknown(wrote_behind)
            || state.keys.keys().any(|key| {
                &key.collection == collection
                    && after.is_none_or(|after| &key.id > after)
                    && until.is_none_or(|until| &key.id <= until)
            })
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Journals were seen empty after `epoch` was taken (`outage`,
    /// `write_behind`: which): what they held is replayed, unless something
    /// was journaled since.
    pub(crate) fn journals_empty(&self, epoch: u64, outage: bool, write_behind: bool) {
        let mut state = self.lock();
        if state.epoch != epoch {
            return;
        }
        if outage {
            state.unknown_outage = false;
        }
        if write_behind {
            state.unknown_write_behind = false;
        }
        if outage && write_behind {
            state.keys.clear();
            state.unpublished.clear();
            self.remembers.store(false, Ordering::Release);
        }
    }

    /// How many keys are remembered, and whether any key may be held.
    pub(crate) fn summary(&self) -> (usize, bool) {
        let state = self.lock();
        (
            state.keys.len(),
            state.unknown_outage || state.unknown_write_behind,
        )
    }
}

impl UnreplayedState {
    fn unknown(&self, wrote_behind: bool) -> bool {
        self.unknown_outage || (wrote_behind && self.unknown_write_behind)
    }
}

/// What a request that the durable tier will answer is about to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    Write(Precondition),
}

/// What settling found.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Settled {
    /// The version an unconditional write must exceed: the durable tier
    /// could not be brought up to date for its key.
    pub floor: Option<Version>,
    /// Journaled versions were applied to the durable tier just now.
    pub applied: bool,
}

/// The time a write must carry so that its clock-based version lies above
/// `floor`: `now`, or just past `floor` when the clock is not there yet.
pub(crate) fn above(now: OffsetDateTime, floor: Option<Version>) -> OffsetDateTime {
    let Some(floor) = floor else { return now };
    if Version::clock(now) > floor.get() {
        return now;
    }
    let nanos = i128::from(floor.get().saturating_add(1)) * 1_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(now)
}

impl Engine {
    /// Whether a journal may hold entries of `collection` that the durable
    /// tier lacks.
    pub(crate) fn journals_may_hold(&self, collection: &Collection) -> bool {
        self.outage_backlog.pending()
            || (self.write_behind_backlog.pending() && self.wrote_behind(collection))
    }

    /// Whether `collection` may have write-behind entries: its own strategy
    /// is cache_first, or it follows a service-wide strategy that was
    /// cache_first since that journal was last seen empty.
    pub(crate) fn wrote_behind(&self, collection: &Collection) -> bool {
        match collection.spec.strategy {
            Some(own) => own == Strategy::CacheFirst,
            None => self.service_wrote_behind(),
        }
    }

    /// Makes sure the durable tier holds the newest journaled version of
    /// every key in `keys` before it answers for them (see the module docs).
    pub(crate) async fn settle(
        &self,
        collection: &Collection,
        keys: &[RecordKey],
        access: Access,
    ) -> Result<Settled, Error> {
        if keys.is_empty() || !self.configured_plan(collection).uses_cache() {
            return Ok(Settled::default());
        }
        let closed = self.cache.breaker.is_closed();
        if closed && !self.journals_may_hold(collection) {
            return Ok(Settled::default());
        }
        // With the breaker open, the tier itself is asked first, briefly:
        // another instance may have seen it back and serve it and journal
        // into it already (this one has not probed yet, or is recovering
        // it), whatever the backlog flags last said.
        let states = if closed {
            self.cache
                .call(|t| t.get_states(keys))
                .await
                // The breaker is open now: decide as without a cache.
                .map_err(|err| self.cache_failed("get_states", &err))
                .ok()
        } else {
            self.recovery
                .past_breaker(|tier| tier.get_states(keys))
                .await
        };
        if let Some(states) = states {
            let pinned: Vec<_> = states
                .into_iter()
                .flatten()
                .filter(|held| held.pinned)
                .map(|held| held.state)
                .collect();
            self.apply_pinned(&pinned).await?;
            return Ok(Settled {
                floor: None,
                applied: !pinned.is_empty(),
            });
        }
        let mut floor = None;
        let wrote_behind = self.wrote_behind(collection);
        let mut not_mine = Vec::new();
        for key in keys {
            match (self.unreplayed.held(key, wrote_behind), access) {
                (Held::No, _) => not_mine.push(key.id.clone()),
                // A version by the clock lies above anything journaled
                // before; a known one is exceeded explicitly.
                (Held::Unknown, Access::Write(Precondition::None)) => {}
                (Held::At(version), Access::Write(Precondition::None)) => {
                    floor = floor.max(Some(version));
                }
                _ => return Err(self.unavailable()),
            }
        }
        // What other instances journaled and published (an instance that
        // has not published yet is the gap README, "Several instances",
        // describes). Asked whatever this instance's backlog flags say: they
        // are only as fresh as its last look at the journals.
        if !not_mine.is_empty() {
            let held = self
                .durable
                .call(|t| t.held_above(&collection.spec.name, &not_mine))
                .await
                .map_err(|err| self.durable_failed(err))?;
            for (_, version) in held {
                match access {
                    Access::Write(Precondition::None) => floor = floor.max(Some(version)),
                    _ => return Err(self.unavailable()),
                }
            }
        }
        Ok(Settled {
            floor,
            applied: false,
        })
    }

    /// Publishes the keys this instance journaled to the durable tier, for
    /// the other instances (see [`DurableStore::hold`]): every
    /// [`PUBLISH_INTERVAL`] while it journals, at once when the cache breaker
    /// opens, again after a failure. Releases the keys the durable tier has
    /// caught up with every [`RELEASE_INTERVAL`]; with the journals seen
    /// empty, also those held longer than [`HELD_STALE`].
    pub async fn run_held_publisher(self: Arc<Self>) {
        let mut last_release = std::time::Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep(PUBLISH_INTERVAL) => {}
                () = self.cache.breaker.opened() => {}
            }
            if !self.durable.breaker.is_closed() {
                continue;
            }
            let held = self.unreplayed.take_unpublished();
            if !held.is_empty()
                && let Err(err) = self.durable.call(|t| t.hold(&held)).await
            {
                tracing::debug!(error = %err, keys = held.len(), "publishing held keys failed");
                self.unreplayed.publish_failed(held);
                continue;
            }
            if last_release.elapsed() >= RELEASE_INTERVAL {
                last_release = std::time::Instant::now();
                let journals_empty = self.cache.breaker.is_closed()
                    && !self.outage_backlog.pending()
                    && !self.write_behind_backlog.pending();
                let stale = journals_empty.then_some(HELD_STALE);
                if let Err(err) = self.durable.call(|t| t.release_held(stale)).await {
                    tracing::debug!(error = %err, "releasing held keys failed");
                }
            }
        }
    }

    /// Before the durable tier lists a page: applies the journaled versions
    /// the cache holds in the page's range, so that a journaled create, change
    /// or delete shows in the page as it shows in a read of its key. Any of
    /// them that would land in the page is among the first `query.limit`
    /// pinned ids after the cursor, so that many are enough. Answers false
    /// when the cache could not tell (the caller then checks the keys known
    /// to be held).
    pub(crate) async fn settle_range(
        &self,
        collection: &Collection,
        query: &ListQuery,
    ) -> Result<bool, Error> {
        let closed = self.cache.breaker.is_closed();
        if closed && !self.journals_may_hold(collection) {
            return Ok(true);
        }
        // As in `settle`: with the breaker open the tier is asked, briefly.
        let pinned = if closed {
            self.cache
                .call(|t| t.pinned(query))
                .await
                .map_err(|err| self.cache_failed("pinned", &err))
                .ok()
        } else {
            self.recovery.past_breaker(|tier| tier.pinned(query)).await
        };
        match pinned {
            Some(pinned) => {
                self.apply_pinned(&pinned).await?;
                Ok(true)
            }
            // The caller's check of the keys known to be held decides.
            None => Ok(false),
        }
    }

    /// Applies pinned (journaled, unreplayed) states to the durable tier,
    /// version-guarded as replay applies them.
    async fn apply_pinned(&self, pinned: &[Change]) -> Result<(), Error> {
        if pinned.is_empty() {
            return Ok(());
        }
        self.durable
            .call(|t| t.apply_changes(pinned, ApplyMode::IfNewer))
            .await
            .map_err(|err| self.durable_failed(err))?;
        for change in pinned {
            self.unreplayed.replayed(&change.key(), change.version());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> RecordKey {
        RecordKey::new(
            CollectionName::parse("c").unwrap(),
            RecordId::parse(id).unwrap(),
        )
    }

    #[test]
    fn journaled_keys_are_published_once_unless_publishing_failed() {
        let unreplayed = Unreplayed::default();
        unreplayed.journaled(&key("a"), Version::new(5));
        unreplayed.journaled(&key("b"), Version::new(6));
        unreplayed.replayed(&key("b"), Version::new(6));
        let taken = unreplayed.take_unpublished();
        assert_eq!(taken, vec![(key("a"), Version::new(5))], "b needs none");
        assert!(unreplayed.take_unpublished().is_empty());
        unreplayed.journaled(&key("a"), Version::new(7));
        unreplayed.publish_failed(taken);
        assert_eq!(
            unreplayed.take_unpublished(),
            vec![(key("a"), Version::new(7))],
            "the newer version wins"
        );
    }

    #[test]
    fn past_the_bound_any_key_may_be_held() {
        let unreplayed = Unreplayed::default();
        unreplayed.journals_empty(unreplayed.epoch(), true, true);
        for n in 0..=MAX_UNREPLAYED {
            unreplayed.journaled(&key(&format!("k{n}")), Version::new(1));
        }
        assert_eq!(unreplayed.held(&key("other"), false), Held::Unknown);
        unreplayed.journals_empty(unreplayed.epoch(), true, true);
        assert_eq!(unreplayed.held(&key("other"), false), Held::No);
    }

    #[test]
    fn a_key_is_held_until_its_version_is_replayed() {
        let unreplayed = Unreplayed::default();
        unreplayed.journals_empty(unreplayed.epoch(), true, true);
        unreplayed.journaled(&key("a"), Version::new(5));
        unreplayed.journaled(&key("a"), Version::new(7));
        unreplayed.replayed(&key("a"), Version::new(5));
        assert_eq!(unreplayed.held(&key("a"), false), Held::At(Version::new(7)));
        let collection = key("a").collection;
        assert!(unreplayed.any_held_in(&collection, false, None, None));
        assert!(!unreplayed.any_held_in(&collection, false, Some(&key("a").id), None));
        unreplayed.replayed(&key("a"), Version::new(7));
        assert_eq!(unreplayed.held(&key("a"), false), Held::No);
    }

    #[test]
    fn a_write_while_the_journal_was_looked_at_stays_held() {
        let unreplayed = Unreplayed::default();
        unreplayed.journals_empty(unreplayed.epoch(), true, true);
        let epoch = unreplayed.epoch();
        unreplayed.journaled(&key("a"), Version::new(5));
        unreplayed.journals_empty(epoch, true, true);
        assert_eq!(unreplayed.held(&key("a"), false), Held::At(Version::new(5)));
    }

    #[test]
    fn a_write_gets_a_version_above_the_floor() {
        let now = OffsetDateTime::now_utc();
        let clock = Version::clock(now);
        assert_eq!(above(now, Some(Version::new(clock - 10))), now);
        let later = above(now, Some(Version::new(clock + 10)));
        assert_eq!(Version::clock(later), clock + 11);
    }
}
