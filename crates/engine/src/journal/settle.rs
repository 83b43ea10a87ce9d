//! Settling: before the durable tier answers for a key whose newest version
//! may wait in a journal, that version is applied to it (see the module docs
//! of `journal::unreplayed` for the whole picture).

use std::sync::Arc;
use std::time::Duration;

use hybridstore_core::{
    ApplyMode, Change, Error, ListQuery, Precondition, RecordKey, Strategy, Version,
};
use time::OffsetDateTime;

use super::Journal;
use super::unreplayed::Held;
use crate::catalog::Collection;

/// How often the keys journaled meanwhile are published for other instances.
const PUBLISH_INTERVAL: Duration = Duration::from_millis(100);

/// How often published keys the durable tier has caught up with are released.
const RELEASE_INTERVAL: Duration = Duration::from_secs(5);

/// A key held this long, with the journals seen empty, was set aside or lost.
const HELD_STALE: Duration = Duration::from_secs(60);

/// How long after this instance lost the cache the held list is complete:
/// every other instance's publisher has run once since (every
/// [`PUBLISH_INTERVAL`], from memory, to a durable tier that is up), with
/// room for its round trip. Before that, a key another instance journaled
/// just before the cache failed may be missing from it.
const HELD_GRACE: Duration = Duration::from_millis(200);

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

impl Journal {
    /// Whether a journal may hold entries of `collection` that the durable
    /// tier lacks.
    pub(crate) fn journals_may_hold(&self, collection: &Collection) -> bool {
        self.outage_backlog.pending()
            || (self.write_behind_backlog.pending() && self.wrote_behind(collection))
    }

    /// Whether `collection` may have write-behind entries: it follows
    /// cache_first now, or some strategy (the service's or a collection's)
    /// was cache_first since that journal was last seen empty.
    pub(crate) fn wrote_behind(&self, collection: &Collection) -> bool {
        self.shared.strategy_of(collection) == Strategy::CacheFirst
            || (self.wrote_behind.load(std::sync::atomic::Ordering::Acquire)
                && self
                    .left_write_behind
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(collection.spec.name.as_str()))
    }

    /// Remembers collections that leave `cache_first` (before the switch is
    /// visible, so no request misses their entries).
    pub(crate) fn leaving_write_behind(&self, collections: Vec<String>) {
        if collections.is_empty() {
            return;
        }
        self.left_write_behind
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(collections);
        self.wrote_behind
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Makes sure the durable tier holds the newest journaled version of
    /// every key in `keys` before it answers for them (see the module docs).
    pub(crate) async fn settle(
        &self,
        collection: &Collection,
        keys: &[RecordKey],
        access: Access,
    ) -> Result<Settled, Error> {
        if keys.is_empty() || !self.shared.configured_plan(collection).uses_cache() {
            return Ok(Settled::default());
        }
        let closed = self.shared.cache.breaker.is_closed();
        if closed && !self.journals_may_hold(collection) {
            return Ok(Settled::default());
        }
        // With the breaker open, the tier itself is asked first, briefly:
        // another instance may have seen it back and serve it and journal
        // into it already (this one has not probed yet, or is recovering
        // it), whatever the backlog flags last said.
        let states = if closed {
            self.shared
                .cache
                .call(|t| t.get_states(keys))
                .await
                // The breaker is open now: decide as without a cache.
                .map_err(|err| self.shared.cache_failed("get_states", &err))
                .ok()
        } else {
            self.shared
                .recovery
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
                _ => return Err(self.shared.unavailable()),
            }
        }
        // What other instances journaled and published, once they have all
        // had the time to (`HELD_GRACE`). Asked whatever this instance's
        // backlog flags say: they are only as fresh as its last look at the
        // journals.
        if !not_mine.is_empty() {
            self.await_publishers(collection).await;
            let held = self
                .shared
                .durable
                .call(|t| t.held_above(&collection.spec.name, &not_mine))
                .await
                .map_err(|err| self.shared.durable_failed(err))?;
            for (_, version) in held {
                match access {
                    Access::Write(Precondition::None) => floor = floor.max(Some(version)),
                    _ => return Err(self.shared.unavailable()),
                }
            }
        }
        Ok(Settled {
            floor,
            applied: false,
        })
    }

    /// Waits, right after this instance lost the cache, until the other
    /// instances' publishers have run once since ([`HELD_GRACE`]): a key
    /// one of them journaled just before the cache failed is in the held
    /// list then. (One that died within that moment never publishes: the
    /// gap README, "Several instances", describes.) Only for a collection
    /// written behind: a write journaled because the durable tier was down
    /// published its key before it was acknowledged. And not while the
    /// durable tier is down: it answers at once, and nothing waits on it.
    pub(crate) async fn await_publishers(&self, collection: &Collection) {
        if !self.shared.durable.breaker.is_closed() || !self.wrote_behind(collection) {
            return;
        }
        if let Some(out) = self.shared.cache.breaker.out_of_service_for()
            && out < HELD_GRACE
        {
            tokio::time::sleep(HELD_GRACE - out).await;
        }
    }

    /// Publishes the keys this instance journaled to the durable tier, for
    /// the other instances (see [`CacheLedger::hold`](hybridstore_core::CacheLedger::hold)): every
    /// [`PUBLISH_INTERVAL`] while it journals, at once when the cache breaker
    /// opens, again after a failure. Releases the keys the durable tier has
    /// caught up with every [`RELEASE_INTERVAL`]; with the journals seen
    /// empty, also those held longer than [`HELD_STALE`].
    pub async fn run_held_publisher(self: Arc<Self>) {
        let mut last_release = std::time::Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep(PUBLISH_INTERVAL) => {}
                () = self.shared.cache.breaker.opened() => {}
            }
            if !self.shared.durable.breaker.is_closed() {
                continue;
            }
            let held = self.unreplayed.take_unpublished();
            if !held.is_empty()
                && let Err(err) = self.shared.durable.call(|t| t.hold(&held)).await
            {
                tracing::debug!(error = %err, keys = held.len(), "publishing held keys failed");
                self.unreplayed.publish_failed(held);
                continue;
            }
            if last_release.elapsed() >= RELEASE_INTERVAL {
                last_release = std::time::Instant::now();
                let journals_empty = self.shared.cache.breaker.is_closed()
                    && !self.outage_backlog.pending()
                    && !self.write_behind_backlog.pending();
                let stale = journals_empty.then_some(HELD_STALE);
                if let Err(err) = self.shared.durable.call(|t| t.release_held(stale)).await {
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
        let closed = self.shared.cache.breaker.is_closed();
        if closed && !self.journals_may_hold(collection) {
            return Ok(true);
        }
        // As in `settle`: with the breaker open the tier is asked, briefly.
        let pinned = if closed {
            self.shared
                .cache
                .call(|t| t.pinned(query))
                .await
                .map_err(|err| self.shared.cache_failed("pinned", &err))
                .ok()
        } else {
            self.shared
                .recovery
                .past_breaker(|tier| tier.pinned(query))
                .await
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
    pub(crate) async fn apply_pinned(&self, pinned: &[Change]) -> Result<(), Error> {
        if pinned.is_empty() {
            return Ok(());
        }
        self.shared
            .durable
            .call(|t| t.apply_changes(pinned, ApplyMode::IfNewer))
            .await
            .map_err(|err| self.shared.durable_failed(err))?;
        for change in pinned {
            self.unreplayed.replayed(&change.key(), change.version());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_gets_a_version_above_the_floor() {
        let now = OffsetDateTime::now_utc();
        let clock = Version::clock(now);
        assert_eq!(above(now, Some(Version::new(clock - 10))), now);
        let later = above(now, Some(Version::new(clock + 10)));
        assert_eq!(Version::clock(later), clock + 11);
    }
}
