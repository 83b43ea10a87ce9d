//! Tier health: one circuit breaker per tier, fed by live calls and a probe.
//!
//! A tier that fails (refused connection, timeout, shutdown) a few times in a
//! row is *open*: calls to it fail at once, without touching the network, so a
//! dead tier costs nothing per request and the engine routes around it. A
//! background probe pings every tier; while a tier is open, each probe is the
//! *half-open* trial, and its success closes the breaker again. Requests never
//! act as trials: they see the last verdict, which keeps recovery decisions in
//! one place and away from request latency.
//!
//! Every tier call also runs under a client-side timeout, because a hung server
//! (stopped process, dropped packets) answers nothing and would otherwise hold
//! the request for as long as the TCP stack cares to wait.
//!
//! The cache needs more than a breaker: copies in it can go stale while it is
//! unreachable, because writes then commit in the durable tier only, and a
//! Redis that restarted may have reloaded copies older than what it had
//! acknowledged. So any cache failure opens its breaker at once, every write
//! that skipped the cache is remembered ([`DirtyKeys`]), and the cache's
//! half-open trial makes it safe before it closes: it compares the server's id
//! (Redis `run_id`) with the last one seen and removes every copy after a
//! restart, or the remembered keys otherwise.

use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use std::collections::HashSet;

use hybridstore_core::{
    ApplyMode, Bucket, BucketValues, CacheEntry, CacheIncrementOutcome, CacheStore, CacheWrite,
    CacheWriteOutcome, CachedState, Change, CollectionName, ControlState, CopyOutcome,
    CounterIncrement, CounterJournalEntry, CounterScope, CounterValue, DurableStore,
    IdempotencyClaim, IndexEntry, IndexName, JournalAck, JournalEntry, JournalKind,
    JournalPosition, ListPage, ListQuery, Precondition, Record, RecordId, RecordKey, RecordWrite,
    ReplayBounds, StoreError, StoreResult, Tier, Version, WriteOutcome,
};
use serde::Serialize;

use crate::stats::TierStats;
use time::OffsetDateTime;

/// How breakers and probes behave.
#[derive(Clone, Debug)]
pub struct HealthSettings {
    /// Consecutive failures that open a breaker.
    pub failure_threshold: u32,
    /// How often the probe pings each tier.
    pub probe_interval: Duration,
    /// Longest a single durable-tier call may take.
    pub durable_call_timeout: Duration,
    /// Longest a single cache-tier call may take.
    pub cache_call_timeout: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            probe_interval: Duration::from_millis(250),
            durable_call_timeout: Duration::from_secs(2),
            cache_call_timeout: Duration::from_millis(500),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Healthy: calls go through.
    Closed,
    /// Failing: calls fail fast until a probe succeeds.
    Open,
    /// A probe is testing an open tier; calls still fail fast.
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

struct BreakerInner {
    state: BreakerState,
    consecutive_failures: u32,
    since: OffsetDateTime,
    last_error: Option<String>,
}

/// The breaker of one tier.
pub struct Breaker {
    tier: Tier,
    backend: &'static str,
    threshold: u32,
    inner: Mutex<BreakerInner>,
    /// How often this tier went from closed to open.
    degradations: AtomicU64,
    /// Counts every failure; a probe closes the breaker only if none happened
    /// since it looked (see [`Breaker::close_unless_failed_since`]).
    failure_epoch: AtomicU64,
    /// Calls, failures and latency of the tier's calls.
    pub(crate) stats: TierStats,
    /// How long the last successful probe took.
    last_probe: Mutex<Option<Duration>>,
    /// Every call fails as if the tier were unreachable (fault drills and
    /// tests of tiers that cannot be killed from outside, like the
    /// in-process cache).
    simulated_outage: AtomicBool,
    /// Wakes the calls in flight when the breaker opens: a call waiting on
    /// a dead tier (for a connection, say) fails then instead of at its
    /// timeout.
    opened: tokio::sync::Notify,
    /// Asks for a probe now: a live call failed, and the probe can tell a
    /// dead tier (connection refused) from a slow one at once.
    pub(crate) probe_wanted: tokio::sync::Notify,
    /// Calls running past half their timeout right now. A probe that fails
    /// meanwhile opens the breaker at once: live calls and the ping both
    /// got no answer, the tier is hung rather than busy.
    stalled: AtomicU64,
}

/// A snapshot of one tier's health, for status pages and metrics.
#[derive(Clone, Debug, Serialize)]
pub struct TierHealth {
    pub tier: &'static str,
    pub backend: &'static str,
    pub state: BreakerState,
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    pub consecutive_failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub degradations: u64,
    /// Round trip of the last successful probe, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_latency_ms: Option<f64>,
}

impl Breaker {
    pub fn new(tier: Tier, backend: &'static str, threshold: u32) -> Self {
        Self {
            tier,
            backend,
            threshold: threshold.max(1),
            inner: Mutex::new(BreakerInner {
                state: BreakerState::Closed,
                consecutive_failures: 0,
                since: OffsetDateTime::now_utc(),
                last_error: None,
            }),
            degradations: AtomicU64::new(0),
            failure_epoch: AtomicU64::new(0),
            stats: TierStats::default(),
            last_probe: Mutex::new(None),
            simulated_outage: AtomicBool::new(false),
            opened: tokio::sync::Notify::new(),
            probe_wanted: tokio::sync::Notify::new(),
            stalled: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerInner> {
        // A panic while holding this lock leaves consistent data behind.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    pub fn is_closed(&self) -> bool {
        self.state() == BreakerState::Closed
    }

    /// Completes when the breaker next opens.
    pub(crate) async fn opened(&self) {
        self.opened.notified().await;
    }

    fn transition(&self, inner: &mut BreakerInner, to: BreakerState) {
        self.move_to(inner, to, true);
    }

    /// Moves to `to`; `release_calls`: an opening fails the calls in flight
    /// (the tier is down: they would only wait for their timeout).
    fn move_to(&self, inner: &mut BreakerInner, to: BreakerState, release_calls: bool) {
        let from = inner.state;
        if from == to {
            return;
        }
        inner.state = to;
        inner.since = OffsetDateTime::now_utc();
        match to {
            BreakerState::Open if from == BreakerState::Closed => {
                if release_calls {
                    self.opened.notify_waiters();
                }
                self.degradations.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    tier = %self.tier,
                    backend = self.backend,
                    from = from.as_str(),
                    to = to.as_str(),
                    failures = inner.consecutive_failures,
                    error = inner.last_error.as_deref().unwrap_or(""),
                    "tier degraded: calls fail fast until a probe succeeds"
                );
            }
            BreakerState::Closed => tracing::info!(
                tier = %self.tier,
                backend = self.backend,
                from = from.as_str(),
                to = to.as_str(),
                "tier recovered"
            ),
            _ => {
                tracing::debug!(tier = %self.tier, from = from.as_str(), to = to.as_str(), "breaker")
            }
        }
    }

    /// A probe succeeded: the tier is healthy again. Only probes close a
    /// breaker, so recovery always goes through the probe's checks.
    pub fn record_success(&self) {
        let mut inner = self.lock();
        inner.consecutive_failures = 0;
        self.transition(&mut inner, BreakerState::Closed);
    }

    pub fn failure_epoch(&self) -> u64 {
        self.failure_epoch.load(Ordering::SeqCst)
    }

    /// Closes the breaker after a successful probe, unless a failure happened
    /// after the probe took `epoch`: what that failure left behind has not
    /// been checked, so the next probe must look again.
    pub fn close_unless_failed_since(&self, epoch: u64) {
        let mut inner = self.lock();
        if self.failure_epoch.load(Ordering::SeqCst) != epoch {
            return;
        }
        inner.consecutive_failures = 0;
        self.transition(&mut inner, BreakerState::Closed);
    }

    /// A live call succeeded. It may have started before the breaker opened,
    /// so it only resets the count of a breaker that is still closed.
    fn record_call_success(&self) {
        let mut inner = self.lock();
        if inner.state == BreakerState::Closed {
            inner.consecutive_failures = 0;
        }
    }

    pub fn record_failure(&self, error: &StoreError) {
        let mut inner = self.lock();
        self.failure_epoch.fetch_add(1, Ordering::SeqCst);
        inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
        inner.last_error = Some(error.to_string());
        let opens = match inner.state {
            // A refused connection is certain: nothing listens there.
            BreakerState::Closed => {
                inner.consecutive_failures >= self.threshold || error.is_refused()
            }
            BreakerState::HalfOpen | BreakerState::Open => true,
        };
        if opens {
            self.transition(&mut inner, BreakerState::Open);
        }
    }

    /// Opens the breaker at once (a tier found down at start).
    pub fn force_open(&self, error: &StoreError) {
        let mut inner = self.lock();
        self.failure_epoch.fetch_add(1, Ordering::SeqCst);
        inner.last_error = Some(error.to_string());
        inner.consecutive_failures = inner.consecutive_failures.max(self.threshold);
        self.transition(&mut inner, BreakerState::Open);
    }

    /// Takes the tier out of service although it answers (its copies may be
    /// stale): like [`Breaker::force_open`], but calls in flight finish. The
    /// tier will carry them out; failing them would answer 503 for writes
    /// it takes.
    pub fn suspend(&self, error: &StoreError) {
        let mut inner = self.lock();
        self.failure_epoch.fetch_add(1, Ordering::SeqCst);
        inner.last_error = Some(error.to_string());
        inner.consecutive_failures = inner.consecutive_failures.max(self.threshold);
        self.move_to(&mut inner, BreakerState::Open, false);
    }

    fn begin_trial(&self) {
        let mut inner = self.lock();
        if inner.state == BreakerState::Open {
            self.transition(&mut inner, BreakerState::HalfOpen);
        }
    }

    pub fn health(&self) -> TierHealth {
        let inner = self.lock();
        TierHealth {
            tier: match self.tier {
                Tier::Durable => "durable",
                Tier::Cache => "cache",
            },
            backend: self.backend,
            state: inner.state,
            since: inner.since,
            consecutive_failures: inner.consecutive_failures,
            last_error: inner.last_error.clone(),
            degradations: self.degradations.load(Ordering::Relaxed),
            probe_latency_ms: self
                .last_probe
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .map(|d| d.as_secs_f64() * 1e3),
        }
    }

    /// Starts or ends a simulated outage of the tier.
    pub fn simulate_outage(&self, down: bool) {
        tracing::warn!(tier = %self.tier, backend = self.backend, down, "simulated outage");
        self.simulated_outage.store(down, Ordering::SeqCst);
    }

    /// Whether an outage is being simulated: the tier counts as unreachable
    /// even for calls that go past the breaker.
    pub(crate) fn outage_simulated(&self) -> bool {
        self.simulated_outage.load(Ordering::SeqCst)
    }

    /// Runs `call` under `timeout`, or fails it at once during a simulated
    /// outage. A call that takes more than half its timeout asks the probe
    /// to look at once; one that times out is [`StoreError::Busy`]: it
    /// reached the tier, which may have carried it out, and a slow answer
    /// alone does not say the tier is down (the probe decides that).
    async fn attempt<T>(
        &self,
        timeout: Duration,
        call: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        if self.simulated_outage.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable(
                self.tier,
                format!("{} is down (simulated outage)", self.backend),
            ));
        }
        tokio::pin!(call);
        let half = timeout / 2;
        if let Ok(result) = tokio::time::timeout(half, &mut call).await {
            return result;
        }
        let _stalled = Stalled::enter(&self.stalled);
        self.probe_wanted.notify_one();
        match tokio::time::timeout(timeout - half, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::busy(
                self.tier,
                format!("{} did not answer within {timeout:?}", self.backend),
                true,
            )),
        }
    }

    /// Runs one of the probe's own calls under `timeout` (or fails it at
    /// once during a simulated outage). Unlike a live call's, a timeout
    /// here is the probe's evidence, not a request for a probe.
    async fn within<T>(
        &self,
        timeout: Duration,
        call: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        if self.outage_simulated() {
            return Err(StoreError::unavailable(
                self.tier,
                format!("{} is down (simulated outage)", self.backend),
            ));
        }
        match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::busy(
                self.tier,
                format!(
                    "{} did not answer the probe within {timeout:?}",
                    self.backend
                ),
                true,
            )),
        }
    }

    /// The probe's ping failed: a failure like any other, except while
    /// live calls hang as well, which opens the breaker at once (both got
    /// no answer: the tier is hung, not busy).
    fn probe_failed(&self, err: &StoreError) {
        tracing::debug!(tier = %self.tier, error = %err, "probe failed");
        if self.stalled.load(Ordering::SeqCst) > 0 {
            self.force_open(err);
        } else {
            self.record_failure(err);
        }
    }

    /// Remembers the round trip of a successful probe.
    fn probe_took(&self, elapsed: Duration) {
        *self.last_probe.lock().unwrap_or_else(|e| e.into_inner()) = Some(elapsed);
    }

    /// Runs one tier call under the breaker and a timeout.
    async fn call<T>(
        &self,
        timeout: Duration,
        call: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        // Registered before the state is read, so an opening in between is
        // not missed.
        let opened = self.opened.notified();
        tokio::pin!(opened);
        opened.as_mut().enable();
        if !self.is_closed() {
            return Err(StoreError::unavailable(
                self.tier,
                format!("{} breaker is open", self.backend),
            ));
        }
        let started = Instant::now();
        let result = tokio::select! {
            result = self.attempt(timeout, call) => result,
            () = opened => {
                // Another call or the probe found the tier down; this one
                // may or may not have reached it, like a timeout.
                self.stats.calls.fetch_add(1, Ordering::Relaxed);
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                // Sent, so it may have been carried out: its outcome is
                // unknown, as a timeout's is.
                return Err(StoreError::busy(
                    self.tier,
                    format!("{} went down while the call waited", self.backend),
                    true,
                ));
            }
        };
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        self.stats.latency.record(started.elapsed());
        match &result {
            // Busy, not dead: the probe, asked to look now, decides.
            Err(err) if err.is_busy() => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                self.probe_wanted.notify_one();
            }
            Err(err) if err.is_unavailable() => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                self.record_failure(err);
                self.probe_wanted.notify_one();
            }
            // An answer, even an error about the request, means the tier is up.
            _ => self.record_call_success(),
        }
        result
    }

    /// One probe: the half-open trial while open, a heartbeat while closed.
    async fn probe(&self, timeout: Duration, ping: impl Future<Output = StoreResult<()>>) {
        self.begin_trial();
        let epoch = self.failure_epoch();
        let started = Instant::now();
        match self.within(timeout, ping).await {
            Ok(()) => {
                self.probe_took(started.elapsed());
                self.close_unless_failed_since(epoch);
            }
            Err(err) => self.probe_failed(&err),
        }
    }
}

/// Counts a call among the stalled ones for as long as it lives.
struct Stalled<'a>(&'a AtomicU64);

impl<'a> Stalled<'a> {
    fn enter(count: &'a AtomicU64) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Stalled<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A durable tier behind its breaker.
pub(crate) struct GuardedDurable {
    pub inner: Arc<dyn DurableStore>,
    pub breaker: Arc<Breaker>,
    pub timeout: Duration,
}

/// A cache tier behind its breaker.
pub(crate) struct GuardedCache {
    pub inner: Arc<dyn CacheStore>,
    pub breaker: Arc<Breaker>,
    pub timeout: Duration,
    /// Records written while the cache could not be updated.
    pub dirty: Mutex<DirtyKeys>,
    /// The cache server's id when last seen healthy.
    pub server_id: Mutex<Option<String>>,
    /// Counter increments went around the cache: its bucket values are
    /// behind, and recovery drops them (they are seeded again).
    pub counters_dirty: std::sync::atomic::AtomicBool,
    /// Held by a write that records its commit around the cache, and by the
    /// recovery while it takes the last of those and closes the breaker: no
    /// write can fall between the two (see [`GuardedCache::wrote_around`]).
    gate: tokio::sync::Mutex<()>,
    /// Versions committed around the cache that the last recoveries
    /// removed older copies for: a write of this instance decided before the
    /// breaker closed, whose update arrives after, must not store its older
    /// version where the newer one was only removed (kept for a while).
    floors: Mutex<std::collections::HashMap<RecordKey, (Version, Instant)>>,
    /// Whether `floors` holds anything: writes look without the lock.
    floors_held: AtomicBool,
    /// A recovery trial found the cache reachable and is under way: the
    /// breaker is still open, but the tier answers (see
    /// [`GuardedCache::recovering`]).
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
/// breaker (see [`GuardedCache::past_breaker`]): a reachable cache
/// answers within a few milliseconds; a hung one must not hold every request
/// for the call timeout.
const PAST_BREAKER_WAIT: Duration = Duration::from_millis(25);

/// Longest a commit waits for its copy's update in a busy cache before the
/// cache is taken out of service (see [`GuardedCache::patiently`]).
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

impl GuardedDurable {
    pub async fn probe(&self) {
        self.breaker.probe(self.timeout, self.inner.ping()).await;
    }
}

impl GuardedCache {
    pub fn new(inner: Arc<dyn CacheStore>, breaker: Arc<Breaker>, timeout: Duration) -> Self {
        Self {
            inner,
            breaker,
            timeout,
            dirty: Mutex::new(DirtyKeys::default()),
            server_id: Mutex::new(None),
            counters_dirty: std::sync::atomic::AtomicBool::new(false),
            gate: tokio::sync::Mutex::new(()),
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
        if self.breaker.is_closed() {
            return false;
        }
        let _gate = self.gate.lock().await;
        if self.breaker.is_closed() {
            return false;
        }
        self.remember(key, Some(version));
        true
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
        self.breaker.force_open(err);
    }

    /// Every copy may be stale and could not be dropped now: the cache stops
    /// serving until its recovery has dropped them all.
    pub fn suspend_until_flushed(&self, err: &StoreError) {
        {
            let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
            dirty.keys.clear();
            dirty.overflowed = true;
        }
        self.breaker.force_open(err);
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
        self.breaker.begin_trial();
        let started = Instant::now();
        // First the ping, on the tier's probe connection: a dead or hung
        // cache shows there within the call timeout; a busy one answers.
        if let Err(err) = self.breaker.within(self.timeout, self.inner.ping()).await {
            return self.breaker.probe_failed(&err);
        }
        let check = self.check(durable_generation);
        let checked = match self.breaker.within(self.timeout * 4, check).await {
            Ok(checked) => checked,
            // It answered the ping: busy. A heartbeat looks again next time.
            Err(err) if err.is_busy() && self.breaker.is_closed() => {
                tracing::debug!(error = %err, "cache heartbeat cut short: the cache is busy");
                return;
            }
            Err(err) => return self.breaker.force_open(&err),
        };
        let _recovering = (!self.breaker.is_closed()).then(|| Recovering::begin(&self.recovering));
        if checked.everything {
            let reconciled = reconcile();
            if let Err(err) = self.breaker.within(RECONCILE_TIMEOUT, reconciled).await {
                tracing::warn!(error = %err, "the cache could not be reconciled yet; it stays out of service");
                return self.breaker.force_open(&err);
            }
        }
        if let Some(generation) = checked.stale_below {
            let recorded = self.inner.set_reconciled_generation(generation);
            if let Err(err) = self.breaker.within(self.timeout, recorded).await {
                return self.breaker.force_open(&err);
            }
        }
        let _gate = self.gate.lock().await;
        let written: Vec<(RecordKey, Option<Version>)> = {
            let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
            if checked.everything {
                // The pass above removed every copy these keys could have.
                *dirty = DirtyKeys::default();
            }
            if self.breaker.is_closed() {
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
                .breaker
                .within(self.timeout * 4, self.remove_older(&written));
            if let Err(err) = removed.await {
                // Remembered again for the next trial.
                for (key, version) in &written {
                    self.remember(key, *version);
                }
                return self.breaker.force_open(&err);
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
        self.breaker.probe_took(started.elapsed());
        self.breaker.close_unless_failed_since(checked.epoch);
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
        if self.breaker.outage_simulated() {
            return None;
        }
        let wait = if self.recovering() {
            self.timeout
        } else {
            PAST_BREAKER_WAIT
        };
        tokio::time::timeout(wait, call(&*self.inner))
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
        let opened = self.breaker.opened.notified();
        tokio::pin!(opened);
        opened.as_mut().enable();
        if !self.breaker.is_closed() || self.breaker.outage_simulated() {
            return Err(StoreError::unavailable(
                Tier::Cache,
                "the cache is out of service",
            ));
        }
        tokio::select! {
            result = tokio::time::timeout(PATIENCE, call(&*self.inner)) => {
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
        self.inner.invalidate(&unknown).await?;
        let older = written.iter().filter_map(|(key, version)| {
            version.map(|version| self.inner.invalidate_older(key, version))
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
        let server_id = self.inner.server_id().await?;
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
                let reconciled = self.inner.reconciled_generation().await?;
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
            self.breaker.suspend(&StoreError::unavailable(
                Tier::Cache,
                format!("{} {why}", self.inner.backend()),
            ));
        }
        // Decided now, after the round trips: the breaker may have opened
        // while this probe waited, and then this probe is the recovery.
        let epoch = self.breaker.failure_epoch();
        // Also while closed: an increment that went around the cache just as
        // it recovered is caught by the next heartbeat.
        if self.counters_dirty.swap(false, Ordering::AcqRel) || everything {
            // Taken down before the scan: an increment that goes around the
            // cache meanwhile sets it again for the next probe.
            if let Err(err) = self.inner.forget_counters().await {
                self.counters_dirty.store(true, Ordering::Release);
                return Err(err);
            }
            tracing::info!(
                "cache recovery dropped counter buckets; they are seeded again from the durable tier"
            );
        }
        if everything {
            let removed = self.inner.invalidate_all(false).await?;
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

#[async_trait]
impl DurableStore for GuardedDurable {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn ping(&self) -> StoreResult<()> {
        self.breaker.call(self.timeout, self.inner.ping()).await
    }
    async fn get(&self, key: &RecordKey, now: OffsetDateTime) -> StoreResult<Option<Record>> {
        self.breaker
            .call(self.timeout, self.inner.get(key, now))
            .await
    }
    async fn get_many(
        &self,
        collection: &CollectionName,
        ids: &[RecordId],
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Record>> {
        let call = self.inner.get_many(collection, ids, now);
        self.breaker.call(self.timeout, call).await
    }
    async fn put(&self, write: &RecordWrite) -> StoreResult<WriteOutcome> {
        self.breaker.call(self.timeout, self.inner.put(write)).await
    }
    async fn delete(
        &self,
        key: &RecordKey,
        precondition: Precondition,
        now: OffsetDateTime,
    ) -> StoreResult<Version> {
        let call = self.inner.delete(key, precondition, now);
        self.breaker.call(self.timeout, call).await
    }
    async fn list(&self, query: &ListQuery) -> StoreResult<ListPage> {
        self.breaker
            .call(self.timeout, self.inner.list(query))
            .await
    }
    async fn lookup(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Option<Record>> {
        let call = self.inner.lookup(collection, index, value, now);
        self.breaker.call(self.timeout, call).await
    }
    async fn apply_changes(&self, changes: &[Change], mode: ApplyMode) -> StoreResult<Vec<bool>> {
        let call = self.inner.apply_changes(changes, mode);
        self.breaker.call(self.timeout, call).await
    }
    async fn scan(
        &self,
        collection: &CollectionName,
        after: Option<&RecordId>,
        limit: usize,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Change>> {
        let call = self.inner.scan(collection, after, limit, now);
        self.breaker.call(self.timeout, call).await
    }
    async fn get_states(
        &self,
        collection: &CollectionName,
        ids: &[RecordId],
        now: OffsetDateTime,
    ) -> StoreResult<Vec<Change>> {
        let call = self.inner.get_states(collection, ids, now);
        self.breaker.call(self.timeout, call).await
    }
    async fn count(&self, collection: &CollectionName) -> StoreResult<u64> {
        let call = self.inner.count(collection);
        self.breaker.call(self.timeout, call).await
    }
    async fn load_control(&self) -> StoreResult<Option<ControlState>> {
        let call = self.inner.load_control();
        self.breaker.call(self.timeout, call).await
    }
    async fn save_control(&self, state: &ControlState) -> StoreResult<bool> {
        let call = self.inner.save_control(state);
        self.breaker.call(self.timeout, call).await
    }
    async fn cache_generation(&self) -> StoreResult<u64> {
        let call = self.inner.cache_generation();
        self.breaker.call(self.timeout, call).await
    }
    async fn bump_cache_generation(&self) -> StoreResult<u64> {
        let call = self.inner.bump_cache_generation();
        self.breaker.call(self.timeout, call).await
    }
    async fn hold(&self, held: &[(RecordKey, Version)]) -> StoreResult<()> {
        let call = self.inner.hold(held);
        self.breaker.call(self.timeout, call).await
    }
    async fn held_above(
        &self,
        collection: &CollectionName,
        ids: &[RecordId],
    ) -> StoreResult<Vec<(RecordId, Version)>> {
        let call = self.inner.held_above(collection, ids);
        self.breaker.call(self.timeout, call).await
    }
    async fn any_held_above(
        &self,
        collection: &CollectionName,
        after: Option<&RecordId>,
        until: Option<&RecordId>,
    ) -> StoreResult<bool> {
        let call = self.inner.any_held_above(collection, after, until);
        self.breaker.call(self.timeout, call).await
    }
    async fn release_held(&self, stale: Option<Duration>) -> StoreResult<u64> {
        let call = self.inner.release_held(stale);
        self.breaker.call(self.timeout, call).await
    }
    async fn apply_increments(&self, increments: &[CounterIncrement]) -> StoreResult<usize> {
        let call = self.inner.apply_increments(increments);
        self.breaker.call(self.timeout, call).await
    }
    async fn counter_snapshot(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
        op_ids: &[String],
    ) -> StoreResult<(Vec<BucketValues>, HashSet<String>)> {
        let call = self.inner.counter_snapshot(scope, buckets, op_ids);
        self.breaker.call(self.timeout, call).await
    }
    async fn set_index_entries(
        &self,
        key: &RecordKey,
        entries: &[IndexEntry],
        now: OffsetDateTime,
    ) -> StoreResult<()> {
        let call = self.inner.set_index_entries(key, entries, now);
        self.breaker.call(self.timeout, call).await
    }
    async fn scan_counters(
        &self,
        after: Option<&CounterValue>,
        limit: usize,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<CounterValue>> {
        let call = self.inner.scan_counters(after, limit, now);
        self.breaker.call(self.timeout, call).await
    }
    async fn restore_counters(
        &self,
        values: &[CounterValue],
        force: bool,
    ) -> StoreResult<Vec<bool>> {
        let call = self.inner.restore_counters(values, force);
        self.breaker.call(self.timeout, call).await
    }
    async fn purge_expired(
        &self,
        now: OffsetDateTime,
        tombstone_retention: Duration,
    ) -> StoreResult<u64> {
        let call = self.inner.purge_expired(now, tombstone_retention);
        self.breaker.call(self.timeout, call).await
    }
}

#[async_trait]
impl CacheStore for GuardedCache {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn ping(&self) -> StoreResult<()> {
        self.breaker.call(self.timeout, self.inner.ping()).await
    }
    async fn server_id(&self) -> StoreResult<Option<String>> {
        self.breaker
            .call(self.timeout, self.inner.server_id())
            .await
    }
    async fn invalidate(&self, keys: &[RecordKey]) -> StoreResult<()> {
        self.breaker
            .call(self.timeout, self.inner.invalidate(keys))
            .await
    }
    async fn invalidate_all(&self, pinned_too: bool) -> StoreResult<u64> {
        self.breaker
            .call(self.timeout, self.inner.invalidate_all(pinned_too))
            .await
    }
    async fn invalidate_older(&self, key: &RecordKey, version: Version) -> StoreResult<bool> {
        let call = self.inner.invalidate_older(key, version);
        self.breaker.call(self.timeout, call).await
    }
    async fn get(&self, key: &RecordKey) -> StoreResult<CacheEntry> {
        self.breaker.call(self.timeout, self.inner.get(key)).await
    }
    async fn get_many(&self, keys: &[RecordKey]) -> StoreResult<Vec<CacheEntry>> {
        self.breaker
            .call(self.timeout, self.inner.get_many(keys))
            .await
    }
    async fn store(&self, record: &Record, ttl: Duration) -> StoreResult<bool> {
        self.breaker
            .call(self.timeout, self.inner.store(record, ttl))
            .await
    }
    async fn store_deleted(
        &self,
        key: &RecordKey,
        version: Version,
        ttl: Duration,
    ) -> StoreResult<bool> {
        let call = self.inner.store_deleted(key, version, ttl);
        self.breaker.call(self.timeout, call).await
    }
    async fn lookup_hint(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
    ) -> StoreResult<Option<RecordId>> {
        let call = self.inner.lookup_hint(collection, index, value);
        self.breaker.call(self.timeout, call).await
    }
    async fn store_lookup_hint(
        &self,
        collection: &CollectionName,
        index: &IndexName,
        value: &str,
        id: &RecordId,
        ttl: Duration,
    ) -> StoreResult<()> {
        let call = self
            .inner
            .store_lookup_hint(collection, index, value, id, ttl);
        self.breaker.call(self.timeout, call).await
    }
    async fn accept_write(&self, write: &CacheWrite) -> StoreResult<CacheWriteOutcome> {
        self.breaker
            .call(self.timeout, self.inner.accept_write(write))
            .await
    }
    async fn read_journal(
        &self,
        consumer: &str,
        max: usize,
        recover: Option<Duration>,
    ) -> StoreResult<Vec<JournalEntry>> {
        let call = self.inner.read_journal(consumer, max, recover);
        self.breaker.call(self.timeout, call).await
    }
    async fn ack_journal(&self, acks: &[JournalAck]) -> StoreResult<()> {
        self.breaker
            .call(self.timeout, self.inner.ack_journal(acks))
            .await
    }
    async fn journal_backlog(&self, kind: JournalKind) -> StoreResult<u64> {
        self.breaker
            .call(self.timeout, self.inner.journal_backlog(kind))
            .await
    }
    async fn list(&self, query: &ListQuery) -> StoreResult<ListPage> {
        self.breaker
            .call(self.timeout, self.inner.list(query))
            .await
    }
    async fn scan(
        &self,
        collection: &CollectionName,
        cursor: u64,
        count: usize,
    ) -> StoreResult<(u64, Vec<CachedState>)> {
        let call = self.inner.scan(collection, cursor, count);
        self.breaker.call(self.timeout, call).await
    }
    async fn pinned(&self, query: &ListQuery) -> StoreResult<Vec<Change>> {
        let call = self.inner.pinned(query);
        self.breaker.call(self.timeout, call).await
    }
    async fn set_aside(&self, refused: &[(JournalEntry, String)]) -> StoreResult<()> {
        let call = self.inner.set_aside(refused);
        self.breaker.call(self.timeout, call).await
    }
    async fn reconciled_generation(&self) -> StoreResult<u64> {
        let call = self.inner.reconciled_generation();
        self.breaker.call(self.timeout, call).await
    }
    async fn set_reconciled_generation(&self, generation: u64) -> StoreResult<()> {
        let call = self.inner.set_reconciled_generation(generation);
        self.breaker.call(self.timeout, call).await
    }
    async fn dead_letters(&self) -> StoreResult<u64> {
        let call = self.inner.dead_letters();
        self.breaker.call(self.timeout, call).await
    }
    async fn get_states(&self, keys: &[RecordKey]) -> StoreResult<Vec<Option<CachedState>>> {
        let call = self.inner.get_states(keys);
        self.breaker.call(self.timeout, call).await
    }
    async fn copy_in(
        &self,
        state: &Change,
        lifetime: Duration,
        authoritative: bool,
        force: bool,
    ) -> StoreResult<CopyOutcome> {
        let call = self.inner.copy_in(state, lifetime, authoritative, force);
        self.breaker.call(self.timeout, call).await
    }
    async fn load_control(&self) -> StoreResult<Option<ControlState>> {
        self.breaker
            .call(self.timeout, self.inner.load_control())
            .await
    }
    async fn publish_control(&self, state: &ControlState) -> StoreResult<()> {
        let call = self.inner.publish_control(state);
        self.breaker.call(self.timeout, call).await
    }
    async fn subscribe_control(&self) -> StoreResult<BoxStream<'static, ControlState>> {
        self.breaker
            .call(self.timeout, self.inner.subscribe_control())
            .await
    }
    async fn increment(&self, increment: &CounterIncrement) -> StoreResult<CacheIncrementOutcome> {
        let call = self.inner.increment(increment);
        self.breaker.call(self.timeout, call).await
    }
    async fn seed_buckets(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
        values: &[BucketValues],
        complete: bool,
    ) -> StoreResult<()> {
        let call = self.inner.seed_buckets(scope, buckets, values, complete);
        self.breaker.call(self.timeout, call).await
    }
    async fn counter_buckets(
        &self,
        scope: &CounterScope,
        buckets: &[Bucket],
    ) -> StoreResult<Vec<Option<(BucketValues, bool)>>> {
        let call = self.inner.counter_buckets(scope, buckets);
        self.breaker.call(self.timeout, call).await
    }
    async fn read_counter_journal(
        &self,
        consumer: &str,
        max: usize,
        recover: Option<Duration>,
    ) -> StoreResult<Vec<CounterJournalEntry>> {
        let call = self.inner.read_counter_journal(consumer, max, recover);
        self.breaker.call(self.timeout, call).await
    }
    async fn ack_counter_journal(&self, positions: &[JournalPosition]) -> StoreResult<()> {
        let call = self.inner.ack_counter_journal(positions);
        self.breaker.call(self.timeout, call).await
    }
    async fn counter_backlog(&self) -> StoreResult<u64> {
        self.breaker
            .call(self.timeout, self.inner.counter_backlog())
            .await
    }
    async fn pending_increments(
        &self,
        scope: &CounterScope,
        limit: usize,
    ) -> StoreResult<Option<Vec<CounterIncrement>>> {
        let call = self.inner.pending_increments(scope, limit);
        self.breaker.call(self.timeout, call).await
    }
    async fn forget_buckets(&self, scope: &CounterScope, buckets: &[Bucket]) -> StoreResult<()> {
        let call = self.inner.forget_buckets(scope, buckets);
        self.breaker.call(self.timeout, call).await
    }
    async fn forget_counters(&self) -> StoreResult<u64> {
        self.breaker
            .call(self.timeout, self.inner.forget_counters())
            .await
    }
    async fn claim_idempotency(
        &self,
        owner: &str,
        key: &str,
        fingerprint: &str,
        pending_ttl: Duration,
    ) -> StoreResult<IdempotencyClaim> {
        let call = self
            .inner
            .claim_idempotency(owner, key, fingerprint, pending_ttl);
        self.breaker.call(self.timeout, call).await
    }
    async fn complete_idempotency(
        &self,
        owner: &str,
        key: &str,
        fingerprint: &str,
        response: &[u8],
        ttl: Duration,
        bounds: ReplayBounds,
    ) -> StoreResult<bool> {
        let call = self
            .inner
            .complete_idempotency(owner, key, fingerprint, response, ttl, bounds);
        self.breaker.call(self.timeout, call).await
    }
    async fn release_idempotency(&self, owner: &str, key: &str) -> StoreResult<()> {
        let call = self.inner.release_idempotency(owner, key);
        self.breaker.call(self.timeout, call).await
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn down() -> StoreError {
        StoreError::unavailable(Tier::Cache, "connection refused")
    }

    #[test]
    fn opens_after_the_threshold_and_closes_on_success() {
        let breaker = Breaker::new(Tier::Cache, "redis", 3);
        breaker.record_failure(&down());
        breaker.record_failure(&down());
        assert_eq!(breaker.state(), BreakerState::Closed);
        breaker.record_failure(&down());
        assert_eq!(breaker.state(), BreakerState::Open);
        assert_eq!(breaker.health().degradations, 1);
        breaker.begin_trial();
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        breaker.record_failure(&down());
        assert_eq!(
            breaker.state(),
            BreakerState::Open,
            "a failed trial reopens"
        );
        breaker.record_success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.health().consecutive_failures, 0);
    }

    #[tokio::test]
    async fn a_call_in_flight_when_the_breaker_opens_fails_then_and_does_not_close_it() {
        let breaker = Breaker::new(Tier::Cache, "redis", 1);
        let started = Instant::now();
        let slow_success = breaker.call(Duration::from_secs(5), async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok(())
        });
        let failure = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            breaker.record_failure(&down());
        };
        let (result, ()) = tokio::join!(slow_success, failure);
        assert!(
            result.is_err_and(|err| err.is_unavailable()),
            "released as unavailable"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "released when the breaker opened, not at the end of the call: {:?}",
            started.elapsed()
        );
        assert_eq!(
            breaker.state(),
            BreakerState::Open,
            "only a probe closes it"
        );
    }

    #[test]
    fn a_refused_connection_opens_the_breaker_at_once() {
        let breaker = Breaker::new(Tier::Durable, "postgres", 3);
        let refused = StoreError::unavailable(
            Tier::Durable,
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        );
        assert!(refused.is_refused());
        assert!(!down().is_refused());
        breaker.record_failure(&down());
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "one timeout is not certain"
        );
        breaker.record_failure(&refused);
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[test]
    fn a_probe_does_not_close_over_a_failure_it_has_not_seen() {
        let breaker = Breaker::new(Tier::Cache, "redis", 1);
        breaker.record_failure(&down());
        let epoch = breaker.failure_epoch();
        breaker.record_failure(&down());
        breaker.close_unless_failed_since(epoch);
        assert_eq!(breaker.state(), BreakerState::Open);
        breaker.close_unless_failed_since(breaker.failure_epoch());
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn a_success_resets_the_count() {
        let breaker = Breaker::new(Tier::Durable, "postgres", 2);
        breaker.record_failure(&down());
        breaker.record_call_success();
        breaker.record_failure(&down());
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test]
    async fn a_slow_call_is_busy_and_an_open_breaker_fails_fast() {
        let breaker = Breaker::new(Tier::Durable, "postgres", 1);
        let slow = breaker
            .call(Duration::from_millis(20), async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(slow.is_busy() && slow.is_unavailable(), "{slow}");
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "a timeout alone does not say the tier is down"
        );
        breaker.record_failure(&down());
        assert_eq!(breaker.state(), BreakerState::Open);
        let started = Instant::now();
        let refused = breaker.call(Duration::from_secs(5), async { Ok(()) }).await;
        assert!(refused.unwrap_err().is_unavailable());
        assert!(
            started.elapsed() < Duration::from_millis(5),
            "no waiting while open"
        );
    }

    /// Busy or hung: while a call hangs past half its timeout, the probe
    /// is asked at once; a ping that answers keeps the breaker closed, one
    /// that does not opens it at once (both got no answer).
    #[tokio::test]
    async fn the_probe_tells_a_busy_tier_from_a_hung_one() {
        let breaker = Arc::new(Breaker::new(Tier::Cache, "redis", 3));
        let hanging = {
            let breaker = breaker.clone();
            tokio::spawn(async move {
                breaker
                    .call(Duration::from_millis(400), async {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        Ok(())
                    })
                    .await
            })
        };
        tokio::time::timeout(Duration::from_secs(1), breaker.probe_wanted.notified())
            .await
            .expect("a stalled call asks for a probe");
        breaker
            .probe(Duration::from_millis(50), async { Ok(()) })
            .await;
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "busy: the ping answers"
        );
        breaker
            .probe(Duration::from_millis(50), async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(())
            })
            .await;
        assert_eq!(
            breaker.state(),
            BreakerState::Open,
            "hung: the ping does not"
        );
        assert!(hanging.await.unwrap().unwrap_err().is_unavailable());
    }

    #[tokio::test]
    async fn request_errors_do_not_count_as_failures() {
        let breaker = Breaker::new(Tier::Durable, "postgres", 1);
        let _ = breaker
            .call::<()>(Duration::from_secs(1), async {
                Err(StoreError::PreconditionFailed)
            })
            .await;
        assert_eq!(breaker.state(), BreakerState::Closed);
    }
}
