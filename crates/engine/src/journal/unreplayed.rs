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
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use hybridstore_core::{CollectionName, RecordId, RecordKey, Version};

/// Most keys remembered one by one; past this, any key may be unreplayed
/// until the journals are seen empty.
const MAX_UNREPLAYED: usize = 100_000;

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
    pub(crate) fn take_unpublished(&self) -> Vec<(RecordKey, Version)> {
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
    pub(crate) fn publish_failed(&self, held: Vec<(RecordKey, Version)>) {
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
    pub(crate) fn unknown(&self, wrote_behind: bool) -> bool {
        self.unknown_outage || (wrote_behind && self.unknown_write_behind)
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
}
