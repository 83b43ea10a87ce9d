//! One wrapper puts any tier behind its breaker: every call goes through
//! [`Guarded::call`], so a role method added to a tier needs nothing here.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hybridstore_core::{Backend, StoreResult};

use crate::breaker::Breaker;

/// How a call reaches the tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// Through the breaker and its timeout: every request's call.
    Breaker,
    /// Straight to the tier, past an open breaker: the recovery that will
    /// close it.
    Direct,
}

/// A tier (or any role of one) behind its breaker and call timeout.
pub(crate) struct Guarded<T: ?Sized> {
    /// The tier itself, past the breaker: probes, and tools that look into
    /// it behind the service's back.
    pub tier: Arc<T>,
    pub breaker: Arc<Breaker>,
    /// Longest one call may take.
    pub timeout: Duration,
}

impl<T: Backend + ?Sized> Guarded<T> {
    pub fn new(tier: Arc<T>, breaker: Breaker, timeout: Duration) -> Self {
        Self {
            tier,
            breaker: Arc::new(breaker),
            timeout,
        }
    }

    /// Runs one tier call under the breaker and the timeout: fails at once
    /// while the breaker is open, counts failures that say the tier is
    /// down, and lets a slow answer wake the probe (see [`Breaker::call`]).
    pub async fn call<'a, R, F>(&'a self, call: impl FnOnce(&'a T) -> F) -> StoreResult<R>
    where
        F: Future<Output = StoreResult<R>>,
    {
        self.breaker.call(self.timeout, call(&self.tier)).await
    }

    /// Runs one call on the route given: through the breaker, or past it
    /// (a recovery's own calls, made while the breaker is still open).
    pub async fn call_on<'a, R, F>(
        &'a self,
        route: Route,
        call: impl FnOnce(&'a T) -> F,
    ) -> StoreResult<R>
    where
        F: Future<Output = StoreResult<R>>,
    {
        match route {
            Route::Breaker => self.call(call).await,
            Route::Direct => call(&self.tier).await,
        }
    }

    pub fn backend(&self) -> &'static str {
        self.tier.backend()
    }

    /// One probe: a ping on the tier, past the breaker (see
    /// [`Breaker::probe`]).
    pub async fn probe(&self) {
        self.breaker.probe(self.timeout, self.tier.ping()).await;
    }
}
