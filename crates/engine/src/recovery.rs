//! Cache recovery: what makes a cache safe to serve again.
//!
//! Copies in the cache can go stale while it is unreachable, because writes
//! then commit in the durable tier only, and a Redis that restarted may have
//! reloaded copies older than what it had acknowledged. So any cache failure
//! opens its breaker at once, every write that skipped the cache is
//! remembered ([`DirtyKeys`]), and the cache's half-open trial makes it safe
//! before it closes: it compares the server's id (Redis `run_id`) with the
//! last one seen and removes every copy after a restart, or the remembered
//! keys otherwise.

use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hybridstore_core::{CacheStore, RecordKey, StoreError, StoreResult, Tier, Version};

use crate::guarded::Guarded;

/// The cache tier's recovery: what it remembers while the cache is out of
/// service, and the probe that brings it back.
pub(crate) struct Recovery {
    /// The cache tier behind its breaker (shared with the engine).
    cache: Arc<Guarded<dyn CacheStore>>,
    /// Records written while the cache could not be updated.
    pub dirty: Mutex<DirtyKeys>,
    /// The cache server's id when last seen healthy.
    pub server_id: Mutex<Option<String>>,
    /// Counter increments went around the cache: its bucket values are
    /// behind, and recovery drops them (they are seeded again).
    pub counters_dirty: std::sync::atomic::AtomicBool,
    /// Shared by a write that records its commit around the cache and by a
    /// fill of an earlier-read durable state ([`Recovery::fill`]); held
    /// alone by the recovery while it takes the last of those writes,
    /// removes older copies and closes the breaker: neither a write nor a
    /// fill can fall between the two (see [`Recovery::wrote_around`]).
    gate: tokio::sync::RwLock<()>,
    /// Versions committed around the cache that the last recoveries
    /// removed older copies for: a write of this instance decided before the
    /// breaker closed, whose update arrives after, must not store its older
    /// version where the newer one was only removed (kept for a while).
    floors: Mutex<std::collections::HashMap<RecordKey, (Version, Instant)>>,
    /// Whether `floors` holds anything: writes look without the lock.
    floors_held: AtomicBool,
    /// A recovery trial found the cache reachable and is under way: the
    /// breaker is still open, but the tier answers (see
    /// [`Recovery::recovering`]).
    recovering: AtomicBool,
    /// When this instance last bumped the durable cache generation (held
    /// while bumping, so concurrent writers share one bump).
    pub(crate) bumped: tokio::sync::Mutex<Option<Instant>>,
    /// The generations this instance's bumps produced since the cache last
    /// recovered: when every generation since the cache was reconciled is
    /// one of them, the keys this instance remembers are all that was
    /// written around.
    pub(crate) own_bumps: Mutex<std::collections::BTreeSet<u64>>,
}

/// How long a recovery remembers the versions committed around the cache
/// (longer than any write decided before it closed can take).
const FLOOR_KEPT: Duration = Duration::from_secs(30);

/// How long a request waits on an unreachable-looking cache past its open
/// breaker (see [`Recovery::past_breaker`]): a reachable cache
/// answers within a few milliseconds; a hung one must not hold every request
/// for the call timeout.
const PAST_BREAKER_WAIT: Duration = Duration::from_millis(25);

/// Longest a commit waits for its copy's update in a busy cache before the
/// cache is taken out of service (see [`Recovery::patiently`]).
const PATIENCE: Duration = Duration::from_secs(5);

/// Longest a restarted cache's reconciliation may take before the probe
/// gives up (the next one goes on from where it stopped).
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(60);

/// Most dirty keys remembered one by one; past this, recovery removes every
/// copy instead.
const MAX_DIRTY_KEYS: usize = 100_000;

/// Keys whose cache copy may be stale, with the newest version committed
/// around the cache when known.
#[derive(Default)]
pub(crate) struct DirtyKeys {
    keys: std::collections::HashMap<RecordKey, Option<Version>>,
    overflowed: bool,
}

impl Recovery {
    pub fn new(cache: Arc<Guarded<dyn CacheStore>>) -> Self {
        Self {
            cache,
            dirty: Mutex::new(DirtyKeys::default()),
            server_id: Mutex::new(None),
            counters_dirty: std::sync::atomic::AtomicBool::new(false),
            gate: tokio::sync::RwLock::new(()),
            floors: Mutex::new(std::collections::HashMap::new()),
            floors_held: AtomicBool::new(false),
            recovering: AtomicBool::new(false),
            bumped: tokio::sync::Mutex::new(None),
            own_bumps: Mutex::new(std::collections::BTreeSet::new()),
        }
    }

    /// Remembers that `key` is being written without updating the cache.
    pub fn mark_dirty(&self, key: &RecordKey) {
        self.remember(key, None);
    }

    fn remember(&self, key: &RecordKey, committed: Option<Version>) {
        let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        if dirty.overflowed {
            return;
        }
        if dirty.keys.len() >= MAX_DIRTY_KEYS && !dirty.keys.contains_key(key) {
            dirty.keys.clear();
            dirty.overflowed = true;
            return;
        }
        let held = dirty.keys.entry(key.clone()).or_default();
        *held = (*held).max(committed);
    }

    /// After a commit of `version` of `key`: unless the cache is in
    /// service, the version is remembered for the recovery to remove older
    /// copies, and true is returned; false means the cache is in service
    /// and the writer updates its copy itself. Decided under the gate the
    /// recovery closes the breaker under, so every write is either
    /// remembered before the recovery's last pass or sees the breaker
    /// closed. The writer then stores only its own committed version, and
    /// only where newer wins (for other instances that may serve the cache
    /// already): nothing older than a commit is put back.
    pub async fn wrote_around(&self, key: &RecordKey, version: Version) -> bool {
        if self.cache.breaker.is_closed() {
            return false;
        }
        let _gate = self.gate.read().await;
        if self.cache.breaker.is_closed() {
            return false;
        }
        self.remember(key, Some(version));
        true
    }

    /// Runs `fill`, which puts `version` of `key` (read from the durable
    /// tier a moment ago: a read's miss, a sync, a repair) into the cache,
    /// unless a newer version was committed around the cache since and a
    /// recovery removed the older copies: the fill would bring back what
    /// that recovery removed, where nothing newer stands to refuse it. Under
    /// the gate, so no recovery falls between the check and the fill; `None`
    /// when it was left out.
    pub async fn fill<T, F>(
        &self,
        key: &RecordKey,
        version: Version,
        fill: impl FnOnce() -> F,
    ) -> Option<StoreResult<T>>
    where
        F: Future<Output = StoreResult<T>>,
    {
        let _gate = self.gate.read().await;
        if self.overtaken(key, version) {
            return None;
        }
        Some(fill().await)
    }

    /// Whether a newer version of `key` than `version` was committed around
    /// the cache and its older copies removed by a recent recovery: then the
    /// copy must not be stored (a read fills the newer one).
    pub fn overtaken(&self, key: &RecordKey, version: Version) -> bool {
        if !self.floors_held.load(Ordering::Acquire) {
            return false;
        }
        let floors = self.floors.lock().unwrap_or_else(|e| e.into_inner());
        floors
            .get(key)
            .is_some_and(|(floor, at)| *floor > version && at.elapsed() < FLOOR_KEPT)
    }

    /// A write committed but its cache update failed: the copy may be stale,
    /// so the cache stops serving until recovery has removed it.
    pub fn write_failed(&self, key: &RecordKey, version: Version, err: &StoreError) {
        self.remember(key, Some(version));
        self.cache.breaker.force_open(err);
    }

    /// Every copy may be stale and could not be dropped now: the cache stops
    /// serving until its recovery has dropped them all.
    pub fn suspend_until_flushed(&self, err: &StoreError) {
        {
            let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
            dirty.keys.clear();
            dirty.overflowed = true;
        }
        self.cache.breaker.force_open(err);
    }

    /// The probe: a heartbeat while closed (which also notices a restart or
    /// a write around the cache by anyone), the recovery trial while open.
    ///
    /// A recovery: (1) if any copy may be stale, every copy but pinned ones
    /// goes and `reconcile` replays the journals (the engine: pinned copies
    /// are confirmed or dropped); (2) the durable generation the cache is
    /// now reconciled to is recorded in it; (3) under the gate, every key
    /// written around loses its copy if that is older than what was
    /// committed (pinned or not; a key whose commit is still in flight loses
    /// an unpinned copy), and the breaker closes.
    pub async fn probe<F, R>(&self, durable_generation: Option<u64>, reconcile: F)
    where
        F: FnOnce() -> R,
        R: Future<Output = StoreResult<()>>,
    {
        self.cache.breaker.begin_trial();
        let started = Instant::now();
        // First the ping, on the tier's probe connection: a dead or hung
        // cache shows there within the call timeout; a busy one answers.
        if let Err(err) = self
            .cache
            .breaker
            .within(self.cache.timeout, self.cache.tier.ping())
            .await
        {
            return self.cache.breaker.probe_failed(&err);
        }
        let check = self.check(durable_generation);
        let checked = match self
            .cache
            .breaker
            .within(self.cache.timeout * 4, check)
            .await
        {
            Ok(checked) => checked,
            // It answered the ping: busy. A heartbeat looks again next time.
            Err(err) if err.is_busy() && self.cache.breaker.is_closed() => {
                tracing::debug!(error = %err, "cache heartbeat cut short: the cache is busy");
                return;
            }
            Err(err) => return self.cache.breaker.force_open(&err),
        };
        let _recovering =
            (!self.cache.breaker.is_closed()).then(|| Recovering::begin(&self.recovering));
        if checked.everything {
            let reconciled = reconcile();
            if let Err(err) = self
                .cache
                .breaker
                .within(RECONCILE_TIMEOUT, reconciled)
                .await
            {
                tracing::warn!(error = %err, "the cache could not be reconciled yet; it stays out of service");
                return self.cache.breaker.force_open(&err);
            }
        }
        if let Some(generation) = checked.stale_below {
            let recorded = self.cache.tier.set_reconciled_generation(generation);
            if let Err(err) = self
                .cache
                .breaker
                .within(self.cache.timeout, recorded)
                .await
            {
                return self.cache.breaker.force_open(&err);
            }
        }
        let _gate = self.gate.write().await;
        let written: Vec<(RecordKey, Option<Version>)> = {
            let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
            if checked.everything {
                // The pass above removed every copy these keys could have.
                *dirty = DirtyKeys::default();
            }
            if self.cache.breaker.is_closed() {
                // A heartbeat: what is left are marks of writes that found
                // the cache back in service and updated their copies
                // themselves. Removing copies now could race their stores.
                dirty.keys.clear();
                Vec::new()
            } else {
                dirty.keys.drain().collect()
            }
        };
        if !written.is_empty() {
            let removed = self
                .cache
                .breaker
                .within(self.cache.timeout * 4, self.remove_older(&written));
            if let Err(err) = removed.await {
                // Remembered again for the next trial.
                for (key, version) in &written {
                    self.remember(key, *version);
                }
                return self.cache.breaker.force_open(&err);
            }
            tracing::info!(
                keys = written.len(),
                "cache recovery removed copies of keys written around it"
            );
            let mut floors = self.floors.lock().unwrap_or_else(|e| e.into_inner());
            floors.retain(|_, (_, at)| at.elapsed() < FLOOR_KEPT);
            for (key, version) in &written {
                if let Some(version) = version {
                    let floor = floors
                        .entry(key.clone())
                        .or_insert((*version, Instant::now()));
                    *floor = (floor.0.max(*version), Instant::now());
                }
            }
            self.floors_held
                .store(!floors.is_empty(), Ordering::Release);
        }
        if let Some(reconciled) = checked.stale_below {
            // Bumps made during this recovery (by writes it handled) stay
            // known as this instance's own, so the next probe does not take
            // them for someone else's.
            self.own_bumps
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|generation| *generation > reconciled);
        }
        *self.server_id.lock().unwrap_or_else(|e| e.into_inner()) = checked.server_id;
        self.cache.breaker.probe_took(started.elapsed());
        self.cache.breaker.close_unless_failed_since(checked.epoch);
    }

    /// Whether a recovery is under way: the tier answered its check just
    /// now, so a request may ask it past the breaker what it must know
    /// before the durable tier answers (pinned versions: the journals a
    /// recovery replays keep filling from instances that serve the cache
    /// already).
    pub fn recovering(&self) -> bool {
        self.recovering.load(Ordering::Acquire)
    }

    /// Asks the tier itself, past the open breaker: another instance may
    /// serve the cache already, so what it holds matters (pinned versions; a
    /// copy to bring up to date). Waits up to the call timeout while this
    /// instance's recovery has just reached it, [`PAST_BREAKER_WAIT`]
    /// otherwise (it may be down, or hung); not at all during a simulated
    /// outage. None: no answer.
    pub async fn past_breaker<'a, T, F>(
        &'a self,
        call: impl FnOnce(&'a dyn CacheStore) -> F,
    ) -> Option<T>
    where
        F: Future<Output = StoreResult<T>>,
    {
        if self.cache.breaker.outage_simulated() {
            return None;
        }
        let wait = if self.recovering() {
            self.cache.timeout
        } else {
            PAST_BREAKER_WAIT
        };
        tokio::time::timeout(wait, call(&*self.cache.tier))
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// Runs `call` on the cache once more, waiting past the call timeout
    /// (up to [`PATIENCE`]) while the breaker stays closed: for the copy of
    /// a commit that must land, a busy cache is waited for rather than
    /// taken out of service. Opening (the probe found the tier down) ends
    /// the wait.
    pub async fn patiently<'a, T, F>(
        &'a self,
        call: impl FnOnce(&'a dyn CacheStore) -> F,
    ) -> StoreResult<T>
    where
        F: Future<Output = StoreResult<T>>,
    {
        let opened = self.cache.breaker.opened.notified();
        tokio::pin!(opened);
        opened.as_mut().enable();
        if !self.cache.breaker.is_closed() || self.cache.breaker.outage_simulated() {
            return Err(StoreError::unavailable(
                Tier::Cache,
                "the cache is out of service",
            ));
        }
        tokio::select! {
            result = tokio::time::timeout(PATIENCE, call(&*self.cache.tier)) => {
                result.unwrap_or_else(|_| Err(StoreError::busy(
                    Tier::Cache,
                    format!("no answer within {PATIENCE:?}"),
                    true,
                )))
            }
            () = opened => Err(StoreError::unavailable(Tier::Cache, "the cache went down")),
        }
    }

    /// Removes the copies older than what was committed around the cache.
    async fn remove_older(&self, written: &[(RecordKey, Option<Version>)]) -> StoreResult<()> {
        let unknown: Vec<RecordKey> = written
            .iter()
            .filter(|(_, version)| version.is_none())
            .map(|(key, _)| key.clone())
            .collect();
        self.cache.tier.invalidate(&unknown).await?;
        let older = written.iter().filter_map(|(key, version)| {
            version.map(|version| self.cache.tier.invalidate_older(key, version))
        });
        for removed in futures_util::future::join_all(older).await {
            removed?;
        }
        Ok(())
    }

    /// Checks the cache: its server id, and the durable cache generation it
    /// was reconciled to. `durable_generation` is the durable tier's, when
    /// it could be read: above the cache's, some instance (maybe one that
    /// died since, maybe another process) wrote around the cache, and any
    /// copy may be stale. Checked on every probe, so an instance that never
    /// lost the cache stops serving it within one probe interval. When any
    /// copy may be stale, every unpinned copy goes now.
    async fn check(&self, durable_generation: Option<u64>) -> StoreResult<Checked> {
        let server_id = self.cache.tier.server_id().await?;
        let restarted = {
            let last = self.server_id.lock().unwrap_or_else(|e| e.into_inner());
            last.is_some() && *last != server_id
        };
        // Written around since it was reconciled: by this instance alone (one
        // bump, its own, and it remembers every key), or by anyone.
        let overflowed = self
            .dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .overflowed;
        let (stale_below, only_mine) = match durable_generation {
            Some(generation) => {
                let reconciled = self.cache.tier.reconciled_generation().await?;
                let own = self.own_bumps.lock().unwrap_or_else(|e| e.into_inner());
                let only_mine = !overflowed
                    && generation.saturating_sub(reconciled) <= own.len() as u64
                    && (reconciled + 1..=generation).all(|g| own.contains(&g));
                if generation > reconciled {
                    (Some(generation), only_mine)
                } else {
                    (None, false)
                }
            }
            None => (None, false),
        };
        // This instance's own bump needs nothing more: each of its writes
        // around the cache was either in its last recovery's final pass or
        // found the cache in service and updated its copy itself.
        let written_by_others = stale_below.is_some() && !only_mine;
        let everything = restarted || overflowed || written_by_others;
        if restarted || written_by_others {
            // Stop serving before cleaning: what the restarted server reloaded
            // may be older than what it had acknowledged, and copies written
            // around are stale.
            let why = if restarted {
                "restarted (server id changed)"
            } else {
                "was written around"
            };
            self.cache.breaker.suspend(&StoreError::unavailable(
                Tier::Cache,
                format!("{} {why}", self.cache.tier.backend()),
            ));
        }
        // Decided now, after the round trips: the breaker may have opened
        // while this probe waited, and then this probe is the recovery.
        let epoch = self.cache.breaker.failure_epoch();
        // Also while closed: an increment that went around the cache just as
        // it recovered is caught by the next heartbeat.
        if self.counters_dirty.swap(false, Ordering::AcqRel) || everything {
            // Taken down before the scan: an increment that goes around the
            // cache meanwhile sets it again for the next probe.
            if let Err(err) = self.cache.tier.forget_counters().await {
                self.counters_dirty.store(true, Ordering::Release);
                return Err(err);
            }
            tracing::info!(
                "cache recovery dropped counter buckets; they are seeded again from the durable tier"
            );
        }
        if everything {
            let removed = self.cache.tier.invalidate_all(false).await?;
            tracing::warn!(
                removed,
                restarted,
                "cache recovery removed every unpinned copy"
            );
        }
        Ok(Checked {
            epoch,
            server_id,
            everything,
            stale_below,
        })
    }
}

/// What a cache probe found.
struct Checked {
    epoch: u64,
    server_id: Option<String>,
    /// Any copy may be stale: replay before serving.
    everything: bool,
    /// The durable cache generation to record once reconciled.
    stale_below: Option<u64>,
}

/// Marks a recovery under way for as long as it lives (every return of the
/// probe ends it).
struct Recovering<'a>(&'a AtomicBool);

impl<'a> Recovering<'a> {
    fn begin(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Release);
        Self(flag)
    }
}

impl Drop for Recovering<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}
