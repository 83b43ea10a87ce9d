//! Strategy switches at run time, shared by every instance.
//!
//! A switch is saved in the durable tier (so it survives restarts; the save
//! only replaces an older revision, so two concurrent switches cannot both
//! win), mirrored and broadcast through the cache tier (so every instance
//! applies it at once), and polled from the durable tier now and then (so an
//! instance that missed the broadcast, because its subscription was down,
//! still catches up).
//!
//! Some switches need care beyond the new plan:
//! - leaving `postgres_only`, whose writes skipped the cache, for a strategy
//!   that uses it: copies may be stale, so the switch bumps the cache
//!   generation and every instance drops every copy before it applies it;
//! - to `redis_only` while PostgreSQL is healthy (acknowledged writes would
//!   then live in Redis only), or away from it (records written under it are
//!   in Redis only): the operator must say `force`;
//! - to `postgres_only` while journaled writes wait: refused until drained,
//!   since PostgreSQL-only reads would not see them.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use hybridstore_api::SwitchOutcome;
use hybridstore_core::{CollectionName, ControlState, Error, Strategy};

use crate::journal::Journal;
use crate::shared::Shared;
use crate::strategy::Plan;
use hybridstore_core::now;

/// How often an instance re-reads the saved state (in case it missed a broadcast).
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Strategy switches: applied here, saved, broadcast and polled.
pub(crate) struct Switches {
    shared: Arc<Shared>,
    journal: Arc<Journal>,
}

impl Switches {
    pub fn new(shared: Arc<Shared>, journal: Arc<Journal>) -> Self {
        Self { shared, journal }
    }
}

impl Switches {
    /// Collections without a strategy of their own.
    fn following_collections(&self) -> impl Iterator<Item = &crate::Collection> {
        self.shared.catalog.iter().filter(|collection| {
            collection.spec.strategy.is_none()
                && self
                    .shared
                    .control
                    .switched(collection.spec.name.as_str())
                    .is_none()
        })
    }

    /// Loads the saved state at start: from the durable tier, or the cache's
    /// mirror when the durable tier is down.
    pub async fn load_control_state(&self) {
        if let Some(state) = self.saved_state().await {
            self.apply_control(state, false).await;
        }
        // Once at start; a switch later warns again (`apply_control`).
        self.warn_held_back(self.shared.control.strategy());
    }

    /// Applies `state` unless this instance already has it (or a newer one).
    /// With `flush_allowed`, a newer cache generation first drops every copy.
    async fn apply_control(&self, state: ControlState, flush_allowed: bool) {
        let _serial = self.shared.control.applying.lock().await;
        let current = self.shared.control.applied();
        if current
            .as_ref()
            .is_some_and(|held| held.revision >= state.revision)
        {
            return;
        }
        let flush = flush_allowed
            && current.as_ref().map_or(0, |held| held.cache_generation) < state.cache_generation;
        if flush {
            // The strategy in force stays the old one until the copies are
            // gone, so nothing reads a stale copy meanwhile.
            match self.shared.cache.tier.invalidate_all(false).await {
                Ok(removed) => {
                    tracing::info!(
                        removed,
                        generation = state.cache_generation,
                        "cache copies dropped for a new cache generation"
                    );
                }
                Err(err) => {
                    tracing::warn!(error = %err, "could not drop cache copies; the cache stays suspended until its recovery drops them");
                    self.shared.recovery.suspend_until_flushed(&err);
                }
            }
        }
        let strategy = state.strategy.unwrap_or(self.shared.control.configured());
        let previous = self.shared.control.strategy();
        // Collections leaving cache_first may have write-behind entries
        // waiting; known before the switch is visible.
        let leaving = self
            .shared
            .catalog
            .iter()
            .filter(|collection| {
                let after = state
                    .collections
                    .get(collection.spec.name.as_str())
                    .copied()
                    .unwrap_or_else(|| collection.strategy(strategy));
                self.shared.strategy_of(collection) == Strategy::CacheFirst
                    && after != Strategy::CacheFirst
            })
            .map(|collection| collection.spec.name.to_string())
            .collect();
        self.journal.leaving_write_behind(leaving);
        if previous != strategy {
            tracing::warn!(%previous, %strategy, revision = state.revision, changed_by = %state.changed_by, "service strategy switched");
            if flush_allowed {
                self.warn_held_back(strategy);
            }
        }
        self.shared.control.install(strategy, state);
    }

    /// One warning naming the collections that follow the service-wide
    /// `strategy` but cannot take it (they stay on `dual_write`).
    pub fn warn_held_back(&self, strategy: Strategy) {
        let held: Vec<String> = self
            .following_collections()
            .filter(|c| c.held_back(strategy).is_some())
            .map(|c| c.spec.name.to_string())
            .collect();
        if !held.is_empty() {
            tracing::warn!(
                %strategy,
                collections = %held.join(", "),
                "these collections have unique indexes, which only the durable tier enforces: they follow dual_write instead"
            );
        }
    }

    /// Switches the service-wide strategy on every instance sharing the stores.
    #[tracing::instrument(level = "info", skip(self))]
    pub async fn switch_strategy(
        &self,
        target: Strategy,
        force: bool,
    ) -> Result<SwitchOutcome, Error> {
        self.two_tiers()?;
        let previous = self.shared.control.strategy();
        let collections: Vec<String> = self
            .following_collections()
            .map(|c| c.spec.name.to_string())
            .collect();
        let held_back: Vec<String> = self
            .following_collections()
            .filter(|c| c.held_back(target).is_some())
            .map(|c| c.spec.name.to_string())
            .collect();
        let current = self.shared.control.applied();
        let revision = current.as_ref().map_or(0, |held| held.revision);
        if previous == target {
            return Ok(SwitchOutcome {
                previous,
                strategy: target,
                changed: false,
                revision,
                cache_flushed: false,
                collections,
                held_back,
            });
        }
        self.admit(previous, target, force).await?;
        let stale_copies =
            !Plan::of(previous).keeps_cache_current() && Plan::of(target).uses_cache();
        let generation = current.as_ref().map_or(0, |held| held.cache_generation);
        let state = ControlState {
            revision: revision + 1,
            strategy: Some(target),
            // Collections switched one by one keep their switches.
            collections: current
                .as_ref()
                .map(|held| held.collections.clone())
                .unwrap_or_default(),
            cache_generation: generation + u64::from(stale_copies),
            changed_at: now(),
            changed_by: self.shared.instance_id.clone(),
        };
        self.save_and_apply(&state).await?;
        Ok(SwitchOutcome {
            previous,
            strategy: target,
            changed: true,
            revision: state.revision,
            cache_flushed: stale_copies,
            collections,
            held_back,
        })
    }

    /// Whether a move of a collection (or the service) from `previous` to
    /// `target` may happen now; the refusals say what to do instead.
    async fn admit(&self, previous: Strategy, target: Strategy, force: bool) -> Result<(), Error> {
        let (durable, cache) = (self.shared.durable.backend(), self.shared.cache.backend());
        if !force && target == Strategy::RedisOnly && self.shared.durable.breaker.is_closed() {
            return Err(Error::ForceRequired(format!(
                "switching to redis_only stops writing to the durable tier ({durable}): \
                 acknowledged writes would live in the cache ({cache}) only. Repeat with force, \
                 then sync from the durable tier to the cache so that the cache holds every record"
            )));
        }
        if !force && previous == Strategy::RedisOnly {
            return Err(Error::ForceRequired(format!(
                "records written under redis_only exist in the cache ({cache}) only: sync from \
                 the cache to the durable tier ({durable}) first, then repeat the switch with force"
            )));
        }
        if target == Strategy::PostgresOnly {
            let (write_behind, outage) = self.journal.journal_backlog().await?;
            if write_behind + outage > 0 {
                return Err(Error::NotAllowed(format!(
                    "{} journaled writes are not in the durable tier ({durable}) yet and \
                     postgres_only reads would miss them: switch to database_first, wait until \
                     status shows an empty journal, then switch to postgres_only",
                    write_behind + outage
                )));
            }
        }
        if !self.shared.durable.breaker.is_closed() {
            return Err(Error::NotAllowed(format!(
                "the durable tier ({durable}) is unavailable: a switch is saved there to survive \
                 restarts; retry when it is back"
            )));
        }
        Ok(())
    }

    /// Saves `state` in the durable tier (only over an older revision),
    /// applies it here and broadcasts it to the other instances.
    async fn save_and_apply(&self, state: &ControlState) -> Result<(), Error> {
        let saved = self
            .shared
            .durable
            .call(|t| t.save_control(state))
            .await
            .map_err(|err| self.shared.durable_failed(err))?;
        if !saved {
            // Another instance switched first; learn what it did.
            self.reconcile_control().await;
            return Err(Error::NotAllowed(
                "another strategy switch was saved at the same time; check the status and retry"
                    .into(),
            ));
        }
        self.apply_control(state.clone(), true).await;
        if let Err(err) = self.shared.cache.call(|t| t.publish_control(state)).await {
            tracing::warn!(error = %err, "could not broadcast the switch; other instances pick it up from the durable tier within seconds");
        }
        Ok(())
    }

    /// A deployment with one tier has one strategy: no switch.
    fn two_tiers(&self) -> Result<(), Error> {
        match self.shared.settings.tiers.alone() {
            None => Ok(()),
            Some(why) => Err(Error::NotAllowed(why)),
        }
    }

    /// Switches one collection's strategy on every instance sharing the
    /// stores (`target: None`: back to what it declares or follows), under
    /// the rules of a service-wide switch; a strategy the collection cannot
    /// take (unique indexes under a strategy that writes through the cache)
    /// is refused.
    #[tracing::instrument(level = "info", skip(self))]
    pub async fn switch_collection_strategy(
        &self,
        name: &CollectionName,
        target: Option<Strategy>,
        force: bool,
    ) -> Result<SwitchOutcome, Error> {
        self.two_tiers()?;
        let collection = self.shared.catalog.get(name)?;
        if let Some(why) = target.and_then(|to| collection.refuses(to)) {
            return Err(Error::NotAllowed(format!("{name}: {why}")));
        }
        let previous = self.shared.strategy_of(collection);
        let next = target.unwrap_or_else(|| collection.strategy(self.shared.control.strategy()));
        let current = self.shared.control.applied();
        let revision = current.as_ref().map_or(0, |held| held.revision);
        let mut switched = current
            .as_ref()
            .map(|held| held.collections.clone())
            .unwrap_or_default();
        let unchanged = switched.get(name.as_str()).copied() == target;
        match target {
            Some(to) => switched.insert(name.to_string(), to),
            None => switched.remove(name.as_str()),
        };
        let outcome = |changed, revision, cache_flushed| SwitchOutcome {
            previous,
            strategy: next,
            changed,
            revision,
            cache_flushed,
            collections: vec![name.to_string()],
            held_back: Vec::new(),
        };
        if unchanged {
            return Ok(outcome(false, revision, false));
        }
        if previous != next {
            self.admit(previous, next, force).await?;
        }
        let stale_copies = !Plan::of(previous).keeps_cache_current() && Plan::of(next).uses_cache();
        let generation = current.as_ref().map_or(0, |held| held.cache_generation);
        let state = ControlState {
            revision: revision + 1,
            strategy: current.as_ref().and_then(|held| held.strategy),
            collections: switched,
            cache_generation: generation + u64::from(stale_copies),
            changed_at: now(),
            changed_by: self.shared.instance_id.clone(),
        };
        self.save_and_apply(&state).await?;
        Ok(outcome(true, state.revision, stale_copies))
    }

    /// The saved state: the durable tier's, or the cache's mirror when the
    /// durable tier cannot be read.
    async fn saved_state(&self) -> Option<ControlState> {
        match self.shared.durable.call(|t| t.load_control()).await {
            Ok(saved) => saved,
            Err(_) => self
                .shared
                .cache
                .call(|t| t.load_control())
                .await
                .ok()
                .flatten(),
        }
    }

    /// Applies the saved state if it is newer than the one in force.
    async fn reconcile_control(&self) {
        if let Some(state) = self.saved_state().await {
            self.apply_control(state, true).await;
        }
    }

    /// Follows switches made by any instance, forever: the broadcast for
    /// speed, a poll of the saved state for certainty.
    pub async fn run_control_sync(self: Arc<Self>) {
        loop {
            match self.shared.cache.call(|t| t.subscribe_control()).await {
                Ok(mut changes) => {
                    // A switch made while this instance was not subscribed.
                    self.reconcile_control().await;
                    loop {
                        tokio::select! {
                            change = changes.next() => match change {
                                Some(state) => self.apply_control(state, true).await,
                                None => break,
                            },
                            () = tokio::time::sleep(POLL_INTERVAL) => {
                                self.reconcile_control().await;
                                // A subscription on a connection that failed
                                // may never end by itself: start afresh.
                                if !self.shared.cache.breaker.is_closed() {
                                    break;
                                }
                            }
                        }
                    }
                }
                Err(err) => {
                    tracing::debug!(error = %err, "control subscription unavailable; polling");
                    tokio::time::sleep(POLL_INTERVAL).await;
                    self.reconcile_control().await;
                }
            }
        }
    }
}
