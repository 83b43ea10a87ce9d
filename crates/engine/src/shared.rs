//! What every component of the engine reads: the tiers behind their
//! breakers, the cache's recovery, the catalog, the settings, the strategy in
//! force and the statistics; and the rules every component applies the same
//! way: which plan a collection follows now, and which API error a tier
//! failure means.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

use hybridstore_core::{CacheStore, ControlState, DurableStore, Error, StoreError, Strategy};
use time::OffsetDateTime;

use crate::breaker::Breaker;
use crate::catalog::{Catalog, Collection};
use crate::guarded::Guarded;
use crate::recovery::Recovery;
use crate::settings::EngineSettings;
use crate::stats::{EngineStats, Operation, Outcome};
use crate::strategy::Plan;

/// State every component reads (see the module docs).
pub(crate) struct Shared {
    pub durable: Arc<Guarded<dyn DurableStore>>,
    pub cache: Arc<Guarded<dyn CacheStore>>,
    /// What the cache's recovery remembers, and its probe.
    pub recovery: Recovery,
    pub catalog: Catalog,
    pub settings: EngineSettings,
    /// The service-wide strategy in force and the control state it came from.
    pub control: Control,
    pub stats: EngineStats,
    /// This instance's name as a journal consumer.
    pub instance_id: String,
    pub started: Instant,
}

/// The service-wide strategy in force on this instance.
pub(crate) struct Control {
    configured: Strategy,
    /// Index into `Strategy::ALL`; read on every request, so an atomic.
    strategy: AtomicU8,
    applied: Mutex<Option<ControlState>>,
    /// Strategies operators set for single collections (read on every
    /// request while any is set; `switched` says whether to look).
    switched: std::sync::RwLock<std::collections::BTreeMap<String, Strategy>>,
    any_switched: std::sync::atomic::AtomicBool,
    /// Serialises applying states (an apply may flush the cache first).
    pub(crate) applying: tokio::sync::Mutex<()>,
}

fn index_of(strategy: Strategy) -> u8 {
    Strategy::ALL
        .iter()
        .position(|s| *s == strategy)
        .expect("every strategy is in ALL") as u8
}

impl Control {
    pub fn new(configured: Strategy) -> Self {
        Self {
            configured,
            strategy: AtomicU8::new(index_of(configured)),
            applied: Mutex::new(None),
            switched: Default::default(),
            any_switched: Default::default(),
            applying: tokio::sync::Mutex::new(()),
        }
    }

    pub fn strategy(&self) -> Strategy {
        Strategy::ALL[usize::from(self.strategy.load(Ordering::Acquire))]
    }

    pub fn configured(&self) -> Strategy {
        self.configured
    }

    /// Puts `strategy`, and the collections' switches, from `state`, in
    /// force.
    pub fn install(&self, strategy: Strategy, state: ControlState) {
        {
            let mut switched = self.switched.write().unwrap_or_else(|e| e.into_inner());
            *switched = state.collections.clone();
            self.any_switched
                .store(!switched.is_empty(), Ordering::Release);
        }
        self.strategy.store(index_of(strategy), Ordering::Release);
        *self.applied.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
    }

    /// The strategy an operator set for this collection, if any.
    pub fn switched(&self, collection: &str) -> Option<Strategy> {
        if !self.any_switched.load(Ordering::Acquire) {
            return None;
        }
        self.switched
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(collection)
            .copied()
    }

    pub fn applied(&self) -> Option<ControlState> {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A name for this process among the journal's consumers.
pub(crate) fn instance_id() -> String {
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    format!("hs-{}-{:x}", std::process::id(), nanos)
}

impl Shared {
    /// The breakers of the tiers this deployment has (durable, then cache).
    pub fn breakers(&self) -> impl Iterator<Item = &Breaker> {
        let tiers = self.settings.tiers;
        [
            (tiers.durable_serves(), &*self.durable.breaker),
            (tiers.cache_serves(), &*self.cache.breaker),
        ]
        .into_iter()
        .filter_map(|(present, breaker)| present.then_some(breaker))
    }

    /// A cache failure on the journaled path: the write cannot be taken.
    pub(crate) fn journal_failed(&self, err: StoreError) -> Error {
        match err {
            // A cache-only deployment's cache enforces unique indexes.
            StoreError::UniqueViolation { index, value } => Error::UniqueViolation { index, value },
            StoreError::Internal { .. } => {
                Error::Internal(format!("{err} ({})", self.cache.backend()))
            }
            StoreError::Busy { maybe_applied, .. } => self.busy(maybe_applied),
            _ => self.unavailable(),
        }
    }

    pub(crate) fn unavailable(&self) -> Error {
        Error::BackendsUnavailable {
            retry_after: self.settings.retry_after,
        }
    }

    /// A tier too busy to answer in time: the request was shed, or (when
    /// it reached the tier) its outcome is unknown; either way the tier is
    /// not declared down for it.
    pub(crate) fn busy(&self, maybe_applied: bool) -> Error {
        let retry_after = self.settings.retry_after;
        if maybe_applied {
            Error::OutcomeUnknown { retry_after }
        } else {
            Error::Overloaded { retry_after }
        }
    }

    /// The strategy a collection follows now: an operator's switch of
    /// it, else its own, else the service's (where it can take it).
    pub fn strategy_of(&self, collection: &Collection) -> Strategy {
        if let Some(forced) = self.settings.tiers.forced_strategy() {
            return forced;
        }
        self.control
            .switched(collection.spec.name.as_str())
            .unwrap_or_else(|| collection.strategy(self.control.strategy()))
    }

    /// The plan of the strategy a collection follows, before health narrows it.
    pub(crate) fn configured_plan(&self, collection: &Collection) -> Plan {
        Plan::of(self.strategy_of(collection))
    }

    /// The plan a collection follows now: its configured plan, narrowed by
    /// which tiers are usable. Fails at once when none is.
    pub(crate) fn plan_for(&self, collection: &Collection) -> Result<Plan, Error> {
        let durable_up = self.durable.breaker.is_closed();
        let cache_up = self.cache.breaker.is_closed();
        self.configured_plan(collection)
            .degraded(durable_up, cache_up)
            .ok_or_else(|| self.unavailable())
    }

    /// Turns a durable-tier failure into the API error it means.
    pub(crate) fn durable_failed(&self, err: StoreError) -> Error {
        match err {
            // The breaker logs the outage once; per request it is only debug.
            StoreError::Unavailable { .. } => {
                tracing::debug!(error = %err, backend = self.durable.backend(), "durable tier unavailable");
                self.unavailable()
            }
            StoreError::Busy { maybe_applied, .. } => {
                tracing::debug!(error = %err, backend = self.durable.backend(), "durable tier busy");
                self.busy(maybe_applied)
            }
            StoreError::PreconditionFailed => Error::VersionConflict { current: None },
            StoreError::NotFound => Error::NotFound("record not found".into()),
            StoreError::UniqueViolation { index, value } => Error::UniqueViolation { index, value },
            StoreError::CounterOutOfRange { field } => out_of_range(&field),
            StoreError::Internal { .. } => {
                Error::Internal(format!("{} ({})", err, self.durable.backend()))
            }
        }
    }

    /// A cache read failed. The durable tier can answer instead, unless
    /// writes currently go through the cache's journal: then the cache may
    /// hold versions the durable tier does not have yet.
    pub(crate) fn cache_read_failed(
        &self,
        plan: Plan,
        operation: &'static str,
        err: &StoreError,
    ) -> Result<(), Error> {
        self.cache_failed(operation, err);
        if plan.write.through_cache() {
            return Err(self.unavailable());
        }
        Ok(())
    }

    /// A cache failure is not the request's failure: log it and go on.
    /// Runs one API operation, counting it (by outcome) and timing it: a
    /// refusal (4xx) is the service working, a failure (5xx) is not.
    pub(crate) async fn observed<T>(
        &self,
        operation: Operation,
        work: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let started = Instant::now();
        let result = work.await;
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(Error::BackendsUnavailable { .. } | Error::Internal(_)) => Outcome::Failed,
            Err(_) => Outcome::Rejected,
        };
        self.stats.record(operation, outcome, started.elapsed());
        result
    }

    pub(crate) fn cache_failed(&self, operation: &'static str, err: &StoreError) {
        tracing::warn!(error = %err, backend = self.cache.backend(), operation, "cache tier call failed; bypassing cache");
    }

    /// Records durably that a write committed around the cache (called
    /// after its commit): bumps the durable cache generation, unless a bump
    /// of this instance started after that commit already (writers that
    /// commit while one bump runs share the next). A bump that started
    /// before the commit does not cover it: another instance may have
    /// reconciled the cache to it already, before the write, and must learn
    /// of the write (a shared window of time once let an instance that
    /// reconciled within it keep a copy the write made stale).
    pub(crate) async fn write_around(&self) -> Result<(), Error> {
        let committed = Instant::now();
        let mut bumped = self.recovery.bumped.lock().await;
        if bumped.is_some_and(|started| started > committed) {
            return Ok(());
        }
        let started = Instant::now();
        let generation = self
            .durable
            .call(|t| t.bump_cache_generation())
            .await
            .map_err(|err| self.durable_failed(err))?;
        *bumped = Some(started);
        let mut own = self
            .recovery
            .own_bumps
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if own.is_empty() {
            tracing::info!(
                generation,
                "writes go around the cache: cache generation bumped"
            );
        }
        if own.len() < 10_000 {
            own.insert(generation);
        }
        Ok(())
    }

    /// The durable tier's cache generation, when it can be read.
    pub(crate) async fn durable_cache_generation(&self) -> Option<u64> {
        if !self.durable.breaker.is_closed() {
            return None;
        }
        self.durable.call(|t| t.cache_generation()).await.ok()
    }
}

/// The API error for an increment refused by [`StoreError::CounterOutOfRange`].
pub(crate) fn out_of_range(field: &str) -> Error {
    Error::CounterOutOfRange(format!(
        "the increment would take {field} past {}, the largest total a counter keeps; nothing was applied",
        hybridstore_core::MAX_TOTAL_UNITS
    ))
}
