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

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hybridstore_api::{BreakerState, TierHealth};
use hybridstore_core::{StoreError, StoreResult, Tier};
use time::OffsetDateTime;

use crate::stats::TierStats;

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

struct BreakerInner {
    state: BreakerState,
    consecutive_failures: u32,
    since: OffsetDateTime,
    /// When the tier last went out of service (the breaker left closed).
    left_closed: Option<std::time::Instant>,
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
    pub(crate) opened: tokio::sync::Notify,
    /// Asks for a probe now: a live call failed, and the probe can tell a
    /// dead tier (connection refused) from a slow one at once.
    pub(crate) probe_wanted: tokio::sync::Notify,
    /// Calls running past half their timeout right now. A probe that fails
    /// meanwhile opens the breaker at once: live calls and the ping both
    /// got no answer, the tier is hung rather than busy.
    stalled: AtomicU64,
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
                left_closed: None,
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

    /// How long the tier has been out of service: since the breaker last
    /// left closed (half-open trials in between do not count as service);
    /// `None` while closed.
    pub fn out_of_service_for(&self) -> Option<Duration> {
        self.lock().left_closed.map(|at| at.elapsed())
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
        if to == BreakerState::Closed {
            inner.left_closed = None;
        } else if from == BreakerState::Closed {
            inner.left_closed = Some(std::time::Instant::now());
        }
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

    pub(crate) fn begin_trial(&self) {
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
            }
            .to_owned(),
            backend: self.backend.to_owned(),
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
    #[cfg(feature = "test-hooks")]
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
    pub(crate) async fn attempt<T>(
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
    pub(crate) async fn within<T>(
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
    pub(crate) fn probe_failed(&self, err: &StoreError) {
        tracing::debug!(tier = %self.tier, error = %err, "probe failed");
        if self.stalled.load(Ordering::SeqCst) > 0 {
            self.force_open(err);
        } else {
            self.record_failure(err);
        }
    }

    /// Remembers the round trip of a successful probe.
    pub(crate) fn probe_took(&self, elapsed: Duration) {
        *self.last_probe.lock().unwrap_or_else(|e| e.into_inner()) = Some(elapsed);
    }

    /// Runs one tier call under the breaker and a timeout.
    pub(crate) async fn call<T>(
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
                self.stats.count(true, None);
                // Sent, so it may have been carried out: its outcome is
                // unknown, as a timeout's is.
                return Err(StoreError::busy(
                    self.tier,
                    format!("{} went down while the call waited", self.backend),
                    true,
                ));
            }
        };
        let failed = result
            .as_ref()
            .is_err_and(|err| err.is_busy() || err.is_unavailable());
        self.stats.count(failed, Some(started.elapsed()));
        match &result {
            // Busy, not dead: the probe, asked to look now, decides.
            Err(err) if err.is_busy() => {
                self.probe_wanted.notify_one();
            }
            Err(err) if err.is_unavailable() => {
                self.record_failure(err);
                self.probe_wanted.notify_one();
            }
            // An answer, even an error about the request, means the tier is up.
            _ => self.record_call_success(),
        }
        result
    }

    /// One probe: the half-open trial while open, a heartbeat while closed.
    pub(crate) async fn probe(
        &self,
        timeout: Duration,
        ping: impl Future<Output = StoreResult<()>>,
    ) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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
