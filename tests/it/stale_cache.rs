//! Redis must never serve a copy older than an acknowledged write: not after a
//! hang during which writes went to PostgreSQL only, and not after a restart
//! that reloaded old data from its append-only file.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hybridstore_testkit::{Redis, RedisPersistence, TestApp, blocking, etag_version, shared};
use reqwest::StatusCode;
use serde_json::json;

async fn app_on(redis: Arc<Redis>) -> TestApp {
    let postgres = blocking(|| shared().postgres.clone()).await;
    TestApp::builder().servers(postgres, redis).spawn().await
}

/// Reads `id` repeatedly for `period`, asserting each read answers at least
/// `floor`; returns how many reads were made.
async fn reads_never_below(app: &TestApp, id: &str, floor: u64, period: Duration) -> usize {
    let deadline = Instant::now() + period;
    let mut reads = 0;
    while Instant::now() < deadline {
        let response = app.get("accounts", id).await;
        assert_eq!(response.status(), StatusCode::OK);
        let version = etag_version(&response);
        assert!(
            version >= floor,
            "read v{version} after v{floor} was acknowledged"
        );
        reads += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reads
}

#[tokio::test]
async fn a_redis_restart_that_reloads_an_old_snapshot_never_serves_it() {
    let redis = Arc::new(blocking(|| Redis::start(RedisPersistence::Snapshot)).await);
    let app = app_on(redis.clone()).await;
    let v1 = etag_version(&app.put("accounts", "a", json!({"n": 1})).await);
    redis::cmd("SAVE")
        .query_async::<()>(&mut app.pg().redis.clone())
        .await
        .unwrap();
    // v2 reaches the cache normally: nothing marks it dirty.
    let v2 = etag_version(&app.put("accounts", "a", json!({"n": 2})).await);
    assert_eq!(
        app.redis_copy("accounts", "a").await.map(|c| c.version),
        Some(v2)
    );
    assert!(v2 > v1);

    // kill -9 and restart: the server reloads the snapshot holding v1. Only
    // its new run_id tells the service that its copies cannot be trusted.
    let server = redis.clone();
    blocking(move || {
        server.kill();
        server.restart();
    })
    .await;
    let reads = reads_never_below(&app, "a", v2, Duration::from_secs(2)).await;
    assert!(reads > 10);
    assert_eq!(
        app.redis_copy("accounts", "a").await.map(|c| c.version),
        Some(v2)
    );
}

#[tokio::test]
async fn a_redis_restart_with_writes_during_the_outage_never_serves_old_copies() {
    let redis = Arc::new(blocking(|| Redis::start(RedisPersistence::AppendOnly)).await);
    let app = app_on(redis.clone()).await;
    let v1 = etag_version(&app.put("accounts", "a", json!({"n": 1})).await);
    assert_eq!(
        app.redis_copy("accounts", "a").await.map(|c| c.version),
        Some(v1)
    );
    // Let the append-only file (fsync every second) take v1 in.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let server = redis.clone();
    blocking(move || server.kill()).await;
    let written = app.put("accounts", "a", json!({"n": 2})).await;
    assert_eq!(
        written.status(),
        StatusCode::OK,
        "PostgreSQL takes the write"
    );
    let v2 = etag_version(&written);

    // The restarted Redis reloads v1 from its file; no read may return it.
    let server = redis.clone();
    blocking(move || server.restart()).await;
    let reads = reads_never_below(&app, "a", v2, Duration::from_secs(2)).await;
    assert!(reads > 10);
    assert_eq!(
        app.redis_copy("accounts", "a").await.map(|c| c.version),
        Some(v2),
        "the cache serves again, with the current version"
    );
}

#[tokio::test]
async fn writes_made_while_redis_hangs_are_not_served_stale_after_it_resumes() {
    let redis = Arc::new(blocking(|| Redis::start(RedisPersistence::None)).await);
    let app = app_on(redis.clone()).await;
    let v1 = etag_version(&app.put("accounts", "a", json!({"n": 1})).await);
    assert_eq!(etag_version(&app.get("accounts", "a").await), v1);

    let server = redis.clone();
    blocking(move || server.pause()).await;
    // The first write waits out the cache call timeout, then the cache is
    // routed around; later writes do not wait at all.
    let written = app.put("accounts", "a", json!({"n": 2})).await;
    assert_eq!(written.status(), StatusCode::OK);
    let started = Instant::now();
    let written = app.put("accounts", "a", json!({"n": 3})).await;
    assert_eq!(written.status(), StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "took {:?}",
        started.elapsed()
    );
    let v3 = etag_version(&written);
    assert_eq!(etag_version(&app.get("accounts", "a").await), v3);

    // Same server, same run_id, still holding v1: recovery must remove it.
    let server = redis.clone();
    blocking(move || server.resume()).await;
    let reads = reads_never_below(&app, "a", v3, Duration::from_secs(2)).await;
    assert!(reads > 10);
    assert_eq!(
        app.redis_copy("accounts", "a").await.map(|c| c.version),
        Some(v3)
    );
}
