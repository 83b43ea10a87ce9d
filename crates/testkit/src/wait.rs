//! Small waiting helpers for tests that drive servers.

use std::future::Future;
use std::time::{Duration, Instant};

/// Runs blocking work (starting, killing, restarting a server) off the async
/// runtime's threads.
pub async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .expect("blocking task")
}

/// Polls `check` every 50 ms until it holds or `limit` passes; whether it held.
pub async fn until<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
